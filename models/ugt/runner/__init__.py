"""The GPU/CPU model runner behind ``models.ugt.inference.UGTInference``, one job per module (as vLLM splits
its runner): ``config``, ``batch`` (packing), ``slot_cache`` (KV slots), ``graphs`` (CUDA graphs by batch descriptor),
``compiled`` (torch.compile on CPU), ``stack`` (prefill/decode), ``catalog`` (the item table), and the heads:
``retrieval``, ``beam``, ``merge``, ``head_runner`` (which also runs target-aware ranking), ``outputs``.
"""
