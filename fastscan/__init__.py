"""fastscan: Triton, CUDA and C++ kernels for hybrid Mamba + Transformer models.

Public API (signatures follow mamba-ssm / causal-conv1d / flash-attn so they are drop-in):
  selective_scan_fn      Mamba-1 selective scan, forward and backward, with initial/last state
  available_backends     which backends this machine can run
"""
from .backends import available_backends
from .selective_scan import selective_scan_fn

__all__ = ["available_backends", "selective_scan_fn"]
__version__ = "0.1.0"
