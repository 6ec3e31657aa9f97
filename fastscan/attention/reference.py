"""Attention in pure PyTorch: the float64 oracle (explicit softmax) and the `torch` backend (SDPA).

Masking, shared by every backend (query row i of batch b, key position j, kv_len = keys of row b):
    offset      = kv_len - seqlen_q                   causal alignment is bottom-right (flash-attn >= 2.1)
    visible     = j < kv_len
    causal      : visible &= j <= i + offset
    self_only[b, i] : visible = (j == i + offset) & (0 <= j < kv_len)  (own key only; causal or not)
A row that sees no key outputs 0 (flash-attn's convention), and its gradient is 0.
GQA: query head h reads kv head h // (heads // kv_heads).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention_mask", "attention_ref", "attention_sdpa", "write_kv_cache", "kvcache_ref"]


def attention_mask(seqlen_q: int, seqlen_k: int, causal: bool, self_only: Optional[Tensor] = None,
                   kv_lens: Optional[Tensor] = None, device=None) -> Tensor:
    """Boolean (batch or 1, 1, seqlen_q, seqlen_k): True where query i sees key j."""
    i = torch.arange(seqlen_q, device=device).view(1, 1, -1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, 1, 1, -1)
    kv_len = (kv_lens.to(device=device, dtype=torch.long).view(-1, 1, 1, 1) if kv_lens is not None
              else torch.full((1, 1, 1, 1), seqlen_k, device=device, dtype=torch.long))
    diagonal = i + (kv_len - seqlen_q)
    visible = j < kv_len
    if causal:
        visible = visible & (j <= diagonal)
    if self_only is not None:
        own = (j == diagonal) & (j < kv_len)
        visible = torch.where(self_only.to(device=device, dtype=torch.bool).view(self_only.shape[0], 1, -1, 1),
                              own, visible)
    return visible


def _heads_first(q, k, v):
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seqlen, headdim)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return q, k, v


def attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, softmax_scale: Optional[float] = None,
                  self_only: Optional[Tensor] = None, kv_lens: Optional[Tensor] = None) -> Tensor:
    """Explicit softmax(q k^T * scale + mask) v, in float64 for float64 inputs, else float32 then q's dtype.

    q (batch, seqlen_q, heads, headdim), k/v (batch, seqlen_k, kv_heads, headdim); kv_lens (batch,)
    limits the keys of each batch row (a KV cache); returns (batch, seqlen_q, heads, headdim).
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh = (t.to(compute) for t in _heads_first(q, k, v))
    mask = attention_mask(q.shape[1], k.shape[1], causal, self_only, kv_lens, q.device)
    # Rows that see nothing get an all-True fill mask (finite softmax), then p * mask zeroes them.
    fill = mask | ~mask.any(dim=-1, keepdim=True)
    scores = torch.einsum("bhid,bhjd->bhij", qh, kh) * scale
    p = torch.softmax(scores.masked_fill(~fill, float("-inf")), dim=-1) * mask
    out = torch.einsum("bhij,bhjd->bhid", p, vh)
    return out.transpose(1, 2).to(q.dtype)


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, softmax_scale: Optional[float] = None,
                   self_only: Optional[Tensor] = None, kv_lens: Optional[Tensor] = None) -> Tensor:
    """The same function through torch's scaled_dot_product_attention with an explicit boolean mask.

    Differentiable with plain autograd; what the `torch` backend runs (fused CPU/GPU kernels, no
    materialised float scores on the flash/efficient paths)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    qh, kh, vh = _heads_first(q, k, v)
    if _mask_is_plain(q.shape[1], k.shape[1], causal, self_only, kv_lens):
        # NOTE: no explicit mask lets SDPA skip the causal half; at 32K tokens the boolean masks were
        # most of a 6.4 GiB one-shot prefill (bench/prefill.py) and cost ~2.5x in time.
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
        return out.transpose(1, 2)
    mask = attention_mask(q.shape[1], k.shape[1], causal, self_only, kv_lens, q.device)
    has_key = mask.any(dim=-1, keepdim=True)
    fill = mask | ~has_key  # SDPA gives NaN for a fully masked row; such rows are zeroed below
    # NOTE: GQA by repeat_interleave, not enable_gqa: torch 2.13's fused CPU kernel with enable_gqa
    # gave a float16 dk 2.7x less accurate than its own math kernel (group of 4, seqlen 50).
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=fill, scale=scale)
    out = out * has_key.to(out.dtype)
    return out.transpose(1, 2)


def _mask_is_plain(seqlen_q: int, seqlen_k: int, causal: bool, self_only, kv_lens) -> bool:
    """True when SDPA's own is_causal (top-left aligned) or no mask at all is the exact mask."""
    if self_only is not None or seqlen_k == 0:  # no key at all: the masked path zeroes such rows
        return False
    if kv_lens is not None:
        if torch.compiler.is_compiling() or not bool((kv_lens == seqlen_k).all()):
            return False
    return not causal or seqlen_q == seqlen_k


def write_kv_cache(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor) -> None:
    """k_cache[b, cache_seqlens[b] + t] = k[b, t] (and v), in place."""
    batch, seqlen_new = k.shape[:2]
    rows = torch.arange(batch, device=k.device).view(-1, 1)
    positions = cache_seqlens.to(device=k.device, dtype=torch.long).view(-1, 1) + torch.arange(
        seqlen_new, device=k.device).view(1, -1)
    k_cache[rows, positions] = k.to(k_cache.dtype)
    v_cache[rows, positions] = v.to(v_cache.dtype)


def kvcache_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                cache_seqlens: Optional[Tensor], causal: bool = True, softmax_scale: Optional[float] = None,
                self_only: Optional[Tensor] = None, attention=attention_ref) -> Tensor:
    """flash_attn_with_kvcache: write k/v at cache_seqlens (in place), attend to cache[: cache_seqlens + new]."""
    if cache_seqlens is None:
        kv_lens = None
    else:
        seqlen_new = 0 if k is None else k.shape[1]
        if k is not None:
            write_kv_cache(k_cache, v_cache, k, v, cache_seqlens)
        kv_lens = cache_seqlens.to(torch.int32) + seqlen_new
        if not torch.compiler.is_compiling():
            # Keys at or past kv_len are masked anyway: attend over the filled part of the cache only.
            top = int(kv_lens.max())
            k_cache, v_cache = k_cache[:, :top], v_cache[:, :top]
    return attention(q, k_cache, v_cache, causal, softmax_scale, self_only, kv_lens)
