"""Semantic IDs: item features -> fused embedding -> residual quantization -> unique code tuples.

Light on import (numpy only): the artifact and encoders load without torch; RQ-VAE training imports torch
inside :mod:`models.semantic_ids.rqvae` only when a build asks for it.
"""

from models.semantic_ids.artifact import FORMAT_VERSION, ArtifactError, SemanticIdArtifact
from models.semantic_ids.build import SemanticIdConfig, build_semantic_ids, stage1
from models.semantic_ids.encoders import ENCODERS, ItemEncoder, register_encoder

__all__ = [
    "ENCODERS",
    "FORMAT_VERSION",
    "ArtifactError",
    "ItemEncoder",
    "SemanticIdArtifact",
    "SemanticIdConfig",
    "build_semantic_ids",
    "register_encoder",
    "stage1",
]
