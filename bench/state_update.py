"""Decode-step benchmark: `selective_state_update` latency on every backend against the torch reference.

    python bench/state_update.py [--sizes quick|full] [--dtype float32|bfloat16|float16]
                                 [--state-dtype float32|input] [--backends ...]

The peer is the `torch` backend: the broadcast-and-reduce step HF transformers' Mamba/Jamba slow
path runs per generated token; mamba-ssm's Triton `selective_state_update` is added when it is
installed and a GPU is present. A decode step reads and writes the whole (batch, dim, dstate) state
once, so the table also gives the state bandwidth. Appends CSV rows to
bench/results/state_update.csv and draws bench/results/state_update.png when matplotlib is there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastscan  # noqa: E402
from fastscan.state_update import selective_state_update  # noqa: E402

# (batch, dim, dstate): Mamba-1.4B / Jamba-like inner dim at batch 1 and 16, a wide batch, a large dstate.
SIZES = {
    "quick": [(1, 3072, 16), (16, 3072, 16)],
    "full": [(1, 3072, 16), (16, 3072, 16), (64, 4096, 16), (8, 2048, 64), (1, 8192, 128)],
}


def make_inputs(batch, dim, dstate, dtype, state_dtype, device):
    g = torch.Generator().manual_seed(0)
    t = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    args = dict(state=t(batch, dim, dstate).to(state_dtype), x=t(batch, dim).to(dtype),
                dt=(t(batch, dim, scale=0.5) - 1).to(dtype), A=-torch.exp(t(dim, dstate, scale=0.5)),
                B=t(batch, dstate).to(dtype), C=t(batch, dstate).to(dtype), D=t(dim), z=t(batch, dim).to(dtype),
                dt_bias=t(dim, scale=0.5))
    return {k: v.to(device) for k, v in args.items()}


def peers():
    """Callables (name -> fn(**inputs)) beyond fastscan's own backends."""
    found = {}
    try:  # mamba-ssm's Triton decode step, when installed (GPU only)
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as mamba_ssm_step
        if torch.cuda.is_available():
            found["mamba_ssm"] = lambda **kw: mamba_ssm_step(**kw, dt_softplus=True)
    except ImportError:
        pass
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="quick")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--state-dtype", default="float32", choices=["float32", "input"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: every available backend except cuda_emu (a test vehicle) and "
                             "interpreted triton")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    state_dtype = torch.float32 if args.state_dtype == "float32" else dtype
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.backends or [b for b in fastscan.available_backends()
                              if b != "cuda_emu" and not (b == "triton" and device.type == "cpu")]
    if "torch" not in names:
        names.insert(0, "torch")
    candidates = {b: (lambda b: lambda **kw: selective_state_update(**kw, dt_softplus=True, backend=b))(b)
                  for b in names}
    candidates.update(peers())
    sha, dev = common.git_sha(), common.device_name(device)
    dtype_label = f"{args.dtype}/state_{str(state_dtype).split('.')[-1]}"
    rows = []
    for batch, dim, dstate in SIZES[args.sizes]:
        shape = f"b{batch}_d{dim}_n{dstate}"
        inputs = make_inputs(batch, dim, dstate, dtype, state_dtype, device)
        state_bytes = 2 * inputs["state"].numel() * inputs["state"].element_size()  # read + write
        base = None
        for name, fn in candidates.items():
            def step(fn=fn):
                with torch.inference_mode():
                    fn(**inputs)
            median, p20, p80 = common.measure(step, device, repeats=args.repeats, warmup=3)
            base = median if name == "torch" else base
            rows.append(dict(op="selective_state_update", backend=name, shape=shape, dtype=dtype_label,
                             median_ms=round(median, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                             device=dev, git_sha=sha,
                             state_GBps=f"{state_bytes / (median * 1e-3) / 1e9:.1f}",
                             speedup_vs_torch=f"{base / median:.1f}x" if base else "-"))
            print(f"  {name:9} {shape:20} {median * 1e3:10.1f} us", flush=True)
    columns = ["op", "backend", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "state_GBps", "speedup_vs_torch"]
    common.report("state_update", rows, columns, f"selective_state_update, {dtype_label}, {dev}")


if __name__ == "__main__":
    main()
