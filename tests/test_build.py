"""`pip install -e .` built what this machine can build, and the libraries speak the C ABI."""
import os
import shutil
from pathlib import Path

import pytest

import fastscan
from fastscan import native


def test_cpu_library_is_always_built():
    assert "cpu" in fastscan.available_backends()
    assert native.library("cpu").fs_backend_name() == b"cpu"


def test_cuda_emu_built_when_cuda_headers_exist():
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    if not (cuda_home / "include" / "cuda_fp16.h").exists():
        pytest.skip("no CUDA headers on this machine")
    assert "cuda_emu" in fastscan.available_backends()
    assert native.library("cuda_emu").fs_backend_name() == b"cuda_emu"


def test_cuda_library_built_when_nvcc_exists():
    if shutil.which("nvcc") is None and os.environ.get("FASTSCAN_BUILD_CUDA", "") != "1":
        pytest.skip("no nvcc on this machine")
    if os.environ.get("FASTSCAN_BUILD_CUDA", "") == "0":
        pytest.skip("FASTSCAN_BUILD_CUDA=0")
    assert native.library("cuda") is not None  # loadable even without a GPU (static cudart)
    assert native.library("cuda").fs_backend_name() == b"cuda"


def test_launcher_error_becomes_exception():
    """An error code from a launcher surfaces as NativeError carrying the library's message."""
    lib = native.library("cpu")
    import ctypes
    from fastscan.selective_scan.native import FsScanParams
    p = FsScanParams()  # all zero: batch 0, null pointers
    p.dtype = 7  # not a dtype code
    with pytest.raises(native.NativeError, match="fs_selective_scan_fwd"):
        native.call(lib, "fs_selective_scan_fwd", ctypes.byref(p))
