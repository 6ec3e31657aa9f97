"""Thin calls into the compiled selective scan (csrc/selective_scan) for the cpu, cuda and cuda_emu backends.

The ctypes structures mirror FsScanParams / FsScanBwdParams in csrc/common/fastscan_abi.h field by field.
Inputs arrive validated by fastscan.selective_scan_fn (B, C grouped 4-D; D, delta_bias, initial_state float32;
cu_seqlens int32 on u's device). With cu_seqlens (batch 1) the states are per sequence: (num_seqs, dim, dstate).
"""
from __future__ import annotations

import ctypes

import torch

from .. import native

_i64, _i32, _vp, _fp = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p


class FsScanParams(ctypes.Structure):
    _fields_ = [
        ("batch", _i64), ("dim", _i64), ("seqlen", _i64), ("dstate", _i64), ("n_groups", _i64),
        ("dtype", _i32), ("delta_softplus", _i32),
        ("u", _vp), ("u_stride", _i64 * 3),
        ("delta", _vp), ("delta_stride", _i64 * 3),
        ("A", _fp), ("A_stride", _i64 * 2),
        ("B", _vp), ("B_stride", _i64 * 4),
        ("C", _vp), ("C_stride", _i64 * 4),
        ("D", _fp),
        ("z", _vp), ("z_stride", _i64 * 3),
        ("delta_bias", _fp),
        ("initial_state", _fp), ("initial_state_stride", _i64 * 3),
        ("y", _vp), ("y_stride", _i64 * 3),
        ("last_state", _fp),
        ("stream", _vp),
        ("cu_seqlens", _vp), ("num_seqs", _i64),
    ]


class FsScanBwdParams(ctypes.Structure):
    _fields_ = [
        ("fwd", FsScanParams),
        ("dy", _vp), ("dy_stride", _i64 * 3),
        ("dlast_state", _fp),
        ("du", _vp), ("ddelta", _vp), ("dz", _vp),
        ("dA", _fp), ("dB", _fp), ("dC", _fp), ("dD", _fp), ("ddelta_bias", _fp),
        ("dinitial_state", _fp),
        ("workspace", _vp),
    ]


def _arr(values, n):
    return (_i64 * n)(*values)


def _params(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, y, last_state, cu_seqlens):
    batch, dim, seqlen = u.shape
    p = FsScanParams()
    p.batch, p.dim, p.seqlen, p.dstate, p.n_groups = batch, dim, seqlen, A.shape[1], B.shape[1]
    p.dtype, p.delta_softplus = native.dtype_code(u.dtype), int(delta_softplus)
    p.u, p.u_stride = native.ptr(u), _arr(u.stride(), 3)
    p.delta, p.delta_stride = native.ptr(delta), _arr(delta.stride(), 3)
    p.A, p.A_stride = native.ptr(A), _arr(A.stride(), 2)
    p.B, p.B_stride = native.ptr(B), _arr(B.stride(), 4)
    p.C, p.C_stride = native.ptr(C), _arr(C.stride(), 4)
    p.D = native.ptr(D)
    p.z, p.z_stride = native.ptr(z), _arr(native.strides(z, 3), 3)
    p.delta_bias = native.ptr(delta_bias)
    p.initial_state = native.ptr(initial_state)
    p.initial_state_stride = _arr(native.strides(initial_state, 3), 3)
    p.y, p.y_stride = native.ptr(y), _arr(native.strides(y, 3), 3)
    p.last_state = native.ptr(last_state)
    p.stream = native.stream_of(u)
    p.cu_seqlens = native.ptr(cu_seqlens)
    p.num_seqs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 0
    return p


def _contiguous_vectors(*tensors):
    # The ABI takes D and delta_bias as contiguous (dim,) float32.
    return [t.contiguous() if t is not None else None for t in tensors]


def _num_states(u, cu_seqlens):
    # Leading size of initial/last states and their gradients: per batch row, or per packed sequence.
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else u.shape[0]


def selective_scan_fwd(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                       cu_seqlens=None):
    lib = native.library(backend)
    D, delta_bias, cu_seqlens = _contiguous_vectors(D, delta_bias, cu_seqlens)
    batch, dim, seqlen = u.shape
    y = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=u.device)
    last_state = torch.empty((_num_states(u, cu_seqlens), dim, A.shape[1]), dtype=torch.float32, device=u.device)
    p = _params(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, y, last_state, cu_seqlens)
    native.call(lib, "fs_selective_scan_fwd", ctypes.byref(p))
    return y, last_state


def selective_scan_bwd(backend, dy, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                       initial_state, cu_seqlens=None):
    lib = native.library(backend)
    D, delta_bias, cu_seqlens = _contiguous_vectors(D, delta_bias, cu_seqlens)
    dlast_state = dlast_state.float().contiguous() if dlast_state is not None else None
    f32 = dict(dtype=torch.float32, device=u.device)
    batch, dim, seqlen = u.shape
    du = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=u.device)
    ddelta = torch.empty_like(du)
    dz = torch.empty_like(du) if z is not None else None
    dA = torch.empty(A.shape, **f32)
    dB = torch.empty(B.shape, **f32)
    dC = torch.empty(C.shape, **f32)
    dD = torch.empty((dim,), **f32) if D is not None else None
    ddelta_bias = torch.empty((dim,), **f32) if delta_bias is not None else None
    dinitial_state = (torch.empty((_num_states(u, cu_seqlens), dim, A.shape[1]), **f32)
                      if initial_state is not None else None)

    b = FsScanBwdParams()
    b.fwd = _params(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, None, None, cu_seqlens)
    b.dy, b.dy_stride = native.ptr(dy), _arr(dy.stride(), 3)
    b.dlast_state = native.ptr(dlast_state)
    b.du, b.ddelta, b.dz = native.ptr(du), native.ptr(ddelta), native.ptr(dz)
    b.dA, b.dB, b.dC = native.ptr(dA), native.ptr(dB), native.ptr(dC)
    b.dD, b.ddelta_bias, b.dinitial_state = native.ptr(dD), native.ptr(ddelta_bias), native.ptr(dinitial_state)
    workspace = native.workspace(lib, "fs_selective_scan_bwd_workspace_bytes", ctypes.byref(b.fwd), u.device)
    b.workspace = native.ptr(workspace)
    native.call(lib, "fs_selective_scan_bwd", ctypes.byref(b))
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state
