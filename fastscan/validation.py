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
