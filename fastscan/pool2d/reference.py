"""Pure-PyTorch 2D token pooling: the `torch` backend and, in float64, the oracle of the tests.

Written from the documented semantics, not from F.avg_pool2d / F.max_pool2d: the grid is padded up
to whole windows, windows are reduced explicitly, and the average divides by the number of valid
tokens of each window. (The tests check that torch's pooling with ceil_mode=True and padding=0
agrees; with padding > 0 and count_include_pad=True torch would count pad cells, so the oracle does
not lean on it.) Max picks the first maximal token of a window in row-major window order with
torch.argmax, which also routes the gradient to that one token, as torch's max pooling does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pooled_grid(H: int, W: int, kh: int, kw: int) -> tuple[int, int]:
    """(Ho, Wo) = (ceil(H / kh), ceil(W / kw))."""
    return -(-H // kh), -(-W // kw)


def pool2d_tokens_ref(x, grid, kernel=2, mode="avg", out=None, index=None):
    """Same arguments and result as `fastscan.pool2d_tokens` (validated by the caller).

    Computes in float64 when x is float64, otherwise float32; returns x's dtype. With out/index the
    pooled rows are copied into `out` in place (index_copy_, differentiable) and `out` is returned.
    """
    H, W = grid
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    num_images, _, C = x.shape
    Ho, Wo = pooled_grid(H, W, kh, kw)
    ct = _compute_dtype(x)
    grid_x = x.to(ct).reshape(num_images, H, W, C)
    pad_value = 0.0 if mode == "avg" else float("-inf")
    # F.pad pads from the last dim backwards: (C: 0, 0), (W: 0, pad_w), (H: 0, pad_h)
    padded = F.pad(grid_x, (0, 0, 0, Wo * kw - W, 0, Ho * kh - H), value=pad_value)
    windows = padded.reshape(num_images, Ho, kh, Wo, kw, C).permute(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(num_images, Ho, Wo, kh * kw, C)
    if mode == "avg":
        rows = torch.clamp(H - torch.arange(Ho, device=x.device) * kh, max=kh)
        cols = torch.clamp(W - torch.arange(Wo, device=x.device) * kw, max=kw)
        count = (rows[:, None] * cols[None, :]).to(ct)
        pooled = windows.sum(dim=3) / count[None, :, :, None]
    else:
        # NaN compares as the largest value in argmax, so a window with a NaN pools to NaN.
        first_max = windows.argmax(dim=3, keepdim=True)
        pooled = windows.gather(3, first_max).squeeze(3)
    pooled = pooled.reshape(num_images, Ho * Wo, C).to(x.dtype)
    if out is None:
        return pooled
    rows = (index.to(torch.int64)[:, None] + torch.arange(Ho * Wo, device=index.device)).reshape(-1)
    return out.index_copy_(0, rows.to(out.device), pooled.reshape(-1, C))
