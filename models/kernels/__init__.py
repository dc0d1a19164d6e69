"""Fused GPU kernels (Triton) beside their PyTorch references; the references always run."""
