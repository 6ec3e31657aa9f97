"""Fused 2D pooling of vision tokens: `pool2d_tokens`, LongLLaVA's 24 x 24 -> 12 x 12 step, with an
optional scatter of the pooled rows straight into a packed input-embedding buffer.

The public function validates once, then calls `fastscan::pool2d_tokens_fwd` (functional, autograd
registered; its backward is `fastscan::pool2d_tokens_bwd`) or, with out/index, the mutating
`fastscan::pool2d_tokens_scatter` (wrapped in an autograd.Function that marks `out` dirty when a
gradient is needed). Every op dispatches to a backend by name.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..validation import FLOAT_DTYPES, expect as _expect, expect_tensor, shape_of
from .reference import pool2d_tokens_ref, pooled_grid

__all__ = ["pool2d_tokens", "pool2d_tokens_ref"]

MODES = ("avg", "max")


def pool2d_tokens(x, grid, kernel=2, mode="avg", out=None, index=None, backend=None):
    """Pool each image's grid of patch tokens with a kernel x kernel window (stride = kernel).

    x holds num_images grids of H x W tokens in row-major order (token h * W + w). Windows of
    kh x kw tokens with stride (kh, kw) tile the grid; the pooled grid is ceil(H / kh) x ceil(W / kw),
    also row-major. When kh does not divide H (or kw W) the windows on the bottom (right) edge are cut
    short, "ceil mode" without padding:
        avg: the mean over the window's valid tokens (the sum divided by their count, not by kh * kw)
        max: the maximum over the window's valid tokens (NaN when one of them is NaN)
    This equals torch's F.avg_pool2d / F.max_pool2d(kernel, ceil_mode=True, padding=0) on the grid
    viewed as (num_images, C, H, W). LongLLaVA: 24 x 24 CLIP tokens, kernel 2 -> 144 tokens per image
    (kernel 4 -> 36). Accumulation in float32, result in x's dtype.

    Fused scatter: with out (T, C) and index (num_images,), image i's pooled tokens are written to
    rows index[i] .. index[i] + Ho * Wo - 1 of out (the image placeholders of a packed prompt), with
    no intermediate tensor; the other rows of out are left untouched and out is returned.

    Gradients flow to x for both modes (max: to the window's first maximal token, as torch routes
    ties; the argmax is recomputed in the backward, nothing is saved). With out/index the op is an
    in-place write into out and autograd treats it as one: the gradient of the written rows flows back
    to x, the gradient of the previous content of out is the incoming gradient with those rows zeroed,
    so out may be a non-leaf tensor in the graph (a leaf that requires grad cannot be written in place,
    as for any torch in-place op).

    Args:
        x:      (num_images, H * W, C) float32 / float16 / bfloat16, any strides (a channel-strided view
                is read without a copy by the compiled backends).
        grid:   (H, W) with H * W == x.shape[1].
        kernel: int or (kh, kw), each >= 1; also the stride. A kernel larger than the grid pools it whole.
        mode:   "avg" or "max".
        out:    None, or (T, C) tensor of x's dtype and device; written in place.
        index:  (num_images,) int64 first row of each image in out, on x's device or on the CPU; given
                iff out is. The ranges [index[i], index[i] + Ho * Wo) must lie inside out and must not
                overlap (checked on the host from a CPU copy of index: a sync for CUDA tensors).
        backend: "torch", "triton", "cuda", "cpu", "cuda_emu" or None (FASTSCAN_BACKEND, then by device).

    Returns:
        (num_images, Ho * Wo, C) pooled tokens in x's dtype, contiguous; or out when out is given.

    Raises:
        ValueError naming the argument for a bad shape, dtype, device, grid, kernel, mode or index.
    """
    x, H, W, kh, kw = _validate(x, grid, kernel, mode, out, index)
    name = backends.resolve(backend, x.device, native_symbol="fs_pool2d_tokens_fwd")
    if name == "torch":  # plain autograd through the reference
        if out is not None and not torch.compiler.is_compiling():
            check_index_ranges(index, pooled_grid(H, W, kh, kw), out.shape[0])
        return pool2d_tokens_ref(x, (H, W), (kh, kw), mode, out, index)
    if out is None:
        return torch.ops.fastscan.pool2d_tokens_fwd(x, H, W, kh, kw, mode, name)
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        return _PoolScatter.apply(out, x, index, H, W, kh, kw, mode, name)
    torch.ops.fastscan.pool2d_tokens_scatter(x, out, index, H, W, kh, kw, mode, name)
    return out


def _int_pair(name, value):
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    _expect(pair is not None and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                        for v in pair),
            f"{name}: expected an int >= 1 or a pair of them, got {value!r}")
    return pair


def _validate(x, grid, kernel, mode, out, index):
    expect_tensor("x", x)
    _expect(x.dim() == 3, f"x: expected (num_images, H * W, C), got shape {tuple(x.shape)}")
    _expect(x.dtype in FLOAT_DTYPES, f"x: expected float32, float16 or bfloat16, got {x.dtype}")
    num_images, tokens, C = x.shape
    _expect(C >= 1, f"x: expected C >= 1 channels, got shape {tuple(x.shape)}")
    _expect(isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid),
            f"grid: expected (H, W), two ints >= 1, got {grid!r}")
    H, W = grid
    _expect(H * W == tokens, f"grid: expected H * W == x.shape[1] = {tokens}, got {tuple(grid)} ({H * W} tokens)")
    kh, kw = _int_pair("kernel", kernel)
    _expect(mode in MODES, f"mode: expected one of {MODES}, got {mode!r}")
    _expect((out is None) == (index is None),
            "index: required when out is given" if index is None else "out: required when index is given")
    if out is not None:
        expect_tensor("out", out)
        _expect(out.dim() == 2 and out.shape[1] == C,
                f"out: expected (T, C={C}), got shape {tuple(out.shape)}")
        _expect(out.dtype == x.dtype, f"out: expected x's dtype {x.dtype}, got {out.dtype}")
        _expect(out.device == x.device, f"out: expected device {x.device} (as x), got {out.device}")
        expect_tensor("index", index)
        _expect(index.dtype == torch.int64, f"index: expected int64, got {index.dtype}")
        _expect(index.shape == (num_images,), f"index: expected shape ({num_images},), got {shape_of(index)}")
        _expect(index.device == x.device or index.device.type == "cpu",
                f"index: expected device {x.device} (as x) or cpu, got {index.device}")
    return x, H, W, kh, kw


def check_index_ranges(index: Tensor, pooled: tuple[int, int], rows: int) -> None:
    """ValueError unless every [index[i], index[i] + Ho * Wo) lies in [0, rows) and none overlap."""
    tokens = pooled[0] * pooled[1]
    starts = index.detach().cpu().tolist()
    for i, start in enumerate(starts):
        _expect(0 <= start and start + tokens <= rows,
                f"index: image {i} writes rows [{start}, {start + tokens}), outside out's {rows} rows")
    order = sorted(range(len(starts)), key=starts.__getitem__)
    for a, b in zip(order, order[1:]):
        _expect(starts[a] + tokens <= starts[b],
                f"index: images {a} and {b} overlap (rows [{starts[a]}, {starts[a] + tokens}) and "
                f"[{starts[b]}, {starts[b] + tokens}), {tokens} rows per image)")


# ---------------------------------------------------------------------------------------------
# Compiled backends (triton, cuda, cpu, cuda_emu) on validated inputs.
# ---------------------------------------------------------------------------------------------

def _fwd_impl(backend, x, H, W, kh, kw, mode, out=None, index=None):
    if x.shape[0] == 0:
        Ho, Wo = pooled_grid(H, W, kh, kw)
        return out if out is not None else x.new_empty((0, Ho * Wo, x.shape[2]))
    if backend == "triton":
        from . import triton as triton_impl
        return triton_impl.pool2d_tokens_fwd(x, H, W, kh, kw, mode, out, index)
    from . import native as native_impl
    return native_impl.pool2d_tokens_fwd(backend, x, H, W, kh, kw, mode, out, index)


def _bwd_impl(backend, dy, x, H, W, kh, kw, mode, index=None):
    if x.shape[0] == 0:
        return torch.zeros_like(x, memory_format=torch.contiguous_format)
    if backend == "triton":
        from . import triton as triton_impl
        return triton_impl.pool2d_tokens_bwd(dy, x, H, W, kh, kw, mode, index)
    from . import native as native_impl
    return native_impl.pool2d_tokens_bwd(backend, dy, x, H, W, kh, kw, mode, index)


# ---------------------------------------------------------------------------------------------
# torch.library ops. An op argument may not be called `mode`: torch's dispatch-mode redirection
# takes a keyword of that name (opcheck's aot_dispatch_dynamic failed with "got multiple values for
# argument 'mode'"), hence `pooling`.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastscan::pool2d_tokens_fwd", mutates_args=())
def _pool2d_tokens_fwd_op(x: Tensor, H: int, W: int, kh: int, kw: int, pooling: str, backend: str) -> Tensor:
    return _fwd_impl(backend, x, H, W, kh, kw, pooling)


@_pool2d_tokens_fwd_op.register_fake
def _(x, H, W, kh, kw, pooling, backend):
    Ho, Wo = pooled_grid(H, W, kh, kw)
    return x.new_empty((x.shape[0], Ho * Wo, x.shape[2]))


# dy: (num_images, Ho * Wo, C), or with index the (T, C) gradient of the buffer the forward wrote into.
@torch.library.custom_op("fastscan::pool2d_tokens_bwd", mutates_args=())
def _pool2d_tokens_bwd_op(dy: Tensor, x: Tensor, index: Optional[Tensor], H: int, W: int, kh: int, kw: int,
                          pooling: str, backend: str) -> Tensor:
    return _bwd_impl(backend, dy.to(x.dtype), x, H, W, kh, kw, pooling, index)


@_pool2d_tokens_bwd_op.register_fake
def _(dy, x, index, H, W, kh, kw, pooling, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastscan::pool2d_tokens_scatter", mutates_args=("out",))
def _pool2d_tokens_scatter_op(x: Tensor, out: Tensor, index: Tensor, H: int, W: int, kh: int, kw: int, pooling: str,
                              backend: str) -> None:
    # Checked here, on real tensors, so a compiled graph (where the public function only traces)
    # still never lets a kernel write outside out.
    check_index_ranges(index, pooled_grid(H, W, kh, kw), out.shape[0])
    _fwd_impl(backend, x, H, W, kh, kw, pooling, out, index)


@_pool2d_tokens_scatter_op.register_fake
def _(x, out, index, H, W, kh, kw, pooling, backend):
    return None


def _setup_context(ctx, inputs, output):
    x, H, W, kh, kw, pooling, backend = inputs
    ctx.save_for_backward(x)
    ctx.args = (H, W, kh, kw, pooling, backend)


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    dx = torch.ops.fastscan.pool2d_tokens_bwd(dy, x, None, *ctx.args)
    return dx, None, None, None, None, None, None


torch.library.register_autograd("fastscan::pool2d_tokens_fwd", _backward, setup_context=_setup_context)


class _PoolScatter(torch.autograd.Function):
    """Autograd of the in-place scatter form: out is marked dirty, so its old value and x both
    receive gradients (a custom op that mutates cannot have its autograd registered directly).
    `out` comes first: autograd's rebase of an in-place write into a view assumes the dirty tensor is
    the Function's first input (with x first, backward through a view of a larger buffer fails)."""

    @staticmethod
    def forward(ctx, out, x, index, H, W, kh, kw, pooling, backend):
        torch.ops.fastscan.pool2d_tokens_scatter(x, out, index, H, W, kh, kw, pooling, backend)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, index)
        ctx.args = (H, W, kh, kw, pooling, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, index = ctx.saved_tensors
        H, W, kh, kw, pooling, backend = ctx.args
        dx = dout = None
        if ctx.needs_input_grad[1]:
            dx = torch.ops.fastscan.pool2d_tokens_bwd(grad_out, x, index, H, W, kh, kw, pooling, backend)
        if ctx.needs_input_grad[0]:
            Ho, Wo = pooled_grid(H, W, kh, kw)
            rows = (index.to(grad_out.device)[:, None] + torch.arange(Ho * Wo, device=grad_out.device)).reshape(-1)
            dout = grad_out.index_fill(0, rows, 0)
        return dout, dx, None, None, None, None, None, None, None
