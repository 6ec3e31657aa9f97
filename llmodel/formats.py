"""Prompt templates, the image/video/tile markers, and tokenization with image placeholders and labels.

A prompt is text in which every image is one `<image>` placeholder. Tokenization turns each placeholder
into N placeholder rows (N = that image's token count after pooling); `multimodal.py` later writes the
projected image features into exactly those rows of the input-embedding buffer, using the spans
returned here. Labels train only what the assistant says (its answer and the end-of-answer token).

Templates (the strings each model was trained with):
  longllava   <|startoftext|><|User|>\\n{text}\\n<|startoftext|><|Assistant|>\\n{answer}<|endoftext|>
              images `<img><image></img>`, video `<vid>` frames joined by `<t>` `</vid>`, tiled high-res
              images: the global image, `\\n`, then one line of tile images per tile row.
  qwen        LLaVA-OneVision's ChatML: <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{text}
              <|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n
  zephyr      Cobra: <|user|>\\n{text}<|endoftext|>\\n<|assistant|>\\n{answer}<|endoftext|>, later user turns
              preceded by `\\n`; the image tokens are a prefix of the whole sequence, not inline.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100

# --- LongLLaVA markers -------------------------------------------------------------------------------

LONGLLAVA_IMAGE = "<img><image></img>"


def longllava_video(num_frames: int) -> str:
    """`<vid>` + the frames' image markers joined by `<t>` + `</vid>`.

    LongLLaVA builds this as `('<vid>' + (image + '<t>') * n).rstrip('<t>') + '</vid>'`. `str.rstrip`
    removes a *set of characters*, not a suffix: after dropping `<t>` it keeps eating `>` from the last
    `</img>`, so the original prompt ends `...</img</vid>`. Joining avoids that.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    return "<vid>" + "<t>".join([LONGLLAVA_IMAGE] * num_frames) + "</vid>"


def longllava_tiled_image(rows: int, cols: int) -> str:
    """A high-res image: the global image, `\\n`, then one line of `cols` tile images per tile row.

    1 + rows * cols placeholders, in the order `pixels.longllava_tiles` returns the images (global image
    first, then tiles in raster order). LongLLaVA's cli nests the tile lines inside the global image's
    `<img>...</img>` (it substitutes into the already-wrapped placeholder); here the global image is closed
    before the tiles start.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"rows, cols: expected >= 1, got {rows}, {cols}")
    line = LONGLLAVA_IMAGE * cols
    return LONGLLAVA_IMAGE + "\n" + "\n".join([line] * rows)


# A bare <image> (not already inside <img>...</img>) gets wrapped by the LongLLaVA template.
_BARE_IMAGE = re.compile(r"(?<!<img>)<image>(?!</img>)")


# --- Chat templates ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """How one model family lays out a conversation. Every field is literal text.

    A conversation renders as: system_format(system) ‖ for each turn: [turn_separator before every user
    turn but the first] user_prefix message user_suffix assistant_prefix answer end_of_answer answer_suffix.
    Only `answer` and `end_of_answer` are trained.
    """
    name: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    end_of_answer: str
    answer_suffix: str = ""             # untrained text after each end_of_answer (ChatML's "\n")
    turn_separator: str = ""            # untrained text between an answer and the next user turn (Cobra's "\n")
    system_format: str = ""             # "{system}" is replaced by the system text; "" for none
    default_system: str = ""
    image_markup: str = IMAGE_PLACEHOLDER   # what a bare <image> in a user message becomes
    images_as_prefix: bool = False      # Cobra: placeholders leave the messages and go first in the sequence


LONGLLAVA = ChatTemplate(
    name="longllava", user_prefix="<|startoftext|><|User|>\n", user_suffix="\n",
    assistant_prefix="<|startoftext|><|Assistant|>\n", end_of_answer="<|endoftext|>",
    image_markup=LONGLLAVA_IMAGE)
# LongLLaVA's inference template ends earlier answers of the history with "\n" instead of <|endoftext|>;
# its training template (conv_jambaLabel) ends every answer with <|endoftext|>. We use the training form.

QWEN_CHATML = ChatTemplate(
    name="qwen", user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n", end_of_answer="<|im_end|>", answer_suffix="\n",
    system_format="<|im_start|>system\n{system}<|im_end|>\n", default_system="You are a helpful assistant.")

# Cobra (mamba-2.8b-zephyr, GPT-NeoX tokenizer): eos is <|endoftext|>, not Zephyr-Mistral's </s>.
COBRA_ZEPHYR = ChatTemplate(
    name="zephyr", user_prefix="<|user|>\n", user_suffix="<|endoftext|>\n", assistant_prefix="<|assistant|>\n",
    end_of_answer="<|endoftext|>", turn_separator="\n", images_as_prefix=True)

TEMPLATES = {t.name: t for t in (LONGLLAVA, QWEN_CHATML, COBRA_ZEPHYR)}


def get_template(template: Union[str, ChatTemplate]) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"template: got {template!r}, expected a ChatTemplate or one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


@dataclass(frozen=True)
class Segment:
    """A piece of rendered conversation; `trained` pieces get labels, the rest get IGNORE_INDEX."""
    text: str
    trained: bool = False


Turn = dict  # LLaVA-style {"from": "human" | "gpt", "value": str | None}


def render_conversation(turns: Sequence[Turn], template: Union[str, ChatTemplate] = "longllava",
                        system: Optional[str] = None) -> list[Segment]:
    """LLaVA-style turns -> segments. Ends with the assistant prefix (a generation prompt) when the last
    turn is from the human or is a "gpt" turn whose value is None."""
    template = get_template(template)
    if not turns:
        raise ValueError("turns: the conversation is empty")
    segments: list[Segment] = []
    prefix_images = 0
    if template.system_format:
        segments.append(Segment(template.system_format.replace(
            "{system}", template.default_system if system is None else system)))
    for index, turn in enumerate(turns):
        role, value = turn.get("from"), turn.get("value")
        expected = "human" if index % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turns[{index}]['from']: got {role!r}, expected {expected!r} "
                             "(turns alternate human, gpt, human, ... starting with human)")
        if role == "human":
            if value is None:
                raise ValueError(f"turns[{index}]['value']: a human turn needs text, got None")
            if template.images_as_prefix:
                # As Cobra's prompt builder: drop the placeholders from the text, strip what is left.
                prefix_images += value.count(IMAGE_PLACEHOLDER)
                value = value.replace(IMAGE_PLACEHOLDER, "").strip()
            elif template.image_markup != IMAGE_PLACEHOLDER:
                value = _BARE_IMAGE.sub(template.image_markup, value)
            separator = template.turn_separator if index > 0 else ""
            segments.append(Segment(separator + template.user_prefix + value + template.user_suffix
                                    + template.assistant_prefix))
        elif value is None:
            if index != len(turns) - 1:
                raise ValueError(f"turns[{index}]['value']: None (generate here) is allowed only in the last turn")
        else:
            if IMAGE_PLACEHOLDER in value:
                raise ValueError(f"turns[{index}]['value']: an answer cannot contain {IMAGE_PLACEHOLDER}")
            segments.append(Segment(value, trained=True))
            segments.append(Segment(template.end_of_answer, trained=True))
            if template.answer_suffix:
                segments.append(Segment(template.answer_suffix))
    if prefix_images:
        segments.insert(0, Segment(IMAGE_PLACEHOLDER * prefix_images))
    return segments


def format_conversation(turns: Sequence[Turn], template: Union[str, ChatTemplate] = "longllava",
                        system: Optional[str] = None) -> str:
    """The conversation as one string (see `render_conversation`)."""
    return "".join(segment.text for segment in render_conversation(turns, template, system))


def format_prompt(text: str, template: Union[str, ChatTemplate] = "longllava", num_images: int = 0,
                  system: Optional[str] = None) -> str:
    """One user message -> a generation prompt. When `text` has no <image> placeholder, `num_images`
    placeholders are put in front of it (`<image>\\n` each, LLaVA's convention)."""
    if num_images and IMAGE_PLACEHOLDER not in text:
        text = (IMAGE_PLACEHOLDER + "\n") * num_images + text
    return format_conversation([{"from": "human", "value": text}], template, system)


# --- Tokenization ------------------------------------------------------------------------------------

@dataclass
class TokenizedPrompt:
    """input_ids (L,) int64; labels (L,) int64, aligned with input_ids (not shifted; IGNORE_INDEX where not
    trained); image_spans: one (start_row, num_tokens) per image, in prompt order."""
    input_ids: Tensor
    labels: Tensor
    image_spans: list[tuple[int, int]]


def _encoder(tokenizer) -> Callable[[str], list[int]]:
    """A `tokenizers.Tokenizer`, a transformers tokenizer, or any callable text -> ids; no special tokens
    added (the templates spell out their own start tokens)."""
    if hasattr(tokenizer, "encode"):
        def encode(text):
            out = tokenizer.encode(text, add_special_tokens=False)
            return list(out.ids if hasattr(out, "ids") else out)
        return encode
    if callable(tokenizer):
        return lambda text: list(tokenizer(text))
    raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer or a callable text -> ids, got {type(tokenizer)}")


def tokenize_prompt(prompt: Union[str, Sequence[Segment]], tokenizer, image_token_counts: Sequence[int] = (),
                    image_token_id: int = 0) -> TokenizedPrompt:
    """Tokenize a prompt (a string: nothing trained; or segments from `render_conversation`) and expand the
    i-th <image> placeholder into image_token_counts[i] rows filled with `image_token_id` (any valid id:
    the rows are overwritten by image features). Text between placeholders is tokenized piece by piece."""
    segments = [Segment(prompt)] if isinstance(prompt, str) else list(prompt)
    counts = [int(c) for c in image_token_counts]
    found = sum(segment.text.count(IMAGE_PLACEHOLDER) for segment in segments)
    if found != len(counts):
        raise ValueError(f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholders but {len(counts)} images were "
                         "given (image_token_counts); they must match one to one")
    if any(c < 1 for c in counts):
        raise ValueError(f"image_token_counts: every count must be >= 1, got {counts}")
    encode = _encoder(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    for segment in segments:
        pieces = segment.text.split(IMAGE_PLACEHOLDER)
        for index, piece in enumerate(pieces):
            if index > 0:  # a placeholder stood before this piece
                n = counts[len(spans)]
                spans.append((len(input_ids), n))
                input_ids.extend([image_token_id] * n)
                labels.extend([IGNORE_INDEX] * n)
            if piece:
                ids = encode(piece)
                input_ids.extend(ids)
                labels.extend(ids if segment.trained else [IGNORE_INDEX] * len(ids))
    return TokenizedPrompt(torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), spans)


def tokenize_conversation(turns: Sequence[Turn], tokenizer, image_token_counts: Sequence[int] = (),
                          template: Union[str, ChatTemplate] = "longllava", system: Optional[str] = None,
                          image_token_id: int = 0) -> TokenizedPrompt:
    """render_conversation + tokenize_prompt: the training example for one LLaVA-style conversation."""
    return tokenize_prompt(render_conversation(turns, template, system), tokenizer, image_token_counts,
                           image_token_id)
