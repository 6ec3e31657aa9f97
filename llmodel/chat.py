"""`python -m llmodel chat`: one question about images / a video / a tiled high-res image, answer streamed.

    python -m llmodel chat --model DIR --image a.jpg --image b.png --prompt "What differs?"
    python -m llmodel chat --model DIR --video clip.mp4 --frames 64 --prompt "What happens?"
    python -m llmodel chat --model DIR --image big.png --tiles --prompt "Read the small print."

DIR is a LongLLaVA checkpoint (config.json + safetensors, `load_longllava`) with tokenizer.json beside it.
Without tokenizer.json the prompt is token ids separated by spaces, placed after the images, and ids are
printed back. An AnyRes model (image_aspect_ratio anyres / anyres_max_N) tiles each image by its grid
pinpoints; a two-tower model (Cobra) gets each image preprocessed for both towers. The same from Python: `chat(model, tokenizer, prompt, images=[PIL images], video=...)`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from . import formats, pixels
from .multimodal import LongLLaVA, load_longllava


def _tower_pixels(model: LongLLaVA, vision) -> pixels.PixelConfig:
    # AnyRes tiles are already tile-sized squares; "pad" pads each whole image (both towers alike).
    return pixels.pixel_config_for_vision(vision, pad_to_square=model.config.image_aspect_ratio == "pad")


def pixel_config_for(model: LongLLaVA, tower: int = 1) -> pixels.PixelConfig:
    """The pixel conventions of the model's first tower (tower=2: Cobra's second tower)."""
    c = model.config
    if tower == 2 and c.second_vision is None:
        raise ValueError("tower: the model has no second vision tower")
    return _tower_pixels(model, c.vision if tower == 1 else c.second_vision)


class ChatInputs(NamedTuple):
    """What `LongLLaVA.generate` takes: input_ids (L,); images: pixel groups [(n_i, 3, H, W)] for the first
    tower; image_spans: (start, n) per span; images_2: the same groups preprocessed for the second tower
    (Cobra), else None; image_sizes: per group, the (width, height) of an AnyRes image (one span for the
    whole group: base image + tiles) or None, or None when no group is AnyRes."""
    input_ids: torch.Tensor
    images: list
    image_spans: list
    images_2: Optional[list] = None
    image_sizes: Optional[list] = None


def build_inputs(model: LongLLaVA, prompt, images: Sequence = (), video=None, num_frames: int = 64,
                 fps: Optional[float] = None, tiles: bool = False, tokenizer=None,
                 template: str = "longllava") -> ChatInputs:
    """-> ChatInputs(input_ids, groups, spans, images_2, image_sizes). Images (PIL or paths) come first, then
    the video; each image is one `<image>` (with tiles: the global image and its tile lines). An AnyRes model
    (image_aspect_ratio anyres / anyres_max_N) cuts each image into its base image + pinpoint tiles
    (pixels.anyres_tiles), one `<image>` of tokens_for_anyres(image.size) rows; video frames stay plain.
    A model with a second tower (Cobra) gets every group preprocessed again by that tower's conventions."""
    config = model.config
    pix = pixel_config_for(model)
    pix_2 = pixel_config_for(model, 2) if config.second_vision is not None else None
    if tiles and config.anyres:
        raise ValueError(f"tiles: an AnyRes model (image_aspect_ratio {config.image_aspect_ratio!r}) tiles its "
                         "images itself; drop --tiles")
    groups, groups_2, sizes, counts, markup = [], [], [], [], []

    def add(batch, size=None):  # PIL images of one group -> pixels for each tower
        groups.append(pixels.preprocess_many(batch, pix))
        groups_2.append(pixels.preprocess_many(batch, pix_2) if pix_2 is not None else None)
        sizes.append(size)
        if size is not None:
            counts.append(model.tokens_for_anyres(size))
        else:
            counts.extend([model.tokens_per_image(*groups[-1].shape[-2:])] * len(batch))

    for image in images:
        if config.anyres:
            image = pixels._rgb(image)
            tiled = pixels.anyres_tiles(image, config.image_grid_pinpoints, tile_size=config.vision.image_size)
            add(tiled.images, image.size)  # base image first, then rows x cols tiles in raster order
            markup.append(formats.IMAGE_PLACEHOLDER)
        elif tiles:
            tiled = pixels.longllava_tiles(image, tile_size=config.vision.image_size)
            add(tiled.images)  # global image first, then raster tiles
            markup.append(formats.longllava_tiled_image(tiled.rows, tiled.cols))
        else:
            add([image])
            markup.append(formats.IMAGE_PLACEHOLDER)
    if video is not None:
        frames = pixels.load_video_frames(video, num_frames=num_frames, fps=fps)
        add(frames)
        markup.append(formats.longllava_video(len(frames)))
    images_2 = groups_2 if pix_2 is not None else None
    image_sizes = sizes if any(s is not None for s in sizes) else None
    if tokenizer is None:  # prompt: token ids; the images go first, back to back
        ids, spans = [], []
        for n in counts:
            spans.append((len(ids), n))
            ids.extend([config.image_token_id] * n)
        ids.extend(int(t) for t in str(prompt).split())
        return ChatInputs(torch.tensor(ids, dtype=torch.long), groups, spans, images_2, image_sizes)
    text = prompt if formats.IMAGE_PLACEHOLDER in prompt or not markup else "\n".join(markup) + "\n" + prompt
    tok = formats.tokenize_prompt(formats.format_prompt(text, template), tokenizer, counts, config.image_token_id)
    return ChatInputs(tok.input_ids, groups, tok.image_spans, images_2, image_sizes)


def chat(model: LongLLaVA, tokenizer, prompt: str, images: Sequence = (), video=None, num_frames: int = 64,
         fps: Optional[float] = None, tiles: bool = False, template: str = "longllava", max_new_tokens: int = 256,
         temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
         chunk_size: Optional[int] = 4096, seed: Optional[int] = None,
         stream: Optional[Callable[[str], None]] = None) -> str:
    """Answer `prompt` about PIL images / a video; returns the answer text (token ids joined by spaces
    without a tokenizer). stream(piece) gets each new piece of text as it is decoded."""
    device = model.lm.embed_tokens.weight.device
    inputs = build_inputs(model, prompt, images, video, num_frames, fps, tiles, tokenizer, template)
    eos = None
    end_of_answer = formats.get_template(template).end_of_answer
    end_id = tokenizer.token_to_id(end_of_answer) if hasattr(tokenizer, "token_to_id") else None
    if end_id is not None:  # the template's end-of-answer token stops generation too
        eos = sorted(set(model.config.lm.eos_token_ids) | {end_id})
    new_ids, printed = [], ""

    def on_token(token):
        nonlocal printed
        new_ids.append(int(token[0]))
        if eos is not None and new_ids[-1] in eos:
            return
        # Decode all so far and emit the new suffix: one token may complete a multi-byte character.
        text = tokenizer.decode([t for t in new_ids if eos is None or t not in eos]) if tokenizer else " ".join(
            map(str, new_ids))
        if stream is not None:
            stream(text[len(printed):] if tokenizer else (" " if printed else "") + str(new_ids[-1]))
        printed = text

    images_2 = None if inputs.images_2 is None else [g.to(device) for g in inputs.images_2]
    model.generate(inputs.input_ids.to(device), [g.to(device) for g in inputs.images], inputs.image_spans,
                   images_2=images_2, image_sizes=inputs.image_sizes, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, chunk_size=chunk_size, stream=on_token,
                   seed=seed, eos_token_id=eos)
    return printed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmodel chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="LongLLaVA directory: config.json + safetensors (+ tokenizer.json)")
    parser.add_argument("--prompt", required=True,
                        help="the question; token ids separated by spaces without tokenizer.json")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--tiles", action="store_true", help="LongLLaVA high-res: each image as global image + tiles (AnyRes models tile by themselves)")
    parser.add_argument("--video", default=None, help="a video file (PyAV) or a folder of frames")
    parser.add_argument("--frames", type=int, default=64, help="frames sampled uniformly from the video")
    parser.add_argument("--fps", type=float, default=None, help="sample the video at this rate first")
    parser.add_argument("--template", default="longllava", choices=sorted(formats.TEMPLATES))
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk length (bounds activation memory)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    for path in args.image + ([args.video] if args.video else []):
        if not os.path.exists(path):
            print(f"chat: {path} does not exist", file=sys.stderr)
            return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}[args.dtype]
    model = load_longllava(args.model, dtype=dtype, device=args.device)
    tokenizer = None
    tokenizer_path = os.path.join(args.model, "tokenizer.json")
    if os.path.isfile(tokenizer_path):
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(tokenizer_path)
    else:
        try:
            [int(t) for t in args.prompt.split()]
        except ValueError:
            print(f"--prompt: {args.model} has no tokenizer.json, so the prompt must be token ids separated by "
                  f"spaces, got {args.prompt!r}", file=sys.stderr)
            return 2
    try:
        chat(model, tokenizer, args.prompt, images=args.image, video=args.video, num_frames=args.frames, fps=args.fps,
             tiles=args.tiles, template=args.template, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, chunk_size=args.chunk_size,
             seed=args.seed, stream=lambda piece: print(piece, end="", flush=True))
    except ValueError as error:  # a placeholder/image count mismatch and the like: say it, no traceback
        print(f"\nchat: {error}", file=sys.stderr)
        return 2
    print()
    return 0


__all__ = ["chat", "build_inputs", "ChatInputs", "pixel_config_for", "main"]
