"""What several layers share, one place each: limits on ids, token vocabularies, the user-state rule,
Redis key layouts, topic and feature names, the generic dataset format.

Layer 2 of the house (infra.settings < contracts < streams < models < jobs < serving < bench, ugt):
it imports only the standard library, numpy and ``infra.settings``, never Kafka, Flink, Feast or torch.
"""
