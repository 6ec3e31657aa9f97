"""The multimodal model: vision tower(s) -> patch tokens -> pooling -> projector -> the prompt's placeholder
rows of the input-embedding buffer -> hybrid LM.

Pool, then project (LongLLaVA's order). LongLLaVA pools inside `CLIPVisionTower.forward` (its
`resamplePooling` branch) and `encode_images` applies `mm_projector` to what the tower returns, so the MLP
sees 144 pooled tokens, not 576. The MLP has a GELU between its layers, so averaging before and after it
differ: to match the trained weights the pooled tokens go to a small (images, tokens, vision_width)
temporary, through the projector, and then `index_copy_` into the placeholder rows. fastscan's fused
scatter (`pool2d_tokens(out=, index=)`) cannot write there directly because the pooled rows are
vision-width, not LM-width; it is used when `pool_after_projection=True` (LLaVA-NeXT/OneVision's video
`get_2dPool` pools projected features), where the pooled rows *are* the embedding rows.

LongLLaVA's "2d" is `F.interpolate(24x24 -> 12x12, bilinear, align_corners=False)`: for an exact factor of
2 each output samples the centre of a 2x2 window with weights 1/4, i.e. a 2x2 average — `pool2d_tokens`
kernel 2. Other kernels here are true k x k averages (bilinear at factor 4 would average only the middle
2x2 of each window). "1d" reproduces LongLLaVA's ablation exactly: linear interpolation along the flat
token axis down to tokens // kernel**2.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastscan import pool2d_tokens

from . import pixels
from .pixels import anyres_feature_grid as _anyres_feature_grid
from fastscan.attention import flash_attn_func, flash_attn_with_kvcache

from .checkpoint import SKIP, _atomic_write, _shapes, _tensor_files, map_checkpoint_keys, materialize
from .checkpoint import hf_to_internal as lm_hf_to_internal, internal_to_hf as lm_internal_to_hf
from .config import LMConfig, MambaConfig, MoEConfig, _read_json_config, named_config
from .generate import generate as _generate
from .lm import AttentionMixer, HybridLM
from .vision import VisionConfig, VisionTower, named_vision_config
from .vision import hf_to_internal as vision_hf_to_internal, internal_to_hf as vision_internal_to_hf

PROJECTORS = ("mlp2x_gelu", "fused_mlp3x_gelu")
POOLINGS = ("2d", "1d", "none", "bilinear")


@dataclass
class MultimodalConfig:
    vision: VisionConfig = field(default_factory=lambda: named_vision_config("clip-vit-large-patch14-336"))
    lm: LMConfig = field(default_factory=lambda: named_config("longllava-9b"))
    projector: str = "mlp2x_gelu"          # LongLLaVA/LLaVA; "fused_mlp3x_gelu": Cobra (Prismatic's FusedMLPProjector)
    pooling: str = "2d"                    # "2d" (pool2d_tokens), "1d" (LongLLaVA's ablation), "none",
    #                                        "bilinear" (LLaVA-NeXT/OneVision get_2dPool: F.interpolate to pool_grid)
    pool_kernel: int = 2                   # 2: 24x24 -> 144 tokens; 4: -> 36; 1 == "none" (576)
    pool_after_projection: bool = False    # pool projected features (fused scatter into the embedding rows)
    pool_grid: Optional[Union[int, tuple]] = None  # "bilinear": output grid (side or (h, w)); None: ceil(g / kernel)
    vision_feature_layer: int = -2         # overrides vision(.feature_layer) of both towers
    second_vision: Optional[VisionConfig] = None  # Cobra: SigLIP beside DINOv2, features concatenated on channels
    image_token_id: int = 0                # id of the placeholder rows (overwritten by features; any valid id)
    image_aspect_ratio: str = "pad"        # "anyres" / "anyres_max_N": LLaVA-NeXT/OneVision tiles + image_newline
    image_grid_pinpoints: Optional[Union[str, list]] = None  # AnyRes: [(w, h), ...], its string, or "(1x1),...,(6x6)"
    composite_attention: bool = False      # EE-MLLM: visual tokens attend only to themselves

    def __post_init__(self):
        for name in ("vision", "second_vision"):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = VisionConfig.from_dict(value)
            if value is not None:
                setattr(self, name, replace(value, feature_layer=self.vision_feature_layer))
        if isinstance(self.lm, dict):
            self.lm = LMConfig.from_dict(self.lm)
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector: got {self.projector!r}, expected one of {PROJECTORS}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: got {self.pooling!r}, expected one of {POOLINGS}")
        if self.pool_kernel < 1:
            raise ValueError(f"pool_kernel: expected >= 1, got {self.pool_kernel}")
        if self.pool_after_projection and self.pooling == "1d":
            raise ValueError("pool_after_projection: only with pooling '2d', 'bilinear' or 'none'")
        if self.pool_grid is not None and self.pooling != "bilinear":
            raise ValueError(f"pool_grid: only with pooling 'bilinear' (got pooling {self.pooling!r})")
        if self.anyres:
            if not self.image_grid_pinpoints:
                raise ValueError(f"image_grid_pinpoints: image_aspect_ratio {self.image_aspect_ratio!r} needs them")
            if self.pooling == "1d":
                raise ValueError("pooling: '1d' leaves no 2D tile grid for AnyRes")
        if (self.second_vision is None) != (self.projector == "mlp2x_gelu"):
            raise ValueError(f"projector: {self.projector!r} goes with "
                             f"{'one tower' if self.projector == 'mlp2x_gelu' else 'two towers (second_vision)'}")
        if self.second_vision is not None and self.second_vision.patch_size != self.vision.patch_size:
            raise ValueError("second_vision: both towers must cut the image into the same patch grid")

    @property
    def vision_width(self) -> int:
        return self.vision.hidden_size + (self.second_vision.hidden_size if self.second_vision else 0)

    @property
    def anyres(self) -> bool:
        return self.image_aspect_ratio.startswith("anyres")

    @property
    def anyres_max(self) -> Optional[int]:
        return pixels.anyres_max_from_name(self.image_aspect_ratio)

    def pooled_grid(self, gh: int, gw: int) -> tuple[int, int]:
        """The (rows, cols) a gh x gw patch grid pools to ("1d" has none: rows * cols tokens in a line)."""
        if self.pooling == "bilinear" and self.pool_grid is not None:
            return (self.pool_grid, self.pool_grid) if isinstance(self.pool_grid, int) else tuple(self.pool_grid)
        k = 1 if self.pooling == "none" else self.pool_kernel
        return math.ceil(gh / k), math.ceil(gw / k)

    def tokens_per_image(self, height: Optional[int] = None, width: Optional[int] = None) -> int:
        """LM rows one image of height x width pixels fills (default: the tower's image size)."""
        p, size = self.vision.patch_size, self.vision.image_size
        gh, gw = (height or size) // p, (width or size) // p
        if self.pooling == "1d":
            return max(gh * gw // (self.pool_kernel ** 2), 1)
        rows, cols = self.pooled_grid(gh, gw)
        return rows * cols

    def anyres_layout(self, original_size) -> tuple[int, int]:
        """(rows, cols) of tiles pixels.anyres_tiles cuts an image of original_size (width, height) into."""
        size = self.vision.image_size
        width, height = pixels.select_best_resolution(
            tuple(original_size), pixels.parse_grid_pinpoints(self.image_grid_pinpoints, size))
        return height // size, width // size

    def tokens_for_anyres(self, original_size) -> int:
        """LM rows one AnyRes image of original_size (width, height) fills: the base image's tokens, then the
        tiles' grid unpadded to the image, capped (anyres_max_N), one image_newline after each row."""
        if not self.anyres:
            raise ValueError(f"image_aspect_ratio: {self.image_aspect_ratio!r} is not AnyRes")
        rows, cols = self.anyres_layout(original_size)
        h, w = self.pooled_grid(self.vision.grid, self.vision.grid)
        shape = pixels.anyres_feature_grid(torch.zeros(rows * cols, h, w, 1), rows, cols, tuple(original_size),
                                           self.anyres_max, newline=torch.zeros(1)).shape
        return self.tokens_per_image() + shape[0]


def _tiny_lm(**overrides) -> LMConfig:
    return LMConfig(**{**dict(model_type="jamba", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=4,
                              num_heads=4, num_kv_heads=2, attn_layer_period=2, attn_layer_offset=1,
                              expert_layer_period=2, expert_layer_offset=1, max_position_embeddings=4096,
                              mamba=MambaConfig(d_state=8, d_conv=4, expand=2, dt_rank=8),
                              moe=MoEConfig(num_experts=2, top_k=1)), **overrides})


def _tiny_vision(model_type: str = "clip_vision_model", width: int = 32) -> VisionConfig:
    # 56 px at patch 14: a 4x4 grid, so kernel 2 gives 4 tokens per image (as 24x24 -> 144 at full size).
    return VisionConfig.from_hf({"model_type": model_type, "hidden_size": width, "intermediate_size": 2 * width,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56,
                                 "patch_size": 14})


NAMED_MULTIMODAL_CONFIGS = {
    "longllava-9b": lambda: MultimodalConfig(lm=named_config("longllava-9b")),
    "longllava-a13b": lambda: MultimodalConfig(lm=named_config("longllava-a13b")),
    "tiny-longllava": lambda: MultimodalConfig(vision=_tiny_vision(), lm=_tiny_lm()),
    # Cobra's shape at test size: DINOv2 || SigLIP -> 3-layer MLP -> pure Mamba, all 729 (here 16) tokens.
    "tiny-cobra": lambda: MultimodalConfig(
        vision=_tiny_vision("dinov2"), second_vision=_tiny_vision("siglip_vision_model", 24),
        projector="fused_mlp3x_gelu", pooling="none",
        lm=LMConfig.from_hf({"model_type": "mamba", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                             "state_size": 8})),
}


def named_multimodal_config(name: str, **overrides) -> MultimodalConfig:
    if name not in NAMED_MULTIMODAL_CONFIGS:
        raise ValueError(f"name: unknown config {name!r}; known: {sorted(NAMED_MULTIMODAL_CONFIGS)}")
    return replace(NAMED_MULTIMODAL_CONFIGS[name](), **overrides)


def build_projector(config: MultimodalConfig) -> nn.Sequential:
    d_in, d_lm = config.vision_width, config.lm.hidden_size
    if config.projector == "mlp2x_gelu":  # keys .0 / .2, as LongLLaVA's mm_projector
        return nn.Sequential(nn.Linear(d_in, d_lm), nn.GELU(), nn.Linear(d_lm, d_lm))
    # Prismatic/Cobra FusedMLPProjector: fused width -> 4x fused width -> LM -> LM (keys .0 / .2 / .4).
    return nn.Sequential(nn.Linear(d_in, 4 * d_in), nn.GELU(), nn.Linear(4 * d_in, d_lm), nn.GELU(),
                         nn.Linear(d_lm, d_lm))


# ---------------------------------------------------------------- EE-MLLM composite attention
class CompositeAttentionMixer(AttentionMixer):
    """AttentionMixer whose visual rows see only their own key (the output there is o_proj(v)); text rows
    attend causally to everything before. `visual` (batch, total_len) is set by LongLLaVA before each
    forward/generation; a chunk reads its columns from cache_seqlens on (rows of a batch share a start)."""

    visual: Optional[Tensor] = None

    def forward(self, hidden: Tensor, cache=None, layer_idx: int = 0, packing=None) -> Tensor:
        b, l, _ = hidden.shape
        start = int(cache.cache_seqlens[0]) if cache is not None else 0
        mask = torch.zeros(b, l, dtype=torch.bool, device=hidden.device)
        if packing is not None and packing.self_only is not None:  # training: the mask travels with the pack
            mask = packing.self_only
        elif self.visual is not None and start < self.visual.shape[1]:
            if self.visual.shape[0] != b:
                raise ValueError(f"composite attention: visual mask batch {self.visual.shape[0]} != input batch {b}")
            piece = self.visual[:, start:start + l]
            mask[:, :piece.shape[1]] = piece.to(hidden.device)
        if not bool(mask.any()):
            return super().forward(hidden, cache, layer_idx, packing)
        q, k, v = self._qkv(hidden, cache, packing)
        if packing is not None:
            out = self._packed(q, k, v, packing, self_only=mask)
        elif bool(mask.all()):  # fast path: a chunk of visual rows only; softmax over one key is 1, out = v
            if cache is not None:
                cache.key[layer_idx][:, start:start + l] = k
                cache.value[layer_idx][:, start:start + l] = v
            out = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)
        elif cache is None:
            out = flash_attn_func(q, k, v, causal=True, self_only=mask)
        else:
            out = flash_attn_with_kvcache(q, cache.key[layer_idx], cache.value[layer_idx], k=k, v=v,
                                          cache_seqlens=cache.cache_seqlens, causal=True, self_only=mask)
        return self.o_proj(out.reshape(b, l, -1))


# ---------------------------------------------------------------- the model
def _starts(image_spans, batch: int, seqlen: int) -> list[tuple[int, int]]:
    """Spans for one row [(start, n), ...] or per row [[...], ...] -> flat (row-major) (start, n) list."""
    def is_span(x):
        return len(x) == 2 and all(isinstance(v, int) for v in x)

    if batch == 1 and (not image_spans or is_span(image_spans[0])):
        image_spans = [image_spans]
    if len(image_spans) != batch:
        raise ValueError(f"image_spans: got spans for {len(image_spans)} rows, input_ids has {batch}")
    return [(b * seqlen + int(s), int(n)) for b, row in enumerate(image_spans) for s, n in row]


class LongLLaVA(nn.Module):
    """vision_tower [+ vision_tower_2] -> pooling -> mm_projector -> lm (HybridLM)."""

    def __init__(self, config: MultimodalConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.vision_tower_2 = VisionTower(config.second_vision) if config.second_vision is not None else None
        self.mm_projector = build_projector(config)
        self.lm = HybridLM(config.lm)
        # LLaVA-NeXT's learned row separator (key model.image_newline), only for AnyRes models.
        self.image_newline = (nn.Parameter(torch.randn(config.lm.hidden_size) / config.lm.hidden_size ** 0.5)
                              if config.anyres else None)
        if config.composite_attention:
            for layer in self.lm.layers:
                if layer.mixer_kind == "attention":  # same parameters, so state_dict keys stay Jamba's
                    layer.self_attn.__class__ = CompositeAttentionMixer

    def tokens_per_image(self, height: Optional[int] = None, width: Optional[int] = None) -> int:
        return self.config.tokens_per_image(height, width)

    def tokens_for_anyres(self, original_size) -> int:
        return self.config.tokens_for_anyres(original_size)

    def _features(self, pixels: Tensor, pixels_2: Optional[Tensor]) -> tuple[Tensor, tuple[int, int]]:
        """(n, 3, H, W) -> patch tokens (n, gh * gw, vision_width) and the grid (gh, gw)."""
        x = self.vision_tower(pixels)
        if self.vision_tower_2 is not None:  # Cobra: the same image through both towers, channels concatenated
            x = torch.cat([x, self.vision_tower_2(pixels if pixels_2 is None else pixels_2).to(x.dtype)], dim=-1)
        p = self.config.vision.patch_size
        return x, (pixels.shape[-2] // p, pixels.shape[-1] // p)

    def _pool(self, x: Tensor, grid, out: Optional[Tensor] = None, index: Optional[Tensor] = None):
        c = self.config
        if c.pooling == "1d":
            target = max(x.shape[1] // c.pool_kernel ** 2, 1)
            return F.interpolate(x.transpose(1, 2), size=target, mode="linear", align_corners=False).transpose(1, 2)
        if c.pooling == "bilinear":  # LLaVA-NeXT/OneVision get_2dPool (align_corners=False)
            n, _, width = x.shape
            maps = x.transpose(1, 2).reshape(n, width, *grid)
            maps = F.interpolate(maps, size=c.pooled_grid(*grid), mode="bilinear", align_corners=False)
            return maps.flatten(2).transpose(1, 2)
        kernel = 1 if c.pooling == "none" else c.pool_kernel
        if kernel == 1 and out is None:
            return x
        return pool2d_tokens(x, grid, kernel, "avg", out=out, index=index)

    def encode_images(self, pixels: Tensor, pixels_2: Optional[Tensor] = None) -> Tensor:
        """(n, 3, H, W) -> (n, tokens_per_image, lm hidden): the rows each image fills."""
        x, grid = self._features(pixels, pixels_2)
        x = x.to(self.mm_projector[0].weight.dtype)
        if self.config.pool_after_projection:
            return self._pool(self.mm_projector(x), grid)
        return self.mm_projector(self._pool(x, grid))

    def _inputs(self, input_ids: Tensor, images, image_spans, images_2, image_sizes=None):
        """Normalize: ids (batch, L), pixel groups, second-tower groups, flat (row * L + start, n) spans,
        per-group AnyRes original sizes (None: a group of ordinary images)."""
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        groups = [] if images is None else [images] if isinstance(images, Tensor) else list(images)
        groups = [g[None] if g.dim() == 3 else g for g in groups]
        groups_2 = [None] * len(groups) if images_2 is None else (
            [images_2] if isinstance(images_2, Tensor) else list(images_2))
        sizes = [None] * len(groups) if image_sizes is None else list(image_sizes)
        if len(sizes) != len(groups):
            raise ValueError(f"image_sizes: got {len(sizes)} entries for {len(groups)} image groups")
        if any(s is not None for s in sizes):
            if not self.config.anyres:
                raise ValueError(f"image_sizes: AnyRes images need image_aspect_ratio 'anyres' (the config has "
                                 f"{self.config.image_aspect_ratio!r})")
            for g, size in zip(groups, sizes):
                if size is not None:
                    rows, cols = self.config.anyres_layout(size)
                    if g.shape[0] != 1 + rows * cols:
                        raise ValueError(f"images: an AnyRes image of size {tuple(size)} is the base image and "
                                         f"{rows}x{cols} tiles ({1 + rows * cols}), got {g.shape[0]}")
        num_images = sum(1 if size is not None else g.shape[0] for g, size in zip(groups, sizes))
        spans = _starts(self._spans_from_ids(input_ids, groups, sizes) if image_spans is None else image_spans,
                        *input_ids.shape)
        if len(spans) != num_images:
            raise ValueError(f"the prompt has {len(spans)} image placeholders (image_spans) but {num_images} images "
                             "were given; they must match one to one")
        return input_ids, groups, groups_2, spans, sizes

    def embed_multimodal(self, input_ids: Tensor, images: Union[Tensor, Sequence[Tensor], None] = None,
                         image_spans=None, images_2=None, image_sizes=None) -> Tensor:
        """input_ids (L,) or (batch, L) with placeholder rows; images: one (N, 3, H, W) tensor or a list of
        (n_i, 3, H, W) / (3, H, W) tensors (a group may differ in size from the next), N images in all, in
        prompt order; image_spans: (start, n) per image ([(...)] for one row, or one list per row), as
        formats.tokenize_prompt returns. None: runs of image_token_id split into tokens_per_image pieces.
        images_2: Cobra's second tower's pixels, grouped as images (None: the same pixels).
        image_sizes: per group, None or the (width, height) of an AnyRes image: that group is one image, its
        base image then its tiles (pixels.anyres_tiles), filling one span of tokens_for_anyres(size) rows.
        Returns inputs_embeds (batch, L, hidden)."""
        return self._embed(*self._inputs(input_ids, images, image_spans, images_2, image_sizes))

    def encode_anyres(self, tiles: Tensor, original_size, tiles_2: Optional[Tensor] = None) -> Tensor:
        """(1 + rows*cols, 3, T, T) base image then tiles -> (tokens_for_anyres(original_size), hidden):
        the base image's rows, then the tile grid unpadded to the image, capped, image_newline after each row."""
        feats = self.encode_images(tiles, tiles_2)
        rows, cols = self.config.anyres_layout(original_size)
        h, w = self.config.pooled_grid(self.config.vision.grid, self.config.vision.grid)
        grid = _anyres_feature_grid(feats[1:].unflatten(1, (h, w)), rows, cols, tuple(original_size),
                                    self.config.anyres_max, newline=self.image_newline)
        return torch.cat([feats[0], grid])

    def _embed(self, input_ids: Tensor, groups, groups_2, spans, sizes=None) -> Tensor:
        batch, seqlen = input_ids.shape
        # Embedded flat, so the buffer written in place is no view: fastscan's scatter autograd breaks on a
        # view's backward (torch's CopySlices takes the Function's first input as the mutated one; it is x).
        flat = self.lm.embed_tokens(input_ids.reshape(-1))
        done = 0
        for pixels, pixels_2, size in zip(groups, groups_2, sizes or [None] * len(groups)):
            if size is not None:
                (start, count), expected = spans[done], self.tokens_for_anyres(size)
                if count != expected:
                    raise ValueError(f"image_spans: image {done} has {count} placeholder rows, but an AnyRes image "
                                     f"of size {tuple(size)} fills {expected}")
                feats = self.encode_anyres(pixels.to(flat.device), size, pixels_2).to(flat.dtype)
                index = torch.tensor([start], dtype=torch.int64, device=flat.device)
                flat = flat.index_copy(0, _rows(index, expected), feats)
                done += 1
                continue
            n, expected = pixels.shape[0], self.tokens_per_image(*pixels.shape[-2:])
            mine = spans[done:done + n]
            bad = [i + done for i, (_, count) in enumerate(mine) if count != expected]
            if bad:
                raise ValueError(f"image_spans: images {bad} have {mine[bad[0] - done][1]} placeholder rows, but a "
                                 f"{pixels.shape[-2]}x{pixels.shape[-1]} image fills {expected}")
            index = torch.tensor([s for s, _ in mine], dtype=torch.int64, device=flat.device)
            if self.config.pool_after_projection and self.config.pooling == "2d":
                # Fused: the pooled rows land straight in the embedding buffer, no pooled temporary.
                x, grid = self._features(pixels.to(flat.device), pixels_2)
                x = self.mm_projector(x.to(self.mm_projector[0].weight.dtype)).to(flat.dtype)
                flat = pool2d_tokens(x, grid, self.config.pool_kernel, "avg", out=flat, index=index)
            else:
                feats = self.encode_images(pixels.to(flat.device), pixels_2).to(flat.dtype)
                flat.index_copy_(0, _rows(index, expected), feats.reshape(-1, feats.shape[-1]))
            done += n
        return flat.view(batch, seqlen, -1)

    def _spans_from_ids(self, input_ids: Tensor, groups, anyres_sizes=None) -> list:
        sizes = []
        for g, size in zip(groups, anyres_sizes or [None] * len(groups)):
            if size is not None:
                sizes.append(self.tokens_for_anyres(size))
            else:
                sizes += [self.tokens_per_image(*g.shape[-2:])] * g.shape[0]
        rows, k = [], 0
        for row in input_ids.tolist():
            spans, i = [], 0
            while i < len(row):
                if row[i] == self.config.image_token_id and k < len(sizes):
                    spans.append((i, sizes[k]))
                    i, k = i + sizes[k], k + 1
                else:
                    i += 1
            rows.append(spans)
        return rows

    def visual_mask(self, input_ids: Tensor, image_spans) -> Tensor:
        """(batch, L) bool: True on image rows (composite attention's self_only)."""
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        return self._visual(input_ids, _starts(image_spans, *input_ids.shape))

    @staticmethod
    def _visual(input_ids: Tensor, spans) -> Tensor:
        mask = torch.zeros(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
        for start, n in spans:
            mask[start:start + n] = True
        return mask.view(input_ids.shape)

    def _set_visual(self, mask: Optional[Tensor]) -> None:
        for layer in self.lm.layers:
            if isinstance(layer.mixer, CompositeAttentionMixer):
                layer.mixer.visual = mask

    def forward(self, input_ids: Tensor, pixel_values=None, image_spans=None, cache=None, last_only: bool = False,
                images_2=None, image_sizes=None, packing=None, return_hidden: bool = False) -> Tensor:
        """Logits (batch, L, vocab) of the prompt with its images (with `cache`: continuing the cached rows).

        packing: an lm.Packing when the row holds several packed conversations (training); return_hidden:
        final-normed hidden states instead of logits (see HybridLM.forward)."""
        inputs = self._inputs(input_ids, pixel_values, image_spans, images_2, image_sizes)
        embeds = self._embed(*inputs)
        if self.config.composite_attention and packing is not None:
            # Carried by the pack, not set on the modules: activation checkpointing recomputes the layers
            # in backward, after this call has returned.
            packing = packing._replace(self_only=self._visual(inputs[0], inputs[3]))
        elif self.config.composite_attention:  # the mixers index the mask by absolute position
            offset = int(cache.cache_seqlens[0]) if cache is not None else 0
            visual = self._visual(inputs[0], inputs[3])
            self._set_visual(torch.cat([visual.new_zeros(visual.shape[0], offset), visual], dim=1))
        try:
            return self.lm(inputs_embeds=embeds, cache=cache, last_only=last_only, packing=packing,
                           return_hidden=return_hidden)
        finally:
            self._set_visual(None)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, images=None, image_spans=None, images_2=None, image_sizes=None,
                 **kwargs) -> Tensor:
        """llmodel.generate over the merged embeddings (chunk_size=, max_new_tokens=, stream=, ...): new tokens."""
        inputs = self._inputs(input_ids, images, image_spans, images_2, image_sizes)
        embeds = self._embed(*inputs)
        if self.config.composite_attention:
            self._set_visual(self._visual(inputs[0], inputs[3]))
        try:
            return _generate(self.lm, inputs_embeds=embeds, **kwargs)
        finally:
            self._set_visual(None)


def _rows(index: Tensor, count: int) -> Tensor:
    """First rows (n,) -> every row (n * count,) of those spans."""
    return (index[:, None] + torch.arange(count, device=index.device)).reshape(-1)


# ---------------------------------------------------------------- LongLLaVA checkpoints
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
_IGNORED = ("model.vision_tower.vision_tower.vision_model.embeddings.position_ids",)  # older CLIP buffers


def _hf_key(ours: str) -> str:
    if ours == "image_newline":
        return "model.image_newline"
    if ours.startswith("vision_tower."):
        return VISION_PREFIX + vision_internal_to_hf(ours[len("vision_tower."):], "clip_vision_model")
    if ours.startswith("mm_projector."):
        return PROJECTOR_PREFIX + ours[len("mm_projector."):]
    return lm_internal_to_hf(ours[len("lm."):], "jamba")


def _our_key(key: str) -> Optional[str]:
    if key.startswith(VISION_PREFIX):
        inner = vision_hf_to_internal(key[len(VISION_PREFIX):], "clip_vision_model")
        return None if inner is None else "vision_tower." + inner
    if key.startswith(PROJECTOR_PREFIX):
        return "mm_projector." + key[len(PROJECTOR_PREFIX):]
    if key == "model.image_newline":
        return "image_newline"
    if key.startswith("model.vision_tower."):
        return None
    inner = lm_hf_to_internal(key, "jamba")
    return None if inner is None else "lm." + inner


def _vision_from(hf: dict, path: str) -> VisionConfig:
    if "vision_config" in hf:
        return VisionConfig.from_hf({**hf["vision_config"], "model_type": "clip_vision_model"})
    tower = str(hf.get("mm_vision_tower", ""))
    local = tower if os.path.isabs(tower) else os.path.join(path, tower)
    if tower and os.path.isfile(os.path.join(local, "config.json")):
        return VisionConfig.from_hf(local)
    if "clip" in tower.lower() and "336" in tower and "large" in tower.lower():
        return named_vision_config("clip-vit-large-patch14-336")
    raise ValueError(f"path: {path}/config.json names the vision tower {tower!r}, which is neither a local "
                     "directory with a config.json nor CLIP ViT-L/14-336; add a `vision_config` entry")


def longllava_config(path_or_dict) -> MultimodalConfig:
    """MultimodalConfig from LongLLaVA's config.json (llava_jamba: a Jamba config plus mm_* fields)."""
    hf = _read_json_config(path_or_dict)
    path = "" if isinstance(path_or_dict, dict) else os.fspath(path_or_dict)
    if "resamplePooling" not in hf:
        # NOTE: LongLLaVA's own code would not pool at all here (576 rows); its released checkpoints were
        # trained with --resamplePooling 2d (every SFT script), so that is the default we take.
        warnings.warn(f"{path or 'config'}: no `resamplePooling` field; assuming '2d' (2x2 average, 144 tokens per "
                      "336px image), what LongLLaVA was trained with. Set it to null for no pooling.")
        pooling = "2d"
    else:
        pooling = {None: "none", "2d": "2d", "1d": "1d", "bilinear": "bilinear"}.get(hf["resamplePooling"])
        if pooling is None:
            raise ValueError(f"resamplePooling: got {hf['resamplePooling']!r}, expected '2d', '1d', 'bilinear' "
                             "or null")
    projector = hf.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type: got {projector!r}; LongLLaVA checkpoints use 'mlp2x_gelu'")
    if hf.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError(f"mm_vision_select_feature: got {hf['mm_vision_select_feature']!r}, only 'patch' is supported")
    lm = LMConfig.from_hf({**hf, "model_type": "jamba"})
    return MultimodalConfig(vision=_vision_from(hf, path), lm=lm, projector=projector, pooling=pooling,
                            pool_kernel=hf.get("pool_kernel", 2), pool_grid=hf.get("pool_grid"),
                            vision_feature_layer=hf.get("mm_vision_select_layer", -2),
                            image_token_id=hf.get("image_token_id", 0),
                            image_aspect_ratio=hf.get("image_aspect_ratio", "pad"),
                            image_grid_pinpoints=hf.get("image_grid_pinpoints"))


def load_longllava(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                   device: Union[str, torch.device] = "cpu", config: Optional[MultimodalConfig] = None) -> LongLLaVA:
    """Load LongLLaVA's saved layout (config.json + safetensors). Strict: ValueError lists every missing,
    unexpected and mis-shaped tensor. dtype None keeps the checkpoint's."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path} is not a directory")
    config = config or longllava_config(path)
    if config.vision.model_type != "clip_vision_model" or config.second_vision is not None:
        raise ValueError("config: LongLLaVA's layout holds one CLIP tower")
    files = _tensor_files(path)
    shapes = _shapes(files)
    with torch.device("meta"):
        model = LongLLaVA(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.lm.tie_word_embeddings:
        expected.pop("lm.lm_head.weight")
    tied = config.lm.tie_word_embeddings

    def to_ours(key):
        ours = SKIP if key in _IGNORED else _our_key(key)
        return SKIP if tied and ours == "lm.lm_head.weight" else ours

    mapping = map_checkpoint_keys(path, "a LongLLaVA model with this config.json", shapes, expected, to_ours, _hf_key)
    return materialize(model, files, mapping, dtype, device,
                       retie=(lambda m: setattr(m.lm.lm_head, "weight", m.lm.embed_tokens.weight)) if tied else None)


def longllava_layout_problem(config: MultimodalConfig) -> Optional[str]:
    """Why save_longllava cannot write a model of this config (None: it can)."""
    towers = [config.vision.model_type] + ([config.second_vision.model_type] if config.second_vision else [])
    if towers != ["clip_vision_model"] or config.projector != "mlp2x_gelu":
        return (f"LongLLaVA's layout holds one CLIP tower and an mlp2x_gelu projector (this model: "
                f"{' + '.join(towers)}, {config.projector})")
    return None


def save_longllava(model: LongLLaVA, path: Union[str, os.PathLike], state_dict: Optional[dict] = None) -> None:
    """Write config.json + model.safetensors in LongLLaVA's layout (each file atomically). state_dict: the
    tensors to write instead of model.state_dict() (a sharded model's gathered full state dict)."""
    from safetensors.torch import save_file

    c = model.config
    problem = longllava_layout_problem(c)
    if problem:
        raise ValueError(f"model: {problem}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {_hf_key(k): v.detach().to("cpu").contiguous() for k, v in state_dict.items()
               if not (k == "lm.lm_head.weight" and c.lm.tie_word_embeddings)}
    v = c.vision
    hf = {**c.lm.to_hf(), "architectures": ["LlavaJambaForCausalLM"], "model_type": "llava_jamba",
          "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": c.projector,
          "mm_hidden_size": v.hidden_size, "mm_vision_select_layer": c.vision_feature_layer,
          "mm_vision_select_feature": "patch",
          "mm_patch_merge_type": "spatial_unpad" if c.anyres else "flat",
          "resamplePooling": {"none": None}.get(c.pooling, c.pooling), "pool_kernel": c.pool_kernel,
          "pool_grid": list(c.pool_grid) if isinstance(c.pool_grid, tuple) else c.pool_grid,
          "image_aspect_ratio": c.image_aspect_ratio, "image_token_id": c.image_token_id,
          "image_grid_pinpoints": c.image_grid_pinpoints,
          "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                            "num_attention_heads": v.num_heads, "num_channels": v.num_channels,
                            "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": v.hidden_act,
                            "layer_norm_eps": v.layer_norm_eps},
          "dtype": str(state_dict["lm.embed_tokens.weight"].dtype).replace("torch.", "")}
    _atomic_write(os.path.join(path, "model.safetensors"),
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(os.path.join(path, "config.json"), lambda tmp: open(tmp, "w").write(json.dumps(hf, indent=2) + "\n"))
    stale_index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(stale_index):
        os.unlink(stale_index)


__all__ = ["MultimodalConfig", "LongLLaVA", "CompositeAttentionMixer", "build_projector", "named_multimodal_config",
           "NAMED_MULTIMODAL_CONFIGS", "longllava_config", "load_longllava", "longllava_layout_problem",
           "save_longllava"]
