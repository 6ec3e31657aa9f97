"""Synthetic multimodal data: coloured shapes for LongLLaVA's three training stages at toy scale, and V-NIAH.

Every image is `image_size` x `image_size` RGB: one filled shape (COLOURS x SHAPES) in one quadrant
(POSITIONS) on a near-white, mildly noisy background. The shape's side is 35-45% of the image side,
jittered a little in size, colour and offset inside its quadrant. Everything is drawn with Pillow from a
`random.Random` seeded by (stage, seed), so the same call writes the same files byte for byte.

Records are LLaVA-style JSONL lines (see `make_split`): {"id", "image": [paths relative to the split
folder] (absent for text-only), "conversations": [{"from": "human"|"gpt", "value"}, ...], "task",
"tasks" (one per assistant turn), "meta" (one {"colour", "shape", "position", "box"} per image)}.
Images appear in the human text as "<image>" placeholders (llmodel.formats wraps them for a template).

Stages and tasks (chance = the accuracy of guessing uniformly among the possible answers; `chance()`):
  align   caption   "<image>\\nDescribe the image." -> "a red circle in the top left"   1/96 (6 x 4 x 4)
  single  colour    "What colour is the shape?" -> "red"                              1/6
          shape     "What shape is it?" -> "circle"                                   1/4
          position  "Where is the shape?" -> "top left"                               1/4
          (1-3 of these as turns of one conversation, in random order)
  multi   which     "Which image has a red circle?" -> "3" (exactly one image matches)  1/N
                    (then follow-up turns, 0-2 unless make_split's which_follow_ups says
                    otherwise, asking the same of other images whose colour and shape are
                    unique among the N)
          count     "How many images have a blue shape?" -> "2" (uniform over 0..N)    1/(N+1)
          order     "Which comes first, the red circle or the blue square?"
                    -> "the red circle" (each combination present exactly once)        1/2
          find      "What colour is the triangle?" -> "green" (exactly one image has
                    that shape; the others use the other three shapes)                1/6
          (the four tasks in equal shares unless make_split's task_shares says otherwise;
          N = 2..max_images images, numbered
          "Image 1: <image>\\nImage 2: <image>\\n..." by default, or with numbered=False just
          "<image>\\n" per image; make_split's which_max_share of the "which" samples (default
          half) use max_images images)
  text    text      text-only replay: "Repeat: blue square top left" -> "blue square top left",
                    "Count the words: red blue green" -> "3"                          ~0
  V-NIAH  vniah     the "find" task at long context: N - 1 haystack images plus one needle, the only
                    image with shape S (random per sample; the haystack uses the other three shapes),
                    at index round(depth * (N - 1)); "What colour is the S?" -> "red"    1/6
                    (bare "<image>" lines by default: a model trained on <= 8 images never saw
                    "Image 9")

`build_tokenizer()` makes a word-level tokenizer over exactly the words this module can produce (VOCAB)
plus LongLLaVA's template tokens, each one token; `answer_matches()` is the evaluation's exact match.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import string
from pathlib import Path
from typing import Optional, Sequence, Union

from PIL import Image, ImageDraw

# --- Vocabulary of the world -------------------------------------------------------------------------

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 165, 45),
    "blue": (35, 65, 225),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 15),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")

STAGES = ("align", "single", "multi", "text")
MULTI_TASKS = ("which", "count", "order", "find")
MAX_NUMBER = 128                # "0".."128" are words: image numbers, counts (V-NIAH up to 128 images)

COLOUR_JITTER = 12              # +- per channel, per image
BACKGROUND = (238, 252)         # near-white background values, per pixel and channel

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|User|>", "<|Assistant|>", "<|endoftext|>",
                  "<img>", "</img>", "<image>", "<vid>", "</vid>", "<t>")

# Prompts ({...} are slots filled from the world's vocabulary).
Q_CAPTION = "<image>\nDescribe the image."
Q_SINGLE = {"colour": "What colour is the shape?", "shape": "What shape is it?",
            "position": "Where is the shape?"}
Q_WHICH = "Which image has a {colour} {shape}?"
Q_COUNT = "How many images have a {colour} shape?"
Q_ORDER = "Which comes first, the {first} or the {second}?"
Q_FIND = "What colour is the {shape}?"
Q_VNIAH = Q_FIND                # V-NIAH asks the trained "find" question
Q_REPEAT = "Repeat: {words}"
Q_COUNT_WORDS = "Count the words: {words}"
TEXT_WORDS = tuple(COLOURS) + SHAPES + ("top", "bottom", "left", "right")

_CHANCE_FIXED = {
    "caption": 1 / (len(COLOURS) * len(SHAPES) * len(POSITIONS)),
    "colour": 1 / len(COLOURS),
    "shape": 1 / len(SHAPES),
    "position": 1 / len(POSITIONS),
    "order": 1 / 2,
    "find": 1 / len(COLOURS),
    "vniah": 1 / len(COLOURS),
    "text": 0.0,
}
CHANCE = dict(_CHANCE_FIXED)    # tasks whose chance does not depend on the number of images


def chance(task: str, num_images: Optional[int] = None) -> float:
    """Chance accuracy of `task`; "which" (1/N) and "count" (1/(N+1)) need the number of images N."""
    if task in _CHANCE_FIXED:
        return _CHANCE_FIXED[task]
    if task in ("which", "count"):
        if not num_images or num_images < 1:
            raise ValueError(f"chance({task!r}): num_images is needed, got {num_images!r}")
        return 1 / num_images if task == "which" else 1 / (num_images + 1)
    raise ValueError(f"task: got {task!r}, expected one of {sorted([*_CHANCE_FIXED, 'which', 'count'])}")


def _words(text: str) -> list[str]:
    """Split like the tokenizer's pre-tokenizer (whitespace, then every punctuation character alone)."""
    return re.findall(r"\w+|[^\w\s]", text)


def vocab_words(max_number: int = MAX_NUMBER) -> list[str]:
    """Every word the generator can write (prompts, answers, "Image", numbers "0".."max_number"), in a
    fixed order. Template/special tokens are not included (see SPECIAL_TOKENS)."""
    texts = [Q_CAPTION.replace("<image>", ""), "a in the", "Image :", *Q_SINGLE.values(),
             Q_WHICH, Q_COUNT, Q_ORDER, Q_FIND, Q_REPEAT, Q_COUNT_WORDS,
             *COLOURS, *SHAPES, *POSITIONS]
    words = [w for text in texts for w in _words(re.sub(r"\{\w+\}", " ", text))]
    words += [str(i) for i in range(max_number + 1)]
    return list(dict.fromkeys(words))


VOCAB = vocab_words()


def build_tokenizer(path: Union[str, os.PathLike, None] = None, max_number: int = MAX_NUMBER):
    """A word-level `tokenizers.Tokenizer` over VOCAB: ids 0 "<pad>", 1 "<unk>", then SPECIAL_TOKENS (added
    special tokens, so each is one id wherever it appears), then the words. Whitespace (newlines too) is
    dropped and punctuation is split off. Saved as tokenizer.json to `path` when given."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = [PAD_TOKEN, UNK_TOKEN, *SPECIAL_TOKENS, *vocab_words(max_number)]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, " ?" -> "?"
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in (PAD_TOKEN, UNK_TOKEN, *SPECIAL_TOKENS)])
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(path))
    return tokenizer


# --- Evaluation --------------------------------------------------------------------------------------

_STRIP_SPECIAL = re.compile("|".join(re.escape(t) for t in (*SPECIAL_TOKENS, PAD_TOKEN, UNK_TOKEN)))
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercase, template tokens and punctuation removed, whitespace collapsed."""
    text = _STRIP_SPECIAL.sub(" ", text)
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def answer_matches(prediction: str, answer: str) -> bool:
    """Normalized exact match (see `normalize_answer`): "Red." matches "red", "red circle" does not."""
    return normalize_answer(prediction) == normalize_answer(answer)


# --- Drawing -----------------------------------------------------------------------------------------

def _shape_geometry(position: str, size: int, rng: random.Random):
    """The shape's integer bounding box (x0, y0, x1, y1), inclusive, inside its quadrant."""
    if position not in POSITIONS:
        raise ValueError(f"position: got {position!r}, expected one of {POSITIONS}")
    half = size / 2
    extent = max(3, round(size * rng.uniform(0.35, 0.45)))
    jitter = max(0.0, min((half - extent) / 2, size * 0.04))
    vertical, horizontal = position.split()
    cx = (half if horizontal == "right" else 0) + half / 2 + rng.uniform(-jitter, jitter)
    cy = (half if vertical == "bottom" else 0) + half / 2 + rng.uniform(-jitter, jitter)
    x0, y0 = round(cx - extent / 2), round(cy - extent / 2)
    return (x0, y0, x0 + extent - 1, y0 + extent - 1)


def _draw(colour: str, shape: str, position: str, size: int, rng: random.Random):
    if colour not in COLOURS:
        raise ValueError(f"colour: got {colour!r}, expected one of {tuple(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"shape: got {shape!r}, expected one of {SHAPES}")
    if size < 8:
        raise ValueError(f"size: expected >= 8, got {size}")
    box = _shape_geometry(position, size, rng)
    fill = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])

    low, high = BACKGROUND
    table = bytes(low + i % (high - low + 1) for i in range(256))
    image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3).translate(table))
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    else:  # cross
        arm = max(1, round((x1 - x0 + 1) / 6))    # half the bar thickness: bars are ~1/3 of the side
        draw.rectangle((x0, math.floor(cy) - arm + 1, x1, math.ceil(cy) + arm - 1), fill=fill)
        draw.rectangle((math.floor(cx) - arm + 1, y0, math.ceil(cx) + arm - 1, y1), fill=fill)
    return image, list(box)


def draw_shape(colour: str, shape: str, position: str, size: int = 32,
               rng: Optional[random.Random] = None) -> Image.Image:
    """One filled `colour` `shape` (SHAPES) in the `position` quadrant of a size x size RGB
    image, on a near-white noisy background. Deterministic given `rng` (None: `random.Random(0)`)."""
    return _draw(colour, shape, position, size, random.Random(0) if rng is None else rng)[0]


# --- Records -----------------------------------------------------------------------------------------

class _Writer:
    """Draws images into out_dir/images/ and remembers each one's metadata."""

    def __init__(self, out_dir: Path, image_size: int, rng: random.Random):
        self.out_dir, self.image_size, self.rng = out_dir, image_size, rng
        (out_dir / "images").mkdir(parents=True, exist_ok=True)

    def images(self, sample_id: str, items: Sequence[tuple[str, str, str]]):
        """items: (colour, shape, position) per image -> (relative paths, meta)."""
        paths, meta = [], []
        for index, (colour, shape, position) in enumerate(items):
            image, box = _draw(colour, shape, position, self.image_size, self.rng)
            relative = f"images/{sample_id}_{index}.png"
            image.save(self.out_dir / relative, format="PNG")
            paths.append(relative)
            meta.append({"colour": colour, "shape": shape, "position": position, "box": box})
        return paths, meta


def _random_item(rng: random.Random, exclude: Sequence[tuple[str, str]] = (), colours=None, shapes=None):
    """A random (colour, shape, position) from `colours` x `shapes` (None: all) whose (colour, shape) is
    not in `exclude`."""
    colours = tuple(COLOURS) if colours is None else tuple(colours)
    shapes = SHAPES if shapes is None else tuple(shapes)
    while True:
        colour, shape = rng.choice(colours), rng.choice(shapes)
        if (colour, shape) not in exclude:
            return colour, shape, rng.choice(POSITIONS)


def _find_items(rng: random.Random, num_images: int, where: int):
    """The "find" layout: image `where` is the only one with shape S (random); the others use the other
    shapes. -> (items, S, the colour at `where`)."""
    shape = rng.choice(SHAPES)
    others = [s for s in SHAPES if s != shape]
    items = [_random_item(rng, shapes=others) for _ in range(num_images)]
    items[where] = (rng.choice(tuple(COLOURS)), shape, rng.choice(POSITIONS))
    return items, shape, items[where][0]


def _prompt(num_images: int, question: str, numbered: bool) -> str:
    """The multi-image prompt: an "Image k: <image>" line per image (numbered) or a bare "<image>" line,
    then the question."""
    if numbered:
        return "".join(f"Image {i + 1}: <image>\n" for i in range(num_images)) + question
    return "<image>\n" * num_images + question


def _conversation(pairs: Sequence[tuple[str, str]]) -> list[dict]:
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def _record(sample_id, paths, meta, pairs, tasks, **extra) -> dict:
    record = {"id": sample_id}
    if paths:
        record["image"] = paths
    record["conversations"] = _conversation(pairs)
    record["task"] = tasks[0]
    record["tasks"] = list(tasks)
    record["meta"] = meta
    record.update(extra)
    return record


def _align(rng, writer, sample_id, max_images):
    item = _random_item(rng)
    paths, meta = writer.images(sample_id, [item])
    colour, shape, position = item
    return _record(sample_id, paths, meta, [(Q_CAPTION, f"a {colour} {shape} in the {position}")], ["caption"])


def _single(rng, writer, sample_id, max_images):
    item = _random_item(rng)
    paths, meta = writer.images(sample_id, [item])
    answers = dict(zip(("colour", "shape", "position"), item))
    tasks = rng.sample(list(Q_SINGLE), rng.randint(1, len(Q_SINGLE)))
    pairs = [(("<image>\n" if i == 0 else "") + Q_SINGLE[task], answers[task]) for i, task in enumerate(tasks)]
    return _record(sample_id, paths, meta, pairs, tasks)


def _multi(rng, writer, sample_id, task, num_images, numbered, follow_ups):
    extra = []                      # follow-up (question, answer) turns over the same images
    if task == "which":
        target = (rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
        where = rng.randrange(num_images)
        items = [_random_item(rng, exclude=[target]) for _ in range(num_images)]
        items[where] = (*target, rng.choice(POSITIONS))
        question, answer = Q_WHICH.format(colour=target[0], shape=target[1]), str(where + 1)
        # follow-up turns (make_split's which_follow_ups) about other images whose colour + shape is unique
        # in the set: the images' tokens (most of a record) are then paid for once per several trained
        # answers, as in multi-turn SFT data
        combos = [item[:2] for item in items]
        unique = [j for j, c in enumerate(combos) if j != where and combos.count(c) == 1]
        follow = rng.sample(unique, min(rng.randint(*follow_ups), len(unique)))
        extra = [(Q_WHICH.format(colour=items[j][0], shape=items[j][1]), str(j + 1)) for j in follow]
    elif task == "count":
        colour = rng.choice(tuple(COLOURS))
        count = rng.randint(0, num_images)
        marked = set(rng.sample(range(num_images), count))
        others = [c for c in COLOURS if c != colour]
        items = [(colour, rng.choice(SHAPES), rng.choice(POSITIONS)) if i in marked
                 else _random_item(rng, colours=others) for i in range(num_images)]
        question, answer = Q_COUNT.format(colour=colour), str(count)
    elif task == "order":
        combos = [(c, s) for c in COLOURS for s in SHAPES]
        a, b = rng.sample(combos, 2)
        i, j = sorted(rng.sample(range(num_images), 2))
        items = [_random_item(rng, exclude=[a, b]) for _ in range(num_images)]
        items[i], items[j] = (*a, rng.choice(POSITIONS)), (*b, rng.choice(POSITIONS))
        names = [f"{a[0]} {a[1]}", f"{b[0]} {b[1]}"]
        first, second = rng.sample(names, 2)
        question, answer = Q_ORDER.format(first=first, second=second), f"the {names[0]}"
    elif task == "find":
        items, shape, answer = _find_items(rng, num_images, rng.randrange(num_images))
        question = Q_FIND.format(shape=shape)
    else:
        raise ValueError(f"task: got {task!r}, expected one of {MULTI_TASKS}")
    paths, meta = writer.images(sample_id, items)
    pairs = [(_prompt(num_images, question, numbered), answer), *extra]
    return _record(sample_id, paths, meta, pairs, [task] * len(pairs))


def _text(rng, writer, sample_id, max_images):
    if rng.random() < 0.5:
        words = " ".join(rng.choice(TEXT_WORDS) for _ in range(rng.randint(2, 5)))
        pair, kind = (Q_REPEAT.format(words=words), words), "repeat"
    else:
        count = rng.randint(1, 8)
        words = " ".join(rng.choice(TEXT_WORDS) for _ in range(count))
        pair, kind = (Q_COUNT_WORDS.format(words=words), str(count)), "count_words"
    return _record(sample_id, [], [], [pair], ["text"], text_kind=kind)


def _write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: Union[str, os.PathLike]) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _task_list(num_samples: int, task_shares: Optional[dict]) -> list[str]:
    if task_shares is None:
        return [MULTI_TASKS[i % len(MULTI_TASKS)] for i in range(num_samples)]
    unknown = sorted(set(task_shares) - set(MULTI_TASKS))
    if unknown or any(v < 0 for v in task_shares.values()) or not math.isclose(sum(task_shares.values()), 1.0):
        raise ValueError(f"task_shares: expected non-negative shares of {MULTI_TASKS} summing to 1, got {task_shares}")
    tasks = []
    for task in MULTI_TASKS[:-1]:
        tasks += [task] * round(task_shares.get(task, 0.0) * num_samples)
    tasks = tasks[:num_samples]
    return tasks + [MULTI_TASKS[-1]] * (num_samples - len(tasks))


def make_split(out_dir: Union[str, os.PathLike], stage: str, num_samples: int, seed: int,
               image_size: int = 32, max_images: int = 8, numbered: bool = True,
               task_shares: Optional[dict] = None, which_max_share: float = 0.5,
               which_follow_ups: tuple = (0, 2)) -> Path:
    """Write `num_samples` records of `stage` ("align", "single", "multi", "text"; see the module docstring)
    to out_dir/data.jsonl (returned) and their PNGs to out_dir/images/. Image paths in the records are
    relative to out_dir. Deterministic given (stage, seed); use different seeds for train and held-out.
    `numbered` (multi only): "Image k: <image>" lines (default; "which" answers are these numbers) or bare
    "<image>" lines. `task_shares` (multi only): {task: share} over MULTI_TASKS (None: equal shares); each
    task gets round(share * num_samples) records (the last task the remainder), shuffled.
    `which_max_share` (multi only): the share of "which" records with exactly max_images images (spread
    evenly: 0.5 is every other one); the rest draw 2..max_images uniformly. `which_follow_ups` (multi
    only): (least, most) follow-up turns per "which" record, drawn uniformly (capped by how many other
    images have a unique colour + shape)."""
    if stage not in STAGES:
        raise ValueError(f"stage: got {stage!r}, expected one of {STAGES}")
    if num_samples < 0:
        raise ValueError(f"num_samples: expected >= 0, got {num_samples}")
    if not (isinstance(which_max_share, (int, float)) and 0.0 <= which_max_share <= 1.0):
        raise ValueError(f"which_max_share: expected a share in [0, 1], got {which_max_share}")
    follow_ups = tuple(which_follow_ups)
    if not (len(follow_ups) == 2 and all(isinstance(v, int) for v in follow_ups)
            and 0 <= follow_ups[0] <= follow_ups[1]):
        raise ValueError(f"which_follow_ups: expected (least, most) with 0 <= least <= most, got {which_follow_ups!r}")
    if stage == "multi" and not 2 <= max_images <= MAX_NUMBER:
        raise ValueError(f"max_images: expected 2..{MAX_NUMBER} for stage 'multi', got {max_images}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"llmodel.synthetic:{stage}:{seed}")
    writer = _Writer(out_dir, image_size, rng) if stage != "text" else None
    records = []
    if stage == "multi":
        tasks = _task_list(num_samples, task_shares)
        rng.shuffle(tasks)
        which_seen = 0
        for i, task in enumerate(tasks):
            if task == "which":
                # which_max_share of them use max_images images, evenly spread (0.5: every other one)
                at_max = math.ceil((which_seen + 1) * which_max_share) > math.ceil(which_seen * which_max_share)
                n = max_images if at_max else rng.randint(2, max_images)
                which_seen += 1
            else:
                n = rng.randint(2, max_images)
            records.append(_multi(rng, writer, f"{stage}-{i:06d}", task, n, numbered, follow_ups))
    else:
        make = {"align": _align, "single": _single, "text": _text}[stage]
        records = [make(rng, writer, f"{stage}-{i:06d}", max_images) for i in range(num_samples)]
    return _write_jsonl(out_dir / "data.jsonl", records)


def needle_index(num_images: int, depth: float) -> int:
    """Where the V-NIAH needle goes: round(depth * (num_images - 1)) (Python's round, half to even)."""
    return round(depth * (num_images - 1))


def make_vniah(out_dir: Union[str, os.PathLike], num_images: int, depth: float, num_samples: int, seed: int,
               image_size: int = 32, numbered: bool = False) -> Path:
    """V-NIAH, the "find" task at long context: num_images - 1 haystack images and one needle at index
    `needle_index(num_images, depth)`, the only image with shape S (random per sample, random colour; the
    haystack uses the other three shapes), asked "What colour is the S?". The prompt is one "<image>" line
    per image (numbered=True: "Image k: <image>" lines as in "multi"; a model trained on <= max_images
    images never saw the larger numbers). Records carry "depth", "num_images", "needle_index" and
    "needle_shape". Writes out_dir/data.jsonl (returned)."""
    if not 1 <= num_images <= MAX_NUMBER:
        raise ValueError(f"num_images: expected 1..{MAX_NUMBER}, got {num_images}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected in [0, 1], got {depth}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"llmodel.synthetic:vniah:{num_images}:{depth!r}:{seed}")
    writer = _Writer(out_dir, image_size, rng)
    where = needle_index(num_images, depth)
    records = []
    for i in range(num_samples):
        sample_id = f"vniah-n{num_images}-d{round(depth * 1000):04d}-{i:06d}"
        items, shape, colour = _find_items(rng, num_images, where)
        paths, meta = writer.images(sample_id, items)
        question = _prompt(num_images, Q_VNIAH.format(shape=shape), numbered)
        records.append(_record(sample_id, paths, meta, [(question, colour)], ["vniah"],
                               depth=depth, num_images=num_images, needle_index=where, needle_shape=shape))
    return _write_jsonl(out_dir / "data.jsonl", records)
