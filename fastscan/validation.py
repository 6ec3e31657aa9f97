"""Argument checks shared by the public functions: every error names the argument, what it got and
what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def expect_tensor(name: str, t) -> torch.Tensor:
    expect(isinstance(t, torch.Tensor), f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def shape_of(t) -> tuple:
    """Shape for error messages, also for non-tensors."""
    return tuple(getattr(t, "shape", ()))


def expect_same_device(reference_name: str, reference: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name}: expected device {reference.device} (as {reference_name}), got {t.device}")


def _is_tracing(t: torch.Tensor) -> bool:
    """True under torch.compile / fake-tensor tracing, where tensor values cannot be read."""
    return torch.compiler.is_compiling() or type(t).__name__ == "FakeTensor"


def expect_cu_seqlens(name: str, cu_seqlens, total: int, device: torch.device) -> torch.Tensor:
    """Validate packed-sequence boundaries and return them as an int32 tensor on `device`.

    cu_seqlens: (num_seqs + 1,) int32, cu_seqlens[0] == 0, non-decreasing (empty sequences are
    allowed), cu_seqlens[-1] == total. Values are checked on the host when the tensor lives on the
    CPU (the usual case: a CPU copy, as fla passes, is then moved to `device` without a sync). A
    tensor already on a GPU is checked with device-side assertions instead (no host sync), and not at
    all while tracing under torch.compile.
    """
    expect_tensor(name, cu_seqlens)
    expect(cu_seqlens.dtype == torch.int32, f"{name}: expected int32, got {cu_seqlens.dtype}")
    expect(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2,
           f"{name}: expected shape (num_seqs + 1,) with num_seqs >= 1, got {tuple(cu_seqlens.shape)}")
    if _is_tracing(cu_seqlens):
        return cu_seqlens
    if cu_seqlens.device.type == "cpu":
        values = cu_seqlens.tolist()
        expect(values[0] == 0, f"{name}: expected to start at 0, got {values[0]}")
        steps = [b - a for a, b in zip(values, values[1:])]
        if min(steps) < 0:
            i = steps.index(min(steps))
            raise ValueError(f"{name}: expected non-decreasing boundaries, got {values[i]} then {values[i + 1]} "
                             f"at positions {i} and {i + 1}")
        expect(values[-1] == total, f"{name}: expected to end at the packed length {total}, got {values[-1]}")
        return cu_seqlens.to(device, non_blocking=True)
    expect(cu_seqlens.device == device, f"{name}: expected device {device} or cpu, got {cu_seqlens.device}")
    torch._assert_async(cu_seqlens[0] == 0, f"{name}: expected to start at 0")
    torch._assert_async((cu_seqlens[1:] >= cu_seqlens[:-1]).all(), f"{name}: expected non-decreasing boundaries")
    torch._assert_async(cu_seqlens[-1] == total, f"{name}: expected to end at the packed length")
    return cu_seqlens
