"""Which backends exist, which are built, and how one is chosen for a call.

Backends:
  torch     the pure-PyTorch reference (any device; the oracle in tests)
  triton    Triton kernels (CUDA tensors; CPU tensors when TRITON_INTERPRET=1 was set before triton import)
  cuda      the CUDA kernels of csrc/ (CUDA tensors; needs libfastscan_cuda, built when nvcc is found)
  cpu       the C++ kernels of csrc/ (CPU tensors; libfastscan_cpu, always built)
  cuda_emu  the CUDA sources compiled for the CPU against an emulation header (CPU tensors; for tests)

Choice: `backend=` argument, else the FASTSCAN_BACKEND environment variable, else by device:
CUDA tensors -> cuda, triton, torch (first available); CPU tensors -> cpu, torch.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import native

BACKENDS = ("torch", "triton", "cuda", "cpu", "cuda_emu")

_HOW_TO_GET = {
    "triton": "install triton (`pip install triton`) and use CUDA tensors; on a CPU it runs only under the "
              "interpreter: set TRITON_INTERPRET=1 before anything imports triton",
    "cuda": "rebuild with nvcc on PATH (`FASTSCAN_BUILD_CUDA=1 pip install -e .`) and run on a machine with a CUDA GPU",
    "cpu": "rebuild the package (`pip install -e .`; needs cmake, ninja and a C++ compiler with OpenMP)",
    "cuda_emu": "rebuild with the CUDA headers available (`CUDA_HOME=/usr/local/cuda pip install -e .`)",
}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def is_available(backend: str) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        return _triton_importable() and (torch.cuda.is_available() or triton_interpreted())
    if backend == "cuda":
        return torch.cuda.is_available() and native.library("cuda") is not None
    if backend in ("cpu", "cuda_emu"):
        return native.library(backend) is not None
    return False


def available_backends() -> list[str]:
    """The backends usable on this machine, in BACKENDS order."""
    return [b for b in BACKENDS if is_available(b)]


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend in ("cpu", "cuda_emu"):
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return False


# The choice is a trace-time constant for torch.compile: evaluated once, not traced (it reads the
# environment and probes ctypes libraries, which dynamo cannot follow).
@torch._dynamo.assume_constant_result
def resolve(backend: str | None, device: torch.device, supported: tuple[str, ...] = BACKENDS,
            native_symbol: str | None = None) -> str:
    """Pick the backend for one call on tensors living on `device`; raise a ValueError saying what to do.

    `native_symbol` is the op's launcher in the compiled libraries: a library built from an older
    checkout that lacks it is reported as needing a rebuild.
    """
    name = _choose(backend, device, supported)
    if native_symbol is not None and name in ("cpu", "cuda", "cuda_emu"):
        if not hasattr(native.library(name), native_symbol):
            raise RuntimeError(f"libfastscan_{name} was built without {native_symbol}: rebuild with `pip install -e .`")
    return name


def _choose(backend, device, supported):
    requested = backend if backend is not None else os.environ.get("FASTSCAN_BACKEND") or None
    if requested is None:
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for candidate in order:
            if candidate in supported and is_available(candidate) and _runs_on(candidate, device):
                return candidate
        return "torch"
    source = "backend" if backend is not None else "FASTSCAN_BACKEND"
    if requested not in BACKENDS:
        raise ValueError(f"{source}: got {requested!r}, expected one of {BACKENDS}")
    if requested not in supported:
        raise ValueError(f"{source}: {requested!r} is not implemented for this op; it has {supported}")
    if not is_available(requested):
        raise RuntimeError(f"{source}={requested!r} is not available here: {_HOW_TO_GET[requested]}")
    if not _runs_on(requested, device):
        raise ValueError(f"{source}={requested!r} cannot run on {device.type} tensors")
    return requested
