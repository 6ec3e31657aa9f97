"""Mamba decode step: `selective_state_update`, drop-in for mamba-ssm's, plus optional D / dt_bias and backends.

The public function validates once, then calls the `fastscan::selective_state_update` custom op
(mutates_args=("state",), with a fake implementation for tracing), which dispatches to a backend
by name. It is an inference op with no backward: tensors that require grad while grad mode is on
are rejected with a ValueError (use `selective_scan_fn` over one token for a differentiable step).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..validation import FLOAT_DTYPES, expect as _expect, expect_same_device, expect_tensor, shape_of
from .reference import selective_state_update_ref

__all__ = ["selective_state_update", "selective_state_update_ref"]


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, backend=None):
    """One decode step of Mamba-1 (S6): advance the SSM state by one token, in place, and return y.

    For every batch b, channel d and state n (g = d // (dim // groups)):
        dt' = softplus(dt[b, d] + dt_bias[d]) if dt_softplus else dt[b, d] + dt_bias[d]
              (softplus(x) = x for x > 20, as torch.nn.functional.softplus)
        state[b, d, n] = exp(dt' * A[d, n]) * state[b, d, n] + dt' * B[b, g, n] * x[b, d]
        y[b, d] = sum_n state[b, d, n] * C[b, g, n] + D[d] * x[b, d],  then y *= silu(z[b, d]) when z is given
    This is exactly one step of `selective_scan_fn`: N calls from state s equal one scan over the
    N tokens with initial_state=s (its outputs and last_state).

    Args:
        state: (batch, dim, dstate), float32 or x's dtype; updated in place (computed in float32,
               stored back in its dtype). Any strides: a slice of a larger cache is read and
               written where it lies. Must not overlap itself (no stride-0 dimension).
        x:     (batch, dim) float32 / float16 / bfloat16. Any strides.
        dt:    (batch, dim), x's dtype.
        A:     (dim, dstate) float32.
        B, C:  (batch, dstate) or grouped (batch, groups, dstate) with dim % groups == 0.
               Cast to x's dtype when they differ.
        D:     (dim,) or None; used in float32.
        z:     (batch, dim) or None; gate, cast to x's dtype.
        dt_bias: (dim,) or None; added to dt before the softplus; used in float32.
        dt_softplus: apply softplus to dt (+ bias).
        backend: "torch", "triton", "cuda", "cpu", "cuda_emu" or None (FASTSCAN_BACKEND, then by device).

    Returns:
        y (batch, dim) in x's dtype, contiguous.

    Raises:
        ValueError naming the argument for a bad shape, dtype or device, and for a tensor that
        requires grad while grad mode is enabled (there is no backward: run decoding under
        torch.no_grad() or torch.inference_mode()).
    """
    state, x, dt, A, B, C, D, z, dt_bias = _validate(state, x, dt, A, B, C, D, z, dt_bias)
    name = backends.resolve(backend, x.device, native_symbol="fs_selective_state_update")
    if name == "torch":
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return torch.ops.fastscan.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), name)


def _validate(state, x, dt, A, B, C, D, z, dt_bias):
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        expect_tensor(name, t)
    _expect(x.dim() == 2, f"x: expected (batch, dim), got shape {tuple(x.shape)}")
    _expect(x.dtype in FLOAT_DTYPES, f"x: expected float32, float16 or bfloat16, got {x.dtype}")
    batch, dim = x.shape
    _expect(dim >= 1, f"x: dim must be >= 1, got shape {tuple(x.shape)}")
    _expect(A.dim() == 2 and A.shape[0] == dim, f"A: expected (dim={dim}, dstate), got shape {tuple(A.shape)}")
    _expect(A.dtype == torch.float32, f"A: expected float32, got {A.dtype}")
    dstate = A.shape[1]
    _expect(dstate >= 1, "A: dstate must be >= 1")
    _expect(state.shape == (batch, dim, dstate),
            f"state: expected shape ({batch}, {dim}, {dstate}) (batch, dim from x; dstate from A), "
            f"got {tuple(state.shape)}")
    _expect(state.dtype in (torch.float32, x.dtype),
            f"state: expected float32 or x's dtype {x.dtype}, got {state.dtype}")
    _expect(all(s != 0 or n <= 1 for s, n in zip(state.stride(), state.shape)),
            f"state: is updated in place, so it must not overlap itself; got strides {state.stride()} "
            f"for shape {tuple(state.shape)} (an expanded tensor?)")
    _expect(dt.shape == x.shape, f"dt: expected shape {tuple(x.shape)} (as x), got {tuple(dt.shape)}")
    _expect(dt.dtype == x.dtype, f"dt: expected x's dtype {x.dtype}, got {dt.dtype}")
    for name, t in (("B", B), ("C", C)):
        _expect(t.dim() in (2, 3),
                f"{name}: expected (batch, dstate) or (batch, groups, dstate), got shape {tuple(t.shape)}")
    _expect(B.shape == C.shape, f"C: expected B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if B.dim() == 2:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups = B.shape[1]
    _expect(B.shape[0] == batch and B.shape[2] == dstate,
            f"B: expected (batch={batch}, [groups,] dstate={dstate}), got {tuple(B.shape)}")
    _expect(groups >= 1 and dim % groups == 0, f"B: dim={dim} must be divisible by groups={groups}")
    _expect(B.dtype in FLOAT_DTYPES and C.dtype in FLOAT_DTYPES,
            f"B, C: expected a float dtype, got {B.dtype}, {C.dtype}")
    B, C = B.to(x.dtype), C.to(x.dtype)
    if z is not None:
        _expect(isinstance(z, Tensor) and z.shape == x.shape,
                f"z: expected shape {tuple(x.shape)} (as x), got {shape_of(z)}")
        _expect(z.dtype in FLOAT_DTYPES, f"z: expected a float dtype, got {z.dtype}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            _expect(isinstance(t, Tensor) and t.shape == (dim,), f"{name}: expected shape ({dim},), got {shape_of(t)}")
            _expect(t.is_floating_point(), f"{name}: expected a float dtype, got {t.dtype}")
    expect_same_device("x", x, state=state, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    if torch.is_grad_enabled():
        for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                        ("dt_bias", dt_bias)):
            _expect(t is None or not t.requires_grad,
                    f"{name}: requires grad, but selective_state_update is an inference op without a backward; "
                    "call it under torch.no_grad() or torch.inference_mode(), or use selective_scan_fn "
                    "(differentiable) for a training step")
    z = z.to(x.dtype) if z is not None else None
    D = D.float() if D is not None else None
    dt_bias = dt_bias.float() if dt_bias is not None else None
    return state, x, dt, A, B, C, D, z, dt_bias


# ---------------------------------------------------------------------------------------------
# Compiled backends (triton, cuda, cpu, cuda_emu). Inputs are validated: B, C grouped 3-D in x's
# dtype; D, dt_bias float32; state float32 or x's dtype, any strides, updated in place.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastscan::selective_state_update", mutates_args=("state",))
def _selective_state_update_op(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                               dt_softplus: bool, backend: str) -> Tensor:
    if backend == "triton":
        from . import triton as triton_impl
        return triton_impl.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    from . import native as native_impl
    return native_impl.selective_state_update(backend, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@_selective_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, backend):
    return x.new_empty(x.shape)
