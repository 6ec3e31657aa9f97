"""Training data: LLaVA-style JSONL -> tokenized conversations -> packs of whole conversations.

A record is `{"image": [paths] | path, "video": path, "conversations": [{"from": "human" | "gpt",
"value": ...}, ...]}` (no image and no video: a text-only conversation). It is rendered with a chat
template and tokenized by `formats.tokenize_conversation`: each image placeholder becomes the rows the
image fills (tokens_per_image; for an AnyRes model — LLaVA-NeXT/OneVision — tokens_for_anyres of the
image's size: its base image, then its tiles), and only the assistant's answers and end-of-answer tokens
get labels.

Packing. LongLLaVA trains on 40960-token rows filled with whole conversations. Here a pack is one row
of conversations back to back plus its boundaries (`cu_seqlens`), which the model hands to fastscan's
varlen ops, so no state or attention crosses from one conversation into the next; targets are shifted
inside each conversation, so no conversation's last token is trained to predict the next one's first.
A conversation longer than the pack is truncated (never inside an image) with a warning.

Order. Everything is a function of (seed, epoch): the epoch's record order (and, for stage III, the
replay mixture: each source's records spread evenly through the epoch, so every batch holds its share),
the packs cut from that order, and the global stream of packs that steps consume in fixed-size groups.
The data position of a run is therefore just its step, which makes resuming exact, and worker processes
(torch DataLoader) only load and tokenize: they make no choices.
"""
from __future__ import annotations

import json
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from . import formats, pixels

IGNORE_INDEX = formats.IGNORE_INDEX
VIDEO_PLACEHOLDER = "<video>"


# ---------------------------------------------------------------- reading records

def read_jsonl(path: Union[str, os.PathLike]) -> list[dict]:
    """Records of a JSONL file (a .json file holding one list works too); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"data: {path} must hold a list of records, got {type(records).__name__}")
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"data: {path}:{number}: not JSON ({e.msg})") from None
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ValueError(f"data: {path} record {i}: expected an object with a 'conversations' list")
    return records


def _image_list(record: dict) -> list[str]:
    images = record.get("image") or []
    return [images] if isinstance(images, str) else list(images)


@dataclass(frozen=True)
class Source:
    """One JSONL file; `share` is its fraction of each epoch when it is replayed (None: the main data)."""
    path: str
    share: Optional[float] = None
    image_root: Optional[str] = None  # relative image paths resolve here (default: the file's folder)

    def root(self) -> Path:
        return Path(self.image_root) if self.image_root else Path(self.path).resolve().parent


# ---------------------------------------------------------------- images

def image_sizes(config, images: Sequence) -> list:
    """Per image (path or PIL image): its (width, height) if the model tiles it (AnyRes), else None.
    A path's size comes from its header; the pixels are not decoded."""
    if not config.anyres:
        return [None] * len(images)
    sizes = []
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                sizes.append(tuple(opened.size))
        else:
            sizes.append(tuple(image.size))
    return sizes


def image_token_counts(config, sizes: Sequence) -> list[int]:
    """Rows each image fills in the prompt, from `image_sizes`."""
    return [config.tokens_per_image() if size is None else config.tokens_for_anyres(size) for size in sizes]


def load_images(config, images: Sequence, pixel_config=None) -> tuple[Tensor, Optional[list]]:
    """Images (paths or PIL images) -> (pixel rows (N, 3, H, W), sizes): one row per image, or for an
    AnyRes model each image's base image then its tiles (pixels.anyres_tiles) and, as sizes, each image's
    (width, height) — None when the model does not tile. `pixel_groups` splits the rows per image again."""
    pixel_config = pixel_config or pixels.pixel_config_for_vision(config.vision, config.image_aspect_ratio == "pad")
    if not config.anyres:
        return pixels.preprocess_many(list(images), pixel_config), None
    rows, sizes = [], []
    for image in images:
        image = pixels._rgb(image)
        tiled = pixels.anyres_tiles(image, config.image_grid_pinpoints, tile_size=config.vision.image_size)
        rows.append(pixels.preprocess_many(tiled.images, pixel_config))
        sizes.append(tuple(image.size))
    return torch.cat(rows), sizes


def pixel_groups(config, pixel_values: Optional[Tensor], sizes: Optional[list]):
    """(pixel rows, sizes) as load_images / a Pack holds them -> (images, image_sizes) as LongLLaVA takes
    them: the rows unchanged when no image is AnyRes, else one group per image with its size (None: plain)."""
    if pixel_values is None or sizes is None:
        return pixel_values, None
    counts = [1 if size is None else 1 + math.prod(config.anyres_layout(size)) for size in sizes]
    if sum(counts) != pixel_values.shape[0]:
        raise ValueError(f"pixel_values: {len(sizes)} images need {sum(counts)} pixel rows (base images and tiles), "
                         f"got {pixel_values.shape[0]}")
    return list(pixel_values.split(counts)), list(sizes)


# ---------------------------------------------------------------- one conversation

@dataclass
class Example:
    """One tokenized conversation: ids, targets (labels shifted left inside the conversation: targets[t] is
    the label of token t + 1), its images' (start, rows) spans, pixels (n, 3, H, W) or None — one row per
    plain image, the base image then the tiles of an AnyRes image — and, when any image is AnyRes, the
    (width, height) of each image (None for plain ones) as `load_images` returns them."""
    input_ids: Tensor
    targets: Tensor
    image_spans: list
    pixel_values: Optional[Tensor]
    task: str = ""
    image_sizes: Optional[list] = None


class Conversations:
    """The records of one or more sources, with what packing needs computed once: token counts and
    trained-target counts (text tokenization only; pixels are loaded when a pack is built).

    tokenizer: a tokenizers.Tokenizer (or anything formats accepts); config: the MultimodalConfig, for
    tokens per image, the image token id and the tower's pixel conventions; num_frames: frames sampled
    from each video record (each frame is an image, LongLLaVA's <vid> markup).
    """

    def __init__(self, sources: Sequence[Source], tokenizer, config, template: str = "longllava",
                 max_len: Optional[int] = None, num_frames: int = 8):
        if not sources:
            raise ValueError("sources: expected at least one data file")
        if config.second_vision is not None:
            raise NotImplementedError("training data: two-tower (Cobra) models are not implemented in the training "
                                      "loader; single-tower models ('pad' or AnyRes) are")
        self.sources = list(sources)
        self.tokenizer, self.config, self.template = tokenizer, config, template
        self.max_len, self.num_frames = max_len, num_frames
        self.records: list[tuple[int, dict]] = []
        for s, source in enumerate(self.sources):
            self.records += [(s, r) for r in read_jsonl(source.path)]
        self.pixel_config = pixels.pixel_config_for_vision(config.vision, config.image_aspect_ratio == "pad")
        self.lengths, self.num_targets = [], []
        self._sizes: dict[int, list] = {}  # AnyRes: each image's (width, height), read once from its header
        for i in range(len(self.records)):
            tokens = self._tokenize(i)
            cut = self._cut(i, tokens, warn=True)
            self.lengths.append(cut)
            self.num_targets.append(int((_shift(tokens.labels[:cut]) != IGNORE_INDEX).sum()))

    def __len__(self) -> int:
        return len(self.records)

    def indices_of(self, source: int) -> list[int]:
        return [i for i, (s, _) in enumerate(self.records) if s == source]

    def _turns_and_images(self, i: int) -> tuple[list, int]:
        s, record = self.records[i]
        turns = [dict(t) for t in record["conversations"]]
        images = _image_list(record)
        if record.get("video"):
            if images:
                raise ValueError(f"data: {self._name(i)} has both 'image' and 'video'")
            markup = formats.longllava_video(self.num_frames) if self.template == "longllava" else \
                formats.IMAGE_PLACEHOLDER * self.num_frames
            for turn in turns:  # the video's one placeholder (<video> or <image>) becomes its frames
                value = turn.get("value") or ""
                for placeholder in (VIDEO_PLACEHOLDER, formats.IMAGE_PLACEHOLDER):
                    if placeholder in value:
                        turn["value"] = value.replace(placeholder, markup, 1)
                        break
                else:
                    continue
                break
            else:
                turns[0]["value"] = markup + "\n" + turns[0]["value"]
            return turns, self.num_frames
        found = sum((t.get("value") or "").count(formats.IMAGE_PLACEHOLDER) for t in turns)
        if found > len(images):
            raise ValueError(f"data: {self._name(i)} has {found} {formats.IMAGE_PLACEHOLDER} placeholders but "
                             f"{len(images)} images")
        if found < len(images):  # LLaVA's convention: missing placeholders go before the first question
            turns[0]["value"] = (formats.IMAGE_PLACEHOLDER + "\n") * (len(images) - found) + turns[0]["value"]
        return turns, len(images)

    def _name(self, i: int) -> str:
        s, record = self.records[i]
        return f"{self.sources[s].path} record {record.get('id', i)!r}"

    def sizes_of(self, i: int) -> list:
        """Per image of record i: its (width, height) when the model tiles it (AnyRes images; the rows it
        fills depend on it), else None (plain images, video frames)."""
        s, record = self.records[i]
        if not self.config.anyres or record.get("video"):
            return [None] * (self.num_frames if record.get("video") else len(_image_list(record)))
        if i not in self._sizes:
            self._sizes[i] = image_sizes(self.config, [self.sources[s].root() / p for p in _image_list(record)])
        return self._sizes[i]

    def _tokenize(self, i: int) -> formats.TokenizedPrompt:
        turns, n = self._turns_and_images(i)
        counts = image_token_counts(self.config, self.sizes_of(i)[:n] if n else [])
        try:
            return formats.tokenize_conversation(turns, self.tokenizer, counts, self.template,
                                                 image_token_id=self.config.image_token_id)
        except ValueError as e:
            raise ValueError(f"data: {self._name(i)}: {e}") from None

    def _cut(self, i: int, tokens: formats.TokenizedPrompt, warn: bool = False) -> int:
        """Length kept: all of it, or max_len moved back to the start of an image it would split."""
        length = len(tokens.input_ids)
        if self.max_len is None or length <= self.max_len:
            return length
        cut = self.max_len
        for start, n in tokens.image_spans:
            if start < cut < start + n:
                cut = start
        if warn:
            warnings.warn(f"data: {self._name(i)} has {length} tokens, more than the pack length {self.max_len}: "
                          f"truncated to {cut}", stacklevel=3)
        return max(cut, 1)

    def example(self, i: int) -> Example:
        tokens = self._tokenize(i)
        cut = self._cut(i, tokens)
        spans = [(s, n) for s, n in tokens.image_spans if s + n <= cut]
        pixel_values, sizes = self._pixels(i, len(spans))
        return Example(tokens.input_ids[:cut], _shift(tokens.labels[:cut]), spans, pixel_values,
                       self.records[i][1].get("task", ""), sizes)

    def _pixels(self, i: int, count: int) -> tuple[Optional[Tensor], Optional[list]]:
        if count == 0:
            return None, None
        s, record = self.records[i]
        root = self.sources[s].root()
        if record.get("video"):
            frames = pixels.load_video_frames(root / record["video"], num_frames=self.num_frames)
            return pixels.preprocess_many(list(frames)[:count], self.pixel_config), None
        pixel_values, sizes = load_images(self.config, [root / p for p in _image_list(record)[:count]],
                                          self.pixel_config)
        if sizes is not None and sizes != self.sizes_of(i)[:count]:
            raise ValueError(f"data: {self._name(i)}: an image changed size since its tokens were counted "
                             f"({self.sizes_of(i)[:count]} -> {sizes})")
        return pixel_values, sizes


def _shift(labels: Tensor) -> Tensor:
    """Aligned labels -> next-token targets of one conversation (the last position has none)."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    return out


# ---------------------------------------------------------------- order and packs

def epoch_order(data: Conversations, seed: int, epoch: int) -> list[int]:
    """The epoch's record order: the main sources shuffled; each replay source contributes
    round(share / (1 - total share) * main count) records (cycling through its own shuffle), and every
    source is spread evenly along the epoch (stratified), so any stretch of it carries the mixture."""
    rng = random.Random(f"{seed}:{epoch}")
    main = [i for s, src in enumerate(data.sources) if src.share is None for i in data.indices_of(s)]
    shares = [(s, src.share) for s, src in enumerate(data.sources) if src.share is not None]
    total_share = sum(share for _, share in shares)
    if shares and not (0 < total_share < 1) or any(share <= 0 for _, share in shares):
        raise ValueError(f"replay shares: each must be > 0 and together < 1, got {[sh for _, sh in shares]}")
    if not main:
        raise ValueError("data: no main source (every source is a replay share)")
    streams = [main]
    for s, share in shares:
        pool = data.indices_of(s)
        if not pool:
            raise ValueError(f"data: replay source {data.sources[s].path} is empty")
        count = round(share / (1 - total_share) * len(main))
        picked = []
        while len(picked) < count:
            cycle = pool[:]
            rng.shuffle(cycle)
            picked += cycle
        streams.append(picked[:count])
    rng.shuffle(main)
    keyed = [((j + rng.random()) / len(stream), i) for stream in streams for j, i in enumerate(stream)]
    return [i for _, i in sorted(keyed)]


def plan_packs(lengths: Sequence[int], order: Sequence[int], pack_len: int) -> list[list[int]]:
    """Next-fit packing in order: records go into the current pack until the next one does not fit."""
    packs, current, used = [], [], 0
    for i in order:
        n = lengths[i]
        if n > pack_len:
            raise ValueError(f"lengths: record {i} has {n} tokens > pack_len {pack_len} (truncate first)")
        if used + n > pack_len and current:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


@dataclass
class Pack:
    """One training row: conversations back to back (batch 1).

    input_ids, targets: (1, T); lengths: tokens per conversation (sum T); pixel_values: (N, 3, H, W) for
    every image in the row, in order (AnyRes images: base image then tiles), or None; image_spans: their
    (start, rows) in the row; num_targets: trained targets in this pack; step_targets: trained targets of
    every pack of its optimizer step (the loss normalizer, the same on every rank and micro-step); tasks:
    each conversation's task label; image_sizes: per image, (width, height) if AnyRes else None — None
    when no image of the pack is AnyRes (`pixel_groups` turns pixels and sizes into the model's inputs)."""
    input_ids: Tensor
    targets: Tensor
    lengths: list
    pixel_values: Optional[Tensor]
    image_spans: list
    num_targets: int
    step_targets: int
    tasks: list = field(default_factory=list)
    image_sizes: Optional[list] = None

    def pin_memory(self) -> "Pack":
        self.input_ids, self.targets = self.input_ids.pin_memory(), self.targets.pin_memory()
        if self.pixel_values is not None:
            self.pixel_values = self.pixel_values.pin_memory()
        return self


def build_pack(examples: Sequence[Example], step_targets: int) -> Pack:
    ids, targets, spans, images, sizes, offset = [], [], [], [], [], 0
    for e in examples:
        ids.append(e.input_ids)
        targets.append(e.targets)
        spans += [(offset + s, n) for s, n in e.image_spans]
        if e.pixel_values is not None:
            images.append(e.pixel_values)
        sizes += e.image_sizes if e.image_sizes is not None else [None] * len(e.image_spans)
        offset += len(e.input_ids)
    targets = torch.cat(targets)
    return Pack(torch.cat(ids)[None], targets[None], [len(e.input_ids) for e in examples],
                torch.cat(images) if images else None, spans, int((targets != IGNORE_INDEX).sum()), step_targets,
                [e.task for e in examples], sizes if any(s is not None for s in sizes) else None)


class PackStream(Dataset):
    """The global stream of packs: epoch 0's packs, then epoch 1's, ... Item k is built on demand (in a
    DataLoader worker). Steps take `packs_per_step` consecutive packs; an epoch's remainder that does
    not fill a step is skipped, so each step's packs come from one epoch."""

    def __init__(self, data: Conversations, pack_len: int, packs_per_step: int, seed: int):
        if pack_len < 1 or packs_per_step < 1:
            raise ValueError(f"pack_len, packs_per_step: expected >= 1, got {pack_len}, {packs_per_step}")
        self.data, self.pack_len, self.packs_per_step, self.seed = data, pack_len, packs_per_step, seed
        self._plans: dict[int, list] = {}
        if self.steps_in_epoch(0) == 0:
            raise ValueError(f"data: {len(self.packs(0))} packs of {pack_len} tokens, fewer than one step needs "
                             f"({packs_per_step} = world size x gradient accumulation)")

    def packs(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:  # cheap (lengths only); each worker process plans for itself
            self._plans[epoch] = plan_packs(self.data.lengths, epoch_order(self.data, self.seed, epoch), self.pack_len)
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.packs(epoch)) // self.packs_per_step

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, first step of that epoch) holding global step `step`."""
        epoch, first = 0, 0
        while step >= first + self.steps_in_epoch(epoch):
            first += self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, first

    def step_packs(self, step: int) -> list[list[int]]:
        epoch, first = self.locate(step)
        k = (step - first) * self.packs_per_step
        return self.packs(epoch)[k:k + self.packs_per_step]

    def __len__(self) -> int:  # not meaningful for an endless stream; DataLoader uses the sampler
        return 2 ** 62

    def __getitem__(self, k: int) -> Pack:
        step, micro = divmod(k, self.packs_per_step)
        members = self.step_packs(step)
        step_targets = sum(self.data.num_targets[i] for pack in members for i in pack)
        return build_pack([self.data.example(i) for i in members[micro]], step_targets)


class StepSampler(Sampler):
    """This rank's pack indices from `start_step` on: step s, micro-step m -> pack s*G + m*world + rank
    (G = world * accumulation), so a single process accumulating G packs sees what all ranks see."""

    def __init__(self, start_step: int, num_steps: int, accumulation: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.accumulation, self.rank, self.world = (start_step, num_steps, accumulation,
                                                                           rank, world)

    def __iter__(self):
        g = self.accumulation * self.world
        for step in range(self.start, self.stop):
            for micro in range(self.accumulation):
                yield step * g + micro * self.world + self.rank

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accumulation


def loader(stream: PackStream, start_step: int, num_steps: int, accumulation: int, rank: int = 0, world: int = 1,
           workers: int = 2, pin_memory: bool = False) -> DataLoader:
    """Packs for this rank in order, built by `workers` processes (0: in this process)."""
    return DataLoader(stream, batch_size=None, sampler=StepSampler(start_step, num_steps, accumulation, rank, world),
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)


def steps_for_epochs(stream: PackStream, epochs: float) -> int:
    whole = int(epochs)
    steps = sum(stream.steps_in_epoch(e) for e in range(whole))
    return steps + math.ceil((epochs - whole) * stream.steps_in_epoch(whole)) if epochs > whole else steps
