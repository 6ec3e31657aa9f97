"""Thin call into the compiled decode step (csrc/state_update) for the cpu, cuda and cuda_emu backends.

FsStateUpdateParams mirrors the struct of csrc/common/state_update_abi.h field by field.
Inputs arrive validated by fastscan.selective_state_update (B, C grouped 3-D in x's dtype; D,
dt_bias float32; state float32 or x's dtype, any strides).
"""
from __future__ import annotations

import ctypes

import torch

from .. import native

_i64, _i32, _vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class FsStateUpdateParams(ctypes.Structure):
    _fields_ = [
        ("batch", _i64), ("dim", _i64), ("dstate", _i64), ("n_groups", _i64),
        ("dtype", _i32), ("state_dtype", _i32), ("dt_softplus", _i32), ("reserved", _i32),
        ("state", _vp), ("state_stride", _i64 * 3),
        ("x", _vp), ("x_stride", _i64 * 2),
        ("dt", _vp), ("dt_stride", _i64 * 2),
        ("A", _vp), ("A_stride", _i64 * 2),
        ("B", _vp), ("B_stride", _i64 * 3),
        ("C", _vp), ("C_stride", _i64 * 3),
        ("D", _vp),
        ("z", _vp), ("z_stride", _i64 * 2),
        ("dt_bias", _vp),
        ("y", _vp), ("y_stride", _i64 * 2),
        ("stream", _vp),
    ]


def _arr(values, n):
    return (_i64 * n)(*values)


def selective_state_update(backend, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Updates `state` in place; returns y (batch, dim) contiguous in x's dtype."""
    lib = native.library(backend)
    # The ABI takes D and dt_bias as contiguous (dim,) float32.
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    batch, dim, dstate = state.shape
    y = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    p = FsStateUpdateParams()
    p.batch, p.dim, p.dstate, p.n_groups = batch, dim, dstate, B.shape[1]
    p.dtype, p.state_dtype = native.dtype_code(x.dtype), native.dtype_code(state.dtype)
    p.dt_softplus = int(dt_softplus)
    p.state, p.state_stride = native.ptr(state), _arr(state.stride(), 3)
    p.x, p.x_stride = native.ptr(x), _arr(x.stride(), 2)
    p.dt, p.dt_stride = native.ptr(dt), _arr(dt.stride(), 2)
    p.A, p.A_stride = native.ptr(A), _arr(A.stride(), 2)
    p.B, p.B_stride = native.ptr(B), _arr(B.stride(), 3)
    p.C, p.C_stride = native.ptr(C), _arr(C.stride(), 3)
    p.D = native.ptr(D)
    p.z, p.z_stride = native.ptr(z), _arr(native.strides(z, 2), 2)
    p.dt_bias = native.ptr(dt_bias)
    p.y, p.y_stride = native.ptr(y), _arr(y.stride(), 2)
    p.stream = native.stream_of(x)
    native.call(lib, "fs_selective_state_update", ctypes.byref(p))
    return y
