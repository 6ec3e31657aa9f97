"""HybridCache: what a hybrid decoder must remember between chunks and tokens.

Attention layers keep K and V for every past position, preallocated to `max_len` so decode never
reallocates: (batch, max_len, kv_heads, head_dim) — flash-attn's KV-cache layout, written in place at
`cache_seqlens`. Mamba layers keep a constant-size state whatever the length: the last d_conv-1 conv
inputs (batch, d_inner, d_conv-1) and the SSM state (batch, d_inner, d_state) in float32 (the scan
carries its state in float32; rounding it to bf16 between chunks would drift from one-shot prefill).

`cache_seqlens[b]` is the number of tokens row b has consumed; rows may differ (prompts of different
lengths are prefilled row by row into `cache.row(b)`, a view that shares storage with the full cache).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import LMConfig


class HybridCache:
    def __init__(self, config: LMConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, _tensors: Optional[dict] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if max_len < 1:
            raise ValueError(f"max_len: expected >= 1, got {max_len}")
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        if _tensors is not None:  # a view built by row()
            self.key, self.value = _tensors["key"], _tensors["value"]
            self.conv_state, self.ssm_state = _tensors["conv_state"], _tensors["ssm_state"]
            self.cache_seqlens = _tensors["cache_seqlens"]
            return
        mixers = config.layer_mixers
        kv_shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
        conv_shape = (batch_size, config.d_inner, config.mamba.d_conv - 1)
        ssm_shape = (batch_size, config.d_inner, config.mamba.d_state)

        def per_layer(kind, shape, dt):
            return [torch.zeros(shape, dtype=dt, device=device) if m == kind else None for m in mixers]

        self.key = per_layer("attention", kv_shape, dtype)
        self.value = per_layer("attention", kv_shape, dtype)
        self.conv_state = per_layer("mamba", conv_shape, dtype)
        self.ssm_state = per_layer("mamba", ssm_shape, torch.float32)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)

    def row(self, index: int) -> "HybridCache":
        """A batch-1 view of row `index`; writes through it (K/V, states, cache_seqlens) land in this cache."""
        if not 0 <= index < self.batch_size:
            raise IndexError(f"index: expected 0..{self.batch_size - 1}, got {index}")
        pick = lambda ts: [t[index:index + 1] if t is not None else None for t in ts]  # noqa: E731
        return HybridCache(self.config, 1, self.max_len, _tensors={
            "key": pick(self.key), "value": pick(self.value), "conv_state": pick(self.conv_state),
            "ssm_state": pick(self.ssm_state), "cache_seqlens": self.cache_seqlens[index:index + 1]})

    def check_room(self, seqlen: int) -> None:
        longest = int(self.cache_seqlens.max()) + seqlen
        if longest > self.max_len:
            raise ValueError(f"cache: {seqlen} more tokens need {longest} positions, but max_len is {self.max_len}; "
                             f"allocate a larger HybridCache")

    def advance(self, seqlen: int) -> None:
        """Called once per forward, after every layer has read the same (pre-chunk) cache_seqlens."""
        self.cache_seqlens += seqlen

    def reset(self) -> None:
        for t in self.key + self.value + self.conv_state + self.ssm_state:
            if t is not None:
                t.zero_()
        self.cache_seqlens.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in self.key + self.value + self.conv_state + self.ssm_state if t is not None)


__all__ = ["HybridCache"]
