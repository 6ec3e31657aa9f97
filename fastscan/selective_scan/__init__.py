"""Mamba-1 selective scan: `selective_scan_fn`, drop-in for mamba-ssm's, plus initial states and backends.

The public function validates once, then calls the `fastscan::selective_scan_fwd` custom op, whose
registered autograd calls `fastscan::selective_scan_bwd`. Both ops dispatch to a backend by name.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..validation import (FLOAT_DTYPES, expect as _expect, expect_cu_seqlens, expect_same_device, expect_tensor,
                          shape_of)
from .reference import selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref"]

def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, initial_state=None, backend=None, cu_seqlens=None):
    """Selective scan of Mamba-1 (S6), differentiable with respect to every tensor argument.

    For every batch b, channel d and state n (g = d // (dim // groups)):
        delta' = softplus(delta + delta_bias[d]) if delta_softplus else delta + delta_bias[d]
                 (softplus(x) = x for x > 20, as torch.nn.functional.softplus)
        h_t[n] = exp(delta'_t * A[d, n]) * h_{t-1}[n] + delta'_t * B[b, g, n, t] * u_t,   h_0 = initial_state or 0
        y_t    = sum_n h_t[n] * C[b, g, n, t] + D[d] * u_t,   then y_t *= silu(z_t) when z is given

    Args:
        u:     (batch, dim, seqlen) float32 / float16 / bfloat16. Any strides: a (batch, seqlen, dim)
               tensor viewed with .transpose(1, 2) is read without a copy by the compiled backends.
        delta: (batch, dim, seqlen), u's dtype.
        A:     (dim, dstate) float32 (real; complex A raises NotImplementedError).
        B, C:  (batch, dstate, seqlen) or grouped (batch, groups, dstate, seqlen) with dim % groups == 0.
               Cast to u's dtype when they differ.
        D:     (dim,) or None; used in float32.
        z:     (batch, dim, seqlen) or None; gate, cast to u's dtype.
        delta_bias: (dim,) or None; added to delta before the softplus; used in float32.
        delta_softplus: apply softplus to delta (+ bias).
        return_last_state: also return the state after the last token.
        initial_state: (batch, dim, dstate) or None (zeros); used in float32. Gradients flow into it.
        backend: "torch", "triton", "cuda", "cpu", "cuda_emu" or None (FASTSCAN_BACKEND, then by device).
        cu_seqlens: None, or int32 (num_seqs + 1,) boundaries of sequences packed along seqlen (batch must
               be 1): starts at 0, non-decreasing (empty sequences allowed), ends at seqlen. The state
               restarts at every boundary from initial_state[i] (initial_state is then (num_seqs, dim,
               dstate)) or zero, and last_state holds one state per sequence. A CPU tensor is checked on
               the host and moved to u's device; see fastscan.validation.expect_cu_seqlens.

    Returns:
        y (batch, dim, seqlen) in u's dtype, contiguous; with return_last_state, (y, last_state) where
        last_state is (batch, dim, dstate) float32 ((num_seqs, dim, dstate) with cu_seqlens). The
        gradient of last_state is propagated too.
    """
    u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens = _validate(
        u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    name = backends.resolve(backend, u.device, native_symbol="fs_selective_scan_fwd")
    if name == "torch":  # plain autograd through the reference
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, cu_seqlens)
    y, last_state = torch.ops.fastscan.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state, cu_seqlens, name)
    return (y, last_state) if return_last_state else y


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens):
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        expect_tensor(name, t)
    if A.is_complex():
        raise NotImplementedError("A: complex A (S4D-complex) is not implemented; pass a real float32 A")
    _expect(u.dim() == 3, f"u: expected (batch, dim, seqlen), got shape {tuple(u.shape)}")
    batch, dim, seqlen = u.shape
    _expect(u.dtype in FLOAT_DTYPES, f"u: expected float32, float16 or bfloat16, got {u.dtype}")
    _expect(seqlen >= 1 and dim >= 1 and batch >= 1, f"u: every size must be >= 1, got {tuple(u.shape)}")
    _expect(delta.shape == u.shape, f"delta: expected shape {tuple(u.shape)} (as u), got {tuple(delta.shape)}")
    _expect(delta.dtype == u.dtype, f"delta: expected u's dtype {u.dtype}, got {delta.dtype}")
    _expect(A.dim() == 2 and A.shape[0] == dim,
            f"A: expected (dim={dim}, dstate), got shape {tuple(A.shape)}")
    _expect(A.dtype == torch.float32, f"A: expected float32, got {A.dtype}")
    dstate = A.shape[1]
    _expect(dstate >= 1, "A: dstate must be >= 1")
    for name, t in (("B", B), ("C", C)):
        _expect(t.dim() in (3, 4), f"{name}: expected (batch, dstate, seqlen) or (batch, groups, dstate, seqlen), "
                                   f"got shape {tuple(t.shape)}")
    _expect(B.shape == C.shape, f"C: expected B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups = B.shape[1]
    _expect(B.shape[0] == batch and B.shape[2] == dstate and B.shape[3] == seqlen,
            f"B: expected (batch={batch}, [groups,] dstate={dstate}, seqlen={seqlen}), got {tuple(B.shape)}")
    _expect(groups >= 1 and dim % groups == 0, f"B: dim={dim} must be divisible by groups={groups}")
    _expect(B.dtype in FLOAT_DTYPES and C.dtype in FLOAT_DTYPES, f"B, C: expected a float dtype, got {B.dtype}, {C.dtype}")
    B, C = B.to(u.dtype), C.to(u.dtype)
    if z is not None:
        _expect(isinstance(z, Tensor) and z.shape == u.shape,
                f"z: expected shape {tuple(u.shape)} (as u), got {shape_of(z)}")
        z = z.to(u.dtype)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _expect(isinstance(t, Tensor) and t.shape == (dim,),
                    f"{name}: expected shape ({dim},), got {shape_of(t)}")
    D = D.float() if D is not None else None
    delta_bias = delta_bias.float() if delta_bias is not None else None
    states = batch
    if cu_seqlens is not None:
        _expect(batch == 1, f"u: packed sequences (cu_seqlens given) need batch 1, got batch {batch}")
        cu_seqlens = expect_cu_seqlens("cu_seqlens", cu_seqlens, seqlen, u.device)
        states = cu_seqlens.shape[0] - 1
    if initial_state is not None:
        what = "num_seqs" if cu_seqlens is not None else "batch"
        _expect(isinstance(initial_state, Tensor) and initial_state.shape == (states, dim, dstate),
                f"initial_state: expected shape ({what}={states}, dim={dim}, dstate={dstate}), "
                f"got {shape_of(initial_state)}")
        initial_state = initial_state.float()
    expect_same_device("u", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                       initial_state=initial_state)
    return u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens


# ---------------------------------------------------------------------------------------------
# Compiled backends (triton, cuda, cpu, cuda_emu). Inputs are validated: B, C grouped 4-D in u's dtype; D, delta_bias,
# initial_state float32. Forward returns (y contiguous in u's dtype, last_state float32).
# ---------------------------------------------------------------------------------------------

def _fwd_impl(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens):
    if backend == "triton":
        from . import triton as triton_impl
        y, last = triton_impl.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                  initial_state, True, cu_seqlens)
        return y, last
    from . import native as native_impl
    return native_impl.selective_scan_fwd(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          initial_state, cu_seqlens)


def _bwd_impl(backend, dy, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
              cu_seqlens):
    if backend == "triton":
        from . import triton as triton_impl
        return triton_impl.selective_scan_bwd(dy, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                              initial_state, cu_seqlens)
    from . import native as native_impl
    return native_impl.selective_scan_bwd(backend, dy, dlast, u, delta, A, B, C, D, z, delta_bias,
                                          delta_softplus, initial_state, cu_seqlens)


# ---------------------------------------------------------------------------------------------
# torch.library ops: fake implementations for tracing, autograd registered on the forward op.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastscan::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                           z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                           initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                           backend: str) -> tuple[Tensor, Tensor]:
    return _fwd_impl(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens)


def _num_states(u, cu_seqlens):
    return u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@_selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, backend):
    batch, dim, seqlen = u.shape
    y = u.new_empty((batch, dim, seqlen))
    last_state = u.new_empty((_num_states(u, cu_seqlens), dim, A.shape[1]), dtype=torch.float32)
    return y, last_state


# Absent optional gradients come back as empty tensors (an op cannot return None); backward maps them to None.
@torch.library.custom_op("fastscan::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd_op(dy: Tensor, dlast_state: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor,
                           B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                           delta_bias: Optional[Tensor], delta_softplus: bool, initial_state: Optional[Tensor],
                           cu_seqlens: Optional[Tensor], backend: str) -> list[Tensor]:
    grads = _bwd_impl(backend, dy, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                      initial_state, cu_seqlens)
    dtypes = (u.dtype, u.dtype, torch.float32, B.dtype, C.dtype, torch.float32, u.dtype, torch.float32,
              torch.float32)
    return [g.to(dt) if g is not None else u.new_empty((0,)) for g, dt in zip(grads, dtypes)]


@_selective_scan_bwd_op.register_fake
def _(dy, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, backend):
    batch, dim, seqlen = u.shape
    f32 = torch.float32
    return [u.new_empty(u.shape), u.new_empty(u.shape), A.new_empty(A.shape, dtype=f32), B.new_empty(B.shape),
            C.new_empty(C.shape), u.new_empty((dim,) if D is not None else (0,), dtype=f32 if D is not None else u.dtype),
            u.new_empty(u.shape if z is not None else (0,)),
            u.new_empty((dim,) if delta_bias is not None else (0,), dtype=f32 if delta_bias is not None else u.dtype),
            u.new_empty(initial_state.shape if initial_state is not None else (0,),
                        dtype=f32 if initial_state is not None else u.dtype)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dlast_state):
    u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    grads = torch.ops.fastscan.selective_scan_bwd(dy, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                                                  ctx.delta_softplus, initial_state, cu_seqlens, ctx.backend)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit = grads
    present = (D, z, delta_bias, initial_state)
    dD, dz, ddelta_bias, dinit = (g if t is not None else None for g, t in zip((dD, dz, ddelta_bias, dinit), present))
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None, dinit, None, None


torch.library.register_autograd("fastscan::selective_scan_fwd", _backward, setup_context=_setup_context)
