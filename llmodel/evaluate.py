"""Evaluation of a trained LongLLaVA: held-out accuracy per task, synthetic V-NIAH, and the plots.

    python -m llmodel eval tasks --model RUN_DIR/final --data held_out.jsonl
    python -m llmodel eval vniah --model RUN_DIR [--images 8 16 32 64] [--depths 0 0.25 0.5 0.75 1]
    python -m llmodel plot RUN_DIR [RUN_DIR ...]          # loss curve(s) -> RUN_DIR/loss.png

Answers are generated greedily (the model's own chunked prefill + decode loop) and compared with
`synthetic.answer_matches` (normalized exact match). V-NIAH (after LongVA's visual needle-in-a-haystack):
one needle image, the only one with a given shape, is put at depth d among N images; the question asks
its colour. Accuracy over the N x depth grid is drawn as a heatmap; prefill is chunked so a large N
fits in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import formats, synthetic
from .data import image_token_counts, load_images, pixel_groups, read_jsonl
from .multimodal import LongLLaVA, load_longllava


def _model_dir(path: str) -> str:
    """A run directory means its final/ weights."""
    return os.path.join(path, "final") if os.path.isdir(os.path.join(path, "final")) else path


def load_for_eval(path: str, device: str = "cpu"):
    from tokenizers import Tokenizer

    path = _model_dir(path)
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"--model: {path} has no tokenizer.json")
    model = load_longllava(path, dtype=torch.float32, device=device).eval()
    return model, Tokenizer.from_file(tokenizer_file)


@torch.no_grad()
def answer(model: LongLLaVA, tokenizer, question_turns: Sequence[dict], images: Sequence, template: str = "longllava",
           max_new_tokens: int = 8, chunk_size: Optional[int] = None) -> str:
    """Greedy answer to the last human turn of `question_turns` about `images` (paths or PIL images)."""
    config = model.config
    turns = list(question_turns) + [{"from": "gpt", "value": None}]
    images = list(images)
    pixel_values, sizes = load_images(config, images) if images else (None, None)
    tokens = formats.tokenize_conversation(turns, tokenizer, image_token_counts(config, sizes or [None] * len(images)),
                                           template, image_token_id=config.image_token_id)
    device = model.lm.embed_tokens.weight.device
    groups, sizes = pixel_groups(config, pixel_values.to(device) if images else None, sizes)
    new = model.generate(tokens.input_ids[None].to(device), images=groups, image_spans=tokens.image_spans,
                         image_sizes=sizes, max_new_tokens=max_new_tokens, chunk_size=chunk_size)
    ids = [int(t) for t in new[0]]  # LongLLaVA.generate returns the new tokens only
    eos = set(config.lm.eos_token_ids)
    ids = ids[:next((i for i, t in enumerate(ids) if t in eos), len(ids))]
    return tokenizer.decode(ids)


def evaluate_tasks(model: LongLLaVA, tokenizer, jsonl: str, limit: Optional[int] = None,
                   chunk_size: Optional[int] = None) -> dict:
    """Accuracy per task on the first question of each record: {task: {"correct", "total", "accuracy",
    "chance"}} (chance from synthetic.chance with the record's image count)."""
    root = Path(jsonl).resolve().parent
    results: dict = defaultdict(lambda: {"correct": 0, "total": 0, "chance_sum": 0.0})
    for record in read_jsonl(jsonl)[:limit]:
        turns = record["conversations"]
        images = [root / p for p in (record.get("image") or [])]
        task = (record.get("tasks") or [record.get("task", "")])[0]
        predicted = answer(model, tokenizer, turns[:1], images, chunk_size=chunk_size)
        r = results[task]
        r["total"] += 1
        r["correct"] += int(synthetic.answer_matches(predicted, turns[1]["value"]))
        r["chance_sum"] += synthetic.chance(task, len(images) or None)
    return {task: {"correct": r["correct"], "total": r["total"], "accuracy": r["correct"] / r["total"],
                   "chance": r["chance_sum"] / r["total"]} for task, r in sorted(results.items())}


def vniah(model: LongLLaVA, tokenizer, work_dir: str, sizes: Sequence[int] = (8, 16, 32, 64),
          depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), samples: int = 10, seed: int = 1234,
          chunk_size: Optional[int] = 512) -> dict:
    """Accuracy per (num_images, depth): {"sizes", "depths", "accuracy": [[...] per size]}."""
    grid = []
    for n in sizes:
        row = []
        for depth in depths:
            path = synthetic.make_vniah(os.path.join(work_dir, f"n{n}_d{depth:g}"), n, depth, samples, seed)
            scores = evaluate_tasks(model, tokenizer, str(path), chunk_size=chunk_size)
            row.append(sum(s["correct"] for s in scores.values()) / sum(s["total"] for s in scores.values()))
        grid.append(row)
    return {"sizes": list(sizes), "depths": list(depths), "accuracy": grid, "samples": samples,
            "chance": synthetic.chance("vniah")}


# ---------------------------------------------------------------- plots

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        raise NotImplementedError("plots need matplotlib (pip install matplotlib)") from None


def plot_vniah(result: dict, path: str, title: str = "V-NIAH accuracy") -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(result["depths"]) + 2, 0.6 * len(result["sizes"]) + 1.5))
    image = ax.imshow(result["accuracy"], cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
    ax.set_yticks(range(len(result["sizes"])), [str(n) for n in result["sizes"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("images in the haystack")
    for i, row in enumerate(result["accuracy"]):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(f"{title} (chance {result['chance']:.0%})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"RUN_DIR: {run_dir} has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dirs: Sequence[str], path: str) -> str:
    """Loss per step of one or more runs (e.g. the three stages, drawn one after another)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for run in run_dirs:
        rows = read_metrics(run)
        steps = [offset + r["step"] for r in rows]
        label = rows[0].get("stage", Path(run).name) if rows else Path(run).name
        ax.plot(steps, [r["loss"] for r in rows], label=label, linewidth=1)
        offset = steps[-1] if steps else offset
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- command line

def eval_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmodel eval")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tasks", help="accuracy per task on a JSONL of questions")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--limit", type=int)
    v = sub.add_parser("vniah", help="needle-in-a-haystack heatmap")
    v.add_argument("--model", required=True, help="a run directory (its final/) or a model directory")
    v.add_argument("--images", type=int, nargs="+", default=[8, 16, 32, 64])
    v.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    v.add_argument("--samples", type=int, default=10, help="questions per cell")
    v.add_argument("--chunk-size", type=int, default=512)
    v.add_argument("--out", help="where the heatmap and JSON go (default: the --model directory)")
    args = p.parse_args(argv)
    model, tokenizer = load_for_eval(args.model)
    if args.what == "tasks":
        for task, r in evaluate_tasks(model, tokenizer, args.data, args.limit).items():
            print(f"{task:10} {r['accuracy']:7.1%}  ({r['correct']}/{r['total']}, chance {r['chance']:.1%})")
        return 0
    out = Path(args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    result = vniah(model, tokenizer, str(out / "vniah-data"), args.images, args.depths, args.samples,
                   chunk_size=args.chunk_size)
    (out / "vniah.json").write_text(json.dumps(result, indent=2))
    print(f"heatmap: {plot_vniah(result, str(out / 'vniah.png'))}")
    for n, row in zip(result["sizes"], result["accuracy"]):
        print(f"{n:4d} images: " + "  ".join(f"{a:5.0%}" for a in row))
    return 0


def plot_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmodel plot", description="loss curve of run directories -> PNG")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", help="PNG path (default: FIRST_RUN/loss.png)")
    args = p.parse_args(argv)
    try:
        path = plot_loss(args.runs, args.out or os.path.join(args.runs[0], "loss.png"))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
