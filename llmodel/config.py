"""One dataclass tree for the language model, and its translation from/to Hugging Face config.json.

`LMConfig` describes every decoder this package runs: Jamba (Mamba + attention layers, MLP + MoE FFNs),
pure Mamba (no FFN), and Qwen2/Llama (attention + MLP). The layer pattern follows HF's JambaConfig
exactly: layer i is attention when `i % attn_layer_period == attn_layer_offset`, and its FFN is a
mixture of experts when `i % expert_layer_period == expert_layer_offset` *and* num_experts > 1 (Jamba
builds a plain MLP where the expert count is 1 — that is how LongLLaVA-9B has no MoE at all).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

MODEL_TYPES = ("jamba", "mamba", "qwen2", "llama")
ARCHITECTURES = {"jamba": "JambaForCausalLM", "mamba": "MambaForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass
class MambaConfig:
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Optional[int] = None          # None: ceil(hidden_size / 16), as HF's "auto"
    conv_bias: bool = True
    proj_bias: bool = False                # bias of in_proj and out_proj
    inner_layernorms: bool = True          # Jamba's RMSNorm on dt, B, C; False for plain Mamba
    # Initialisation only (training from scratch; loaded weights replace it): dt starts log-uniform in
    # [dt_min, dt_max], at least dt_init_floor — Mamba's defaults (HF Mamba: time_step_min/max/floor).
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4


@dataclass
class MoEConfig:
    num_experts: int = 1
    top_k: int = 2
    renormalize: bool = False              # Jamba keeps the top-k softmax weights unnormalized


@dataclass
class LMConfig:
    model_type: str = "jamba"              # which HF layout checkpoints use: jamba | mamba | qwen2 | llama
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: Optional[int] = None         # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # Layer pattern (HF JambaConfig semantics). attn_layer_period=None means no attention layer at all.
    attn_layer_period: Optional[int] = 8
    attn_layer_offset: int = 4
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    use_ffn: bool = True                   # False for pure Mamba, whose blocks are mixer-only
    # Attention
    attention_bias: bool = False           # q/k/v bias (Qwen2: True; Llama: attention_bias)
    attention_out_bias: bool = False       # o_proj bias (Llama's attention_bias covers it too)
    mlp_bias: bool = False
    rope_theta: Optional[float] = None     # None: no positional encoding (Jamba)
    rope_scaling_factor: float = 1.0       # linear RoPE scaling: positions divided by this factor
    max_position_embeddings: int = 262144
    mamba: MambaConfig = field(default_factory=MambaConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 1
    eos_token_id: Union[int, list, None] = 2

    def __post_init__(self):
        if isinstance(self.mamba, dict):
            self.mamba = MambaConfig(**self.mamba)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type: got {self.model_type!r}, expected one of {MODEL_TYPES}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.mamba.dt_rank is None:
            self.mamba.dt_rank = math.ceil(self.hidden_size / 16)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.attn_layer_period is not None and not 0 <= self.attn_layer_offset < self.attn_layer_period:
            raise ValueError(f"attn_layer_offset: got {self.attn_layer_offset}, expected in "
                             f"[0, attn_layer_period={self.attn_layer_period})")
        if not 0 <= self.expert_layer_offset < self.expert_layer_period:
            raise ValueError(f"expert_layer_offset: got {self.expert_layer_offset}, expected in "
                             f"[0, expert_layer_period={self.expert_layer_period})")
        if self.moe.num_experts > 1 and not 1 <= self.moe.top_k <= self.moe.num_experts:
            raise ValueError(f"moe.top_k: got {self.moe.top_k}, expected 1..{self.moe.num_experts}")

    # ---- derived shape facts (used by lm.py, cache.py and the planner) ----
    @property
    def layer_mixers(self) -> list[str]:
        """Per layer: "mamba" or "attention"."""
        if self.attn_layer_period is None:
            return ["mamba"] * self.num_layers
        return ["attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"
                for i in range(self.num_layers)]

    @property
    def layer_ffns(self) -> list[str]:
        """Per layer: "moe", "mlp" or "none"."""
        if not self.use_ffn:
            return ["none"] * self.num_layers
        return ["moe" if self.moe.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset
                else "mlp" for i in range(self.num_layers)]

    @property
    def d_inner(self) -> int:
        return self.mamba.expand * self.hidden_size

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LMConfig.from_dict: unknown keys {unknown}")
        return cls(**d)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, path_or_dict: Union[str, os.PathLike, dict]) -> "LMConfig":
        """Build from an HF config (a dict, a config.json path, or a model directory holding one)."""
        hf = _read_json_config(path_or_dict)
        model_type = hf.get("model_type")
        if model_type == "jamba":
            return _from_jamba(hf)
        if model_type == "mamba":
            return _from_mamba(hf)
        if model_type in ("qwen2", "llama"):
            return _from_dense(hf, model_type)
        raise ValueError(f"path_or_dict: model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}")

    def to_hf(self) -> dict:
        """The config.json dict HF's matching *ForCausalLM class loads."""
        base = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "tie_word_embeddings": self.tie_word_embeddings, "pad_token_id": self.pad_token_id,
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "hidden_act": "silu"}
        m = self.mamba
        if self.model_type == "mamba":
            return {**base, "state_size": m.d_state, "expand": m.expand, "conv_kernel": m.d_conv,
                    "time_step_rank": m.dt_rank, "use_bias": m.proj_bias, "use_conv_bias": m.conv_bias,
                    "time_step_min": m.dt_min, "time_step_max": m.dt_max, "time_step_floor": m.dt_init_floor,
                    "layer_norm_epsilon": self.rms_norm_eps, "intermediate_size": self.d_inner}
        base.update({"intermediate_size": self.intermediate_size, "num_attention_heads": self.num_heads,
                     "num_key_value_heads": self.num_kv_heads, "rms_norm_eps": self.rms_norm_eps,
                     "max_position_embeddings": self.max_position_embeddings})
        if self.model_type == "jamba":
            return {**base, "attn_layer_period": self.attn_layer_period, "attn_layer_offset": self.attn_layer_offset,
                    "expert_layer_period": self.expert_layer_period, "expert_layer_offset": self.expert_layer_offset,
                    "num_experts": self.moe.num_experts, "num_experts_per_tok": self.moe.top_k,
                    "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand,
                    "mamba_dt_rank": m.dt_rank, "mamba_conv_bias": m.conv_bias, "mamba_proj_bias": m.proj_bias,
                    # the dt initialisation range (HF's Jamba ignores these keys; our save/reload keeps them)
                    "mamba_dt_min": m.dt_min, "mamba_dt_max": m.dt_max, "mamba_dt_init_floor": m.dt_init_floor,
                    # HF's Jamba derives hidden_size // num_attention_heads; ours may differ, so it is kept
                    "head_dim": self.head_dim,
                    # Jamba has no positional encoding; a RoPE variant keeps its theta (HF's Jamba ignores it)
                    **({"rope_theta": self.rope_theta} if self.rope_theta is not None else {})}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor != 1.0:
            rope = {"rope_type": "linear", "rope_theta": self.rope_theta, "factor": self.rope_scaling_factor}
        base.update({"head_dim": self.head_dim, "rope_parameters": rope, "rope_theta": self.rope_theta})
        if self.model_type == "llama":
            base.update({"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias})
        return base


def _read_json_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path_or_dict: no config.json at {path}")
    with open(path) as f:
        return json.load(f)


def _token_ids(hf: dict, pad, bos, eos) -> dict:
    return {"pad_token_id": hf.get("pad_token_id", pad), "bos_token_id": hf.get("bos_token_id", bos),
            "eos_token_id": hf.get("eos_token_id", eos)}


def _dt_rank(value, hidden_size):
    return math.ceil(hidden_size / 16) if value in (None, "auto") else int(value)


def _from_jamba(hf: dict) -> LMConfig:
    hidden, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    mamba = MambaConfig(d_state=hf.get("mamba_d_state", 16), d_conv=hf.get("mamba_d_conv", 4),
                        expand=hf.get("mamba_expand", 2), dt_rank=_dt_rank(hf.get("mamba_dt_rank"), hidden),
                        conv_bias=hf.get("mamba_conv_bias", True), proj_bias=hf.get("mamba_proj_bias", False),
                        inner_layernorms=True, dt_min=hf.get("mamba_dt_min", 0.001), dt_max=hf.get("mamba_dt_max", 0.1),
                        dt_init_floor=hf.get("mamba_dt_init_floor", 1e-4))
    moe = MoEConfig(num_experts=hf.get("num_experts", hf.get("num_local_experts", 16)),
                    top_k=hf.get("num_experts_per_tok", 2), renormalize=False)
    return LMConfig(model_type="jamba", vocab_size=hf.get("vocab_size", 65536), hidden_size=hidden,
                    intermediate_size=hf.get("intermediate_size", 14336),
                    num_layers=hf.get("num_hidden_layers", 32), num_heads=heads,
                    num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
                    rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", False),
                    attn_layer_period=hf.get("attn_layer_period", 8), attn_layer_offset=hf.get("attn_layer_offset", 4),
                    expert_layer_period=hf.get("expert_layer_period", 2),
                    expert_layer_offset=hf.get("expert_layer_offset", 1),
                    rope_theta=hf.get("rope_theta"), max_position_embeddings=hf.get("max_position_embeddings", 262144),
                    mamba=mamba, moe=moe, **_token_ids(hf, 0, 1, 2))


def _from_mamba(hf: dict) -> LMConfig:
    hidden = hf.get("hidden_size", 768)
    mamba = MambaConfig(d_state=hf.get("state_size", 16), d_conv=hf.get("conv_kernel", 4), expand=hf.get("expand", 2),
                        dt_rank=_dt_rank(hf.get("time_step_rank"), hidden), conv_bias=hf.get("use_conv_bias", True),
                        proj_bias=hf.get("use_bias", False), inner_layernorms=False,
                        dt_min=hf.get("time_step_min", 0.001), dt_max=hf.get("time_step_max", 0.1),
                        dt_init_floor=hf.get("time_step_floor", 1e-4))
    return LMConfig(model_type="mamba", vocab_size=hf.get("vocab_size", 50280), hidden_size=hidden,
                    intermediate_size=0, num_layers=hf.get("num_hidden_layers", 32), num_heads=1, num_kv_heads=1,
                    rms_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                    tie_word_embeddings=hf.get("tie_word_embeddings", True), attn_layer_period=None,
                    attn_layer_offset=0, use_ffn=False, mamba=mamba, **_token_ids(hf, 0, 0, 0))


def _rope(hf: dict) -> tuple[float, float]:
    """(theta, linear factor) from either v5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor", scaling.get("factor", 1.0))
    if kind not in ("default", "linear"):
        raise ValueError(f"rope scaling type {kind!r} is not supported; only 'default' and 'linear'")
    return float(theta), float(factor) if kind == "linear" else 1.0


def _from_dense(hf: dict, model_type: str) -> LMConfig:
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("path_or_dict: Qwen2 with use_sliding_window=True is not supported")
    hidden, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    theta, factor = _rope(hf)
    llama_bias = hf.get("attention_bias", False)
    return LMConfig(model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hidden,
                    intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
                    num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
                    rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", False),
                    attn_layer_period=1, attn_layer_offset=0,
                    attention_bias=True if model_type == "qwen2" else llama_bias,
                    attention_out_bias=False if model_type == "qwen2" else llama_bias,
                    mlp_bias=hf.get("mlp_bias", False), rope_theta=theta, rope_scaling_factor=factor,
                    max_position_embeddings=hf.get("max_position_embeddings", 32768),
                    **_token_ids(hf, None, None, None))


def _longllava(num_experts: int, top_k: int) -> LMConfig:
    return LMConfig(model_type="jamba", vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_layers=32,
                    num_heads=32, num_kv_heads=8, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
                    expert_layer_offset=1, rope_theta=None,
                    mamba=MambaConfig(d_state=16, d_conv=4, expand=2, dt_rank=256),
                    moe=MoEConfig(num_experts=num_experts, top_k=top_k))


NAMED_CONFIGS = {
    # LongLLaVA-9B: Jamba shape with a single expert, so every FFN is a dense MLP.
    "longllava-9b": lambda: _longllava(num_experts=1, top_k=1),
    # LongLLaVA-A13B: the same with 16 experts, top-2, on every other layer.
    "longllava-a13b": lambda: _longllava(num_experts=16, top_k=2),
}


def named_config(name: str) -> LMConfig:
    if name not in NAMED_CONFIGS:
        raise ValueError(f"name: unknown config {name!r}; known: {sorted(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name]()


__all__ = ["LMConfig", "MambaConfig", "MoEConfig", "NAMED_CONFIGS", "named_config"]
