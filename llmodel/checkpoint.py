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
from typing import Callable, Optional, Union

import torch
from torch import nn

from .config import LMConfig, _read_json_config
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
# mamba_ssm's own layout (state-spaces/mamba, Cobra): `backbone.embedding.` where HF says `backbone.embeddings.`.
KEY_RULES["mamba_ssm"] = [("backbone.embedding.", "embed_tokens.")] + KEY_RULES["mamba"][:1] + KEY_RULES["mamba"][2:]
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


def is_mamba_ssm_config(hf: dict) -> bool:
    """mamba_ssm's MambaConfig (d_model, n_layer, ssm_cfg, ...; no model_type), as Cobra and state-spaces ship."""
    return "model_type" not in hf and "d_model" in hf and "n_layer" in hf


def mamba_ssm_to_hf(hf: dict) -> dict:
    """mamba_ssm's MambaConfig -> the HF MambaConfig dict LMConfig.from_hf reads. The stored embedding and head
    have vocab_size rounded up to pad_vocab_size_multiple, so that is the model's vocab_size."""
    ssm = dict(hf.get("ssm_cfg") or {})
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ValueError(f"ssm_cfg.layer: got {ssm['layer']!r}; only Mamba1 mixers are supported")
    if not hf.get("rms_norm", True):
        raise ValueError("rms_norm: false (LayerNorm blocks) is not supported; this LM uses RMSNorm")
    if hf.get("d_intermediate", 0):
        raise ValueError(f"d_intermediate: got {hf['d_intermediate']}; MLP blocks between mixers are not supported")
    if hf.get("attn_layer_idx"):
        raise ValueError("attn_layer_idx: attention layers in a mamba_ssm model are not supported")
    vocab, multiple = hf["vocab_size"], hf.get("pad_vocab_size_multiple", 8)
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    dt_rank = ssm.get("dt_rank", "auto")
    return {"model_type": "mamba", "vocab_size": vocab, "hidden_size": hf["d_model"],
            "num_hidden_layers": hf["n_layer"],
            "state_size": ssm.get("d_state", 16), "conv_kernel": ssm.get("d_conv", 4), "expand": ssm.get("expand", 2),
            "time_step_rank": None if dt_rank == "auto" else dt_rank, "use_conv_bias": ssm.get("conv_bias", True),
            "use_bias": ssm.get("bias", False), "layer_norm_epsilon": hf.get("norm_epsilon", 1e-5),
            "tie_word_embeddings": hf.get("tie_embeddings", True)}


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


SKIP = object()  # what a key translator returns for a checkpoint tensor that is allowed but not loaded


def map_checkpoint_keys(path: str, what: str, shapes: dict[str, tuple], expected: dict[str, tuple],
                        to_ours: Callable[[str], object], to_theirs: Callable[[str], str],
                        stored_shape: Optional[Callable[[str], tuple]] = None) -> dict[str, str]:
    """Checkpoint key -> model key for every tensor to load; strict.

    to_ours maps a checkpoint key to a model key (SKIP: allowed, not loaded; anything not in `expected`:
    unexpected); to_theirs names a missing model key the way the checkpoint would. Raises ValueError
    listing every missing, unexpected and mis-shaped tensor of `what`.
    """
    mapping, unexpected, misshaped, present = {}, [], [], set()
    for key, shape in shapes.items():
        ours = to_ours(key)
        if ours is SKIP:
            continue
        if ours not in expected:
            unexpected.append(key)
            continue
        present.add(ours)
        want = stored_shape(ours) if stored_shape else expected[ours]
        if shape != want:
            misshaped.append(f"{key} {list(shape)} (expected {list(want)})")
        else:
            mapping[key] = ours
    missing = [to_theirs(k) for k in expected if k not in present]
    if missing or unexpected or misshaped:
        problems = [_listing(t, sorted(items)) for t, items in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
        raise ValueError(f"path: checkpoint at {path} does not fit {what}:\n  " + "\n  ".join(problems))
    return mapping


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def materialize(model: nn.Module, files: dict[str, str], mapping: dict[str, str], dtype: Optional[torch.dtype],
                device: Union[str, torch.device], retie: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """Allocate a meta-device model once and fill it shard by shard (peak memory ~ the model's size).

    dtype None keeps the checkpoint's (its first mapped tensor's). `retie` re-ties shared parameters,
    which to_empty replaces one module at a time."""
    from safetensors import safe_open

    if dtype is None:
        first = next(iter(mapping))
        with safe_open(files[first], framework="pt") as f:
            dtype = _SAFETENSORS_DTYPES.get(f.get_slice(first).get_dtype(), torch.float32)
    model = model.to(dtype=dtype).to_empty(device=device)
    if retie is not None:
        retie(model)
    params = model.state_dict()
    by_file: dict[str, list[str]] = {}
    for key in mapping:
        by_file.setdefault(files[key], []).append(key)
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    target = params[mapping[key]]
                    target.copy_(f.get_tensor(key).reshape(target.shape))
    return model.eval()



def load_lm(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
            device: Union[str, torch.device] = "cpu", config: Optional[LMConfig] = None) -> HybridLM:
    """Load a HybridLM from an HF model directory (config.json + safetensors, single file or sharded).

    dtype: parameter dtype; None keeps the checkpoint's (the dtype of its first floating tensor).
    Raises ValueError listing every missing, unexpected and mis-shaped tensor.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path} is not a directory")
    layout = None
    if config is None:
        hf = _read_json_config(path)
        layout = "mamba_ssm" if is_mamba_ssm_config(hf) else None
        config = LMConfig.from_hf(mamba_ssm_to_hf(hf) if layout else hf)
    layout = layout or config.model_type
    files = _tensor_files(path)

    with torch.device("meta"):
        model = HybridLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")  # shares embed_tokens.weight; a stored copy is accepted and ignored

    def to_ours(hf_key):
        ours = hf_to_internal(hf_key, layout)
        return SKIP if tied and ours == "lm_head.weight" else ours

    mapping = map_checkpoint_keys(path, f"a {config.model_type} model with this config.json", _shapes(files),
                                  expected, to_ours, lambda k: internal_to_hf(k, layout))
    return materialize(model, files, mapping, dtype, device,
                       retie=(lambda m: setattr(m.lm_head, "weight", m.embed_tokens.weight)) if tied else None)


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


__all__ = ["load_lm", "save_lm", "hf_to_internal", "internal_to_hf", "KEY_RULES", "is_mamba_ssm_config",
           "mamba_ssm_to_hf"]
