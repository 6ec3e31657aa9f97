"""Causal depthwise conv1d: `causal_conv1d_fn` and `causal_conv1d_update`, drop-in for causal-conv1d's
(Dao-AILab), plus initial/final states in every layout, their gradients, and backends.

The public functions validate once, then call the `fastscan::causal_conv1d_fwd` custom op (autograd
registered, calling `fastscan::causal_conv1d_bwd`) or the in-place `fastscan::causal_conv1d_update` op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..validation import (FLOAT_DTYPES, expect as _expect, expect_cu_seqlens, expect_same_device, expect_tensor,
                          shape_of)
from .native import like_x
from .reference import causal_conv1d_ref, causal_conv1d_update_ref

__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_ref", "causal_conv1d_update_ref"]

MAX_WIDTH = 8  # FS_CONV1D_MAX_WIDTH in csrc/common/causal_conv1d_abi.h
_ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d_fn(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None,
                     backend=None, cu_seqlens=None):
    """Causal depthwise conv1d over time, differentiable with respect to x, weight, bias, initial_states.

    For every batch b and channel d, with xpad = initial_states[b, d] ++ x[b, d] along time (W = width):
        out[b, d, t] = act(bias[d] + sum_{k<W} weight[d, k] * xpad[t + k]),   t in [0, seqlen)
    so weight[d, W-1] multiplies x[b, d, t] and weight[d, 0] the input W-1 steps earlier. act is the
    identity or silu. final_states = the last W-1 entries of xpad (they include initial_states when
    seqlen < W-1), so a sequence split in two calls, final_states -> initial_states, equals one call.

    Args:
        x:      (batch, dim, seqlen) float32 / float16 / bfloat16. Any strides: a (batch, seqlen, dim)
                tensor viewed with .transpose(1, 2) (channel-last) is read without a copy, and out then
                comes back channel-last too.
        weight: (dim, width), 2 <= width <= 8, any float dtype (used in float32).
        bias:   (dim,) or None; used in float32.
        initial_states: (batch, dim, width-1) or None (zeros), any layout, cast to x's dtype.
                Gradients flow into it.
        return_final_states: also return final_states (batch, dim, width-1) in x's dtype; the gradient
                of final_states is propagated too.
        activation: None, "silu" or "swish" (= silu).
        backend: "torch", "triton", "cuda", "cpu", "cuda_emu" or None (FASTSCAN_BACKEND, then by device).
        cu_seqlens: None, or int32 (num_seqs + 1,) boundaries of sequences packed along seqlen (batch must
                be 1): starts at 0, non-decreasing (empty sequences allowed), ends at seqlen. The window
                never reaches across a boundary: sequence i is padded by initial_states[i] (initial_states
                and final_states are then (num_seqs, dim, width-1)) or zeros. A CPU tensor is checked on
                the host and moved to x's device; see fastscan.validation.expect_cu_seqlens.

    Returns:
        out (batch, dim, seqlen) in x's dtype and layout; with return_final_states, (out, final_states).
    """
    x, weight, bias, initial_states, silu, cu_seqlens = _validate_fn(x, weight, bias, initial_states, activation,
                                                                     cu_seqlens)
    name = backends.resolve(backend, x.device, native_symbol="fs_causal_conv1d_fwd")
    if name == "torch":  # plain autograd through the reference
        return causal_conv1d_ref(x, weight, bias, initial_states, return_final_states, activation, cu_seqlens)
    out, final_states = torch.ops.fastscan.causal_conv1d_fwd(x, weight, bias, initial_states, silu, cu_seqlens,
                                                             name)
    return (out, final_states) if return_final_states else out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend=None):
    """One decode step (or a few tokens) of the causal conv1d, advancing conv_state in place.

    The conv runs over window = conv_state[..., -(W-1):] ++ x along time; afterwards conv_state holds
    its old contents shifted left by seqlen with the new tokens at the end (when seqlen >= state_len:
    the last state_len tokens). Not differentiable (decode).

    Args:
        x:          (batch, dim) one token, or (batch, dim, seqlen) a few; float32 / float16 / bfloat16.
        conv_state: (batch, dim, state_len), state_len >= width-1, float32 / float16 / bfloat16 (may
                    differ from x's dtype), any strides; modified in place.
        weight:     (dim, width), 2 <= width <= 8. bias: (dim,) or None.
        activation: None, "silu" or "swish".
        backend:    as for causal_conv1d_fn.

    Returns:
        out with x's shape and dtype.
    """
    x3, conv_state, weight, bias, silu = _validate_update(x, conv_state, weight, bias, activation)
    name = backends.resolve(backend, x3.device, native_symbol="fs_causal_conv1d_update")
    if name == "torch":
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    out = torch.ops.fastscan.causal_conv1d_update(x3, conv_state, weight, bias, silu, name)
    return out.squeeze(-1) if x.dim() == 2 else out


def _validate_activation(activation):
    _expect(activation is None or (isinstance(activation, str) and activation in _ACTIVATIONS),
            f"activation: expected None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _validate_weight(weight, bias, dim):
    expect_tensor("weight", weight)
    _expect(weight.dim() == 2 and weight.shape[0] == dim,
            f"weight: expected (dim={dim}, width), got shape {tuple(weight.shape)}")
    width = weight.shape[1]
    _expect(2 <= width <= MAX_WIDTH, f"weight: width must be between 2 and {MAX_WIDTH}, got {width}")
    _expect(weight.is_floating_point(), f"weight: expected a float dtype, got {weight.dtype}")
    if bias is not None:
        _expect(isinstance(bias, Tensor) and bias.shape == (dim,), f"bias: expected shape ({dim},), got {shape_of(bias)}")
        _expect(bias.is_floating_point(), f"bias: expected a float dtype, got {bias.dtype}")
        bias = bias.float()
    return weight.float(), bias, width


def _validate_fn(x, weight, bias, initial_states, activation, cu_seqlens):
    expect_tensor("x", x)
    silu = _validate_activation(activation)
    _expect(x.dim() == 3, f"x: expected (batch, dim, seqlen), got shape {tuple(x.shape)}")
    _expect(x.dtype in FLOAT_DTYPES, f"x: expected float32, float16 or bfloat16, got {x.dtype}")
    batch, dim, seqlen = x.shape
    _expect(batch >= 1 and dim >= 1 and seqlen >= 1, f"x: every size must be >= 1, got {tuple(x.shape)}")
    weight, bias, width = _validate_weight(weight, bias, dim)
    states = batch
    if cu_seqlens is not None:
        _expect(batch == 1, f"x: packed sequences (cu_seqlens given) need batch 1, got batch {batch}")
        cu_seqlens = expect_cu_seqlens("cu_seqlens", cu_seqlens, seqlen, x.device)
        states = cu_seqlens.shape[0] - 1
    if initial_states is not None:
        what = "num_seqs" if cu_seqlens is not None else "batch"
        _expect(isinstance(initial_states, Tensor) and initial_states.shape == (states, dim, width - 1),
                f"initial_states: expected shape ({what}={states}, dim={dim}, width-1={width - 1}), "
                f"got {shape_of(initial_states)}")
        _expect(initial_states.is_floating_point(),
                f"initial_states: expected a float dtype, got {initial_states.dtype}")
        initial_states = initial_states.to(x.dtype)
    expect_same_device("x", x, weight=weight, bias=bias, initial_states=initial_states)
    return x, weight, bias, initial_states, silu, cu_seqlens


def _validate_update(x, conv_state, weight, bias, activation):
    expect_tensor("x", x)
    expect_tensor("conv_state", conv_state)
    silu = _validate_activation(activation)
    _expect(x.dim() in (2, 3), f"x: expected (batch, dim) or (batch, dim, seqlen), got shape {tuple(x.shape)}")
    _expect(x.dtype in FLOAT_DTYPES, f"x: expected float32, float16 or bfloat16, got {x.dtype}")
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    batch, dim, seqlen = x3.shape
    _expect(batch >= 1 and dim >= 1 and seqlen >= 1, f"x: every size must be >= 1, got {tuple(x.shape)}")
    weight, bias, width = _validate_weight(weight, bias, dim)
    _expect(conv_state.dim() == 3 and conv_state.shape[:2] == (batch, dim) and conv_state.shape[2] >= width - 1,
            f"conv_state: expected (batch={batch}, dim={dim}, state_len >= {width - 1}), "
            f"got shape {tuple(conv_state.shape)}")
    _expect(conv_state.dtype in FLOAT_DTYPES,
            f"conv_state: expected float32, float16 or bfloat16, got {conv_state.dtype}")
    expect_same_device("x", x, conv_state=conv_state, weight=weight, bias=bias)
    return x3, conv_state, weight, bias, silu


def _as_layout_of(t: Tensor, x: Tensor) -> Tensor:
    """t in x's memory layout when it is in neither (autograd hands expanded, stride-0 gradients)."""
    if x.stride(1) == 1 and x.stride(2) != 1:
        return t if t.stride(1) == 1 else t.transpose(1, 2).contiguous().transpose(1, 2)
    return t if t.stride(2) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# Compiled backends. Inputs are validated: weight (dim, width) and bias float32, initial_states in
# x's dtype. Forward returns (out in x's dtype and layout, final_states contiguous in x's dtype).
# ---------------------------------------------------------------------------------------------

def _impl(backend):
    if backend == "triton":
        from . import triton as impl
    else:
        from . import native as impl
        impl = _NativeBound(impl, backend)
    return impl


class _NativeBound:
    """The native module's functions with the backend name bound (the triton module takes none)."""

    def __init__(self, module, backend):
        self.module, self.backend = module, backend

    def __getattr__(self, name):
        fn = getattr(self.module, name)
        return lambda *args: fn(self.backend, *args)


@torch.library.custom_op("fastscan::causal_conv1d_fwd", mutates_args=())
def _causal_conv1d_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_states: Optional[Tensor],
                          silu: bool, cu_seqlens: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend).causal_conv1d_fwd(x, weight, bias, initial_states, silu, cu_seqlens)


def _num_states(x, cu_seqlens):
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@_causal_conv1d_fwd_op.register_fake
def _(x, weight, bias, initial_states, silu, cu_seqlens, backend):
    return like_x(x), x.new_empty((_num_states(x, cu_seqlens), x.shape[1], weight.shape[1] - 1))


# Absent optional gradients come back as empty tensors (an op cannot return None).
@torch.library.custom_op("fastscan::causal_conv1d_bwd", mutates_args=())
def _causal_conv1d_bwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_states: Optional[Tensor],
                          dout: Tensor, dfinal_states: Optional[Tensor], silu: bool, need_dinitial: bool,
                          cu_seqlens: Optional[Tensor], backend: str) -> list[Tensor]:
    dx, dweight, dbias, dinit = _impl(backend).causal_conv1d_bwd(x, weight, bias, initial_states, dout,
                                                                 dfinal_states, silu, need_dinitial, cu_seqlens)
    return [dx, dweight, dbias if dbias is not None else x.new_empty((0,)),
            dinit if dinit is not None else x.new_empty((0,))]


@_causal_conv1d_bwd_op.register_fake
def _(x, weight, bias, initial_states, dout, dfinal_states, silu, need_dinitial, cu_seqlens, backend):
    dim, width = weight.shape
    return [like_x(x), weight.new_empty((dim, width), dtype=torch.float32),
            weight.new_empty((dim,), dtype=torch.float32) if bias is not None else x.new_empty((0,)),
            x.new_empty((_num_states(x, cu_seqlens), dim, width - 1)) if need_dinitial else x.new_empty((0,))]


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_states, silu, cu_seqlens, backend = inputs
    ctx.save_for_backward(x, weight, bias, initial_states, cu_seqlens)
    ctx.silu, ctx.backend = silu, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dfinal_states):
    x, weight, bias, initial_states, cu_seqlens = ctx.saved_tensors
    dout = torch.zeros_like(x) if dout is None else _as_layout_of(dout, x)
    need_dinitial = initial_states is not None and ctx.needs_input_grad[3]
    dx, dweight, dbias, dinit = torch.ops.fastscan.causal_conv1d_bwd(
        x, weight, bias, initial_states, dout, dfinal_states, ctx.silu, need_dinitial, cu_seqlens, ctx.backend)
    return (dx, dweight, dbias if bias is not None else None, dinit if need_dinitial else None, None, None, None)


torch.library.register_autograd("fastscan::causal_conv1d_fwd", _backward, setup_context=_setup_context)


@torch.library.custom_op("fastscan::causal_conv1d_update", mutates_args=("conv_state",))
def _causal_conv1d_update_op(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                             backend: str) -> Tensor:
    return _impl(backend).causal_conv1d_update(x, conv_state, weight, bias, silu)


@_causal_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, silu, backend):
    return like_x(x)
