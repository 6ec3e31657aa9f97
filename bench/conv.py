"""Causal depthwise conv1d benchmark: every backend available here against torch's F.conv1d path.

    python bench/conv.py [--sizes quick|full] [--dtype float32|bfloat16] [--layout contiguous|channel_last]
                         [--mode fwd fwdbwd] [--backends ...]

The peer is `F.conv1d`: what a model without a fused kernel runs (depthwise, groups=dim, padded by
width-1 on both sides, sliced to seqlen, then silu), as HF transformers' Mamba/Jamba slow path does.
causal-conv1d's CUDA kernel is added when it is installed and a GPU is present. Prints a table with
the speed-up over F.conv1d, appends CSV rows to bench/results/conv.csv and draws
bench/results/conv.png when matplotlib is there.
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
from fastscan.causal_conv1d import causal_conv1d_fn  # noqa: E402

# (batch, dim, seqlen, width); the first is the target shape.
SIZES = {
    "quick": [(1, 8192, 4096, 4)],
    "full": [(1, 8192, 4096, 4), (4, 2048, 2048, 4), (8, 1536, 1024, 4), (1, 4096, 8192, 2)],
}


def make_inputs(batch, dim, seqlen, width, dtype, layout, device, requires_grad):
    g = torch.Generator().manual_seed(0)
    if layout == "channel_last":
        x = torch.randn(batch, seqlen, dim, generator=g).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, seqlen, generator=g).to(dtype)
    args = dict(x=x, weight=torch.randn(dim, width, generator=g) / width ** 0.5, bias=torch.randn(dim, generator=g))
    return {k: v.to(device).requires_grad_(requires_grad) for k, v in args.items()}


def torch_conv1d(x, weight, bias):
    """The unfused path: depthwise conv padded by width-1, sliced to seqlen, silu."""
    dim, width = weight.shape
    out = F.conv1d(x, weight.to(x.dtype).unsqueeze(1), bias.to(x.dtype), padding=width - 1, groups=dim)
    return F.silu(out[..., :x.shape[-1]])


def peers():
    found = {"F.conv1d": torch_conv1d}
    try:  # Dao-AILab causal-conv1d, when installed (GPU only)
        from causal_conv1d import causal_conv1d_fn as dao_causal_conv1d
        if torch.cuda.is_available():
            found["causal_conv1d"] = lambda x, weight, bias: dao_causal_conv1d(x, weight, bias, activation="silu")
    except ImportError:
        pass
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="quick")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--layout", default="contiguous", choices=["contiguous", "channel_last"])
    parser.add_argument("--mode", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: every available backend except cuda_emu (a test vehicle) and "
                             "interpreted triton")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.backends or [b for b in fastscan.available_backends()
                              if b != "cuda_emu" and not (b == "triton" and device.type == "cpu")]
    candidates = peers()
    candidates.update({b: (lambda b: lambda x, weight, bias: causal_conv1d_fn(x, weight, bias, activation="silu",
                                                                              backend=b))(b) for b in names})
    sha, dev = common.git_sha(), common.device_name(device)
    rows = []
    for batch, dim, seqlen, width in SIZES[args.sizes]:
        shape = f"b{batch}_d{dim}_l{seqlen}_w{width}" + ("_cl" if args.layout == "channel_last" else "")
        for mode in args.mode:
            inputs = make_inputs(batch, dim, seqlen, width, dtype, args.layout, device,
                                 requires_grad=mode == "fwdbwd")
            base = None
            for name, fn in candidates.items():
                if mode == "fwd":
                    def step(fn=fn):
                        with torch.no_grad():
                            fn(**inputs)
                else:
                    def step(fn=fn):
                        fn(**inputs).sum().backward()
                median, p20, p80 = common.measure(step, device, repeats=args.repeats, warmup=2)
                base = median if name == "F.conv1d" else base
                rows.append(dict(op=f"causal_conv1d_{mode}", backend=name, shape=shape, dtype=args.dtype,
                                 median_ms=round(median, 3), p20_ms=round(p20, 3), p80_ms=round(p80, 3),
                                 device=dev, git_sha=sha,
                                 speedup_vs_conv1d=f"{base / median:.2f}x" if base else "-"))
                print(f"  {rows[-1]['op']:22} {name:13} {shape:26} {median:10.2f} ms", flush=True)
    columns = ["op", "backend", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "speedup_vs_conv1d"]
    common.report("conv", rows, columns, f"causal conv1d, {args.dtype}, {dev}")


if __name__ == "__main__":
    main()
