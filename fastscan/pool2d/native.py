"""Thin calls into the compiled 2D token pooling (csrc/pool2d) for the cpu, cuda and cuda_emu backends.

The ctypes structures mirror FsPool2dParams / FsPool2dBwdParams in csrc/common/pool2d_abi.h field
by field. Inputs arrive validated by fastscan.pool2d_tokens (index ranges inside out, no overlap).
"""
from __future__ import annotations

import ctypes

import torch

from .. import native

_i64, _i32, _vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p

MODE_CODES = {"avg": 0, "max": 1}


class FsPool2dParams(ctypes.Structure):
    _fields_ = [
        ("num_images", _i64), ("H", _i64), ("W", _i64), ("C", _i64),
        ("kh", _i64), ("kw", _i64), ("Ho", _i64), ("Wo", _i64),
        ("dtype", _i32), ("mode", _i32),
        ("x", _vp), ("x_stride", _i64 * 3),
        ("y", _vp), ("y_stride", _i64 * 3),
        ("index", _vp),
        ("stream", _vp),
    ]


class FsPool2dBwdParams(ctypes.Structure):
    _fields_ = [
        ("fwd", FsPool2dParams),
        ("dy", _vp), ("dy_stride", _i64 * 3),
        ("dx", _vp),
    ]


def _rows_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of y / dy as (image, token, channel): a (T, C) buffer has no image stride."""
    return tuple(t.stride()) if t.dim() == 3 else (0, *t.stride())


def _params(x, H, W, kh, kw, mode, y, index):
    num_images, _, C = x.shape
    p = FsPool2dParams()
    p.num_images, p.H, p.W, p.C, p.kh, p.kw = num_images, H, W, C, kh, kw
    p.Ho, p.Wo = -(-H // kh), -(-W // kw)
    p.dtype, p.mode = native.dtype_code(x.dtype), MODE_CODES[mode]
    p.x, p.x_stride = native.ptr(x), (_i64 * 3)(*x.stride())
    if y is not None:
        p.y, p.y_stride = native.ptr(y), (_i64 * 3)(*_rows_strides(y))
    p.index = native.ptr(index)
    p.stream = native.stream_of(x)
    return p


def _device_index(index, x):
    # The kernels read index[i] as int64 on x's device; the cpu backend reads host memory.
    return index.to(device=x.device, dtype=torch.int64).contiguous() if index is not None else None


def pool2d_tokens_fwd(backend, x, H, W, kh, kw, mode, out=None, index=None):
    """Pooled (num_images, Ho * Wo, C) tensor, or `out` with its index rows written."""
    lib = native.library(backend)
    num_images, _, C = x.shape
    Ho, Wo = -(-H // kh), -(-W // kw)
    y = out if out is not None else torch.empty((num_images, Ho * Wo, C), dtype=x.dtype, device=x.device)
    index = _device_index(index, x)
    p = _params(x, H, W, kh, kw, mode, y, index)
    native.call(lib, "fs_pool2d_tokens_fwd", ctypes.byref(p))
    return y


def pool2d_tokens_bwd(backend, dy, x, H, W, kh, kw, mode, index=None):
    """dx (num_images, H * W, C) contiguous; dy is (num_images, Ho * Wo, C), or (T, C) with index."""
    lib = native.library(backend)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    index = _device_index(index, x)
    b = FsPool2dBwdParams()
    b.fwd = _params(x, H, W, kh, kw, mode, None, index)
    b.dy, b.dy_stride = native.ptr(dy), (_i64 * 3)(*_rows_strides(dy))
    b.dx = native.ptr(dx)
    native.call(lib, "fs_pool2d_tokens_bwd", ctypes.byref(b))
    return dx
