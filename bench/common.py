"""Shared benchmark helpers: timing, CSV rows, a printed table, an optional plot."""
from __future__ import annotations

import csv
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CSV_FIELDS = ["op", "backend", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "device", "git_sha"]


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()}"


def measure(fn, device: torch.device, repeats: int = 10, warmup: int = 1) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds. GPU: triton.testing.do_bench; CPU: wall clock over repeats."""
    if device.type == "cuda":
        import triton.testing
        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def append_csv(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def plot(name: str, rows: list[dict], title: str) -> Path | None:
    """Bar chart of median ms per (op, shape) and backend; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    key = lambda r: f"{r['op']}\n{r['shape']}"  # noqa: E731
    labels = list(dict.fromkeys(key(r) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(labels)), 4))
    width = 0.8 / max(1, len(backends))
    for i, backend in enumerate(backends):
        values = [next((r["median_ms"] for r in rows if key(r) == s and r["backend"] == backend), 0)
                  for s in labels]
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=backend)
    ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("median ms (log)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(name: str, rows: list[dict], columns: list[str], title: str) -> None:
    """The end of every bench script: the table, CSV rows in bench/results/<name>.csv, the plot."""
    print()
    print_table(rows, columns)
    csv_path = append_csv(name, rows)
    png = plot(name, rows, title)
    print(f"\nappended {len(rows)} rows to {csv_path}" + (f"; plot: {png}" if png else ""))
