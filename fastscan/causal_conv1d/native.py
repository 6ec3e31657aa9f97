"""Thin calls into the compiled causal conv1d (csrc/causal_conv1d) for the cpu, cuda and cuda_emu backends.

The ctypes structures mirror FsConv1dParams / FsConv1dBwdParams / FsConv1dUpdateParams in
csrc/common/causal_conv1d_abi.h field by field. Inputs arrive validated by fastscan.causal_conv1d_fn
(weight and bias float32, initial_states in x's dtype; cu_seqlens int32 on x's device, batch 1);
outputs are allocated here by `like_x`. With cu_seqlens the per-row states (initial, final and their
gradients) are per sequence: (num_seqs, dim, width-1).
"""
from __future__ import annotations

import ctypes

import torch

from .. import native

_i64, _i32, _vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class FsConv1dParams(ctypes.Structure):
    _fields_ = [
        ("batch", _i64), ("dim", _i64), ("seqlen", _i64), ("width", _i64),
        ("dtype", _i32), ("silu", _i32),
        ("x", _vp), ("x_stride", _i64 * 3),
        ("weight", _vp), ("weight_stride", _i64 * 2),
        ("bias", _vp),
        ("initial_states", _vp), ("initial_states_stride", _i64 * 3),
        ("out", _vp), ("out_stride", _i64 * 3),
        ("final_states", _vp), ("final_states_stride", _i64 * 3),
        ("stream", _vp),
        ("cu_seqlens", _vp), ("num_seqs", _i64),
    ]


class FsConv1dBwdParams(ctypes.Structure):
    _fields_ = [
        ("fwd", FsConv1dParams),
        ("dout", _vp), ("dout_stride", _i64 * 3),
        ("dfinal_states", _vp), ("dfinal_states_stride", _i64 * 3),
        ("dx", _vp), ("dx_stride", _i64 * 3),
        ("dweight", _vp), ("dbias", _vp),
        ("dinitial_states", _vp), ("dinitial_states_stride", _i64 * 3),
        ("workspace", _vp),
    ]


class FsConv1dUpdateParams(ctypes.Structure):
    _fields_ = [
        ("batch", _i64), ("dim", _i64), ("seqlen", _i64), ("width", _i64), ("state_len", _i64),
        ("dtype", _i32), ("state_dtype", _i32), ("silu", _i32), ("unused", _i32),
        ("x", _vp), ("x_stride", _i64 * 3),
        ("conv_state", _vp), ("conv_state_stride", _i64 * 3),
        ("weight", _vp), ("weight_stride", _i64 * 2),
        ("bias", _vp),
        ("out", _vp), ("out_stride", _i64 * 3),
        ("stream", _vp),
    ]


def like_x(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """An empty (batch, dim, seqlen) tensor in x's memory layout: channel-last when x is, else contiguous."""
    batch, dim, seqlen = x.shape
    kw = dict(dtype=dtype or x.dtype, device=x.device)
    if x.stride(1) == 1 and x.stride(2) != 1:
        return torch.empty((batch, seqlen, dim), **kw).transpose(1, 2)
    return torch.empty((batch, dim, seqlen), **kw)


def _arr(t, n):
    return (_i64 * n)(*(native.strides(t, n)))


def _num_states(x, cu_seqlens):
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _params(x, weight, bias, initial_states, silu, cu_seqlens, out=None, final_states=None):
    batch, dim, seqlen = x.shape
    p = FsConv1dParams()
    p.batch, p.dim, p.seqlen, p.width = batch, dim, seqlen, weight.shape[1]
    p.dtype, p.silu = native.dtype_code(x.dtype), int(silu)
    p.x, p.x_stride = native.ptr(x), _arr(x, 3)
    p.weight, p.weight_stride = native.ptr(weight), _arr(weight, 2)
    p.bias = native.ptr(bias)
    p.initial_states, p.initial_states_stride = native.ptr(initial_states), _arr(initial_states, 3)
    p.out, p.out_stride = native.ptr(out), _arr(out, 3)
    p.final_states, p.final_states_stride = native.ptr(final_states), _arr(final_states, 3)
    p.stream = native.stream_of(x)
    if cu_seqlens is not None:
        p.cu_seqlens, p.num_seqs = native.ptr(cu_seqlens), cu_seqlens.shape[0] - 1
    return p


def causal_conv1d_fwd(backend, x, weight, bias, initial_states, silu, cu_seqlens=None):
    lib = native.library(backend)
    cu_seqlens = cu_seqlens.contiguous() if cu_seqlens is not None else None
    bias = bias.contiguous() if bias is not None else None
    dim = x.shape[1]
    out = like_x(x)
    final_states = torch.empty((_num_states(x, cu_seqlens), dim, weight.shape[1] - 1), dtype=x.dtype, device=x.device)
    p = _params(x, weight, bias, initial_states, silu, cu_seqlens, out, final_states)
    native.call(lib, "fs_causal_conv1d_fwd", ctypes.byref(p))
    return out, final_states


def causal_conv1d_bwd(backend, x, weight, bias, initial_states, dout, dfinal_states, silu, need_dinitial,
                      cu_seqlens=None):
    """(dx in x's layout, dweight float32, dbias float32 or None, dinitial_states or None)."""
    lib = native.library(backend)
    cu_seqlens = cu_seqlens.contiguous() if cu_seqlens is not None else None
    bias = bias.contiguous() if bias is not None else None
    dim = x.shape[1]
    width = weight.shape[1]
    dx = like_x(x)
    dweight = torch.empty((dim, width), dtype=torch.float32, device=x.device)
    dbias = torch.empty((dim,), dtype=torch.float32, device=x.device) if bias is not None else None
    dinit = (torch.empty((_num_states(x, cu_seqlens), dim, width - 1), dtype=x.dtype, device=x.device)
             if need_dinitial else None)
    q = FsConv1dBwdParams()
    q.fwd = _params(x, weight, bias, initial_states, silu, cu_seqlens)
    q.dout, q.dout_stride = native.ptr(dout), _arr(dout, 3)
    q.dfinal_states, q.dfinal_states_stride = native.ptr(dfinal_states), _arr(dfinal_states, 3)
    q.dx, q.dx_stride = native.ptr(dx), _arr(dx, 3)
    q.dweight, q.dbias = native.ptr(dweight), native.ptr(dbias)
    q.dinitial_states, q.dinitial_states_stride = native.ptr(dinit), _arr(dinit, 3)
    workspace = native.workspace(lib, "fs_causal_conv1d_bwd_workspace_bytes", ctypes.byref(q.fwd), x.device)
    q.workspace = native.ptr(workspace)
    native.call(lib, "fs_causal_conv1d_bwd", ctypes.byref(q))
    return dx, dweight, dbias, dinit


def causal_conv1d_update(backend, x, conv_state, weight, bias, silu):
    """x (batch, dim, seqlen); updates conv_state in place; returns out shaped and laid out like x."""
    lib = native.library(backend)
    bias = bias.contiguous() if bias is not None else None
    batch, dim, seqlen = x.shape
    out = like_x(x)
    u = FsConv1dUpdateParams()
    u.batch, u.dim, u.seqlen, u.width, u.state_len = batch, dim, seqlen, weight.shape[1], conv_state.shape[2]
    u.dtype, u.state_dtype, u.silu = native.dtype_code(x.dtype), native.dtype_code(conv_state.dtype), int(silu)
    u.x, u.x_stride = native.ptr(x), _arr(x, 3)
    u.conv_state, u.conv_state_stride = native.ptr(conv_state), _arr(conv_state, 3)
    u.weight, u.weight_stride = native.ptr(weight), _arr(weight, 2)
    u.bias = native.ptr(bias)
    u.out, u.out_stride = native.ptr(out), _arr(out, 3)
    u.stream = native.stream_of(x)
    native.call(lib, "fs_causal_conv1d_update", ctypes.byref(u))
    return out
