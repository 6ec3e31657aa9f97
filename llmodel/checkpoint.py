"""Safetensors checkpoints in Hugging Face layouts: JambaForCausalLM, MambaForCausalLM, Qwen2ForCausalLM,
LlamaForCausalLM.

Loading is strict — every tensor the model needs must be there with the right shape, and nothing else
may be — because a silently skipped tensor gives a model that runs and talks nonsense. The model is built
on the meta device (no memory), materialized once, and filled tensor by tensor from memory-mapped
files, so peak memory is the model plus one tensor, whatever the number of shards.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Optional, Union

import torch

from .config import LMConfig
from .lm import HybridLM

# (HF key prefix, our key prefix); `{i}` is a layer index. First match wins, in both directions.
KEY_RULES = {
    "jamba": [("lm_head.", "lm_head."), ("model.", "")],
    "qwen2": [("lm_head.", "lm_head."), ("model.embed_tokens.", "embed_tokens."), ("model.norm.", "final_layernorm."),
              ("model.layers.{i}.post_attention_layernorm.", "layers.{i}.pre_ff_layernorm."),
              ("model.layers.{i}.mlp.", "layers.{i}.feed_forward."), ("model.layers.", "layers.")],
    "mamba": [("lm_head.", "lm_head."), ("backbone.embeddings.", "embed_tokens."),
              ("backbone.norm_f.", "final_layernorm."), ("backbone.layers.{i}.norm.", "layers.{i}.input_layernorm."),
              ("backbone.layers.{i}.mixer.", "layers.{i}.mamba.")],
}
KEY_RULES["llama"] = KEY_RULES["qwen2"]
_MAX_LISTED = 20


def _rename(key: str, rules, source: int) -> Optional[str]:
    """Map `key` through the first rule whose side `source` (0: HF, 1: ours) is a prefix of it."""
    for rule in rules:
        pattern = "^" + re.escape(rule[source]).replace(re.escape("{i}"), r"(\d+)")
        match = re.match(pattern, key)
        if match:
            target = rule[1 - source]
            if match.groups():
                target = target.replace("{i}", match.group(1))
            return target + key[match.end():]
    return None


def hf_to_internal(key: str, model_type: str) -> Optional[str]:
    return _rename(key, KEY_RULES[model_type], 0)


def internal_to_hf(key: str, model_type: str) -> str:
    return _rename(key, KEY_RULES[model_type], 1)


def _tensor_files(path: str) -> dict[str, str]:
    """HF key -> file holding it, from model.safetensors.index.json or a single model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {key: os.path.join(path, name) for key, name in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"path: {path} holds neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {shown}{more}"


def _shapes(files: dict[str, str]) -> dict[str, tuple]:
    from safetensors import safe_open
    shapes = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if files.get(key) == file:
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def load_lm(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
            device: Union[str, torch.device] = "cpu", config: Optional[LMConfig] = None) -> HybridLM:
    """Load a HybridLM from an HF model directory (config.json + safetensors, single file or sharded).

    dtype: parameter dtype; None keeps the checkpoint's (the dtype of its first floating tensor).
    Raises ValueError listing every missing, unexpected and mis-shaped tensor.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path} is not a directory")
    config = config or LMConfig.from_hf(path)
    files = _tensor_files(path)
    shapes = _shapes(files)

    with torch.device("meta"):
        model = HybridLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # shares embed_tokens.weight; a stored copy is accepted and ignored

    mapping, unexpected, misshaped, present = {}, [], [], set()
    for hf_key, shape in shapes.items():
        ours = hf_to_internal(hf_key, config.model_type)
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if ours not in expected:
            unexpected.append(hf_key)
            continue
        present.add(ours)
        if shape != expected[ours]:
            misshaped.append(f"{hf_key} {list(shape)} (expected {list(expected[ours])})")
        else:
            mapping[hf_key] = ours
    missing = [internal_to_hf(k, config.model_type) for k in expected if k not in present]
    if missing or unexpected or misshaped:
        problems = [_listing(t, sorted(items)) for t, items in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
        raise ValueError(f"path: checkpoint at {path} does not fit a {config.model_type} model with this "
                         f"config.json:\n  " + "\n  ".join(problems))

    if dtype is None:
        with safe_open(files[next(iter(mapping))], framework="pt") as f:
            dtype = f.get_slice(next(iter(mapping))).get_dtype()
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(
            dtype, torch.float32)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty replaces each module's parameter separately; tie them again
        model.lm_head.weight = model.embed_tokens.weight
    params = model.state_dict()
    by_file: dict[str, list[str]] = {}
    for hf_key in mapping:
        by_file.setdefault(files[hf_key], []).append(hf_key)
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for hf_key in keys:
                    params[mapping[hf_key]].copy_(f.get_tensor(hf_key))
    return model.eval()


def _atomic_write(final_path: str, write) -> None:
    """Write through a temp file in the same directory, then rename: readers never see a half file."""
    directory = os.path.dirname(final_path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(final_path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, final_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_lm(model: HybridLM, path: Union[str, os.PathLike]) -> None:
    """Write config.json + model.safetensors in the HF layout of model.config.model_type (loadable by HF)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = model.config
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # HF re-ties it from the embedding
        tensors[internal_to_hf(key, config.model_type)] = tensor.detach().to("cpu").contiguous()
    hf_config = config.to_hf()
    hf_config["dtype"] = str(model.embed_tokens.weight.dtype).replace("torch.", "")
    _atomic_write(os.path.join(path, "model.safetensors"),
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(os.path.join(path, "config.json"),
                  lambda tmp: open(tmp, "w").write(json.dumps(hf_config, indent=2) + "\n"))
    stale_index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(stale_index):  # a sharded index left here would shadow the file just written
        os.unlink(stale_index)


__all__ = ["load_lm", "save_lm", "hf_to_internal", "internal_to_hf", "KEY_RULES"]
