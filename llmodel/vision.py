"""Vision towers: CLIP, SigLIP and DINOv2 (with or without registers) as one ViT with flags.

The four Hugging Face families differ only in a handful of switches, so one module serves them all:

                      class token  registers  pre-norm  final norm on sequence  activation   layer scale  patch bias
  CLIP (LongLLaVA)    yes          -          yes       no (pooled token only)  quick-GELU   -            no
  SigLIP              -            -          -         yes                     tanh-GELU    -            yes
  DINOv2              yes          -          -         yes                     GELU (erf)   yes          yes
  DINOv2 + registers  yes          yes        -         yes                     GELU (erf)   yes          yes

Layer numbering is HF's `hidden_states` convention, as LLaVA's `vision_feature_layer`: 0 is the input of
the first encoder layer (embeddings, after CLIP's pre-layernorm), k the output of layer k, -1 the last
layer's output *without* the final norm, -2 (the default) the second-to-last. Only the layers up to the
selected one run.

Parameters live under our own names (`layers.{i}.attn.q_proj`, ...) with canonical shapes; `load_vision`
renames each HF layout onto them and checks every key and shape.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastscan.attention import flash_attn_func

from .checkpoint import SKIP, _rename, _shapes, _tensor_files, map_checkpoint_keys, materialize
from .config import _read_json_config

MODEL_TYPES = ("clip_vision_model", "siglip_vision_model", "dinov2", "dinov2_with_registers")
ACTIVATIONS = ("quick_gelu", "gelu_pytorch_tanh", "gelu")


@dataclass
class VisionConfig:
    model_type: str = "clip_vision_model"  # which HF layout checkpoints use: one of MODEL_TYPES
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 336                  # the checkpoint's input size; others interpolate the positions
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    class_token: bool = True
    num_register_tokens: int = 0
    pre_norm: bool = False                 # CLIP's pre_layrnorm on the embeddings
    post_norm: bool = False                # HF's last_hidden_state is final_norm(last layer) (SigLIP, DINOv2)
    layer_scale: bool = False              # DINOv2's per-channel scale on both residual branches
    patch_bias: bool = True
    qkv_bias: bool = True
    swiglu: bool = False                   # DINOv2-giant's SwiGLU FFN instead of fc1-act-fc2
    pos_antialias: bool = False            # DINOv2-with-registers interpolates with antialias=True
    feature_layer: int = -2                # LLaVA's vision_feature_layer / mm_vision_select_layer

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type: got {self.model_type!r}, expected one of {MODEL_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act: got {self.hidden_act!r}, expected one of {ACTIVATIONS}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide hidden_size={self.hidden_size}")
        self.layer_index(self.feature_layer)  # validates

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side at the checkpoint's image size."""
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Class + register tokens ahead of the patch tokens."""
        return int(self.class_token) + self.num_register_tokens

    @property
    def ffn_size(self) -> int:
        """Width of the FFN's hidden layer (SwiGLU shrinks it by 2/3, rounded up to a multiple of 8, as DINOv2)."""
        return (int(self.intermediate_size * 2 / 3) + 7) // 8 * 8 if self.swiglu else self.intermediate_size

    def num_patches(self, height: Optional[int] = None, width: Optional[int] = None) -> int:
        height, width = height or self.image_size, width or self.image_size
        return (height // self.patch_size) * (width // self.patch_size)

    def layer_index(self, layer: int) -> int:
        """HF hidden_states index (negative from the end) -> how many encoder layers to run."""
        k = layer if layer >= 0 else self.num_layers + 1 + layer
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"layer: got {layer}, expected in [-{self.num_layers + 1}, {self.num_layers}] "
                             f"for a tower of {self.num_layers} layers")
        return k

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"VisionConfig.from_dict: unknown keys {unknown}")
        return cls(**d)

    @classmethod
    def from_hf(cls, path_or_dict: Union[str, os.PathLike, dict], feature_layer: int = -2) -> "VisionConfig":
        """From an HF config (dict, config.json, or directory): a vision config (clip_vision_model,
        siglip_vision_model, dinov2, dinov2_with_registers) or any config holding one as `vision_config`
        (CLIPConfig, SiglipConfig, LLaVA's). Missing fields take HF's defaults for that family."""
        hf = _read_json_config(path_or_dict)
        outer = hf.get("model_type")
        if "vision_config" in hf:
            hf = dict(hf["vision_config"])
            hf.setdefault("model_type", {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(outer))
        model_type = hf.get("model_type")
        image_size = hf.get("image_size", 224)
        if isinstance(image_size, (list, tuple)):
            if len(set(image_size)) != 1:
                raise ValueError(f"path_or_dict: non-square image_size {image_size} is not supported")
            image_size = image_size[0]
        common = dict(model_type=model_type, hidden_size=hf.get("hidden_size", 768),
                      num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
                      num_channels=hf.get("num_channels", 3), image_size=image_size, feature_layer=feature_layer)
        if model_type == "clip_vision_model":
            return cls(**common, intermediate_size=hf.get("intermediate_size", 3072),
                       patch_size=hf.get("patch_size", 32), hidden_act=hf.get("hidden_act", "quick_gelu"),
                       layer_norm_eps=hf.get("layer_norm_eps", 1e-5), class_token=True,
                       pre_norm=True, post_norm=False, patch_bias=False)
        if model_type == "siglip_vision_model":
            return cls(**common, intermediate_size=hf.get("intermediate_size", 3072),
                       patch_size=hf.get("patch_size", 16), hidden_act=hf.get("hidden_act", "gelu_pytorch_tanh"),
                       layer_norm_eps=hf.get("layer_norm_eps", 1e-6), class_token=False, post_norm=True)
        if model_type in ("dinov2", "dinov2_with_registers"):
            registers = model_type == "dinov2_with_registers"
            return cls(**common, intermediate_size=int(common["hidden_size"] * hf.get("mlp_ratio", 4)),
                       patch_size=hf.get("patch_size", 16 if registers else 14),
                       hidden_act=hf.get("hidden_act", "gelu"),
                       layer_norm_eps=hf.get("layer_norm_eps", 1e-6), class_token=True,
                       num_register_tokens=hf.get("num_register_tokens", 4) if registers else 0, post_norm=True,
                       layer_scale=True, qkv_bias=hf.get("qkv_bias", True), swiglu=hf.get("use_swiglu_ffn", False),
                       pos_antialias=registers)
        raise ValueError(f"path_or_dict: model_type {model_type!r} is not a supported vision tower; "
                         f"expected one of {MODEL_TYPES} (or a config with such a vision_config)")


NAMED_VISION_CONFIGS = {
    # LongLLaVA / LLaVA-1.5: openai/clip-vit-large-patch14-336, 24×24 patches + class token.
    "clip-vit-large-patch14-336": lambda: VisionConfig.from_hf(
        {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
         "num_attention_heads": 16, "image_size": 336, "patch_size": 14}),
    # LLaVA-OneVision / Cobra: google/siglip-so400m-patch14-384, 27×27 patches.
    "siglip-so400m-patch14-384": lambda: VisionConfig.from_hf(
        {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
         "num_attention_heads": 16, "image_size": 384, "patch_size": 14}),
    "dinov2-large": lambda: VisionConfig.from_hf(
        {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
         "image_size": 518, "patch_size": 14}),
}


# ---------------------------------------------------------------- the tower
def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, l, _ = x.shape
        shape = (b, l, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        out = flash_attn_func(q, k, v, causal=False, softmax_scale=self.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, l, -1))


class MLP(nn.Module):
    """fc2(act(fc1(x))), or DINOv2's SwiGLU kept in its checkpoint's fused layout: weights_in holds
    [gate; up], weights_out is the down projection."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d, h = config.hidden_size, config.ffn_size
        self.swiglu = config.swiglu
        if self.swiglu:
            self.weights_in, self.weights_out = nn.Linear(d, 2 * h), nn.Linear(h, d)
        else:
            self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
            self.act = _activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            gate, up = self.weights_in(x).chunk(2, dim=-1)
            return self.weights_out(F.silu(gate) * up)
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm block: x + s1 * attn(norm1(x)), then x + s2 * mlp(norm2(x)); s1, s2 only with layer scale."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1, self.attn = nn.LayerNorm(d, eps=eps), Attention(config)
        self.norm2, self.mlp = nn.LayerNorm(d, eps=eps), MLP(config)
        if config.layer_scale:
            self.layer_scale1, self.layer_scale2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.layer_scale = config.layer_scale

    def forward(self, x: Tensor) -> Tensor:
        h = self.attn(self.norm1(x))
        x = x + (h * self.layer_scale1 if self.layer_scale else h)
        h = self.mlp(self.norm2(x))
        return x + (h * self.layer_scale2 if self.layer_scale else h)


class VisionTower(nn.Module):
    """pixel_values (images, channels, height, width) -> one layer's tokens (images, tokens, hidden_size)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, d, config.patch_size, stride=config.patch_size,
                                     bias=config.patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(d)) if config.class_token else None
        self.register_tokens = (nn.Parameter(torch.zeros(config.num_register_tokens, d))
                                if config.num_register_tokens else None)
        # Random positions for a tower trained from scratch (a checkpoint overwrites them): at the patch
        # projection's output scale (default conv init on unit-variance pixels: std 1/sqrt(3)). Zeros would
        # leave the tower blind to where a patch is until training moved them.
        self.position_embedding = nn.Parameter(
            torch.randn(int(config.class_token) + config.grid ** 2, d) * 3 ** -0.5)
        self.pre_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.pre_norm else None
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)  # every HF layout carries one

    def positions(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings for a grid_h × grid_w patch grid (class token's first, if any); the learned
        grid resized bicubically (align_corners=False) when it differs, as HF's interpolate_pos_encoding."""
        pos, c, g = self.position_embedding, self.config, self.config.grid
        if (grid_h, grid_w) == (g, g):
            return pos
        cls_pos, patch_pos = pos[:int(c.class_token)], pos[int(c.class_token):]
        # NOTE: resampled in float32 whatever the weights' dtype (DINOv2 does; CLIP/SigLIP in their dtype,
        # which only differs in half precision, where bicubic in fp16/bf16 visibly shifts the embeddings).
        grid = patch_pos.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                             antialias=c.pos_antialias)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1).to(pos.dtype)])

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Layer 0: [class] [registers] patches, with positions (registers have none), CLIP's pre-norm applied."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (n, d, grid_h, grid_w)
        n, _, grid_h, grid_w = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(n, 1, -1), x], dim=1)
        x = x + self.positions(grid_h, grid_w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1), x[:, 1:]], dim=1)
        return self.pre_norm(x) if self.pre_norm is not None else x

    def forward(self, pixel_values: Tensor, layer: Optional[int] = None, patch_only: bool = True,
                post_norm: bool = False) -> Tensor:
        """The selected layer's hidden states.

        Args:
            pixel_values: (images, channels, height, width), normalized; any height/width (the position
                embeddings are interpolated when the patch grid differs from the checkpoint's).
            layer: HF hidden_states index (0: embeddings, -1: last layer); None: config.feature_layer (-2).
            patch_only: drop the class and register tokens (LLaVA's "patch" feature select).
            post_norm: apply the final LayerNorm (HF's last_hidden_state for SigLIP/DINOv2 at layer -1).

        Returns:
            (images, tokens, hidden_size): tokens = patches (raster order) or prefix tokens + patches.
        """
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values: got shape {list(pixel_values.shape)}, expected "
                             f"(images, {self.config.num_channels}, height, width)")
        if min(pixel_values.shape[2:]) < self.config.patch_size:
            raise ValueError(f"pixel_values: {list(pixel_values.shape[2:])} is smaller than one "
                             f"{self.config.patch_size}-pixel patch")
        depth = self.config.layer_index(self.config.feature_layer if layer is None else layer)
        x = self.embed(pixel_values)
        for block in self.layers[:depth]:
            x = block(x)
        if post_norm:
            x = self.final_norm(x)
        return x[:, self.config.num_prefix_tokens:] if patch_only else x


# ---------------------------------------------------------------- checkpoints
# (HF key prefix, our key prefix) after the layout's outer prefix (`vision_model.` when present).
_CLIP_RULES = [("embeddings.class_embedding", "class_embedding"),
               ("embeddings.patch_embedding.", "patch_embed."),
               ("embeddings.position_embedding.weight", "position_embedding"),
               ("pre_layrnorm.", "pre_norm."), ("post_layernorm.", "final_norm."),
               ("encoder.layers.{i}.layer_norm1.", "layers.{i}.norm1."),
               ("encoder.layers.{i}.layer_norm2.", "layers.{i}.norm2."),
               ("encoder.layers.{i}.self_attn.out_proj.", "layers.{i}.attn.o_proj."),
               ("encoder.layers.{i}.self_attn.", "layers.{i}.attn."),
               ("encoder.layers.{i}.mlp.", "layers.{i}.mlp.")]
_DINOV2_RULES = [("embeddings.cls_token", "class_embedding"), ("embeddings.register_tokens", "register_tokens"),
                 ("embeddings.position_embeddings", "position_embedding"),
                 ("embeddings.patch_embeddings.projection.", "patch_embed."), ("layernorm.", "final_norm."),
                 ("encoder.layer.{i}.norm1.", "layers.{i}.norm1."), ("encoder.layer.{i}.norm2.", "layers.{i}.norm2."),
                 ("encoder.layer.{i}.attention.attention.query.", "layers.{i}.attn.q_proj."),
                 ("encoder.layer.{i}.attention.attention.key.", "layers.{i}.attn.k_proj."),
                 ("encoder.layer.{i}.attention.attention.value.", "layers.{i}.attn.v_proj."),
                 ("encoder.layer.{i}.attention.output.dense.", "layers.{i}.attn.o_proj."),
                 ("encoder.layer.{i}.layer_scale1.lambda1", "layers.{i}.layer_scale1"),
                 ("encoder.layer.{i}.layer_scale2.lambda1", "layers.{i}.layer_scale2"),
                 ("encoder.layer.{i}.mlp.", "layers.{i}.mlp.")]
KEY_RULES = {"clip_vision_model": _CLIP_RULES, "siglip_vision_model": _CLIP_RULES,
             "dinov2": _DINOV2_RULES, "dinov2_with_registers": _DINOV2_RULES}
# Tensors an HF layout may hold that feature extraction never uses: accepted when present, not loaded.
UNUSED_KEYS = {"clip_vision_model": (), "siglip_vision_model": ("head.",),  # attention-pooling head
               "dinov2": ("embeddings.mask_token",), "dinov2_with_registers": ("embeddings.mask_token",)}
# Outside `vision_model.`: the rest of a full CLIPModel / SiglipModel checkpoint.
OTHER_TOWER_KEYS = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")
# DINOv2 stores these with leading singleton dims: (1, 1, d), (1, R, d), (1, N, d).
_LEADING_ONES = {"dinov2": {"class_embedding": 2, "register_tokens": 1, "position_embedding": 1}}
_LEADING_ONES["dinov2_with_registers"] = _LEADING_ONES["dinov2"]


def hf_to_internal(key: str, model_type: str) -> Optional[str]:
    return _rename(key, KEY_RULES[model_type], 0)


def internal_to_hf(key: str, model_type: str) -> str:
    return _rename(key, KEY_RULES[model_type], 1)


def load_vision(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                device: Union[str, torch.device] = "cpu", config: Optional[VisionConfig] = None,
                prefix: Optional[str] = None, feature_layer: int = -2) -> VisionTower:
    """Load a VisionTower from a local HF directory (safetensors, single or sharded): CLIPVisionModel or a
    full CLIPModel, SiglipVisionModel or SiglipModel, Dinov2Model, Dinov2WithRegistersModel.

    config: None reads the directory's config.json (VisionConfig.from_hf).
    prefix: the tower's key prefix inside a larger checkpoint (e.g. LongLLaVA's
        "model.vision_tower.vision_tower.vision_model."); keys outside it are left alone. None: "vision_model."
        when the checkpoint has it, else "" — and then only a full CLIP/SigLIP model's text tower may sit beside.
    dtype: None keeps the checkpoint's. Raises ValueError listing every missing, unexpected and mis-shaped tensor.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path} is not a directory")
    config = config or VisionConfig.from_hf(path, feature_layer=feature_layer)
    files = _tensor_files(path)
    shapes = _shapes(files)
    explicit = prefix is not None
    if not explicit:
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in shapes) else ""

    with torch.device("meta"):
        model = VisionTower(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    leading = _LEADING_ONES.get(config.model_type, {})
    hf_shape = {k: (1,) * leading.get(k, 0) + s for k, s in expected.items()}

    def to_ours(key):
        if not key.startswith(prefix):
            # outside the tower: fine under an explicit prefix or for a full CLIP/SigLIP model's text side
            return SKIP if explicit or key.startswith(OTHER_TOWER_KEYS) else None
        inner = key[len(prefix):]
        if inner.startswith(UNUSED_KEYS[config.model_type]):
            return SKIP
        return hf_to_internal(inner, config.model_type)

    mapping = map_checkpoint_keys(path, f"a {config.model_type} tower of this config (key prefix {prefix!r})",
                                  shapes, expected, to_ours,
                                  lambda k: prefix + internal_to_hf(k, config.model_type), hf_shape.__getitem__)
    return materialize(model, files, mapping, dtype, device)


def named_vision_config(name: str, **overrides) -> VisionConfig:
    if name not in NAMED_VISION_CONFIGS:
        raise ValueError(f"name: unknown vision config {name!r}; known: {sorted(NAMED_VISION_CONFIGS)}")
    return replace(NAMED_VISION_CONFIGS[name](), **overrides)


__all__ = ["VisionConfig", "VisionTower", "load_vision", "named_vision_config", "NAMED_VISION_CONFIGS",
           "KEY_RULES", "hf_to_internal", "internal_to_hf"]
