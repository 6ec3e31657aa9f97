"""llmodel.synthetic: deterministic data, answers correct by construction, a tokenizer with no <unk>."""
import math
import random
import re

import pytest
from PIL import Image

from llmodel import synthetic as syn
from llmodel.formats import IGNORE_INDEX, tokenize_conversation

SIZES = {"align": 18, "single": 18, "multi": 32, "text": 16}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for stage, n in SIZES.items():
        path = syn.make_split(root / stage, stage, n, seed=3, image_size=32, max_images=8)
        out[stage] = (path.parent, syn.read_jsonl(path))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return syn.build_tokenizer()


def _pairs(record):
    turns = record["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def _check_numbered(question, n):
    lines = question.split("\n")
    assert lines[:n] == [f"Image {i + 1}: <image>" for i in range(n)]
    assert question.count("<image>") == n and len(lines) == n + 1
    return lines[n]


def _check_unnumbered(question, n):
    lines = question.split("\n")
    assert lines[:n] == ["<image>"] * n and len(lines) == n + 1
    assert question.count("<image>") == n and "Image" not in question
    return lines[n]


def _check_find(question, meta, answer):
    """Exactly one image has the asked shape; the answer is its colour. -> its index."""
    shape, = re.fullmatch(r"What colour is the (\w+)\?", question).groups()
    assert shape in syn.SHAPES
    matches = [i for i, m in enumerate(meta) if m["shape"] == shape]
    assert len(matches) == 1 and answer == meta[matches[0]]["colour"]
    return matches[0]


def _all_records(splits):
    return [(folder, r) for folder, records in splits.values() for r in records]


def test_deterministic(tmp_path):
    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    for stage in ("single", "multi"):
        a = syn.make_split(tmp_path / "a" / stage, stage, 6, seed=11, max_images=4).parent
        b = syn.make_split(tmp_path / "b" / stage, stage, 6, seed=11, max_images=4).parent
        c = syn.make_split(tmp_path / "c" / stage, stage, 6, seed=12, max_images=4).parent
        assert files(a) == files(b)
        assert files(a)["data.jsonl"] != files(c)["data.jsonl"]
    v1 = syn.make_vniah(tmp_path / "v1", 5, 0.5, 2, seed=0).parent
    v2 = syn.make_vniah(tmp_path / "v2", 5, 0.5, 2, seed=0).parent
    assert files(v1) == files(v2)
    rng1, rng2 = random.Random(4), random.Random(4)
    assert syn.draw_shape("red", "cross", "top right", 32, rng1).tobytes() == \
        syn.draw_shape("red", "cross", "top right", 32, rng2).tobytes()


def test_record_layout(splits):
    for stage, (folder, records) in splits.items():
        assert len(records) == SIZES[stage]
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            pairs = _pairs(r)
            assert r["task"] == r["tasks"][0] and len(r["tasks"]) == len(pairs)
            images = r.get("image", [])
            assert len(images) == len(r["meta"])
            assert sum(q.count("<image>") for q, _ in pairs) == len(images)
            assert all("<image>" not in q for q, _ in pairs[1:])
            for path in images:
                assert not path.startswith("/") and (folder / path).is_file()
            if stage == "text":
                assert "image" not in r and r["task"] == "text"


def test_align_and_single_answers(splits):
    for r in splits["align"][1]:
        (q, a), = _pairs(r)
        m = r["meta"][0]
        assert q == "<image>\nDescribe the image." and r["task"] == "caption"
        assert a == f"a {m['colour']} {m['shape']} in the {m['position']}"
    seen = set()
    for r in splits["single"][1]:
        m = r["meta"][0]
        assert 1 <= len(r["tasks"]) <= 3 and len(set(r["tasks"])) == len(r["tasks"])
        seen.update(r["tasks"])
        for task, (q, a) in zip(r["tasks"], _pairs(r)):
            assert q.replace("<image>\n", "") == syn.Q_SINGLE[task]
            assert a == m[task]
    assert seen == {"colour", "shape", "position"}


def test_multi_answers(splits):
    records = splits["multi"][1]
    tasks = [r["task"] for r in records]
    assert {t: tasks.count(t) for t in syn.MULTI_TASKS} == {"which": 8, "count": 8, "order": 8, "find": 8}
    which_sizes, find_where = [], set()
    follow_ups = 0
    for r in records:
        pairs = _pairs(r)
        (q, a) = pairs[0]
        meta, n = r["meta"], len(r["meta"])
        assert 2 <= n <= 8 and all(m["shape"] in syn.SHAPES for m in meta)
        assert r["tasks"] == [r["task"]] * len(pairs)
        assert len(pairs) == 1 or r["task"] == "which" and len(pairs) <= 3
        question = _check_numbered(q, n)
        combos = [(m["colour"], m["shape"]) for m in meta]
        if r["task"] == "which":
            asked = []
            for turn, (q, a) in enumerate(pairs):  # follow-ups: the same question, other unique images
                text = question if turn == 0 else q
                colour, shape = re.fullmatch(r"Which image has a (\w+) (\w+)\?", text).groups()
                matches = [i for i, c in enumerate(combos) if c == (colour, shape)]
                assert len(matches) == 1 and a == str(matches[0] + 1)
                asked.append(matches[0])
            assert len(set(asked)) == len(asked)
            follow_ups += len(pairs) - 1
            which_sizes.append(n)
        elif r["task"] == "find":
            find_where.add(_check_find(question, meta, a))
        elif r["task"] == "count":
            colour, = re.fullmatch(r"How many images have a (\w+) shape\?", question).groups()
            assert a == str(sum(m["colour"] == colour for m in meta))
        else:
            assert r["task"] == "order"
            x, y = re.fullmatch(r"Which comes first, the (\w+ \w+) or the (\w+ \w+)\?", question).groups()
            assert x != y
            index = {name: [i for i, c in enumerate(combos) if " ".join(c) == name] for name in (x, y)}
            assert all(len(v) == 1 for v in index.values())
            assert a == "the " + min((x, y), key=lambda name: index[name][0])
    assert sum(n == 8 for n in which_sizes) * 2 >= len(which_sizes)
    assert follow_ups > 0
    assert len(find_where) > 1      # the target image is not always at the same index


def test_multi_unnumbered(tmp_path):
    path = syn.make_split(tmp_path, "multi", 8, seed=3, max_images=5, numbered=False)
    records = syn.read_jsonl(path)
    assert {r["task"] for r in records} == set(syn.MULTI_TASKS)
    for r in records:
        (q, a) = _pairs(r)[0]
        question = _check_unnumbered(q, len(r["image"]))
        if r["task"] == "find":
            _check_find(question, r["meta"], a)


def test_multi_task_shares(tmp_path):
    shares = {"which": 0.5, "count": 0.1, "order": 0.2, "find": 0.2}
    records = syn.read_jsonl(syn.make_split(tmp_path / "a", "multi", 20, seed=1, max_images=4, task_shares=shares))
    counts = {t: sum(r["task"] == t for r in records) for t in syn.MULTI_TASKS}
    assert counts == {"which": 10, "count": 2, "order": 4, "find": 4}
    assert [r["task"] for r in records[:10]] != ["which"] * 10   # shuffled, not in blocks
    for bad in ({"which": 0.5, "count": 0.4}, {"which": 1.2, "count": -0.2}, {"which": 0.5, "colour": 0.5}):
        with pytest.raises(ValueError, match="task_shares"):
            syn.make_split(tmp_path / "b", "multi", 4, seed=1, task_shares=bad)


@pytest.mark.parametrize("share", [0.5, 1.0, 0.25, 0.0])
def test_which_max_share(tmp_path, share):
    records = syn.read_jsonl(syn.make_split(tmp_path, "multi", 20, seed=3, max_images=5, task_shares={"which": 1.0},
                                            which_max_share=share))
    sizes = [len(r["image"]) for r in records]
    assert all(2 <= n <= 5 for n in sizes)
    # the share is spread evenly (0.5: records 0, 2, 4, ...); the others draw 2..5 uniformly, 5 included
    forced = [i for i in range(20) if math.ceil((i + 1) * share) > math.ceil(i * share)]
    assert len(forced) == round(20 * share) and all(sizes[i] == 5 for i in forced)
    free = [sizes[i] for i in range(20) if i not in forced]
    assert share == 1.0 or len(set(free)) >= 3
    for bad in (1.5, -0.1, "half"):
        with pytest.raises(ValueError, match="which_max_share"):
            syn.make_split(tmp_path / "bad", "multi", 2, seed=3, which_max_share=bad)


@pytest.mark.parametrize("follow_ups", [(0, 0), (2, 4), (3, 3)])
def test_which_follow_ups(tmp_path, follow_ups):
    records = syn.read_jsonl(syn.make_split(tmp_path, "multi", 12, seed=4, max_images=8, task_shares={"which": 1.0},
                                            which_follow_ups=follow_ups))
    least, most = follow_ups
    for r in records:
        combos = [(m["colour"], m["shape"]) for m in r["meta"]]
        unique_others = sum(combos.count(c) == 1 for c in combos) - 1      # the first question's image is unique
        turns = len(r["conversations"]) // 2 - 1
        assert min(least, unique_others) <= turns <= min(most, unique_others)
    for bad in ((3, 2), (-1, 2), (1,), (0.5, 2)):
        with pytest.raises(ValueError, match="which_follow_ups"):
            syn.make_split(tmp_path / "bad", "multi", 2, seed=4, which_follow_ups=bad)


def test_text_answers(splits):
    for r in splits["text"][1]:
        (q, a), = _pairs(r)
        if q.startswith("Repeat: "):
            assert a == q[len("Repeat: "):]
        else:
            assert q.startswith("Count the words: ") and a == str(len(q.split(": ", 1)[1].split()))


@pytest.mark.parametrize("num_images,depth", [(1, 0.0), (6, 0.0), (6, 0.5), (6, 1.0), (12, 0.3)])
def test_vniah(tmp_path, num_images, depth):
    path = syn.make_vniah(tmp_path, num_images, depth, 3, seed=1, image_size=32)
    where = syn.needle_index(num_images, depth)
    assert where == round(depth * (num_images - 1))
    for r in syn.read_jsonl(path):
        (q, a), = _pairs(r)
        question = _check_unnumbered(q, num_images)
        assert r["task"] == "vniah" and r["num_images"] == num_images == len(r["image"])
        assert r["depth"] == depth and r["needle_index"] == where
        assert _check_find(question, r["meta"], a) == where
        assert question == f"What colour is the {r['needle_shape']}?"
        assert all(m["shape"] in syn.SHAPES for m in r["meta"])


def test_vniah_numbered_and_shapes_vary(tmp_path):
    path = syn.make_vniah(tmp_path / "n", 10, 0.5, 2, seed=2, numbered=True)
    for r in syn.read_jsonl(path):
        (q, a), = _pairs(r)
        assert _check_find(_check_numbered(q, 10), r["meta"], a) == r["needle_index"] == 4
    records = syn.read_jsonl(syn.make_vniah(tmp_path / "v", 3, 1.0, 24, seed=0, image_size=8))
    assert {r["needle_shape"] for r in records} == set(syn.SHAPES)


def test_tokenizer(splits, tokenizer, tmp_path):
    vocab = tokenizer.get_vocab()
    assert vocab["<pad>"] == 0 and vocab["<unk>"] == 1
    assert "star" not in syn.VOCAB and "find" not in syn.VOCAB
    assert set(syn.VOCAB) <= set(vocab) and len(vocab) == 2 + len(syn.SPECIAL_TOKENS) + len(syn.VOCAB)
    for token in syn.SPECIAL_TOKENS:
        assert tokenizer.encode(f"a{token}red", add_special_tokens=False).tokens == ["a", token, "red"]
    unk = vocab["<unk>"]
    for _, r in _all_records(splits):
        n = len(r.get("image", []))
        tp = tokenize_conversation(r["conversations"], tokenizer, image_token_counts=[16] * n,
                                   template="longllava")
        ids = tp.input_ids.tolist()
        assert unk not in ids and len(tp.image_spans) == n
        for start, count in tp.image_spans:
            assert ids[start - 1] == vocab["<img>"] and ids[start + count] == vocab["</img>"]
        trained = [i for i, label in zip(ids, tp.labels.tolist()) if label != IGNORE_INDEX]
        answers = " ".join(a for _, a in _pairs(r))
        assert trained.count(vocab["<|endoftext|>"]) == len(r["tasks"])
        assert [i for i in trained if i != vocab["<|endoftext|>"]] == tokenizer.encode(answers).ids
    saved = syn.build_tokenizer(tmp_path / "tok" / "tokenizer.json")
    from tokenizers import Tokenizer
    loaded = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    text = "<|startoftext|><|User|>\nImage 12: <img></img>\nWhat colour is the cross?"
    assert loaded.encode(text).ids == saved.encode(text).ids == tokenizer.encode(text).ids


def _nearest_colour(rgb):
    return min(syn.COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(syn.COLOURS[c], rgb)))


def test_images_pixels(splits, tmp_path):
    vniah = syn.make_vniah(tmp_path, 4, 1.0, 2, seed=5, image_size=32)
    folders = _all_records(splits) + [(vniah.parent, r) for r in syn.read_jsonl(vniah)]
    opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
    checked = 0
    for folder, r in folders:
        for path, m in zip(r.get("image", []), r["meta"]):
            image = Image.open(folder / path)
            assert image.mode == "RGB" and image.size == (32, 32)
            x0, y0, x1, y1 = m["box"]
            assert 9 <= x1 - x0 + 1 <= 15 and 9 <= y1 - y0 + 1 <= 15
            vertical, horizontal = m["position"].split()
            qx, qy = (16 if horizontal == "right" else 0), (16 if vertical == "bottom" else 0)
            assert qx <= x0 and x1 < qx + 16 and qy <= y0 and y1 < qy + 16
            centre = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
            assert max(abs(a - b) for a, b in zip(centre, syn.COLOURS[m["colour"]])) <= syn.COLOUR_JITTER
            assert _nearest_colour(centre) == m["colour"]
            # the diagonally opposite quadrant's centre is background: near-white
            far = image.getpixel((8 if qx else 24, 8 if qy else 24))
            assert min(far) >= syn.BACKGROUND[0]
            checked += 1
    assert checked > 100


def test_draw_shape_direct():
    rng = random.Random(0)
    for colour in syn.COLOURS:
        for shape in syn.SHAPES:
            for position in syn.POSITIONS:
                image = syn.draw_shape(colour, shape, position, size=48, rng=rng)
                assert image.mode == "RGB" and image.size == (48, 48)
                vertical, horizontal = position.split()
                centre = (36 if horizontal == "right" else 12, 36 if vertical == "bottom" else 12)
                assert _nearest_colour(image.getpixel(centre)) == colour
    with pytest.raises(ValueError):
        syn.draw_shape("pink", "circle", "top left")
    with pytest.raises(ValueError):
        syn.draw_shape("red", "circle", "middle")
    with pytest.raises(ValueError):
        syn.draw_shape("red", "star", "top left")


def test_answer_matches_and_chance():
    assert syn.answer_matches(" Red.", "red")
    assert syn.answer_matches("the red circle<|endoftext|>", "the red circle")
    assert syn.answer_matches("Top-Left", "top left")
    assert not syn.answer_matches("red circle", "the red circle")
    assert not syn.answer_matches("3", "13")
    assert syn.chance("colour") == 1 / 6 and syn.chance("shape") == 1 / 4 == syn.chance("position")
    assert syn.chance("which", 8) == 0.125 and syn.chance("count", 8) == 1 / 9
    assert syn.CHANCE["order"] == 0.5 and syn.chance("vniah") == 1 / 6 == syn.chance("find")
    with pytest.raises(ValueError):
        syn.chance("which")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        syn.make_split(tmp_path, "video", 1, 0)
    with pytest.raises(ValueError):
        syn.make_split(tmp_path, "multi", 1, 0, max_images=1)
    with pytest.raises(ValueError):
        syn.make_vniah(tmp_path, 4, 1.5, 1, 0)
