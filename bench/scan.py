"""Selective scan benchmark: every backend available here against the sequential reference loop.

    python bench/scan.py [--sizes quick|full] [--dtype float32|bfloat16] [--mode fwd fwdbwd] [--backends ...]

The peer is the `torch` backend: the loop HF transformers' Jamba/Mamba slow path and mamba-ssm's
selective_scan_ref run (discretize, then one step per token); mamba-ssm's CUDA kernel is added when it
is installed and a GPU is present. Prints a table with the speed-up over the loop, appends CSV rows to
bench/results/scan.csv and draws bench/results/scan.png when matplotlib is there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastscan  # noqa: E402

# (batch, dim, dstate, seqlen); the first is the target shape (Jamba-small-like, Mamba-1.4B dim 1536).
SIZES = {
    "quick": [(1, 1536, 16, 4096)],
    "full": [(1, 1536, 16, 4096), (1, 768, 16, 1024), (2, 1536, 16, 2048), (1, 1024, 64, 2048)],
}


def make_inputs(batch, dim, dstate, seqlen, dtype, device, requires_grad):
    g = torch.Generator().manual_seed(0)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale)  # noqa: E731
    args = dict(u=t(batch, dim, seqlen).to(dtype), delta=(t(batch, dim, seqlen, scale=0.5) - 1).to(dtype),
                A=-torch.exp(t(dim, dstate, scale=0.5)), B=t(batch, dstate, seqlen).to(dtype),
                C=t(batch, dstate, seqlen).to(dtype), D=t(dim), z=t(batch, dim, seqlen).to(dtype),
                delta_bias=t(dim, scale=0.5))
    args = {k: v.to(device).requires_grad_(requires_grad) for k, v in args.items()}
    return args


def peers():
    """Callables (name -> fn(**inputs)) beyond fastscan's own backends."""
    found = {}
    try:  # mamba-ssm's CUDA kernel, when installed (GPU only)
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_ssm_scan
        if torch.cuda.is_available():
            found["mamba_ssm"] = lambda **kw: mamba_ssm_scan(**kw, delta_softplus=True)
    except ImportError:
        pass
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="quick")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--mode", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: every available backend except cuda_emu (a test vehicle) and "
                             "interpreted triton")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.backends or [b for b in fastscan.available_backends()
                              if b != "cuda_emu" and not (b == "triton" and device.type == "cpu")]
    if "torch" not in names:
        names.insert(0, "torch")
    candidates = {b: (lambda b: lambda **kw: fastscan.selective_scan_fn(**kw, delta_softplus=True, backend=b))(b)
                  for b in names}
    candidates.update(peers())
    sha, dev = common.git_sha(), common.device_name(device)
    rows = []
    for batch, dim, dstate, seqlen in SIZES[args.sizes]:
        shape = f"b{batch}_d{dim}_n{dstate}_l{seqlen}"
        for mode in args.mode:
            inputs = make_inputs(batch, dim, dstate, seqlen, dtype, device, requires_grad=mode == "fwdbwd")
            base = None
            for name, fn in candidates.items():
                if mode == "fwd":
                    def step(fn=fn):
                        with torch.no_grad():
                            fn(**inputs)
                else:
                    def step(fn=fn):
                        fn(**inputs).sum().backward()
                slow = name == "torch" and device.type == "cpu"
                median, p20, p80 = common.measure(step, device, repeats=max(2, args.repeats // 2) if slow
                                                  else args.repeats)
                base = median if name == "torch" else base
                rows.append(dict(op=f"selective_scan_{mode}", backend=name, shape=shape, dtype=args.dtype,
                                 median_ms=round(median, 3), p20_ms=round(p20, 3), p80_ms=round(p80, 3),
                                 device=dev, git_sha=sha,
                                 speedup_vs_loop=f"{base / median:.1f}x" if base else "-"))
                print(f"  {rows[-1]['op']:22} {name:9} {shape:24} {median:10.2f} ms", flush=True)
    columns = ["op", "backend", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "speedup_vs_loop"]
    common.report("scan", rows, columns, f"selective scan, {args.dtype}, {dev}")


if __name__ == "__main__":
    main()
