"""Baselines run in the same harness as UGT: SASRec (sampled softmax, as HSTU's repo) and popularity."""
