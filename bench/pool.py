"""2D token pooling benchmark: every backend available here against the plain torch path.

    python bench/pool.py [--sizes quick|full] [--dtype float32 bfloat16] [--mode scatter fwd fwdbwd]
                         [--backends ...]

LongLLaVA's vision side: num_images grids of 24 x 24 CLIP tokens (C = 1024) pooled 2 x 2 to 144
tokens each (4 x 4 -> 36 in the full sweep). Modes:
  scatter  pooled rows written into a packed (T, C) input-embedding buffer at per-image offsets;
           fastscan fuses the write (out=, index=), the torch path pools then index_copy_'s the rows
  fwd      pooled tensor returned
  fwdbwd   forward and backward to x
The peer ("torch_path") is what a model does without fastscan: view the tokens as (N, C, H, W) with
reshape/permute, F.avg_pool2d(ceil_mode=True), permute back, copy into the buffer rows. The
`torch` backend is fastscan's own reference (explicit windows). Prints a table with the speed-up over
the torch path, appends CSV rows to bench/results/pool.csv and draws bench/results/pool.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastscan  # noqa: E402
from fastscan.pool2d import pool2d_tokens  # noqa: E402

# (num_images, H, W, C, kernel); the first is the target (16 images of CLIP-336 tokens).
SIZES = {
    "quick": [(16, 24, 24, 1024, 2)],
    "full": [(16, 24, 24, 1024, 2), (64, 24, 24, 1024, 2), (64, 24, 24, 1024, 4)],
}


def torch_path(x, H, W, kernel, out=None, rows=None):
    """reshape/permute + F.avg_pool2d + permute back (+ copy into the buffer rows)."""
    num_images, _, C = x.shape
    pooled = F.avg_pool2d(x.reshape(num_images, H, W, C).permute(0, 3, 1, 2), kernel, ceil_mode=True)
    pooled = pooled.permute(0, 2, 3, 1).reshape(num_images, -1, C)
    if out is None:
        return pooled
    return out.index_copy_(0, rows, pooled.reshape(-1, C))


def make_case(num_images, H, W, C, kernel, dtype, device, requires_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_images, H * W, C, generator=g).to(dtype).to(device).requires_grad_(requires_grad)
    tokens = (-(-H // kernel)) * (-(-W // kernel))
    # A packed prompt: 32 text tokens before each image's placeholders.
    index = torch.arange(num_images, dtype=torch.int64) * (tokens + 32) + 32
    out = torch.zeros(int(index[-1]) + tokens + 32, C, dtype=dtype, device=device)
    rows = (index[:, None] + torch.arange(tokens)).reshape(-1).to(device)
    return x, out, index.to(device), rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="quick")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--mode", nargs="+", default=["scatter", "fwd", "fwdbwd"], choices=["scatter", "fwd", "fwdbwd"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: every available backend except cuda_emu (a test vehicle) and "
                             "interpreted triton")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.backends or [b for b in fastscan.available_backends()
                              if b != "cuda_emu" and not (b == "triton" and device.type == "cpu")]
    sha, dev = common.git_sha(), common.device_name(device)
    rows = []
    for num_images, H, W, C, kernel in SIZES[args.sizes]:
        shape = f"n{num_images}_{H}x{W}_c{C}_k{kernel}"
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            for mode in args.mode:
                x, out, index, buffer_rows = make_case(num_images, H, W, C, kernel, dtype, device,
                                                       requires_grad=mode == "fwdbwd")
                candidates = {"torch_path": None, **{b: b for b in names}}
                base = None
                for name, backend in candidates.items():
                    step = _step(mode, name, backend, x, out, index, buffer_rows, H, W, kernel)
                    median, p20, p80 = common.measure(step, device, repeats=args.repeats)
                    base = median if name == "torch_path" else base
                    rows.append(dict(op=f"pool2d_{mode}", backend=name, shape=shape, dtype=dtype_name,
                                     median_ms=round(median, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                                     device=dev, git_sha=sha, gbps=_gbps(x, H, W, kernel, mode, median),
                                     speedup_vs_torch_path=f"{base / median:.2f}x"))
                    print(f"  {rows[-1]['op']:16} {name:10} {shape:22} {dtype_name:9} {median:9.3f} ms", flush=True)
    columns = ["op", "backend", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps", "speedup_vs_torch_path"]
    common.report("pool", rows, columns, f"pool2d_tokens, {dev}")


def _step(mode, name, backend, x, out, index, buffer_rows, H, W, kernel):
    if mode == "scatter":
        if backend is None:
            return lambda: torch_path(x, H, W, kernel, out, buffer_rows)
        return lambda: pool2d_tokens(x, (H, W), kernel, out=out, index=index, backend=backend)
    fn = (lambda: torch_path(x, H, W, kernel)) if backend is None else (
        lambda: pool2d_tokens(x, (H, W), kernel, backend=backend))
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                fn()
        return forward

    def forward_backward():
        x.grad = None
        fn().sum().backward()
    return forward_backward


def _gbps(x, H, W, kernel, mode, ms):
    """Effective bandwidth: x read + pooled written (+ dy read and dx written for fwdbwd)."""
    pooled = x.numel() // (kernel * kernel)
    elements = x.numel() + pooled + (x.numel() + pooled if mode == "fwdbwd" else 0)
    return round(elements * x.element_size() / (ms * 1e6), 1)


if __name__ == "__main__":
    main()
