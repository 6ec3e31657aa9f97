"""Flash attention with a KV cache: `flash_attn_func`, `flash_attn_varlen_func` (packed sequences) and
`flash_attn_with_kvcache`, drop-in for flash-attn's (same names, shapes and bottom-right causal
alignment), plus a `self_only` row mask and backends.

The public functions validate once. The `triton` backend runs the `fastscan::flash_attn_fwd` and
`fastscan::flash_attn_varlen_fwd` custom ops (registered autograd calls the matching `_bwd` op) and
`fastscan::flash_attn_with_kvcache` (mutates the caches in place; inference only). The `torch` backend
runs torch's scaled_dot_product_attention with an explicit boolean mask (reference.attention_sdpa),
plain autograd. Backends: "torch" and "triton"; the compiled cpu / cuda / cuda_emu libraries have no
attention.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import backends
from ..validation import expect as _expect, expect_cu_seqlens, expect_same_device, expect_tensor, shape_of
from .reference import (attention_ref, attention_sdpa, attention_varlen_padded, attention_varlen_ref, kvcache_ref,
                        write_kv_cache)

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "attention_ref",
           "attention_varlen_ref", "kvcache_ref"]

_SUPPORTED = ("torch", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, self_only=None, backend=None):
    """softmax(q k^T * softmax_scale + mask) v per head, differentiable in q, k and v.

    Mask: with causal, query i sees keys j <= i + seqlen_k - seqlen_q (aligned bottom-right, as
    flash-attn >= 2.1); a query row with self_only[b, i] set sees only its own key,
    j == i + seqlen_k - seqlen_q (EE-MLLM's visual tokens that do not attend to each other), causal
    or not. A row that sees no key (causal with seqlen_q > seqlen_k) outputs 0, as flash-attn.
    GQA: query head h reads kv head h // (heads // kv_heads).

    Args:
        q: (batch, seqlen_q, heads, headdim) float16 / bfloat16 / float32; any strides.
        k, v: (batch, seqlen_k, kv_heads, headdim), q's dtype, heads % kv_heads == 0.
            headdim: 1..256 (the triton kernels pad to a power of two >= 16 with masks; 64 and 128
            are the tuned and AOT-checked sizes).
        causal: bottom-right aligned causal mask.
        softmax_scale: default headdim ** -0.5.
        self_only: (batch, seqlen_q) bool or None.
        backend: "torch", "triton" or None (FASTSCAN_BACKEND, then triton on CUDA, torch on CPU).

    Returns:
        out (batch, seqlen_q, heads, headdim) in q's dtype. The triton backend saves the row
        logsumexp (float32) for the backward; probabilities are never materialized.
    """
    q, k, v, self_only, scale = _validate_qkv(q, k, v, self_only, softmax_scale)
    name = backends.resolve(backend, q.device, supported=_SUPPORTED)
    if name == "torch":
        return attention_sdpa(q, k, v, bool(causal), scale, self_only)
    out, _ = torch.ops.fastscan.flash_attn_fwd(q, k, v, self_only, bool(causal), scale, name)
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           softmax_scale=None, self_only=None, backend=None):
    """flash_attn_func over packed variable-length sequences, differentiable in q, k and v.

    Sequence i owns query rows cu_seqlens_q[i] .. cu_seqlens_q[i + 1] - 1 and key rows
    cu_seqlens_k[i] .. cu_seqlens_k[i + 1] - 1 and attends only to its own keys: the result (and every
    gradient) equals flash_attn_func on each sequence alone, concatenated. Per sequence, with causal,
    query i sees keys j <= i + seqlen_k_i - seqlen_q_i (bottom-right, as flash-attn); self_only rows
    see only their own key j == i + seqlen_k_i - seqlen_q_i. Empty sequences are allowed; a row that
    sees no key (its sequence has no keys, or causal with seqlen_q_i > seqlen_k_i) outputs 0.

    Args:
        q: (total_q, heads, headdim) float16 / bfloat16 / float32; any strides.
        k, v: (total_k, kv_heads, headdim), q's dtype, heads % kv_heads == 0 (GQA).
        cu_seqlens_q, cu_seqlens_k: (num_seqs + 1,) int32, both with the same num_seqs: 0, then
            non-decreasing, ending at total_q / total_k. A CPU tensor is checked on the host and copied
            to q's device without a sync; one on the GPU is checked asynchronously (device asserts).
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence (they size the triton
            grid). Checked only when cu_seqlens_* is a CPU tensor (on the GPU it would need a sync); a
            value too small leaves rows of the longer sequences unwritten.
        causal: bottom-right aligned causal mask, per sequence.
        softmax_scale: default headdim ** -0.5.
        self_only: (total_q,) bool or None.
        backend: "torch", "triton" or None (FASTSCAN_BACKEND, then triton on CUDA, torch on CPU).
            The torch backend loops over the sequences when the boundaries are CPU tensors, else (GPU
            boundaries, or under torch.compile) attends over a padded batch with a mask (no sync).

    Returns:
        out (total_q, heads, headdim) in q's dtype.
    """
    q, k, v, self_only, scale = _validate_packed_qkv(q, k, v, self_only, softmax_scale)
    host = _host_boundaries(cu_seqlens_q, cu_seqlens_k)
    cu_q = expect_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    cu_k = expect_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    _expect(cu_q.shape == cu_k.shape, f"cu_seqlens_k: expected num_seqs + 1 = {cu_q.shape[0]} entries (as "
                                      f"cu_seqlens_q), got {cu_k.shape[0]}")
    for name, value, bounds in (("max_seqlen_q", max_seqlen_q, cu_seqlens_q), ("max_seqlen_k", max_seqlen_k,
                                                                             cu_seqlens_k)):
        _expect(isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool) and value >= 1,
                f"{name}: expected an int >= 1, got {value!r}")
        if host is not None:
            longest = int((bounds[1:] - bounds[:-1]).max())
            _expect(value >= longest, f"{name}: expected >= the longest sequence, {longest}, got {value}")
    name = backends.resolve(backend, q.device, supported=_SUPPORTED)
    if name == "torch":
        if host is not None:
            return attention_varlen_ref(q, k, v, *host, bool(causal), scale, self_only, attention=attention_sdpa)
        return attention_varlen_padded(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, bool(causal), scale,
                                       self_only)
    out, _ = torch.ops.fastscan.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, self_only,
                                                      bool(causal), scale, name)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
                            softmax_scale=None, self_only=None, backend=None):
    """Append k/v to the caches in place, then attend q to cache[: cache_seqlens + seqlen_new].

    One call serves a prefill chunk (seqlen_q > 1 over a cached prefix) and a decode step
    (seqlen_q = 1): the causal mask is bottom-right aligned per batch row, query i of row b sees
    keys j <= i + cache_seqlens[b] + seqlen_new - seqlen_q. Chunked prefill through this function
    equals one causal flash_attn_func over the whole sequence. Short queries (seqlen_q * heads /
    kv_heads <= 64) take a split-KV (flash-decoding) kernel on the triton backend.

    Args:
        q: (batch, seqlen_q, heads, headdim) float16 / bfloat16 / float32.
        k_cache, v_cache: (batch, cache_len, kv_heads, headdim), q's dtype; updated in place where
            k/v are written. Any strides (a slice of a stacked per-layer cache works).
        k, v: (batch, seqlen_new, kv_heads, headdim) or None; written at cache_seqlens[b] ...
            cache_seqlens[b] + seqlen_new - 1 of each batch row.
        cache_seqlens: int or (batch,) int32/int64 tensor: tokens already in each row's cache
            (ragged rows allowed). None means the whole cache is valid (only without k/v).
            cache_seqlens + seqlen_new must fit in cache_len (checked on the host in eager mode;
            under torch.compile the check is skipped, as it would need a device sync).
        causal: bottom-right aligned causal mask (default True, the prefill/decode case).
        softmax_scale: default headdim ** -0.5.
        self_only: (batch, seqlen_q) bool or None; as in flash_attn_func.
        backend: "torch", "triton" or None.

    Returns:
        out (batch, seqlen_q, heads, headdim) in q's dtype.

    Raises:
        ValueError naming the argument for bad shapes, dtypes, devices, a cache too short, and for
        tensors that require grad while grad mode is on (inference only: use flash_attn_func to train).
    """
    q, k_cache, v_cache, self_only, scale = _validate_qkv(q, k_cache, v_cache, self_only, softmax_scale,
                                                         k_name="k_cache", v_name="v_cache")
    k, v, cache_seqlens = _validate_cache(q, k_cache, v_cache, k, v, cache_seqlens)
    name = backends.resolve(backend, q.device, supported=_SUPPORTED)
    if name == "torch":
        with torch.no_grad():
            return kvcache_ref(q, k_cache, v_cache, k, v, cache_seqlens, bool(causal), scale, self_only,
                               attention=attention_sdpa)
    return torch.ops.fastscan.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, self_only,
                                                     bool(causal), scale, name)


def _validate_qkv(q, k, v, self_only, softmax_scale, k_name="k", v_name="v"):
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        expect_tensor(name, t)
        _expect(t.dim() == 4, f"{name}: expected (batch, seqlen, heads, headdim), got shape {tuple(t.shape)}")
    _expect(q.dtype in _DTYPES, f"q: expected float16, bfloat16 or float32, got {q.dtype}")
    batch, seqlen_q, heads, head_dim = q.shape
    _expect(batch >= 1 and seqlen_q >= 1 and heads >= 1, f"q: batch, seqlen_q and heads must be >= 1, got "
                                                         f"{tuple(q.shape)}")
    _expect(1 <= head_dim <= MAX_HEAD_DIM, f"q: headdim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    _expect(k.shape[0] == batch and k.shape[3] == head_dim and k.shape[1] >= 1,
            f"{k_name}: expected (batch={batch}, seqlen >= 1, kv_heads, headdim={head_dim}), got {tuple(k.shape)}")
    _expect(v.shape == k.shape, f"{v_name}: expected {k_name}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if self_only is not None:
        _expect(isinstance(self_only, Tensor) and self_only.shape == (batch, seqlen_q),
                f"self_only: expected shape ({batch}, {seqlen_q}) (batch, seqlen_q), got {shape_of(self_only)}")
    scale = _check_heads_dtypes_scale(q, k, v, self_only, softmax_scale, heads, k.shape[2], head_dim, k_name, v_name)
    return q, k, v, self_only, scale


def _check_heads_dtypes_scale(q, k, v, self_only, softmax_scale, heads, kv_heads, head_dim, k_name, v_name):
    """The rules flash_attn_func and flash_attn_varlen_func share (shapes already checked); returns the scale."""
    _expect(kv_heads >= 1 and heads % kv_heads == 0,
            f"{k_name}: heads={heads} must be a multiple of kv_heads={kv_heads} (GQA)")
    for name, t in ((k_name, k), (v_name, v)):
        _expect(t.dtype == q.dtype, f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
    if self_only is not None:
        _expect(self_only.dtype == torch.bool, f"self_only: expected torch.bool, got {self_only.dtype}")
    expect_same_device("q", q, **{k_name: k, v_name: v}, self_only=self_only)
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    _expect(isinstance(softmax_scale, (int, float)) and softmax_scale > 0,
            f"softmax_scale: expected a positive float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _validate_packed_qkv(q, k, v, self_only, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        expect_tensor(name, t)
        _expect(t.dim() == 3, f"{name}: expected (total, heads, headdim) packed sequences, got shape {tuple(t.shape)}")
    _expect(q.dtype in _DTYPES, f"q: expected float16, bfloat16 or float32, got {q.dtype}")
    total_q, heads, head_dim = q.shape
    _expect(total_q >= 1 and heads >= 1, f"q: total_q and heads must be >= 1, got {tuple(q.shape)}")
    _expect(1 <= head_dim <= MAX_HEAD_DIM, f"q: headdim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    _expect(k.shape[0] >= 1 and k.shape[2] == head_dim,
            f"k: expected (total_k >= 1, kv_heads, headdim={head_dim}), got {tuple(k.shape)}")
    _expect(v.shape == k.shape, f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if self_only is not None:
        _expect(isinstance(self_only, Tensor) and self_only.shape == (total_q,),
                f"self_only: expected shape ({total_q},) (total_q,), got {shape_of(self_only)}")
    scale = _check_heads_dtypes_scale(q, k, v, self_only, softmax_scale, heads, k.shape[1], head_dim, "k", "v")
    return q, k, v, self_only, scale


def _host_boundaries(cu_seqlens_q, cu_seqlens_k):
    """Both boundary tensors when they can be read without a device sync (CPU, not traced), else None."""
    tensors = (cu_seqlens_q, cu_seqlens_k)
    if torch.compiler.is_compiling() or not all(isinstance(t, Tensor) and t.device.type == "cpu" for t in tensors):
        return None
    if any(type(t).__name__ == "FakeTensor" for t in tensors):
        return None
    return tensors


def _validate_cache(q, k_cache, v_cache, k, v, cache_seqlens):
    batch, cache_len = k_cache.shape[:2]
    _expect((k is None) == (v is None), f"k, v: give both or neither, got k {shape_of(k)} and v {shape_of(v)}")
    seqlen_new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            expect_tensor(name, t)
            _expect(t.dim() == 4 and t.shape[0] == batch and t.shape[2:] == k_cache.shape[2:] and t.shape[1] >= 1,
                    f"{name}: expected (batch={batch}, seqlen_new, kv_heads={k_cache.shape[2]}, "
                    f"headdim={k_cache.shape[3]}), got {tuple(t.shape)}")
            _expect(t.dtype == q.dtype, f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
        _expect(k.shape == v.shape, f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        expect_same_device("q", q, k=k, v=v)
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            _expect(all(s != 0 or n <= 1 for s, n in zip(t.stride(), t.shape)),
                    f"{name}: is written in place, so it must not overlap itself; got strides {t.stride()}")
        seqlen_new = k.shape[1]
        _expect(cache_seqlens is not None, "cache_seqlens: required when k, v are given (where to write them)")
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
            _expect(t is None or not t.requires_grad,
                    f"{name}: requires grad, but flash_attn_with_kvcache is an inference op without a backward; "
                    "call it under torch.no_grad() or torch.inference_mode(), or use flash_attn_func to train")
    if cache_seqlens is None:
        return k, v, None
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        _expect(0 <= cache_seqlens and cache_seqlens + seqlen_new <= cache_len,
                f"cache_seqlens: {cache_seqlens} + seqlen_new {seqlen_new} must be in 0..cache_len={cache_len}")
        return k, v, torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    _expect(isinstance(cache_seqlens, Tensor) and cache_seqlens.shape == (batch,),
            f"cache_seqlens: expected an int or a ({batch},) tensor, got {shape_of(cache_seqlens)}")
    _expect(cache_seqlens.dtype in (torch.int32, torch.int64),
            f"cache_seqlens: expected int32 or int64, got {cache_seqlens.dtype}")
    expect_same_device("q", q, cache_seqlens=cache_seqlens)
    if not torch.compiler.is_compiling():  # a device sync on CUDA; skipped when traced
        low, high = int(cache_seqlens.min()), int(cache_seqlens.max())
        _expect(low >= 0 and high + seqlen_new <= cache_len,
                f"cache_seqlens: values in {low}..{high} plus seqlen_new {seqlen_new} must fit in "
                f"cache_len={cache_len}")
    return k, v, cache_seqlens.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# torch.library ops (triton backend): fake implementations for tracing, autograd on the forward.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastscan::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, self_only: Optional[Tensor], causal: bool,
                       softmax_scale: float, backend: str) -> tuple[Tensor, Tensor]:
    from . import triton as triton_impl
    return triton_impl.attention_forward(q, k, v, None, self_only, causal, softmax_scale)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, self_only, causal, softmax_scale, backend):
    batch, seqlen_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("fastscan::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       self_only: Optional[Tensor], causal: bool, softmax_scale: float,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton as triton_impl
    return triton_impl.attention_backward(dout, q, k, v, out, lse, self_only, causal, softmax_scale)


@_flash_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, self_only, causal, softmax_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, self_only, causal, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, self_only)
    ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, self_only = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None, None
    dq, dk, dv = torch.ops.fastscan.flash_attn_bwd(dout, q, k, v, out, lse, self_only, ctx.causal,
                                                   ctx.softmax_scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("fastscan::flash_attn_fwd", _backward, setup_context=_setup_context)


@torch.library.custom_op("fastscan::flash_attn_varlen_fwd", mutates_args=())
def _flash_attn_varlen_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                              max_seqlen_q: int, max_seqlen_k: int, self_only: Optional[Tensor], causal: bool,
                              softmax_scale: float, backend: str) -> tuple[Tensor, Tensor]:
    from . import triton as triton_impl
    return triton_impl.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, self_only, causal,
                                                softmax_scale)


@_flash_attn_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, self_only, causal, softmax_scale, backend):
    total_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads, total_q), dtype=torch.float32)


@torch.library.custom_op("fastscan::flash_attn_varlen_bwd", mutates_args=())
def _flash_attn_varlen_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                              self_only: Optional[Tensor], causal: bool, softmax_scale: float,
                              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton as triton_impl
    return triton_impl.attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 max_seqlen_k, self_only, causal, softmax_scale)


@_flash_attn_varlen_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, self_only, causal,
      softmax_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, self_only, causal, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, self_only)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend
    ctx.set_materialize_grads(False)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, self_only = ctx.saved_tensors
    if dout is None:
        return (None,) * 11
    dq, dk, dv = torch.ops.fastscan.flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                          *ctx.max_seqlens, self_only, ctx.causal, ctx.softmax_scale,
                                                          ctx.backend)
    return (dq, dk, dv) + (None,) * 8


torch.library.register_autograd("fastscan::flash_attn_varlen_fwd", _varlen_backward,
                                setup_context=_varlen_setup_context)


@torch.library.custom_op("fastscan::flash_attn_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _flash_attn_with_kvcache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor],
                                v: Optional[Tensor], cache_seqlens: Optional[Tensor], self_only: Optional[Tensor],
                                causal: bool, softmax_scale: float, backend: str) -> Tensor:
    from . import triton as triton_impl
    kv_lens = None
    if cache_seqlens is not None:
        if k is not None:
            write_kv_cache(k_cache, v_cache, k, v, cache_seqlens)
        kv_lens = (cache_seqlens + (0 if k is None else k.shape[1])).to(torch.int32)
    out, _ = triton_impl.attention_forward(q, k_cache, v_cache, kv_lens, self_only, causal, softmax_scale)
    return out


@_flash_attn_with_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, self_only, causal, softmax_scale, backend):
    return q.new_empty(q.shape)
