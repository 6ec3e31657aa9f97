"""Prefill time vs prompt length: a tiny Jamba-pattern hybrid against an all-attention model of similar size.

    python bench/prefill.py [--quick] [--max-len 32768] [--attn-max-len 16384] [--chunk-size 2048]
                            [--modes chunked oneshot] [--rss-len 32768] [--rss-models hybrid] [--threads N]

Both models run through llmodel's `prefill` on the CPU in float32: `chunked` feeds the prompt in
chunks of --chunk-size into a HybridCache, `oneshot` feeds it whole (chunk_size=None). The exponent p
of time ∝ length^p is fitted by least squares on log-log for each model and mode: the hybrid's seven
Mamba layers are linear in the length and only one layer in eight is quadratic, so its p should sit
well below the all-attention model's (which tends to 2). The all-attention model is capped at
--attn-max-len by default because it is the quadratic one (32K costs minutes on two cores).

Peak RSS of chunked vs one-shot prefill is measured at --rss-len, each in a fresh `python -c` child
(VmHWM from /proc/self/status; the child first resets the high-water mark after building the model
when the kernel allows it, so "delta" is what the prefill itself added).

Prints a table, appends CSV rows to bench/results/prefill.csv (op=prefill_<model>_<mode>, shape=len<L>)
and bench/results/prefill_rss.csv, and plots bench/results/prefill.png when matplotlib is there.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import fastscan  # noqa: E402
import llmodel  # noqa: E402
from llmodel import LMConfig  # noqa: E402
from llmodel.generate import prefill  # noqa: E402

VOCAB = 1024  # prefill computes the last position's logits only, so the vocabulary barely matters


def hybrid_config(intermediate: int = 512) -> dict:
    """Jamba's pattern at toy width: attention at layer 4 of 8, MoE (4 experts, top-2) every 2nd layer."""
    return dict(model_type="jamba", vocab_size=VOCAB, hidden_size=256, intermediate_size=intermediate,
                num_layers=8, num_heads=4, num_kv_heads=2, attn_layer_period=8, attn_layer_offset=4,
                expert_layer_period=2, expert_layer_offset=1, moe=dict(num_experts=4, top_k=2),
                mamba=dict(d_state=16, d_conv=4, expand=2))


def attention_config(intermediate: int) -> dict:
    return {**hybrid_config(intermediate), "attn_layer_period": 1, "attn_layer_offset": 0}


def count_params(cfg: dict) -> int:
    """Parameters outside the embedding and the head (those are the same in both models)."""
    with torch.device("meta"):
        model = llmodel.HybridLM(LMConfig(**cfg))
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(("embed_tokens", "lm_head")))


def matched_attention_config(target: int) -> dict:
    """All-attention model whose FFN width is chosen (multiple of 32) so its size matches `target`."""
    best = min(range(256, 2049, 32), key=lambda i: abs(count_params(attention_config(i)) - target))
    return attention_config(best)


def build(cfg: dict, seed: int = 0) -> llmodel.HybridLM:
    torch.manual_seed(seed)
    return llmodel.HybridLM(LMConfig(**cfg)).eval()


def time_prefill(model, length: int, chunk_size, repeats: int) -> list[float]:
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    times = []
    for _ in range(repeats):
        cache = model.new_cache(1, length)  # allocated outside the timed region
        start = time.perf_counter()
        prefill(model, cache, input_ids=ids, chunk_size=chunk_size)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)


def fit_exponent(lengths: list[int], ms: list[float]) -> float:
    """Least-squares slope of log(ms) on log(length)."""
    xs, ys = [math.log(v) for v in lengths], [math.log(v) for v in ms]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


# The RSS child: build the model, reset the high-water mark, prefill once, report VmHWM (KiB) as JSON.
RSS_CHILD = r"""
import json, sys, time, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
import llmodel
from llmodel.generate import prefill
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
torch.manual_seed(0)
model = llmodel.HybridLM(llmodel.LMConfig(**spec["config"])).eval()
ids = torch.randint(0, spec["config"]["vocab_size"], (1, spec["length"]))
cache = model.new_cache(1, spec["length"])
before = status("VmRSS")
try:  # "5" resets the peak RSS counter (Linux >= 4.0); without it, delta is measured from the old peak
    open("/proc/self/clear_refs", "w").write("5")
    reset = True
except OSError:
    reset = False
start = time.perf_counter()
prefill(model, cache, input_ids=ids, chunk_size=spec["chunk_size"])
wall = time.perf_counter() - start
print(json.dumps(dict(before_kib=before, peak_kib=status("VmHWM"), reset=reset, wall_ms=wall * 1e3,
                      cache_mib=cache.nbytes() / 2**20)))
"""


def measure_rss(cfg: dict, length: int, chunk_size, threads: int) -> dict:
    spec = json.dumps(dict(config=cfg, length=length, chunk_size=chunk_size, threads=threads))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", RSS_CHILD, spec], capture_output=True, text=True, cwd=REPO,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"RSS child failed (length {length}, chunk_size {chunk_size}); run with a smaller "
                           f"--rss-len or check memory:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def append_rss_csv(rows: list[dict]) -> Path:
    fields = ["op", "backend", "shape", "dtype", "peak_rss_mib", "prefill_delta_mib", "cache_mib", "wall_ms",
              "device", "git_sha"]
    common.RESULTS.mkdir(exist_ok=True)
    path = common.RESULTS / "prefill_rss.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="lengths 1K-8K, RSS at 8K (about a minute)")
    parser.add_argument("--max-len", type=int, default=32768, help="longest prompt; lengths double from 4096")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="explicit lengths (override)")
    parser.add_argument("--attn-max-len", type=int, default=16384,
                        help="cap for the all-attention model (quadratic); 0 = same as --max-len")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--modes", nargs="+", default=["chunked", "oneshot"], choices=["chunked", "oneshot"])
    parser.add_argument("--models", nargs="+", default=["hybrid", "attention"], choices=["hybrid", "attention"])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per point (median reported)")
    parser.add_argument("--rss-len", type=int, default=32768, help="0 skips the RSS measurement")
    parser.add_argument("--rss-models", nargs="+", default=["hybrid"], choices=["hybrid", "attention"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's). NOTE: on a shared 2-core box another busy "
                             "process made 2-thread elementwise ops ~1000x slower (OpenMP waits); use 1 there")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        lengths = args.lengths or [1024, 2048, 4096, 8192]
        attn_max = args.attn_max_len if "--attn-max-len" in (argv or sys.argv) else 8192
        rss_len = args.rss_len if "--rss-len" in (argv or sys.argv) else 8192
    else:
        lengths = args.lengths or [n for n in (4096 * 2**i for i in range(16)) if n <= args.max_len]
        attn_max, rss_len = args.attn_max_len or max(lengths), args.rss_len
    device = torch.device("cpu")
    sha, dev = common.git_sha(), common.device_name(device)
    scan_backend = fastscan.backends.resolve(None, device)
    backend = f"llmodel[{scan_backend}]"

    hybrid = hybrid_config()
    target = count_params(hybrid)
    configs = {"hybrid": hybrid, "attention": matched_attention_config(target)}
    for name, cfg in configs.items():
        print(f"{name:9}: {count_params(cfg) / 1e6:.2f}M params (excl. embedding/head), attention period "
              f"{cfg['attn_layer_period']}, FFN width {cfg['intermediate_size']}")
    print(f"scan/conv backend {scan_backend}, {dev}, chunk {args.chunk_size}\n")

    rows, fits = [], {}
    for name in args.models:
        model = build(configs[name])
        time_prefill(model, 512, args.chunk_size, 1)  # warm-up: first-call allocations, library loads
        model_lengths = [n for n in lengths if name != "attention" or n <= attn_max]
        for mode in args.modes:
            chunk = args.chunk_size if mode == "chunked" else None
            points = []
            for length in model_lengths:
                times = time_prefill(model, length, chunk, args.repeats)
                q = [times[0]] * 4 if len(times) < 2 else statistics.quantiles(times, n=5)
                median = times[len(times) // 2]
                points.append((length, median))
                rows.append(dict(op=f"prefill_{name}_{mode}", backend=backend, shape=f"len{length}",
                                 dtype="float32", median_ms=round(median, 1), p20_ms=round(q[0], 1),
                                 p80_ms=round(q[3], 1), device=dev, git_sha=sha,
                                 tok_per_s=round(length / median * 1e3)))
                print(f"  {rows[-1]['op']:26} len {length:6} {median:10.1f} ms", flush=True)
            if len(points) >= 2:
                fits[(name, mode)] = fit_exponent(*zip(*points))
        del model

    common.report("prefill", rows, ["op", "backend", "shape", "median_ms", "tok_per_s"], f"prefill, float32, {dev}")
    print("\nfitted exponent p in time ∝ length^p (least squares on log-log):")
    for (name, mode), p in fits.items():
        span = [n for n in lengths if name != "attention" or n <= attn_max]
        print(f"  {name:9} {mode:8} p = {p:.2f}   over {span[0]}..{span[-1]}")

    if rss_len:
        rss_rows = []
        for name in args.rss_models:
            for mode in ("chunked", "oneshot"):
                r = measure_rss(configs[name], rss_len, args.chunk_size if mode == "chunked" else None,
                                torch.get_num_threads())
                peak, before = r["peak_kib"] / 1024, r["before_kib"] / 1024
                rss_rows.append(dict(op=f"prefill_rss_{name}_{mode}", backend=backend, shape=f"len{rss_len}",
                                     dtype="float32", peak_rss_mib=round(peak), cache_mib=round(r["cache_mib"]),
                                     prefill_delta_mib=round(peak - before) if r["reset"] else "n/a",
                                     wall_ms=round(r["wall_ms"]), device=dev, git_sha=sha))
                print(f"  {rss_rows[-1]['op']:30} peak {peak:8.0f} MiB", flush=True)
        print(f"\npeak RSS at {rss_len} tokens, each in a fresh child process (delta: above the RSS after the "
              f"model and the cache were built):")
        common.print_table(rss_rows, ["op", "shape", "peak_rss_mib", "prefill_delta_mib", "cache_mib", "wall_ms"])
        by = {row["op"]: row for row in rss_rows}
        for name in args.rss_models:
            a, b = by[f"prefill_rss_{name}_chunked"], by[f"prefill_rss_{name}_oneshot"]
            if isinstance(a["prefill_delta_mib"], int) and a["prefill_delta_mib"] > 0:
                print(f"  {name}: one-shot prefill adds {b['prefill_delta_mib'] / a['prefill_delta_mib']:.1f}x "
                      f"the memory chunked prefill adds")
        print(f"appended {len(rss_rows)} rows to {append_rss_csv(rss_rows)}")


if __name__ == "__main__":
    main()
