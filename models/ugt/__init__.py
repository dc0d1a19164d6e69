"""UGT: the Unified Generative Transformer (HSTU attention + MoE FFN + GLN, multi-scale input, two heads).

One small module per idea, each with its config dataclass: embedding, multiscale, moe, gln, heads, model.
"""
