"""fastscan: Triton, CUDA and C++ kernels for hybrid Mamba + Transformer models.

Public API (signatures follow mamba-ssm / causal-conv1d / flash-attn so they are drop-in):
  selective_scan_fn        Mamba-1 selective scan, forward and backward, with initial/last state; packed
                           sequences (cu_seqlens) here and in causal_conv1d_fn
  selective_state_update   Mamba-1 decode step: advances the SSM state in place for one token
  causal_conv1d_fn         causal depthwise conv1d (causal-conv1d's signature), forward and backward
  causal_conv1d_update     its decode step: advances conv_state in place for new tokens
  flash_attn_func          flash attention (flash-attn's layout), GQA, causal bottom-right, backward
  flash_attn_varlen_func   flash attention over packed variable-length sequences (cu_seqlens), backward
  flash_attn_with_kvcache  attention through a KV cache written in place: chunked prefill and decode
  pool2d_tokens            2D pooling of vision patch tokens, optionally scattered into embedding rows
  available_backends       which backends this machine can run
"""
from .backends import available_backends
from .attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from .causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from .pool2d import pool2d_tokens
from .selective_scan import selective_scan_fn
from .state_update import selective_state_update

__all__ = ["available_backends", "causal_conv1d_fn", "causal_conv1d_update", "flash_attn_func",
           "flash_attn_varlen_func", "flash_attn_with_kvcache", "pool2d_tokens", "selective_scan_fn", "selective_state_update"]
__version__ = "0.1.0"
