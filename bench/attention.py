"""Attention benchmark: fastscan's backends against torch's scaled_dot_product_attention.

    python bench/attention.py [--sizes quick|full] [--dtype bfloat16|float16|float32] [--mode fwd fwdbwd decode]

Shapes follow the hybrid LM's attention layers (32 query heads, 8 KV heads, head dim 128, causal).
On a GPU: TFLOP/s of the triton backend and of SDPA (flash/efficient kernels; GQA through
enable_gqa) for the forward, forward + backward, and a decode step over a long cache (split-KV; GB/s
of K/V read there). On a CPU: the backends that exist (torch; interpreted triton is skipped) against
SDPA called directly. Prints a table, appends CSV rows to bench/results/attention.csv, draws
bench/results/attention.png when matplotlib is there.
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
from fastscan.attention import flash_attn_func, flash_attn_with_kvcache  # noqa: E402

# (batch, seqlen, heads, kv_heads, headdim); decode: seqlen is the cache length, one query token.
SIZES = {
    "gpu": {"quick": [(2, 4096, 32, 8, 128)],
            "full": [(2, 4096, 32, 8, 128), (1, 8192, 32, 8, 128), (4, 2048, 16, 16, 64), (8, 1024, 32, 8, 128)]},
    "cpu": {"quick": [(1, 512, 8, 2, 64)], "full": [(1, 512, 8, 2, 64), (1, 1024, 8, 2, 128)]},
}
DECODE = {"gpu": [(8, 8192, 32, 8, 128), (32, 4096, 32, 8, 128)], "cpu": [(2, 2048, 8, 2, 64)]}


def sdpa(q, k, v, causal):
    group = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         enable_gqa=group > 1)
    return out.transpose(1, 2)


def flops(batch, seqlen_q, seqlen_k, heads, head_dim, causal, mode):
    fwd = 4 * batch * heads * seqlen_q * seqlen_k * head_dim * (0.5 if causal and seqlen_q > 1 else 1.0)
    return fwd * (3.5 if mode == "fwdbwd" else 1.0)  # backward: 5 matmuls to the forward's 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=["quick", "full"], default="quick")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--mode", nargs="+", default=["fwd", "fwdbwd", "decode"], choices=["fwd", "fwdbwd", "decode"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = "gpu" if device.type == "cuda" else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if kind == "gpu" else "float32"))
    names = [b for b in fastscan.available_backends() if b in ("torch", "triton")
             and not (b == "triton" and device.type == "cpu")]
    sha, dev = common.git_sha(), common.device_name(device)
    rows = []

    def record(op, backend, shape, fn, work, unit):
        median, p20, p80 = common.measure(fn, device, repeats=args.repeats)
        rate = work / (median * 1e-3) / 1e12
        rows.append(dict(op=op, backend=backend, shape=shape, dtype=str(dtype).replace("torch.", ""),
                         median_ms=round(median, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4), device=dev,
                         git_sha=sha, rate=f"{rate:.3f} {unit}"))

    for mode in [m for m in args.mode if m != "decode"]:
        for batch, seqlen, heads, kv_heads, head_dim in SIZES[kind][args.sizes]:
            shape = f"b{batch}_l{seqlen}_h{heads}_kv{kv_heads}_d{head_dim}_causal"
            g = torch.Generator(device=device).manual_seed(0)
            make = lambda h: torch.randn(batch, seqlen, h, head_dim, generator=g, device=device,  # noqa: E731
                                         dtype=dtype).requires_grad_(mode == "fwdbwd")
            q, k, v = make(heads), make(kv_heads), make(kv_heads)
            work = flops(batch, seqlen, seqlen, heads, head_dim, True, mode)
            candidates = {"sdpa": lambda: sdpa(q, k, v, True)}
            for name in names:
                candidates[name] = (lambda name: lambda: flash_attn_func(q, k, v, causal=True, backend=name))(name)
            for name, fn in candidates.items():
                run = fn if mode == "fwd" else (lambda fn: lambda: fn().sum().backward())(fn)
                record(f"attention_{mode}", name, shape, run, work, "TFLOP/s")

    if "decode" in args.mode:
        for batch, cache_len, heads, kv_heads, head_dim in DECODE[kind]:
            shape = f"b{batch}_cache{cache_len}_h{heads}_kv{kv_heads}_d{head_dim}_q1"
            k_cache = torch.randn(batch, cache_len, kv_heads, head_dim, device=device, dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(batch, 1, heads, head_dim, device=device, dtype=dtype)
            lens = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
            kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
            candidates = {"sdpa": lambda: sdpa(q, k_cache, v_cache, False)}
            for name in names:
                candidates[name] = (lambda name: lambda: flash_attn_with_kvcache(
                    q, k_cache, v_cache, cache_seqlens=lens, backend=name))(name)
            with torch.no_grad():
                for name, fn in candidates.items():
                    record("attention_decode", name, shape, fn, kv_bytes, "TB/s of K/V")

    common.print_table(rows, ["op", "backend", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "rate"])
    path = common.append_csv("attention", rows)
    print(f"appended {len(rows)} rows to {path}")
    png = common.plot("attention", rows, f"attention ({dev}, {dtype})")
    if png:
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
