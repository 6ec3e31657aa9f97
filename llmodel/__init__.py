"""llmodel: a small, readable LongLLaVA model package built on fastscan's public ops.

Public API:
  LMConfig, named_config        the language model's config (from/to HF config.json; longllava-9b, longllava-a13b)
  HybridLM                      the decoder: per-layer Mamba | attention mixer, MLP | MoE FFN
  HybridCache                   KV cache for attention layers, conv + SSM state for Mamba layers
  load_lm, save_lm              safetensors checkpoints in HF layouts (Jamba, Mamba, Qwen2, Llama)
  generate                      chunked prefill + decode loop + sampling
  VisionTower, load_vision      CLIP / SigLIP / DINOv2 towers from HF-layout safetensors
  LongLLaVA, load_longllava     the multimodal model: towers -> 2D pooling -> projector -> hybrid LM
  formats, pixels               prompt templates with placeholder expansion; image/tile/video preprocessing

Training and evaluation live in their modules (imported on use): llmodel.data (JSONL -> packs),
llmodel.train (the three stages, FSDP2, checkpoints), llmodel.synthetic (toy data), llmodel.evaluate
(task accuracy, V-NIAH, plots), llmodel.demo (`python -m llmodel demo`).
"""
from .config import LMConfig, MambaConfig, MoEConfig, NAMED_CONFIGS, named_config
from .cache import HybridCache
from .lm import HybridLM
from .checkpoint import load_lm, save_lm
# Bound after the submodule import on purpose: `llmodel.generate` is the function, not the module.
from .generate import generate
from .vision import VisionConfig, VisionTower, load_vision, named_vision_config
from .multimodal import (LongLLaVA, MultimodalConfig, load_longllava, named_multimodal_config,
                         save_longllava)
from . import formats, pixels

__all__ = ["LMConfig", "MambaConfig", "MoEConfig", "NAMED_CONFIGS", "named_config", "HybridCache", "HybridLM",
           "load_lm", "save_lm", "generate", "VisionConfig", "VisionTower", "load_vision", "named_vision_config",
           "LongLLaVA", "MultimodalConfig", "load_longllava", "named_multimodal_config", "save_longllava",
           "formats", "pixels"]
