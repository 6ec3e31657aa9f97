"""Fused 2D token pooling in Triton: forward, backward, host launchers, AOT specs.

x (num_images, H * W, C) holds row-major grids of patch tokens; windows of KH x KW tokens with
stride (KH, KW) tile each grid, windows on the bottom / right edge keep only their valid tokens
(avg divides by that count; max ignores the rest). Pooled token t of image i is written to y[i, t]
or, with an index, to row index[i] + t of a (T, C) buffer.

Work split (both kernels): grid (num_images, cdiv(Ho * Wo, BLOCK_T), cdiv(C, BLOCK_C)); a program
owns a (BLOCK_T pooled tokens, BLOCK_C channels) tile of one image and walks the KH * KW window
positions (constexpr: unrolled, independent loads in flight), each a (BLOCK_T, BLOCK_C) gather of
x rows with C contiguous. Windows do not overlap, so every x element is read once and every y / dx
element written once. The max backward recomputes the argmax from x instead of saving indices.
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# NOTE: the KH * KW window loads are unrolled and all in flight, so registers grow with the tile
# times the window. Measured on AOT compiles (4 warps, sm_80 / sm_90): a 2048-element tile (16 tokens
# x 128 channels) takes 80-168 registers for 2 x 2 windows and spills 176-1024 bytes for 4 x 4; a
# budget of 4096 tile x window elements (1024 x 4 positions, 256 x 16) stays far below both. Being
# memory-bound, the kernel needs bytes in flight, not big tiles: 1024 x 4 loads x 4 bytes per block
# at several blocks per SM is enough, and the smaller tile gives 16 images x 144 tokens of LongLLaVA
# over two thousand programs to spread.
_TILE_WINDOW_ELEMENTS = 4096
_MAX_TILE_ELEMENTS = 1024
_MAX_BLOCK_C = 128


def _blocks(tokens: int, C: int, window: int) -> tuple[int, int]:
    tile = max(128, min(_MAX_TILE_ELEMENTS, _TILE_WINDOW_ELEMENTS // window))
    block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(C))
    block_t = min(triton.next_power_of_2(tokens), 1 << (max(1, tile // block_c).bit_length() - 1))
    return block_t, block_c


@triton.jit
def _pooled_rows(y, index, image, offs_t, stride_y_n, stride_y_t, HAS_INDEX: tl.constexpr):
    """Pointers to channel 0 of the pooled tokens offs_t of `image` (a (BLOCK_T,) tensor)."""
    if HAS_INDEX:
        first_row = tl.load(index + image)
        return y + (first_row + offs_t.to(tl.int64)) * stride_y_t
    return y + image * stride_y_n + offs_t.to(tl.int64) * stride_y_t


@triton.heuristics({"HAS_INDEX": lambda args: args["index"] is not None})
@triton.jit(do_not_specialize=["H", "W", "Wo", "tokens"])
def pool2d_tokens_fwd_kernel(
    x, y, index,
    H, W, C, Wo, tokens,
    stride_x_n, stride_x_t, stride_x_c,
    stride_y_n, stride_y_t, stride_y_c,
    KH: tl.constexpr, KW: tl.constexpr, IS_MAX: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = avg or max of each pooled token's window.

    grid: (num_images, cdiv(tokens, BLOCK_T), cdiv(C, BLOCK_C)); tokens = Ho * Wo. Reads the
    windows of its BLOCK_T pooled tokens once (BLOCK_C channels), writes their y rows once.
    """
    image = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < tokens
    mask_c = offs_c < C
    h0 = (offs_t // Wo) * KH
    w0 = (offs_t % Wo) * KW
    x_image = x + image * stride_x_n
    channels = (offs_c * stride_x_c)[None, :]

    if IS_MAX:
        acc = tl.full((BLOCK_T, BLOCK_C), float("-inf"), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for dh in tl.static_range(KH):
        for dw in tl.static_range(KW):
            h = h0 + dh
            w = w0 + dw
            valid = mask_t & (h < H) & (w < W)
            rows = ((h * W + w).to(tl.int64) * stride_x_t)[:, None]
            mask = valid[:, None] & mask_c[None, :]
            if IS_MAX:
                v = tl.load(x_image + rows + channels, mask=mask, other=float("-inf")).to(tl.float32)
                acc = tl.where((v > acc) | (v != v), v, acc)  # a NaN, once taken, stays
            else:
                v = tl.load(x_image + rows + channels, mask=mask, other=0.0).to(tl.float32)
                acc += v
    if not IS_MAX:
        count = tl.minimum(H - h0, KH) * tl.minimum(W - w0, KW)
        acc = acc / tl.maximum(count, 1).to(tl.float32)[:, None]

    y_rows = _pooled_rows(y, index, image, offs_t, stride_y_n, stride_y_t, HAS_INDEX)
    tl.store(y_rows[:, None] + (offs_c * stride_y_c)[None, :], acc.to(y.dtype.element_ty),
             mask=mask_t[:, None] & mask_c[None, :])


@triton.heuristics({"HAS_INDEX": lambda args: args["index"] is not None})
@triton.jit(do_not_specialize=["H", "W", "Wo", "tokens"])
def pool2d_tokens_bwd_kernel(
    dy, x, dx, index,
    H, W, C, Wo, tokens,
    stride_dy_n, stride_dy_t, stride_dy_c,
    stride_x_n, stride_x_t, stride_x_c,
    KH: tl.constexpr, KW: tl.constexpr, IS_MAX: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx of the windows of BLOCK_T pooled tokens; dx is contiguous (num_images, H * W, C).

    grid as the forward. Reads dy once (and for max the windows of x once, to recompute the first
    argmax of each window), writes every dx element of its windows once.
    """
    image = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < tokens
    mask_c = offs_c < C
    h0 = (offs_t // Wo) * KH
    w0 = (offs_t % Wo) * KW

    dy_rows = _pooled_rows(dy, index, image, offs_t, stride_dy_n, stride_dy_t, HAS_INDEX)
    tile_mask = mask_t[:, None] & mask_c[None, :]
    g = tl.load(dy_rows[:, None] + (offs_c * stride_dy_c)[None, :], mask=tile_mask, other=0.0).to(tl.float32)

    if IS_MAX:
        x_image = x + image * stride_x_n
        best = tl.full((BLOCK_T, BLOCK_C), float("-inf"), dtype=tl.float32)
        best_pos = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.int32)  # the window's first token when all are -inf
        for dh in tl.static_range(KH):
            for dw in tl.static_range(KW):
                h = h0 + dh
                w = w0 + dw
                valid = mask_t & (h < H) & (w < W)
                rows = ((h * W + w).to(tl.int64) * stride_x_t)[:, None]
                v = tl.load(x_image + rows + (offs_c * stride_x_c)[None, :], mask=valid[:, None] & mask_c[None, :],
                            other=float("-inf")).to(tl.float32)
                # strictly greater keeps the first of equal maxima; the first NaN beats any number
                take = (v > best) | ((v != v) & (best == best))
                best = tl.where(take, v, best)
                best_pos = tl.where(take, dh * KW + dw, best_pos)
    else:
        count = tl.minimum(H - h0, KH) * tl.minimum(W - w0, KW)
        g = g / tl.maximum(count, 1).to(tl.float32)[:, None]

    dx_image = dx + image * H * W * C
    for dh in tl.static_range(KH):
        for dw in tl.static_range(KW):
            h = h0 + dh
            w = w0 + dw
            valid = mask_t & (h < H) & (w < W)
            rows = ((h * W + w).to(tl.int64) * C)[:, None]
            if IS_MAX:
                value = tl.where(best_pos == dh * KW + dw, g, 0.0)
            else:
                value = g
            tl.store(dx_image + rows + offs_c[None, :], value.to(dx.dtype.element_ty),
                     mask=valid[:, None] & mask_c[None, :])


def _rows_strides(t):
    return tuple(t.stride()) if t.dim() == 3 else (0, *t.stride())


def pool2d_tokens_fwd(x, H, W, kh, kw, mode, out=None, index=None):
    num_images, _, C = x.shape
    Ho, Wo = -(-H // kh), -(-W // kw)
    tokens = Ho * Wo
    y = out if out is not None else torch.empty((num_images, tokens, C), dtype=x.dtype, device=x.device)
    if index is not None:
        index = index.to(device=x.device, dtype=torch.int64).contiguous()
    block_t, block_c = _blocks(tokens, C, kh * kw)
    grid = (num_images, triton.cdiv(tokens, block_t), triton.cdiv(C, block_c))
    pool2d_tokens_fwd_kernel[grid](
        x, y, index, H, W, C, Wo, tokens, *x.stride(), *_rows_strides(y),
        KH=kh, KW=kw, IS_MAX=mode == "max", BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return y


def pool2d_tokens_bwd(dy, x, H, W, kh, kw, mode, index=None):
    num_images, _, C = x.shape
    Ho, Wo = -(-H // kh), -(-W // kw)
    tokens = Ho * Wo
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if index is not None:
        index = index.to(device=x.device, dtype=torch.int64).contiguous()
    block_t, block_c = _blocks(tokens, C, kh * kw)
    grid = (num_images, triton.cdiv(tokens, block_t), triton.cdiv(C, block_c))
    pool2d_tokens_bwd_kernel[grid](
        dy, x, dx, index, H, W, C, Wo, tokens, *_rows_strides(dy), *x.stride(),
        KH=kh, KW=kw, IS_MAX=mode == "max", BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return dx


# ----------------------------------------------------------------------------------------------
# Ahead-of-time specs (python -m fastscan.aot): LongLLaVA's 2 x 2 average and the 4 x 4 of the
# paper's token sweep, channel-contiguous layouts (stride 1 specialised as Triton does at run time).
# ----------------------------------------------------------------------------------------------
def _jit_fn(kernel):
    while isinstance(kernel, triton.runtime.autotuner.Heuristics):
        kernel = kernel.fn
    return kernel


def _aot_spec(kind, dtype, k, is_max, has_index):
    fn = _jit_fn(pool2d_tokens_fwd_kernel if kind == "fwd" else pool2d_tokens_bwd_kernel)
    block_t, block_c = _blocks((24 // k) ** 2, 1024, k * k)
    constexprs = dict(KH=k, KW=k, IS_MAX=is_max, HAS_INDEX=has_index, BLOCK_T=block_t, BLOCK_C=block_c)
    signature = {}
    for name in fn.arg_names:
        if name in ("x", "y", "dy", "dx"):
            signature[name] = "*" + dtype
        elif name == "index":
            signature[name] = "*i64"
        elif name.endswith("_c") and name.startswith("stride_"):
            signature[name], constexprs[name] = "constexpr", 1
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    name = f"pool2d_tokens_{kind}_{'max' if is_max else 'avg'}_{dtype}_k{k}{'_index' if has_index else ''}"
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs, "num_warps": 4,
            "num_stages": 1}


AOT_SPECS = [
    _aot_spec("fwd", "fp32", 2, False, True),
    _aot_spec("fwd", "bf16", 2, False, True),
    _aot_spec("fwd", "bf16", 4, False, False),
    _aot_spec("fwd", "bf16", 2, True, False),
    _aot_spec("bwd", "fp32", 2, False, True),
    _aot_spec("bwd", "bf16", 2, False, False),
    _aot_spec("bwd", "bf16", 2, True, False),
    _aot_spec("bwd", "bf16", 4, True, True),
]
