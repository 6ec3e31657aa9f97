"""Attention in pure PyTorch: the float64 oracle (explicit softmax) and the `torch` backend (SDPA).

Masking, shared by every backend (query row i of batch b, key position j, kv_len = keys of row b):
    offset      = kv_len - seqlen_q                   causal alignment is bottom-right (flash-attn >= 2.1)
    visible     = j < kv_len
    causal      : visible &= j <= i + offset
    self_only[b, i] : visible = (j == i + offset) & (0 <= j < kv_len)  (own key only; causal or not)
A row that sees no key outputs 0 (flash-attn's convention), and its gradient is 0.
GQA: query head h reads kv head h // (heads // kv_heads).
Packed sequences (flash_attn_varlen_func) apply all of this per sequence, with its own seqlen_q and
kv_len: attention_varlen_ref is that definition, attention_varlen_padded the same without a host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention_mask", "attention_ref", "attention_sdpa", "write_kv_cache", "kvcache_ref",
           "attention_varlen_ref", "attention_varlen_padded"]


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
    if _mask_is_plain(q.shape[1], k.shape[1], causal, self_only, kv_lens):
        qh, kh, vh = _heads_first(q, k, v)
        # NOTE: no explicit mask lets SDPA skip the causal half; at 32K tokens the boolean masks were
        # most of a 6.4 GiB one-shot prefill (bench/prefill.py) and cost ~2.5x in time.
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
        return out.transpose(1, 2)
    return _sdpa_masked(q, k, v, causal, scale, self_only, kv_lens)


def _sdpa_masked(q, k, v, causal, scale, self_only, kv_lens):
    qh, kh, vh = _heads_first(q, k, v)
    mask = attention_mask(q.shape[1], k.shape[1], causal, self_only, kv_lens, q.device)
    has_key = mask.any(dim=-1, keepdim=True)
    fill = mask | ~has_key  # SDPA gives NaN for a fully masked row; such rows are zeroed below
    # NOTE: GQA by repeat_interleave, not enable_gqa: torch 2.13's fused CPU kernel with enable_gqa
    # gave a float16 dk 2.7x less accurate than its own math kernel (group of 4, seqlen 50).
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=fill, scale=scale)
    out = out * has_key.to(out.dtype)
    return out.transpose(1, 2)


def attention_varlen_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         causal: bool = False, softmax_scale: Optional[float] = None,
                         self_only: Optional[Tensor] = None, attention=attention_ref) -> Tensor:
    """Packed sequences, by definition: each sequence alone through `attention`, concatenated.

    q (total_q, heads, headdim), k/v (total_k, kv_heads, headdim), cu_seqlens_* (num_seqs + 1,)
    boundaries, self_only (total_q,) bool or None. The boundaries are read on the host (free for CPU
    tensors, a device sync otherwise). A sequence without keys outputs 0 (and passes gradient 0).
    """
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = []
    for i in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[i: i + 2], bounds_k[i: i + 2]
        if q1 == q0:
            continue
        rows = None if self_only is None else self_only[None, q0:q1]
        # attention_ref handles a sequence without keys (zeros); SDPA kernels need not.
        attend = attention if k1 > k0 else attention_ref
        pieces.append(attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, softmax_scale, rows)[0])
    return torch.cat(pieces)  # total_q >= 1: some sequence has queries


def attention_varlen_padded(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                            softmax_scale: Optional[float] = None, self_only: Optional[Tensor] = None) -> Tensor:
    """attention_varlen_ref's function without reading the boundaries on the host (no device sync,
    traceable by torch.compile): the sequences are gathered into a padded (num_seqs, max_seqlen, ...)
    batch, attended with attention_sdpa's masked path, and gathered back.

    Queries are right-aligned in their padded row and keys left-aligned with kv_lens = the sequence's
    key count, so the bottom-right causal diagonal of the padded row is the sequence's own; the padding
    query rows are computed and dropped. Costs num_seqs * max_seqlen_q * max_seqlen_k mask entries
    per head: the fallback where the boundaries are not on the host.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    device = q.device
    cu_q, cu_k = cu_seqlens_q.to(device=device, dtype=torch.long), cu_seqlens_k.to(device=device, dtype=torch.long)
    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    pad_q = max_seqlen_q - len_q  # leading padding rows of each padded query row
    r = torch.arange(max_seqlen_q, device=device)
    rows_q = (cu_q[:-1, None] + r[None, :] - pad_q[:, None]).clamp(0, q.shape[0] - 1)
    c = torch.arange(max_seqlen_k, device=device)
    rows_k = (cu_k[:-1, None] + c[None, :]).clamp(max=k.shape[0] - 1)  # past len_k: masked by kv_lens
    padded_self_only = None if self_only is None else self_only[rows_q]
    out = _sdpa_masked(q[rows_q], k[rows_k], v[rows_k], causal, scale, padded_self_only, len_k)
    # Packed row t belongs to sequence s (cu_q[s] <= t < cu_q[s + 1]); empty sequences never match.
    t = torch.arange(q.shape[0], device=device)
    seq = torch.searchsorted(cu_q[1:], t, right=True)
    return out[seq, t - cu_q[seq] + pad_q[seq]]


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
