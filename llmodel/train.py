"""Training: LongLLaVA's three stages on packed conversations, single process or FSDP2 over many.

    python -m llmodel train --stage align  --config tiny-longllava --tokenizer tok.json --data cap.jsonl --out runs/s1
    python -m llmodel train --stage single --init runs/s1/final --data single.jsonl --out runs/s2
    python -m llmodel train --stage multi  --init runs/s2/final --data multi.jsonl \\
        --replay runs/data/single.jsonl:0.2 --replay runs/data/text.jsonl:0.1 --out runs/s3
    torchrun --nproc_per_node 8 -m llmodel train ...      (FSDP2: every process runs the same command)

Stages (LongLLaVA's recipe; the freeze policy is the stage's default unless --train names the parts):
  align   Stage I, image-caption alignment: only the projector trains (vision tower and LM frozen).
  single  Stage II, single-image instruction tuning: projector and LM (vision frozen).
  multi   Stage III, multi-image instruction tuning, with a replay share of stage-II and text-only data
          spread through every batch (--replay PATH:SHARE).
Each stage starts from the previous stage's `final/` checkpoint (--init) or, for a first stage, from a
named or JSON config with random weights (--config). Models: one CLIP tower, mlp2x_gelu projector, any LM
of llmodel (checkpoints use LongLLaVA's layout), images padded to square ("pad") or tiled (AnyRes,
LLaVA-NeXT/OneVision: each image's base image and tiles, its rows depending on its size). A model that
layout cannot hold (Cobra's two towers) is refused before any work, with NotImplementedError.

One optimizer step = world_size x accumulation packs (rows of whole conversations, --pack-len tokens,
LongLLaVA: 40960); the loss is the mean over every trained target of the step, whichever rank or
micro-step holds it, so N processes and one process accumulating N packs compute the same update.
AdamW with parameter groups (projector / LM / vision lr), no weight decay on biases and norms, linear
warmup then cosine decay, gradient-norm clipping, bf16 autocast on CUDA, activation checkpointing per
decoder layer. Checkpoints hold model, optimizer, scheduler, every rank's RNG states and the step (the
data position: see data.py); they are written to a temporary directory and renamed, and `latest` is
replaced atomically, so an interrupted run always resumes from a complete checkpoint. The model is
gathered to rank 0 and written as a loadable LongLLaVA checkpoint (safetensors); the optimizer's moments,
twice the fp32 model, stay sharded: torch.distributed.checkpoint writes each rank's shards (optimizer/).
When a stage starts from --init, and on resume, only rank 0 reads the model file; the other ranks get
their shards by broadcast (from --init they build the model on the meta device: no storage until sharded).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import data as data_mod
from .checkpoint import _atomic_write
from .lm import Packing
from .multimodal import (LongLLaVA, MultimodalConfig, load_longllava, longllava_config, longllava_layout_problem,
                         named_multimodal_config, save_longllava)

STAGES = {"align": ("projector",), "single": ("projector", "lm"), "multi": ("projector", "lm")}
PARTS = ("vision", "projector", "lm")
IGNORE_INDEX = data_mod.IGNORE_INDEX


@dataclass
class TrainConfig:
    stage: str = "align"
    trainable: Optional[list] = None      # the freeze policy: parts that train; None = the stage's default
    lr: float = 2e-5                      # LM
    projector_lr: float = 1e-3
    vision_lr_mult: float = 0.1           # vision lr = lr * this, when vision trains (LLaVA-OneVision)
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    pack_len: int = 40960
    accumulation: int = 1
    steps: Optional[int] = None           # None: `epochs` worth of steps
    epochs: float = 1.0
    seed: int = 0
    workers: int = 2
    activation_checkpointing: Optional[bool] = None  # None: on when pack_len >= 8192
    bf16: bool = True                     # autocast on CUDA (fp32 master weights); ignored on CPU
    save_every: int = 0                   # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    num_frames: int = 8
    template: str = "longllava"
    loss_chunk: int = 4096                # rows of logits alive at once in the loss

    def parts(self) -> tuple:
        parts = tuple(self.trainable) if self.trainable is not None else STAGES[self.stage]
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ValueError(f"trainable: unknown parts {unknown}, expected a subset of {PARTS}")
        return parts

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage: got {self.stage!r}, expected one of {sorted(STAGES)}")
        self.parts()
        self.betas = tuple(self.betas)
        if self.accumulation < 1 or self.keep_last < 1:
            raise ValueError(f"accumulation, keep_last: expected >= 1, got {self.accumulation}, {self.keep_last}")


# ---------------------------------------------------------------- model pieces

def part_modules(model: LongLLaVA) -> dict[str, list[nn.Module | nn.Parameter]]:
    return {"vision": [m for m in (model.vision_tower, model.vision_tower_2) if m is not None],
            "projector": [model.mm_projector] + ([model.image_newline] if model.image_newline is not None else []),
            "lm": [model.lm]}


def _params(item) -> list[nn.Parameter]:
    return [item] if isinstance(item, nn.Parameter) else list(item.parameters())


def apply_freeze_policy(model: LongLLaVA, parts) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """requires_grad per part; returns trainable_parameters(model). A policy that trains nothing is an error."""
    for part, items in part_modules(model).items():
        for p in (p for item in items for p in _params(item)):
            p.requires_grad_(part in parts)
    trained = trainable_parameters(model)
    if not trained:
        raise ValueError(f"trainable: the freeze policy {tuple(parts)} trains no parameter of this model")
    return trained


def trainable_parameters(model: LongLLaVA) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{part: [(name, parameter), ...]} of the parameters that require grad. Call it again after FSDP's
    fully_shard: sharding replaces every parameter object (with DTensor ones that keep requires_grad)."""
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {}
    for part, items in part_modules(model).items():
        params = [p for item in items for p in _params(item) if p.requires_grad]
        if params:
            trained[part] = [(names[id(p)], p) for p in params]
    return trained


def param_groups(trained: dict, config: TrainConfig) -> list[dict]:
    """AdamW groups: per part its lr; weight decay only on matrices (not biases, norms, 1-D vectors)."""
    lrs = {"projector": config.projector_lr, "lm": config.lr, "vision": config.lr * config.vision_lr_mult}
    groups = []
    for part, named in trained.items():
        decay = [p for n, p in named if p.dim() >= 2]
        no_decay = [p for n, p in named if p.dim() < 2]
        for params, wd, tag in ((decay, config.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lrs[part], "weight_decay": wd, "name": f"{part}/{tag}"})
    return groups


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_ratio: float):
    warmup = max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _ce_sum(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


class Trainee(nn.Module):
    """The model plus its loss, one module, so FSDP's root hooks cover lm_head inside the loss too."""

    def __init__(self, model: LongLLaVA, loss_chunk: int):
        super().__init__()
        self.model, self.loss_chunk = model, loss_chunk

    def forward(self, input_ids: Tensor, targets: Tensor, packing: Packing, pixel_values: Optional[Tensor],
                image_spans: list, image_sizes: Optional[list] = None) -> Tensor:
        """Summed cross-entropy over the pack's trained targets. Logits exist only for trained rows, a chunk
        at a time, recomputed in backward (a 40K-row x vocab logit matrix is never held). image_sizes: the
        pack's AnyRes sizes (Pack.image_sizes)."""
        images, sizes = data_mod.pixel_groups(self.model.config, pixel_values, image_sizes)
        hidden = self.model(input_ids, pixel_values=images, image_spans=image_spans, packing=packing,
                            image_sizes=sizes, return_hidden=True)[0]
        rows = (targets[0] != IGNORE_INDEX).nonzero()[:, 0]
        weight = self.model.lm.lm_head.weight
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.numel(), self.loss_chunk):
            idx = rows[start:start + self.loss_chunk]
            total = total + checkpoint(_ce_sum, hidden[idx], weight, targets[0, idx], use_reentrant=False)
        return total


# ---------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank() if world > 1 else 0, world, device)


def shard(trainee: Trainee, world: int) -> None:
    """FSDP2: each decoder layer and each vision encoder layer is its own unit, then the root."""
    if world == 1:
        return
    from torch.distributed.fsdp import fully_shard

    model = trainee.model
    for tower in (model.vision_tower, model.vision_tower_2):
        if tower is not None:
            for layer in tower.layers:
                fully_shard(layer)
    for layer in model.lm.layers:
        fully_shard(layer)
    fully_shard(trainee)


# ---------------------------------------------------------------- checkpoints

def _full_model_state(trainee: Trainee) -> dict:
    """The whole model's weights in rank 0's CPU memory, gathered one tensor at a time (a collective: every
    rank takes part; the other ranks get an empty dict). They are the checkpoint's loadable model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(trainee, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len("model."):]: v for k, v in state.items()}


def _optimizer_state(trainee: Trainee, optimizer) -> dict:
    """AdamW's moments as each rank holds them (FSDP2: its shard of every parameter, as DTensors), keyed by
    parameter name. Never gathered: they are twice the fp32 model, the bulk of a checkpoint, and
    torch.distributed.checkpoint writes each rank's shards itself. On a fresh optimizer the states are
    created first (zeros), so a checkpoint can be loaded into them in place."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"optimizer": get_optimizer_state_dict(trainee, optimizer)}


@contextlib.contextmanager
def _one_process_dcp(d: Dist):
    """torch.distributed.checkpoint warns on every save/load without a process group; one process is meant."""
    with warnings.catch_warnings():
        if d.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run: Path, step: int, trainee: Trainee, optimizer, scheduler, d: Dist, keep_last: int,
                    tokenizer_path: Optional[str]) -> Path:
    """run/checkpoints/step-N: written under a temporary name, renamed when complete, then `latest` is
    replaced and checkpoints beyond keep_last are removed (oldest first)."""
    import torch.distributed.checkpoint as dcp

    root = run / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    model_sd = _full_model_state(trainee)  # collective: every rank takes part
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    with _one_process_dcp(d):  # each rank writes its own shards
        dcp.save(_optimizer_state(trainee, optimizer), checkpoint_id=tmp / "optimizer", no_dist=d.world == 1)
    torch.save(_rng_state(), tmp / f"rng-rank{d.rank}.pt")
    if d.main:
        save_longllava(trainee.model, tmp, state_dict=model_sd)
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                      "world": d.world}, indent=2))
    d.barrier()
    if d.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(str(root / "latest"), lambda p: Path(p).write_text(final.name + "\n"))
        steps = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in steps[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def latest_checkpoint(run: Path) -> Optional[Path]:
    root = run / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if path.is_dir():
            return path
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())  # renamed only when complete
    return steps[-1] if steps else None


def load_model_weights(trainee: Trainee, path, d: Dist) -> None:
    """A saved model's weights (LongLLaVA layout) into the trainee, sharded or not: rank 0 alone reads the
    file; the other ranks get their shards by broadcast, one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = ({f"model.{k}": v for k, v in load_longllava(path, dtype=torch.float32).state_dict().items()}
               if d.main else {})
    set_model_state_dict(trainee, weights, options=StateDictOptions(full_state_dict=True, strict=True,
                                                                    broadcast_from_rank0=d.world > 1))


def load_checkpoint(path: Path, trainee: Trainee, optimizer, scheduler, d: Dist) -> int:
    """Model, optimizer, scheduler and this rank's RNG states from `path`; returns its step. Only rank 0
    reads the model file (the weights reach the other ranks' shards by broadcast, one tensor at a time);
    each rank reads its own optimizer shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    meta = json.loads((path / "trainer.json").read_text())
    if meta["world"] != d.world:
        raise ValueError(f"--resume: {path} was written by {meta['world']} processes, this run has {d.world}; "
                         "the data order and RNG streams are per rank")
    if not (path / "optimizer" / ".metadata").is_file():
        raise FileNotFoundError(f"--resume: {path} has no optimizer/ (torch.distributed.checkpoint) directory; "
                                "checkpoints written before the optimizer was sharded (optimizer.pt) cannot resume")
    load_model_weights(trainee, path, d)
    optim_sd = _optimizer_state(trainee, optimizer)
    with _one_process_dcp(d):
        dcp.load(optim_sd, checkpoint_id=path / "optimizer", no_dist=d.world == 1)
    set_optimizer_state_dict(trainee, optimizer, optim_sd["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(torch.load(path / f"rng-rank{d.rank}.pt", weights_only=False))
    return int(meta["step"])


# ---------------------------------------------------------------- the run

def build_model(init: Optional[str], config_name: Optional[str], seed: int) -> LongLLaVA:
    if init:
        return load_longllava(init, dtype=torch.float32)
    if not config_name:
        raise ValueError("--init or --config: a first stage needs a config (named or JSON), later ones --init")
    if os.path.isfile(config_name):
        config = MultimodalConfig(**json.loads(Path(config_name).read_text()))
    else:
        config = named_multimodal_config(config_name)
    torch.manual_seed(seed)
    return LongLLaVA(config)


def train(config: TrainConfig, data_paths: list, out: str, init: Optional[str] = None,
          model_config: Optional[str] = None, tokenizer_path: Optional[str] = None, replay: tuple = (),
          resume: bool = False, progress: bool = True, model: Optional[LongLLaVA] = None) -> dict:
    """Run one stage; returns {"steps", "final" (path), "losses" (this process's per-step losses)}."""
    from tokenizers import Tokenizer

    d = init_distributed()
    run = Path(out)
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
    tokenizer_path = tokenizer_path or (os.path.join(init, "tokenizer.json") if init else None)
    if not tokenizer_path or not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"--tokenizer: no tokenizer.json (got {tokenizer_path!r}; --init dirs carry one)")
    tokenizer = Tokenizer.from_file(tokenizer_path)

    torch.manual_seed(config.seed)
    random.seed(config.seed + d.rank)
    meta_init = d.world > 1 and model is None and bool(init)
    if meta_init:
        # every rank builds the model without storage (meta) and shards it; the weights come after (below):
        # rank 0 reads them and broadcasts, so no process ever holds a second full copy
        with torch.device("meta"):
            model = LongLLaVA(longllava_config(init))
    elif model is None:
        model = build_model(init, model_config, config.seed)
    problem = longllava_layout_problem(model.config)
    if problem:  # found now, not at the first checkpoint
        raise NotImplementedError(f"training: checkpoints are written in LongLLaVA's layout, and {problem}; "
                                  "training other layouts is not implemented")
    if d.world == 1:
        model.to(d.device)  # FSDP2 moves each unit to the device as it shards it: never the whole model
    trained = apply_freeze_policy(model, config.parts())
    checkpointing = (config.activation_checkpointing if config.activation_checkpointing is not None
                     else config.pack_len >= 8192)
    model.lm.gradient_checkpointing = checkpointing
    trainee = Trainee(model, config.loss_chunk)
    shard(trainee, d.world)
    if meta_init:
        trainee.to_empty(device=d.device)
        load_model_weights(trainee, init, d)
    trained = trainable_parameters(model)
    optimizer = torch.optim.AdamW(param_groups(trained, config), betas=config.betas,
                                  fused=d.device.type == "cuda" or None)

    sources = [data_mod.Source(p) for p in data_paths] + [data_mod.Source(p, share) for p, share in replay]
    convs = data_mod.Conversations(sources, tokenizer, model.config, config.template, max_len=config.pack_len,
                                   num_frames=config.num_frames)
    stream = data_mod.PackStream(convs, config.pack_len, d.world * config.accumulation, config.seed)
    total_steps = config.steps or data_mod.steps_for_epochs(stream, config.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, config.warmup_ratio, config.min_lr_ratio))

    start = 0
    if resume and (found := latest_checkpoint(run)) is not None:
        start = load_checkpoint(found, trainee, optimizer, scheduler, d)
    if d.main:
        record = {"config": asdict(config), "data": data_paths, "replay": list(replay), "init": init,
                  "model_config": model_config, "world": d.world, "total_steps": total_steps,
                  "trainable": {p: sum(x.numel() for _, x in named) for p, named in trained.items()}}
        (run / "train_config.json").write_text(json.dumps(record, indent=2, default=str))

    packs = data_mod.loader(stream, start, total_steps, config.accumulation, d.rank, d.world, config.workers,
                            pin_memory=d.device.type == "cuda")
    bar = None
    if d.main and progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start, desc=f"{config.stage}", dynamic_ncols=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (d.device.type == "cuda" and config.bf16) \
        else contextlib.nullcontext()
    losses, metrics_path = [], run / "metrics.jsonl"
    it = iter(packs)
    trainee.train()
    for step in range(start, total_steps):
        t0, loss_sum, tokens = time.perf_counter(), torch.zeros((), dtype=torch.float64, device=d.device), 0
        for micro in range(config.accumulation):
            pack = next(it)
            if d.world > 1:  # reduce-scatter gradients once per step, after the last micro-step
                trainee.set_requires_gradient_sync(micro == config.accumulation - 1)
            packing = Packing.from_lengths(pack.lengths, d.device)
            with autocast:
                loss = trainee(pack.input_ids.to(d.device), pack.targets.to(d.device), packing,
                               pack.pixel_values.to(d.device) if pack.pixel_values is not None else None,
                               pack.image_spans, pack.image_sizes)
            # FSDP averages gradients over ranks; scaling by world makes the step's gradient that of
            # sum(losses) / step_targets over all ranks' packs, as one process would compute it.
            (loss * (d.world / max(pack.step_targets, 1))).backward()
            loss_sum += loss.detach().double()
            tokens += pack.input_ids.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if d.world > 1:
            stats = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=d.device)])
            dist.all_reduce(stats)
            loss_sum, tokens = stats[0].cpu(), int(stats[1])
        step_loss = float(loss_sum) / max(pack.step_targets, 1)
        losses.append(step_loss)
        seconds = time.perf_counter() - t0
        if d.main:
            lr = scheduler.get_last_lr()
            row = {"step": step + 1, "stage": config.stage, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": tokens, "tokens_per_s": tokens / seconds, "time": time.time()}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{max(lr):.2e}", tok_s=f"{tokens / seconds:.0f}",
                                refresh=False)
                bar.update(1)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(run, step + 1, trainee, optimizer, scheduler, d, config.keep_last, tokenizer_path)
    if bar is not None:
        bar.close()
    final = save_checkpoint(run, total_steps, trainee, optimizer, scheduler, d, config.keep_last, tokenizer_path)
    if d.main:  # the next stage's --init: weights + tokenizer (no optimizer)
        target = run / "final"
        tmp = run / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            if (final / name).exists():
                shutil.copyfile(final / name, tmp / name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    d.barrier()
    return {"steps": total_steps, "final": str(run / "final"), "losses": losses}


# ---------------------------------------------------------------- command line

def _replay(value: str) -> tuple:
    path, _, share = value.rpartition(":")
    try:
        return path, float(share)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--replay: expected PATH:SHARE (e.g. single.jsonl:0.2), got {value!r}")


# TrainConfig fields settable from the command line (flag name -> field name with "_").
_NUMERIC_FLAGS = (("lr", float), ("projector-lr", float), ("vision-lr-mult", float), ("weight-decay", float),
                  ("warmup-ratio", float), ("max-grad-norm", float), ("pack-len", int), ("accumulation", int),
                  ("steps", int), ("epochs", float), ("seed", int), ("workers", int), ("save-every", int),
                  ("keep-last", int), ("num-frames", int))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmodel train", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=sorted(STAGES), required=True)
    p.add_argument("--data", nargs="+", required=True, help="LLaVA-style JSONL file(s)")
    p.add_argument("--replay", type=_replay, action="append", default=[], help="PATH:SHARE, replayed data")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, final/)")
    p.add_argument("--init", help="previous stage's final/ (or any LongLLaVA checkpoint directory)")
    p.add_argument("--config", help="a first stage: named multimodal config or a JSON file")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in --init)")
    p.add_argument("--train", help="freeze policy override: comma-separated parts among vision,projector,lm")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    for name, kind in _NUMERIC_FLAGS:
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--activation-checkpointing", choices=["on", "off"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    overrides = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _ in _NUMERIC_FLAGS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.activation_checkpointing:
        overrides["activation_checkpointing"] = args.activation_checkpointing == "on"
    if args.train is not None:
        overrides["trainable"] = [s.strip() for s in args.train.split(",") if s.strip()]
    try:
        config = TrainConfig(stage=args.stage, **overrides)
        result = train(config, args.data, args.out, init=args.init, model_config=args.config,
                       tokenizer_path=args.tokenizer, replay=tuple(args.replay), resume=args.resume,
                       progress=not args.no_progress)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"done: {result['steps']} steps, final weights in {result['final']}")
    return 0
