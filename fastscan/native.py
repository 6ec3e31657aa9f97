"""Loads the compiled backends (fastscan/_lib/libfastscan_{cpu,cuda,cuda_emu}*.so) with ctypes and turns
tensors into the raw pointers, strides and dtype codes of the C ABI (csrc/common/fastscan_abi.h)."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

LIB_DIR = Path(__file__).resolve().parent / "_lib"

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class NativeError(RuntimeError):
    """A compiled launcher returned an error code."""


@functools.lru_cache(maxsize=None)
def library(name: str) -> ctypes.CDLL | None:
    """The loaded library for backend `name`, or None when it was not built."""
    candidates = sorted(LIB_DIR.glob(f"libfastscan_{name}.*so")) + sorted(LIB_DIR.glob(f"libfastscan_{name}.so"))
    if not candidates:
        return None
    lib = ctypes.CDLL(str(candidates[0]))
    lib.fs_last_error.restype = ctypes.c_char_p
    lib.fs_backend_name.restype = ctypes.c_char_p
    built_as = lib.fs_backend_name().decode()
    if built_as != name:
        raise ImportError(f"{candidates[0]} reports backend {built_as!r}, expected {name!r}; rebuild with `pip install -e .`")
    return lib


def call(lib: ctypes.CDLL, fn_name: str, *args) -> int:
    """Call a launcher; turn a nonzero status into NativeError carrying the library's message."""
    fn = getattr(lib, fn_name)
    status = fn(*args)
    if status != 0:
        raise NativeError(f"{fn_name} ({lib.fs_backend_name().decode()}): {lib.fs_last_error().decode()}")
    return status


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def stream_of(t: torch.Tensor) -> ctypes.c_void_p:
    if t.device.type == "cuda":
        return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)
    return ctypes.c_void_p(None)


def workspace(lib: ctypes.CDLL, fn_name: str, params, device: torch.device) -> torch.Tensor | None:
    """The scratch a backward launcher asks for: `fn_name(params)` returns a byte count (< 0 on error,
    with the library's message). None when it needs none."""
    fn = getattr(lib, fn_name)
    fn.restype = ctypes.c_int64
    nbytes = fn(params)
    if nbytes < 0:
        raise NativeError(f"{fn_name} ({lib.fs_backend_name().decode()}): {lib.fs_last_error().decode()}")
    return torch.empty((nbytes,), dtype=torch.uint8, device=device) if nbytes > 0 else None
