"""Test session setup.

TRITON_INTERPRET must be set before anything imports triton: with it, Triton kernels run on CPU
tensors through the interpreter. (AOT compilation needs it unset: test_aot runs in a subprocess.)
Every torch.empty / torch.empty_like made during a test is filled with NaN, so an output a kernel
forgets to write fails the comparison instead of passing by luck.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_empty, _empty_like = torch.empty, torch.empty_like


def _poison(t):
    if t.is_floating_point() and t.numel() > 0:
        with torch.no_grad():  # an empty(..., requires_grad=True) leaf may be poisoned too
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))
    yield


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error norm ||actual - expected|| / ||expected|| in float64 (NaN propagates)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff
