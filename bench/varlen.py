"""Packed variable-length sequences: one call over a pack (cu_seqlens) vs a loop over its sequences.

    python bench/varlen.py [--sizes quick|full] [--ops scan conv attention] [--mode fwd fwdbwd]
                           [--dtype float32|bfloat16] [--backends ...]

Same data, same backend, two ways: `packed` is one call with cu_seqlens; `loop` calls the op once per
sequence on slices of the same tensors and concatenates (what a model does without varlen kernels, if
it does not pad). The speed-up column is loop / packed for that backend. Sequence lengths are drawn
at random (seeded) so that they sum to the pack length, the way a packing collator fills a pack.
Prints a table, appends CSV rows to bench/results/varlen.csv and draws bench/results/varlen.png.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastscan  # noqa: E402

# (pack length, number of sequences); the first is the quick one.
SIZES = {"quick": [(8192, 16)], "full": [(8192, 16), (8192, 64), (16384, 4)]}
SCAN_DIM, DSTATE, CONV_DIM, WIDTH, HEADS, KV_HEADS, HEAD_DIM = 1536, 16, 1536, 4, 16, 4, 64


def random_cu_seqlens(total: int, num_seqs: int, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, total), num_seqs - 1))
    return torch.tensor([0] + cuts + [total], dtype=torch.int32)


def scan_case(total, dtype, device, backend):
    g = torch.Generator().manual_seed(0)
    t = dict(u=torch.randn(1, SCAN_DIM, total, generator=g), delta=0.5 * torch.rand(1, SCAN_DIM, total, generator=g),
             B=torch.randn(1, DSTATE, total, generator=g), C=torch.randn(1, DSTATE, total, generator=g),
             z=torch.randn(1, SCAN_DIM, total, generator=g))
    t = {k: v.to(device, dtype) for k, v in t.items()}
    A = (-torch.rand(SCAN_DIM, DSTATE, generator=g)).to(device)
    D, bias = torch.randn(SCAN_DIM, generator=g).to(device), torch.randn(SCAN_DIM, generator=g).to(device)

    def call(t, cu=None, s=None, e=None):
        cut = (lambda x: x) if s is None else (lambda x: x[..., s:e])
        return fastscan.selective_scan_fn(cut(t["u"]), cut(t["delta"]), A, cut(t["B"]), cut(t["C"]), D, cut(t["z"]),
                                          bias, True, backend=backend, cu_seqlens=cu)
    return t, call


def conv_case(total, dtype, device, backend):
    g = torch.Generator().manual_seed(0)
    t = dict(x=torch.randn(1, total, CONV_DIM, generator=g).to(device, dtype).transpose(1, 2))  # channel-last, as a model
    weight, bias = torch.randn(CONV_DIM, WIDTH, generator=g).to(device), torch.randn(CONV_DIM, generator=g).to(device)

    def call(t, cu=None, s=None, e=None):
        x = t["x"] if s is None else t["x"][..., s:e]
        return fastscan.causal_conv1d_fn(x, weight, bias, activation="silu", backend=backend, cu_seqlens=cu)
    return t, call


def attention_case(total, dtype, device, backend, max_seqlen):
    g = torch.Generator().manual_seed(0)
    t = dict(q=torch.randn(total, HEADS, HEAD_DIM, generator=g), k=torch.randn(total, KV_HEADS, HEAD_DIM, generator=g),
             v=torch.randn(total, KV_HEADS, HEAD_DIM, generator=g))
    t = {k: v.to(device, dtype) for k, v in t.items()}

    def call(t, cu=None, s=None, e=None):
        if s is None:
            return fastscan.flash_attn_varlen_func(t["q"], t["k"], t["v"], cu, cu, max_seqlen, max_seqlen, causal=True,
                                                   backend=backend)
        one = lambda x: x[s:e].unsqueeze(0)
        return fastscan.flash_attn_func(one(t["q"]), one(t["k"]), one(t["v"]), causal=True, backend=backend)[0]
    return t, call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="quick")
    parser.add_argument("--ops", nargs="+", default=["scan", "conv", "attention"], choices=["scan", "conv", "attention"])
    parser.add_argument("--mode", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: every available backend of the op except cuda_emu (a test vehicle) and "
                             "interpreted triton")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = [b for b in fastscan.available_backends()
                 if b != "cuda_emu" and not (b == "triton" and device.type == "cpu")]
    sha, dev = common.git_sha(), common.device_name(device)
    rows = []
    for total, num_seqs in SIZES[args.sizes]:
        cu = random_cu_seqlens(total, num_seqs)
        bounds = cu.tolist()
        max_seqlen = max(b - a for a, b in zip(bounds, bounds[1:]))
        cu_dev = cu.to(device)
        for op in args.ops:
            backends = args.backends or ([b for b in available if b in ("torch", "triton")] if op == "attention"
                                         else [b for b in available if b != "torch"])  # torch scan: a python loop
            for backend in backends:
                for mode in args.mode:
                    make = dict(scan=scan_case, conv=conv_case,
                                attention=lambda *a: attention_case(*a, max_seqlen))[op]
                    t, call = make(total, dtype, device, backend)
                    if mode == "fwdbwd":
                        t = {k: v.detach().requires_grad_(True) for k, v in t.items()}

                    def packed():
                        return call(t, cu_dev)

                    def loop():
                        outs = [call(t, None, s, e) for s, e in zip(bounds, bounds[1:]) if e > s]
                        return torch.cat(outs, dim=0 if op == "attention" else -1)

                    times = {}
                    for way, fn in (("loop", loop), ("packed", packed)):
                        if mode == "fwd":
                            def step(fn=fn):
                                with torch.no_grad():
                                    fn()
                        else:
                            def step(fn=fn):
                                fn().float().sum().backward()
                        median, p20, p80 = common.measure(step, device, repeats=args.repeats, warmup=1)
                        times[way] = median
                        shape = f"{op}_T{total}_n{num_seqs}"
                        rows.append(dict(op=f"{op}_{mode}", backend=f"{backend}:{way}", shape=shape, dtype=args.dtype,
                                         median_ms=round(median, 3), p20_ms=round(p20, 3), p80_ms=round(p80, 3),
                                         device=dev, git_sha=sha,
                                         speedup_vs_loop=f"{times['loop'] / median:.2f}x"))
                        print(f"  {rows[-1]['op']:16} {backend + ':' + way:14} {shape:24} {median:10.2f} ms", flush=True)
    columns = ["op", "backend", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "speedup_vs_loop"]
    common.report("varlen", rows, columns, f"packed vs per-sequence loop, {args.dtype}, {dev}")


if __name__ == "__main__":
    main()
