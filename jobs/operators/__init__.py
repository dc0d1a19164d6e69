"""Flink operator classes of the UGT jobs: thin adapters from PyFlink functions to the pure logic modules."""
