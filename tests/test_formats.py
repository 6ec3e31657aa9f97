"""Prompt templates, LongLLaVA markers, placeholder expansion, labels and the placeholder count check.

Expected strings are spelled out here from each model's template definition (LongLLaVA's conv_jambaLabel,
LLaVA-NeXT's conv_qwen, Cobra's ZephyrChatPromptBuilder), independently of llmodel.formats.
"""
import re

import pytest
import torch

from llmodel import formats
from llmodel.formats import IGNORE_INDEX

IMG = "<img><image></img>"
LL_USER, LL_ASSISTANT, LL_END = "<|startoftext|><|User|>\n", "<|startoftext|><|Assistant|>\n", "<|endoftext|>"
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QWEN_USER, QWEN_ASSISTANT, QWEN_END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"
ZEPHYR_USER, ZEPHYR_ASSISTANT, ZEPHYR_EOS = "<|user|>\n", "<|assistant|>\n", "<|endoftext|>"
SPECIALS = ["<|startoftext|>", "<|User|>", "<|Assistant|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
            "<|user|>", "<|assistant|>"]


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def char_ids(text):
    """A tokenizer as a plain callable: one id per character."""
    return [ord(c) for c in text]


# --- Strings -----------------------------------------------------------------------------------------

def test_longllava_generation_prompt_wraps_each_image():
    got = formats.format_prompt("<image>\n<image>\nCompare them.", "longllava")
    assert got == LL_USER + IMG + "\n" + IMG + "\nCompare them.\n" + LL_ASSISTANT
    # Placeholders are added in front when the text has none; wrapped ones are not wrapped twice.
    assert formats.format_prompt("Compare them.", "longllava", num_images=2) == got
    assert formats.format_prompt(IMG + "\nCompare.", "longllava") == LL_USER + IMG + "\nCompare.\n" + LL_ASSISTANT


def test_longllava_multi_turn_every_answer_ends_with_endoftext():
    turns = [human("<image>\nWhat is it?"), gpt("A cat."), human("Colour?"), gpt("Black.")]
    expected = (LL_USER + IMG + "\nWhat is it?\n" + LL_ASSISTANT + "A cat." + LL_END
                + LL_USER + "Colour?\n" + LL_ASSISTANT + "Black." + LL_END)
    assert formats.format_conversation(turns, "longllava") == expected
    # A final gpt turn of None asks for generation.
    assert formats.format_conversation(turns[:3] + [gpt(None)]) == expected[:expected.index("Black.")]


def test_longllava_video_markers_keep_the_last_img_closed():
    n = 3
    got = formats.longllava_video(n)
    assert got == "<vid>" + IMG + "<t>" + IMG + "<t>" + IMG + "</vid>"
    assert got.count("<image>") == n and got.count("</img>") == n
    # The original's rstrip('<t>') strips characters, eating the '>' of the last </img>.
    original = ("<vid>" + (IMG + "<t>") * n).rstrip("<t>") + "</vid>"
    assert original.endswith("</img</vid>") and not got.endswith("</img</vid>")


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 3), (3, 2)])
def test_longllava_tiled_image_global_then_one_line_per_row(rows, cols):
    got = formats.longllava_tiled_image(rows, cols)
    lines = got.split("\n")
    assert lines[0] == IMG
    assert lines[1:] == [IMG * cols] * rows
    assert got.count("<image>") == 1 + rows * cols


def test_qwen_chatml_onevision():
    got = formats.format_prompt("<image>\nDescribe.", "qwen")
    assert got == QWEN_SYSTEM + QWEN_USER + "<image>\nDescribe." + QWEN_END + "\n" + QWEN_ASSISTANT
    turns = [human("<image>\nQ1"), gpt("A1"), human("Q2"), gpt("A2")]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                + QWEN_USER + "<image>\nQ1" + QWEN_END + "\n" + QWEN_ASSISTANT + "A1" + QWEN_END + "\n"
                + QWEN_USER + "Q2" + QWEN_END + "\n" + QWEN_ASSISTANT + "A2" + QWEN_END + "\n")
    assert formats.format_conversation(turns, "qwen", system="Be brief.") == expected


def test_cobra_zephyr_images_are_a_prefix():
    turns = [human("<image>\nWhat is it?"), gpt("A dog."), human("Where?"), gpt(None)]
    expected = ("<image>" + ZEPHYR_USER + "What is it?" + ZEPHYR_EOS + "\n" + ZEPHYR_ASSISTANT + "A dog." + ZEPHYR_EOS
                + "\n" + ZEPHYR_USER + "Where?" + ZEPHYR_EOS + "\n" + ZEPHYR_ASSISTANT)
    assert formats.format_conversation(turns, "zephyr") == expected
    ids = formats.tokenize_conversation(turns, char_ids, [5], template="zephyr")
    assert ids.image_spans == [(0, 5)]


def test_turn_order_is_checked():
    with pytest.raises(ValueError, match=r"turns\[0\]\['from'\].*'human'"):
        formats.format_conversation([gpt("hi")])
    with pytest.raises(ValueError, match=r"turns\[1\]\['from'\].*'gpt'"):
        formats.format_conversation([human("a"), human("b")])
    with pytest.raises(ValueError, match="only in the last turn"):
        formats.format_conversation([human("a"), gpt(None), human("b")])
    with pytest.raises(ValueError, match="template"):
        formats.format_prompt("a", "vicuna")


# --- Tokenization ------------------------------------------------------------------------------------

def test_placeholders_expand_into_spans():
    prompt = formats.format_prompt("<image>\n<image>\nHi", "longllava")
    got = formats.tokenize_prompt(prompt, char_ids, [4, 2], image_token_id=7)
    # Hand layout: text before the first <image>, 4 rows, text between, 2 rows, the rest.
    first, middle, rest = prompt.split("<image>")
    assert got.image_spans == [(len(first), 4), (len(first) + 4 + len(middle), 2)]
    expected = char_ids(first) + [7] * 4 + char_ids(middle) + [7] * 2 + char_ids(rest)
    assert got.input_ids.tolist() == expected
    assert got.input_ids.dtype == torch.long and got.labels.dtype == torch.long
    assert (got.labels == IGNORE_INDEX).all()  # a prompt string trains nothing


def test_labels_train_only_answers_and_each_end_token():
    turns = [human("<image>\nQ1"), gpt("A1"), human("Q2"), gpt("A22")]
    got = formats.tokenize_conversation(turns, char_ids, [3])
    # With image_token_id 0, the expected ids are the text's characters with each <image> as three "\0".
    flat = formats.format_conversation(turns).replace("<image>", "\0" * 3)
    assert got.input_ids.tolist() == char_ids(flat)
    trained = got.labels != IGNORE_INDEX
    assert (got.labels[trained] == got.input_ids[trained]).all()
    # The trained positions are exactly the characters of "A1<|endoftext|>" and "A22<|endoftext|>".
    want = torch.zeros(len(flat), dtype=torch.bool)
    for answer in ("A1" + LL_END, "A22" + LL_END):
        start = flat.index(LL_ASSISTANT + answer) + len(LL_ASSISTANT)
        want[start:start + len(answer)] = True
    assert torch.equal(trained, want)
    start, n = got.image_spans[0]
    assert (got.labels[start:start + n] == IGNORE_INDEX).all()


@pytest.mark.parametrize("placeholders,images", [(2, 3), (3, 1), (0, 1), (1, 0)])
def test_count_mismatch_names_both_counts(placeholders, images):
    prompt = formats.format_prompt("<image>" * placeholders + "x", "longllava")
    with pytest.raises(ValueError) as error:
        formats.tokenize_prompt(prompt, char_ids, [4] * images)
    message = str(error.value)
    assert f"{placeholders} <image> placeholders" in message and f"{images} images" in message


def _hf_char_tokenizer(texts):
    tokenizers = pytest.importorskip("tokenizers")
    chars = sorted(set("".join(re.sub("|".join(map(re.escape, SPECIALS)), "", t) for t in texts)))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(SPECIALS)

    def reference(text):  # specials are one id each, every other character is its vocab id
        ids = []
        for part in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
            ids += [tok.token_to_id(part)] if part in SPECIALS else [vocab[c] for c in part]
        return ids
    return tok, reference


@pytest.mark.parametrize("template", ["longllava", "qwen", "zephyr"])
def test_with_a_tokenizers_tokenizer(template):
    turns = [human("<image>\nwhat is in the image?"), gpt("a red square."), human("and now?"), gpt("nothing.")]
    text = formats.format_conversation(turns, template)
    tok, reference = _hf_char_tokenizer([text])
    got = formats.tokenize_conversation(turns, tok, [6], template=template, image_token_id=0)
    before, after = text.split("<image>")
    assert got.input_ids.tolist() == reference(before) + [0] * 6 + reference(after)
    assert got.image_spans == [(len(reference(before)), 6)]
    end = formats.get_template(template).end_of_answer
    trained = got.input_ids[got.labels != IGNORE_INDEX].tolist()
    assert trained == reference("a red square." + end) + reference("nothing." + end)
