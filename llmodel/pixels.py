"""Pixels in: per-tower preprocessing, LongLLaVA high-res tiles, LLaVA-NeXT/OneVision AnyRes, video frames.

Pillow does the resampling (bicubic, as the Hugging Face image processors do through PIL), torch holds
the result: each image becomes a float32 (3, H, W) tensor, (x / 255 - mean) / std. No torchvision.
Sizes follow PIL: (width, height). Tile grids are (rows, cols).
"""
from __future__ import annotations

import ast
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

BICUBIC = Image.Resampling.BICUBIC

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PixelConfig:
    """How one vision tower wants its pixels.

    resize "shortest_edge": scale so the short side is `shortest_edge` (default image_size; the long side
    int()-truncated, as HF), then center-crop image_size × image_size (CLIP, DINOv2).
    resize "square": stretch to image_size × image_size, no crop (SigLIP).
    pad_to_square: first pad to a square with the mean colour (LongLLaVA's image_aspect_ratio "pad").
    """
    image_size: int
    mean: tuple
    std: tuple
    resize: str = "shortest_edge"
    shortest_edge: Optional[int] = None
    pad_to_square: bool = False

    def __post_init__(self):
        if self.resize not in ("shortest_edge", "square"):
            raise ValueError(f"resize: got {self.resize!r}, expected 'shortest_edge' or 'square'")


TOWER_PIXELS = {
    "clip": PixelConfig(336, CLIP_MEAN, CLIP_STD),                                # CLIP ViT-L/14-336
    "siglip": PixelConfig(384, SIGLIP_MEAN, SIGLIP_STD, resize="square"),         # SigLIP so400m-384
    "dinov2": PixelConfig(224, IMAGENET_MEAN, IMAGENET_STD, shortest_edge=256),   # HF BitImageProcessor
}


def pixel_config(tower: str, image_size: Optional[int] = None, **overrides) -> PixelConfig:
    """The named tower's conventions, optionally at another resolution (DINOv2 keeps its 256/224 ratio)."""
    if tower not in TOWER_PIXELS:
        raise ValueError(f"tower: got {tower!r}, expected one of {sorted(TOWER_PIXELS)}")
    config = TOWER_PIXELS[tower]
    if image_size is not None and image_size != config.image_size:
        edge = None if config.shortest_edge is None else round(config.shortest_edge * image_size / config.image_size)
        config = replace(config, image_size=image_size, shortest_edge=edge)
    return replace(config, **overrides)


# HF vision model_type -> the pixel conventions of that tower family.
TOWER_OF_MODEL_TYPE = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "dinov2": "dinov2",
                       "dinov2_with_registers": "dinov2"}


def pixel_config_for_vision(vision, pad_to_square: bool) -> PixelConfig:
    """The conventions of a VisionConfig's tower at its image size (pad_to_square: LongLLaVA's "pad")."""
    if vision.model_type not in TOWER_OF_MODEL_TYPE:
        raise ValueError(f"vision: no pixel conventions for tower type {vision.model_type!r}; "
                         f"known: {sorted(TOWER_OF_MODEL_TYPE)}")
    return pixel_config(TOWER_OF_MODEL_TYPE[vision.model_type], image_size=vision.image_size,
                        pad_to_square=pad_to_square)


def _rgb(image) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image or a path, got {type(image)}")
    return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image: Image.Image, fill) -> Image.Image:
    """LongLLaVA's expand2square: paste centred (offset (long - short) // 2) on a square of `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), fill)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def mean_colour(mean) -> tuple:
    """The pad colour LongLLaVA uses: int(m * 255) per channel (truncated)."""
    return tuple(int(m * 255) for m in mean)


def resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"center_crop: image {width}x{height} is smaller than the crop {size}x{size}")
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image, mean, std) -> Tensor:
    """PIL RGB -> float32 (3, H, W), (x / 255 - mean) / std."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = data.view(image.size[1], image.size[0], 3).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def preprocess(image, config: Union[PixelConfig, str] = "clip") -> Tensor:
    """One image (PIL or path) -> (3, image_size, image_size) float32."""
    config = pixel_config(config) if isinstance(config, str) else config
    image = _rgb(image)
    if config.pad_to_square:
        image = expand_to_square(image, mean_colour(config.mean))
    if config.resize == "square":
        image = image.resize((config.image_size, config.image_size), BICUBIC)
    else:
        image = center_crop(resize_shortest_edge(image, config.shortest_edge or config.image_size), config.image_size)
    return to_tensor(image, config.mean, config.std)


def preprocess_many(images: Sequence, config: Union[PixelConfig, str] = "clip") -> Tensor:
    """Images -> (N, 3, image_size, image_size)."""
    return torch.stack([preprocess(image, config) for image in images])


# --- Tiles -------------------------------------------------------------------------------------------

@dataclass
class Tiled:
    """images: the global/base image first, then rows × cols tiles in raster order."""
    images: list
    rows: int
    cols: int


def split_tiles(image: Image.Image, tile_size: int) -> list:
    """Cut an image whose sides are multiples of tile_size into tiles, row by row, left to right."""
    width, height = image.size
    return [image.crop((left, top, left + tile_size, top + tile_size))
            for top in range(0, height, tile_size) for left in range(0, width, tile_size)]


def longllava_tiles(image, tile_size: int = 336) -> Tiled:
    """LongLLaVA high-res: pad white (centred) up to multiples of tile_size, cut tiles in raster order;
    the global image (the original, unpadded) comes first. Matches `formats.longllava_tiled_image(rows, cols)`.

    The original pads (new - old) // 2 on both sides, one pixel short when the difference is odd, which
    leaves the last row/column of tiles smaller than a tile; here the far side takes the odd pixel.
    """
    image = _rgb(image)
    width, height = image.size
    cols, rows = math.ceil(width / tile_size), math.ceil(height / tile_size)
    padded = Image.new("RGB", (cols * tile_size, rows * tile_size), (255, 255, 255))
    padded.paste(image, ((cols * tile_size - width) // 2, (rows * tile_size - height) // 2))
    return Tiled([image] + split_tiles(padded, tile_size), rows, cols)


def parse_grid_pinpoints(pinpoints, tile_size: int) -> list:
    """Grid pinpoints -> [(width, height), ...]. Accepts a list, its string form "[(336, 672), ...]", or
    OneVision's range form "(1x1),...,(6x6)" (every grid from the first to the last, times tile_size)."""
    if isinstance(pinpoints, str) and "x" in pinpoints:
        found = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        if not found:
            raise ValueError(f"grid_pinpoints: cannot read {pinpoints!r}; expected e.g. '(1x1),...,(6x6)'")
        (c0, r0), (c1, r1) = map(int, found[0]), map(int, found[-1])
        return [(c * tile_size, r * tile_size) for c in range(c0, c1 + 1) for r in range(r0, r1 + 1)]
    if isinstance(pinpoints, str):
        pinpoints = ast.literal_eval(pinpoints)
    return [(int(w), int(h)) for w, h in pinpoints]


def select_best_resolution(original_size, possible_resolutions) -> tuple:
    """LLaVA-NeXT: the (width, height) that keeps the most of the image's own pixels once it is scaled to fit
    (effective resolution, capped at the original's), ties broken by the least wasted (padded) area."""
    original_width, original_height = original_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        effective = min(int(original_width * scale) * int(original_height * scale), original_width * original_height)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (width, height), effective, wasted
    return best


def resize_and_pad(image: Image.Image, target) -> Image.Image:
    """LLaVA-NeXT: scale to fit inside target (width, height) keeping the aspect ratio (the fitted side
    exact, the other ceil'd), paste centred on black."""
    width, height = image.size
    target_width, target_height = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(width * scale_h), target_width), target_height
    result = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    result.paste(image.resize((new_width, new_height), BICUBIC),
                 ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return result


def anyres_tiles(image, grid_pinpoints, tile_size: int = 336) -> Tiled:
    """LLaVA-NeXT/OneVision AnyRes: best-fit resolution, resize-and-pad to it, tiles in raster order; the
    base image (the whole image stretched to tile_size × tile_size) first."""
    image = _rgb(image)
    width, height = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints, tile_size))
    tiles = split_tiles(resize_and_pad(image, (width, height)), tile_size)
    return Tiled([image.resize((tile_size, tile_size), BICUBIC)] + tiles, height // tile_size, width // tile_size)


# --- AnyRes feature grid -----------------------------------------------------------------------------

def unpad_features(features: Tensor, original_size) -> Tensor:
    """(rows·h, cols·w, C) feature map of the padded canvas -> the part that covers the image itself.

    LLaVA-NeXT's unpad_image on a channels-last map: the canvas was padded symmetrically along one axis,
    so cut `padding = (current - int(original * scale)) // 2` from both ends of that axis.
    """
    original_width, original_height = original_size
    current_height, current_width = features.shape[:2]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return features[padding:current_height - padding]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return features[:, padding:current_width - padding]


def cap_feature_grid(features: Tensor, max_num_tiles: int, tile_side: int) -> Tensor:
    """OneVision's anyres_max_N: when the (H, W, C) grid holds more than N tiles' worth of tokens
    (N · tile_side², by more than 1.1× in side length), bilinearly shrink it by that factor."""
    height, width = features.shape[:2]
    times = math.sqrt(height * width / (max_num_tiles * tile_side ** 2))
    if times <= 1.1:
        return features
    grid = features.permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=[int(height // times), int(width // times)], mode="bilinear")
    return grid[0].permute(1, 2, 0)


def anyres_max_from_name(image_aspect_ratio: str) -> Optional[int]:
    """'anyres_max_9' -> 9; other names -> None."""
    found = re.match(r"anyres_max_(\d+)", image_aspect_ratio or "")
    return int(found.group(1)) if found else None


def anyres_feature_grid(tile_features: Tensor, rows: int, cols: int, original_size,
                        max_num_tiles: Optional[int] = None, newline: Optional[Tensor] = None) -> Tensor:
    """Tiles' features (rows·cols, h·w or (h, w), C), raster order, without the base image -> the tokens of the
    unpadded (and optionally capped) grid, row by row, with `newline` (C,) appended after each row when given.
    Returns (tokens, C)."""
    if tile_features.dim() == 3:
        side = math.isqrt(tile_features.shape[1])
        if side * side != tile_features.shape[1]:
            raise ValueError(f"tile_features: {tile_features.shape[1]} tokens per tile is not a square; "
                             "pass (tiles, h, w, C)")
        tile_features = tile_features.unflatten(1, (side, side))
    count, h, w, channels = tile_features.shape
    if count != rows * cols:
        raise ValueError(f"tile_features: got {count} tiles, expected rows * cols = {rows * cols}")
    grid = tile_features.view(rows, cols, h, w, channels).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, channels)
    grid = unpad_features(grid, original_size)
    if max_num_tiles is not None:
        grid = cap_feature_grid(grid, max_num_tiles, h)
    if newline is not None:
        grid = torch.cat([grid, newline.to(grid.dtype).expand(grid.shape[0], 1, channels)], dim=1)
    return grid.reshape(-1, channels)


# --- Video -------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def uniform_frame_indices(total_frames: int, num_frames: int) -> list:
    """num_frames indices spread evenly over [0, total_frames - 1], first and last included; all frames when
    there are not more than num_frames. Equals int(np.linspace(0, total - 1, num_frames)) as LongLLaVA uses."""
    if total_frames < 1 or num_frames < 1:
        raise ValueError(f"total_frames, num_frames: expected >= 1, got {total_frames}, {num_frames}")
    if total_frames <= num_frames:
        return list(range(total_frames))
    if num_frames == 1:
        return [0]
    step = (total_frames - 1) / (num_frames - 1)
    return [int(i * step) for i in range(num_frames - 1)] + [total_frames - 1]


def sample_frame_indices(total_frames: int, num_frames: Optional[int] = None, fps: Optional[float] = None,
                         video_fps: Optional[float] = None) -> list:
    """Which frames to keep: every (video_fps / fps)-th frame when fps is given (as LongLLaVA's every
    int(fps · t)-th), then at most num_frames of those, uniformly."""
    indices = list(range(total_frames))
    if fps is not None:
        if not video_fps:
            raise ValueError("fps: sampling at a rate needs the video's own rate; pass video_fps")
        indices = indices[::max(int(video_fps / fps), 1)]
    if num_frames is not None:
        indices = [indices[i] for i in uniform_frame_indices(len(indices), num_frames)]
    return indices


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _import_av():
    try:
        import av
    except ImportError as error:
        raise ImportError("reading video files needs PyAV: pip install av "
                          "(or pass a folder of frames or a list of PIL images)") from error
    return av


def load_video_frames(source, num_frames: Optional[int] = None, fps: Optional[float] = None,
                      video_fps: Optional[float] = None) -> list:
    """Frames as RGB PIL images from a folder of frames (natural name order: frame2 before frame10), a list
    of PIL images, or a video file (PyAV); sampled by `sample_frame_indices`. A file supplies its own
    video_fps; a folder or a list needs it passed for fps sampling."""
    if isinstance(source, (list, tuple)):
        chosen = sample_frame_indices(len(source), num_frames, fps, video_fps)
        return [_rgb(source[i]) for i in chosen]
    path = os.fspath(source)
    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
        if not names:
            raise ValueError(f"source: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder {path}")
        chosen = sample_frame_indices(len(names), num_frames, fps, video_fps)
        return [_rgb(os.path.join(path, names[i])) for i in chosen]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source: {path} is neither a folder of frames nor a video file")
    av = _import_av()
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else video_fps
        total = stream.frames or sum(1 for _ in container.decode(video=0))
    chosen = set(sample_frame_indices(total, num_frames, fps, rate))
    frames = []
    with av.open(path) as container:  # a second pass: the first may have only counted
        for index, frame in enumerate(container.decode(video=0)):
            if index in chosen:
                frames.append(frame.to_image().convert("RGB"))
    return frames
