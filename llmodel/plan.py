"""Memory and FLOP planner: what a config costs for a prefill of T tokens and the decode after it.

Everything is counted from the config's shapes, layer by layer (layer i's mixer and FFN come from
`LMConfig.layer_mixers` / `layer_ffns`, i.e. HF Jamba's attn/expert period and offset). Symbols:
H hidden, F FFN width, V vocab, L layers, nh / nkv heads / KV heads, hd head_dim, Di = expand*H,
N d_state, R dt_rank, K d_conv, E experts, k top-k, T prompt tokens, c chunk, B batch,
a activation bytes (2 for bf16/fp16 and for int8 weights, whose compute dtype is 16-bit; 4 for fp32).

Weights (`weights=`): bf16/fp16 2 bytes and fp32 4 bytes for every tensor. int8 follows how the
LongLLaVA paper measured (its repo's benchmarks/Efficiency/evaluate.py loads the model through HF with
`BitsAndBytesConfig(load_in_8bit=True)` and no skip list): every nn.Linear weight -> 1 byte per element
plus one float32 scale per output row (LLM.int8's row-wise absmax); lm_head is kept 16-bit (transformers
never converts the output head); embeddings, norms, conv1d, A_log, D and biases stay 16-bit.
`int8_skip_mamba=True` keeps the Mamba projections 16-bit too (the Jamba model card's advice).
MoE: every expert is resident, so weight bytes count all E experts; "active" counts k of them.

Memory model of a forward pass (inference, no autograd), bytes per token times the tokens in flight:
- KV cache: per attention layer 2 * nkv * hd * T * B * a.
- Mamba state per Mamba layer (constant in T): conv B * Di * (K-1) * a + SSM B * Di * N * 4 (float32),
  the shapes `HybridCache` allocates.
- Activation peak = B * n * (residual H*a + the widest block's live set) + last-position logits B*V*4,
  with n = T one-shot or n = c chunked. The residual is the layer input held for the skip connection;
  each block also holds its normed input (H) while it runs. Live sets at each block's widest point:
    mamba (at the scan): xz 2Di + conv out Di + x_proj out (R+2N) [+ normed dt,B,C (R+2N)] + dt Di
                         + y Di, all times a, plus the normed input H*a;
    attention (in flash attention): normed input H + q nh*hd + k, v 2*nkv*hd + out nh*hd, times a;
      no T x T scores (flash); `attention="eager"` adds scores and probabilities 2 * nh * n * T_kv * a;
    mlp (at the product): normed input H + act(gate) F + up F + product F, times a;
    moe (token-grouped, experts one after another): normed input H + accumulator H + router logits E,
      times a, + softmax probs E*4 + top-k weights/ids k*12, + the current expert's k/E share of
      tokens (balanced routing) holding gathered input H, 3F intermediates and output H, times a.
  The Mamba scan is fused: no (T, Di, N) tensor (an unfused scan would add T*Di*N*4 bytes).
  Chunked prefill holds the same live set for c tokens, so it is bounded independent of T.
- Input buffer: multimodal prompts arrive as inputs_embeds (T x H x a), which exist whole before the
  LM runs, chunked or not; counted when `inputs_embeds=True` (the CLI sets it with --images).
- Vision (multimodal configs only: a MultimodalConfig or a name in llmodel.multimodal's
  NAMED_MULTIMODAL_CONFIGS, e.g. longllava-9b = CLIP ViT-L/14-336 + mlp2x_gelu 1024 -> 4096 -> 4096):
  weights: every tensor of the tower(s) as built (all D-layers, final norm included, even though only
  the layers up to feature_layer run) and of the projector. Under int8 they follow the LM's rule, since
  the paper's load_in_8bit has no skip list: the tower's and projector's nn.Linear weights (q/k/v/o,
  fc1/fc2, projector layers) -> 1 byte + a float32 scale per row; patch conv, class/position
  embeddings, LayerNorms and biases stay 16-bit. (Loaded apart from the LM, a tower would stay 16-bit.)
  Activation peak while encoding: images go through the tower `image_batch` at a time, one layer in
  flight: image_batch * S * (residual D + max(attention D + 4D, mlp D + 2I)) * a with S = 577 tokens
  (576 patches + class) for CLIP-336, then the projector over the pooled tokens
  image_batch * P * (D + 2 * H_lm) * a. HF's CLIPVisionModel called with output_hidden_states=True (as
  LLaVA towers are) would also hold every layer's hidden states, (layers+1) * S * D * a per image.
  Encoding finishes before the LM prefill starts, so the plan's activation term is max(LM, vision); the
  inputs_embeds buffer is live through both.
- Not counted: CUDA context (~0.5-1 GB), the caching allocator's reserve/fragmentation, kernel
  workspaces, library temporaries (e.g. LLM.int8's int32 outputs).

FLOPs of prefill (multiply-add = 2):
  2 * B * T * (active matmul parameters: every Linear, MoE counting k of E experts)
  + per attention layer 4 * B * nh * hd * T(T+1)/2        (QK^T and PV, causal half)
  + per Mamba layer B * T * Di * (9N + 2K + 5)            (scan ~9/state element, conv, D skip and gate)
  + the lm_head at the last position 2 * B * H * V.
Vision FLOPs per image (multimodal): 2 * S * (Linear parameters of the layers that run) + the patch conv
  2 * patches * (C * p * p * D) + per layer run 4 * S^2 * D (QK^T and PV, bidirectional) + the projector
  2 * P * (its Linear parameters) over the P pooled tokens; times the number of images when known.
Decode bytes per step (memory traffic, what bounds decode speed): weights read once per step
(embedding rows B*H*a, all non-expert weights, lm_head, and per MoE layer the expected distinct experts
E * (1 - (1 - k/E)^B), k for B=1) + KV cache read at length T + Mamba states read and written.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Optional, Union

from .config import LMConfig, NAMED_CONFIGS, named_config

WEIGHT_DTYPES = {"int8": 2, "bf16": 2, "fp16": 2, "fp32": 4}   # -> activation / 16-bit-kept bytes
DEFAULT_CHUNK = 4096
GB, GIB = 1e9, 2 ** 30

# Measured peak memory at a 100K-token prompt, int8 weights (LongLLaVA paper, arXiv 2409.02889).
# Their script prints torch.cuda.max_memory_allocated / 1024**2 (MiB), so "GB" is read as GiB here.
PAPER_MEMORY_GIB = {"longllava-9b": 38.7, "longllava-a13b": 79.1}
PAPER_TOKENS = 100_000
PAPER_EXPLANATION = (
    "the paper's script (LongLLaVA repo, benchmarks/Efficiency/evaluate.py) measures HF transformers + "
    "bitsandbytes LLM.int8 over a one-shot prefill with torch.cuda.max_memory_allocated; LLM.int8 matmuls "
    "hold int32 outputs (4 B/elem) plus int8 copies of their inputs, and HF's layers keep more temporaries "
    "than this plan's minimal live sets; CUDA context is in neither number; the vision tower is planned as this plan's minimal live set.")


@dataclass
class Weight:
    """One parameter tensor (or a group of E identical expert tensors)."""
    part: str        # embedding | lm_head | norm | attention | mamba | mlp | moe
    numel: int
    rows: int = 0    # output rows of a Linear weight (one int8 scale each); 0 for non-Linear tensors
    experts: int = 0  # >0: an expert tensor group of this many experts (numel covers all of them)


def resolve_multimodal(config):
    """The MultimodalConfig `config` names or is, else None (an LM-only config: no vision lines)."""
    if hasattr(config, "vision") and hasattr(config, "lm"):
        return config
    if isinstance(config, str) and config in NAMED_CONFIGS:
        from .multimodal import NAMED_MULTIMODAL_CONFIGS, named_multimodal_config
        return named_multimodal_config(config) if config in NAMED_MULTIMODAL_CONFIGS else None
    return None


def resolve_config(config: Union[LMConfig, str, os.PathLike, dict]) -> LMConfig:
    """An LMConfig, a named config ('longllava-9b'), an HF config dict, config.json or model dir
    (or a MultimodalConfig: its LM)."""
    if hasattr(config, "vision") and hasattr(config, "lm"):
        return config.lm
    if isinstance(config, LMConfig):
        return config
    if isinstance(config, str) and config in NAMED_CONFIGS:
        return named_config(config)
    if isinstance(config, (str, os.PathLike)) and not os.path.exists(config):
        raise ValueError(f"config: {config!r} is neither a named config {sorted(NAMED_CONFIGS)} "
                         f"nor an HF config.json / model directory")
    return LMConfig.from_hf(config)


def _linear(part: str, fan_in: int, fan_out: int, bias: bool) -> list[Weight]:
    out = [Weight(part, fan_in * fan_out, rows=fan_out)]
    return out + [Weight(part, fan_out)] if bias else out


def layer_weights(cfg: LMConfig, i: int) -> list[Weight]:
    """The parameter tensors of decoder layer i, in the shapes HF's Jamba/Mamba/Llama/Qwen2 modules use."""
    H, F, m = cfg.hidden_size, cfg.intermediate_size, cfg.mamba
    Di, R, N = cfg.d_inner, m.dt_rank, m.d_state
    mixer, ffn = cfg.layer_mixers[i], cfg.layer_ffns[i]
    w = [Weight("norm", H)] + ([Weight("norm", H)] if ffn != "none" else [])  # pre-mixer, pre-FFN norms
    if mixer == "mamba":
        w += _linear("mamba", H, 2 * Di, m.proj_bias)                          # in_proj -> x, z
        w += [Weight("mamba", Di * m.d_conv)] + ([Weight("mamba", Di)] if m.conv_bias else [])  # depthwise conv
        w += _linear("mamba", Di, R + 2 * N, False)                            # x_proj -> dt, B, C
        w += _linear("mamba", R, Di, True)                                     # dt_proj (+ dt bias)
        w += [Weight("mamba", Di * N), Weight("mamba", Di)]                    # A_log, D
        w += _linear("mamba", Di, H, m.proj_bias)                              # out_proj
        if m.inner_layernorms:
            w += [Weight("norm", R), Weight("norm", N), Weight("norm", N)]     # Jamba's dt/B/C RMSNorms
    else:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        w += _linear("attention", H, q, cfg.attention_bias) + _linear("attention", H, kv, cfg.attention_bias)
        w += _linear("attention", H, kv, cfg.attention_bias) + _linear("attention", q, H, cfg.attention_out_bias)
    if ffn == "mlp":
        for fan_in, fan_out in ((H, F), (H, F), (F, H)):                       # gate, up, down
            w += _linear("mlp", fan_in, fan_out, cfg.mlp_bias)
    elif ffn == "moe":
        E = cfg.moe.num_experts
        w += [Weight("moe", E * H, rows=E)]                                    # router (Linear, no bias)
        w += [Weight("moe", E * 3 * H * F, rows=E * (2 * F + H), experts=E)]   # gate, up, down per expert
    return w


def model_weights(cfg: LMConfig) -> list[Weight]:
    """All tensors: embedding, every layer, final norm, lm_head unless tied to the embedding."""
    w = [Weight("embedding", cfg.vocab_size * cfg.hidden_size)]
    for i in range(cfg.num_layers):
        w += layer_weights(cfg, i)
    w.append(Weight("norm", cfg.hidden_size))
    if not cfg.tie_word_embeddings:
        w.append(Weight("lm_head", cfg.vocab_size * cfg.hidden_size, rows=cfg.vocab_size))
    return w


def vision_tower_weights(vc, part: str = "vision") -> list[Weight]:
    """The tensors of llmodel.vision.VisionTower(vc), all layers as built."""
    D, C, p = vc.hidden_size, vc.num_channels, vc.patch_size
    w = [Weight(part, C * p * p * D)] + ([Weight(part, D)] if vc.patch_bias else [])   # patch conv (not Linear)
    w += [Weight(part, D)] if vc.class_token else []
    w += [Weight(part, vc.num_register_tokens * D)] if vc.num_register_tokens else []
    w += [Weight(part, (int(vc.class_token) + vc.grid ** 2) * D)]                    # position embedding
    w += [Weight(part, 2 * D)] if vc.pre_norm else []
    w += vision_layer_weights(vc, part) * vc.num_layers
    return w + [Weight(part, 2 * D)]                                                  # final LayerNorm


def vision_layer_weights(vc, part: str = "vision") -> list[Weight]:
    D, h = vc.hidden_size, vc.ffn_size
    w = [Weight(part, 2 * D)]                                                         # norm1 (weight, bias)
    for bias in (vc.qkv_bias, vc.qkv_bias, vc.qkv_bias, True):                        # q, k, v, o
        w += _linear(part, D, D, bias)
    w += [Weight(part, 2 * D)]                                                        # norm2
    w += _linear(part, D, 2 * h, True) + _linear(part, h, D, True) if vc.swiglu else \
        _linear(part, D, h, True) + _linear(part, h, D, True)
    return w + ([Weight(part, D), Weight(part, D)] if vc.layer_scale else [])


def projector_weights(mm) -> list[Weight]:
    d_in, d_lm = mm.vision_width, mm.lm.hidden_size
    dims = [(d_in, d_lm), (d_lm, d_lm)] if mm.projector == "mlp2x_gelu" else \
        [(d_in, 4 * d_in), (4 * d_in, d_lm), (d_lm, d_lm)]
    return [t for fi, fo in dims for t in _linear("projector", fi, fo, True)]


def vision_weights(mm) -> list[Weight]:
    """Tower(s) + projector of a MultimodalConfig, as llmodel.multimodal.LongLLaVA builds them."""
    w = vision_tower_weights(mm.vision)
    if mm.second_vision is not None:
        w += vision_tower_weights(mm.second_vision)
    return w + projector_weights(mm)


def vision_parameter_count(config) -> int:
    """Parameters of the vision tower(s) + projector (0 for an LM-only config)."""
    mm = resolve_multimodal(config)
    return sum(w.numel for w in vision_weights(mm)) if mm is not None else 0


def _tower_tokens(vc) -> int:
    return vc.num_prefix_tokens + vc.num_patches()


def vision_flops_per_image(mm) -> int:
    """See the module docstring: Linear matmuls of the layers that run, patch conv, attention, projector."""
    total = 0
    for vc in (mm.vision, mm.second_vision):
        if vc is None:
            continue
        S, D, depth = _tower_tokens(vc), vc.hidden_size, vc.layer_index(vc.feature_layer)
        layer_linear = sum(w.numel for w in vision_layer_weights(vc) if w.rows)
        total += 2 * S * depth * layer_linear + 2 * vc.num_patches() * vc.num_channels * vc.patch_size ** 2 * D
        total += depth * 4 * S * S * D
    P = mm.tokens_per_image()
    return total + 2 * P * sum(w.numel for w in projector_weights(mm) if w.rows)


def vision_activation_peak(mm, image_batch: int, a: int) -> int:
    """Bytes live while encoding `image_batch` images (module docstring): one tower layer in flight, then the
    projector over the pooled tokens; the larger of the two (towers run one after another)."""
    peak = 0
    for vc in (mm.vision, mm.second_vision):
        if vc is None:
            continue
        D, I = vc.hidden_size, vc.ffn_size
        per_token = D + max(D + 4 * D, D + (3 if vc.swiglu else 2) * I)
        peak = max(peak, image_batch * _tower_tokens(vc) * per_token * a)
    proj = image_batch * mm.tokens_per_image() * (mm.vision_width + 2 * mm.lm.hidden_size) * a
    return int(max(peak, proj))


def weight_bytes(w: Weight, weights: str, int8_skip_mamba: bool = False) -> int:
    """int8: Linear weights (rows > 0) except lm_head -> numel + 4*rows; all else 16-bit. See module doc."""
    if weights == "int8" and w.rows and w.part != "lm_head" and not (int8_skip_mamba and w.part == "mamba"):
        return w.numel + 4 * w.rows
    return w.numel * WEIGHT_DTYPES[weights]


def parameter_count(config) -> int:
    """Total parameters (all experts), equal to sum(p.numel()) of the built model."""
    return sum(w.numel for w in model_weights(resolve_config(config)))


def _active_fraction(cfg: LMConfig, w: Weight) -> float:
    return cfg.moe.top_k / w.experts if w.experts else 1.0


def activation_bytes_per_token(cfg: LMConfig, a: int) -> dict:
    """Live bytes per token at each block kind's widest point (see the module docstring), excluding the
    residual H*a that is added on top."""
    H, F, m = cfg.hidden_size, cfg.intermediate_size, cfg.mamba
    Di, R, N = cfg.d_inner, m.dt_rank, m.d_state
    kinds = (set(cfg.layer_mixers) | set(cfg.layer_ffns)) - {"none"}
    out = {}
    if "mamba" in kinds:
        out["mamba scan"] = a * (H + 2 * Di + Di + (R + 2 * N) * (2 if m.inner_layernorms else 1) + Di + Di)
    if "attention" in kinds:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        out["attention"] = a * (H + 2 * q + 2 * kv)
    if "mlp" in kinds:
        out["mlp product"] = a * (H + 3 * F)
    if "moe" in kinds:
        E, k = cfg.moe.num_experts, cfg.moe.top_k
        out["moe expert"] = a * (2 * H + E) + 4 * E + 12 * k + a * (k / E) * (2 * H + 3 * F)
    return out


def activation_peak(cfg: LMConfig, tokens_in_flight: int, kv_len: int, a: int, batch: int = 1,
                    attention: str = "flash") -> tuple[int, str]:
    """(peak bytes, dominating block) for one forward over `tokens_in_flight` tokens whose attention
    sees `kv_len` keys: B*n*(H*a + max block live set) + B*V*4 last-position logits (+ eager scores)."""
    per_token = activation_bytes_per_token(cfg, a)
    if attention == "eager" and "attention" in per_token:
        per_token["attention"] += 2 * cfg.num_heads * kv_len * a
    name = max(per_token, key=per_token.get)
    peak = batch * tokens_in_flight * (cfg.hidden_size * a + per_token[name]) + batch * cfg.vocab_size * 4
    return int(peak), name


def plan(config, tokens: int, weights: str = "bf16", chunk: Optional[int] = None, batch: int = 1,
         inputs_embeds: bool = False, int8_skip_mamba: bool = False, attention: str = "flash",
         gpu_gb: float = 80.0, images: Optional[int] = None, image_batch: int = 1) -> dict:
    """Plan memory, FLOPs and decode traffic for a prefill of `tokens` tokens (per row) at `batch` rows.

    Returns a dict of plain numbers (bytes, FLOPs, counts); every formula is in the module docstring.
    `chunk=None` plans one-shot prefill as the total and still reports the chunked peak at DEFAULT_CHUNK.
    Multimodal configs add the vision tower(s) + projector (`vision_*` keys; 0 / None for LM-only ones):
    `images` (None: unknown) scales the vision FLOPs, `image_batch` images are encoded at a time.
    """
    mm = resolve_multimodal(config)
    cfg = resolve_config(config)
    if image_batch < 1 or (images is not None and images < 0):
        raise ValueError(f"image_batch must be >= 1 and images >= 0; got {image_batch}, {images}")
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"weights: got {weights!r}, expected one of {sorted(WEIGHT_DTYPES)}")
    if tokens < 1 or batch < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"tokens, batch, chunk must be >= 1; got {tokens}, {batch}, {chunk}")
    a = WEIGHT_DTYPES[weights]
    T, B, c = tokens, batch, min(chunk or DEFAULT_CHUNK, tokens)
    H, V, m = cfg.hidden_size, cfg.vocab_size, cfg.mamba
    Di, N, K = cfg.d_inner, m.d_state, m.d_conv
    mixers = cfg.layer_mixers
    n_attn, n_mamba = mixers.count("attention"), mixers.count("mamba")
    E, k = cfg.moe.num_experts, cfg.moe.top_k

    ws = model_weights(cfg)
    params_by_part, bytes_by_part = {}, {}
    for w in ws:
        params_by_part[w.part] = params_by_part.get(w.part, 0) + w.numel
        bytes_by_part[w.part] = bytes_by_part.get(w.part, 0) + weight_bytes(w, weights, int8_skip_mamba)
    params_total = sum(params_by_part.values())
    params_active = int(sum(w.numel * _active_fraction(cfg, w) for w in ws))
    # Linear weights inside the layers (embedding is a lookup; lm_head runs at the last position only).
    matmul_active = int(sum(w.numel * _active_fraction(cfg, w) for w in ws
                            if w.rows and w.part not in ("embedding", "lm_head")))
    weight_total = sum(bytes_by_part.values())

    kv_bytes = n_attn * 2 * cfg.num_kv_heads * cfg.head_dim * T * B * a
    conv_state = n_mamba * B * Di * (K - 1) * a
    ssm_state = n_mamba * B * Di * N * 4
    state_bytes = conv_state + ssm_state
    embeds_bytes = B * T * H * a if inputs_embeds else 0

    one_shot, one_shot_block = activation_peak(cfg, T, T, a, B, attention)
    chunked, chunked_block = activation_peak(cfg, c, T, a, B, attention)

    flops_linear = 2 * B * T * matmul_active
    flops_attention = n_attn * 4 * B * cfg.num_heads * cfg.head_dim * T * (T + 1) // 2
    flops_scan = n_mamba * B * T * Di * (9 * N + 2 * K + 5)
    flops_head = 2 * B * H * V
    prefill_flops = flops_linear + flops_attention + flops_scan + flops_head

    # Decode: every weight read once per step; MoE layers read the experts the batch's tokens pick.
    expected_experts = E * (1 - (1 - k / E) ** B) if E > 1 else 1
    decode_weights = 0
    for w in ws:
        full = weight_bytes(w, weights, int8_skip_mamba)
        if w.part == "embedding":
            decode_weights += B * H * a
        elif w.experts:
            decode_weights += full * expected_experts / w.experts
        else:
            decode_weights += full
    decode_bytes = int(decode_weights) + kv_bytes + 2 * state_bytes

    vws = vision_weights(mm) if mm is not None else []
    vision_params = sum(w.numel for w in vws)
    vision_bytes = sum(weight_bytes(w, weights) for w in vws)
    vision_bytes_by_part = {}
    for w in vws:
        vision_bytes_by_part[w.part] = vision_bytes_by_part.get(w.part, 0) + weight_bytes(w, weights)
    ib = min(image_batch, images) if images else image_batch
    vision_act = vision_activation_peak(mm, ib, a) if mm is not None else 0
    vision_flops_image = vision_flops_per_image(mm) if mm is not None else 0
    vision_flops = vision_flops_image * images if (mm is not None and images is not None) else None

    fixed = weight_total + vision_bytes + kv_bytes + state_bytes + embeds_bytes
    total_one_shot, total_chunked = fixed + max(one_shot, vision_act), fixed + max(chunked, vision_act)
    total = total_chunked if chunk else total_one_shot
    return {
        "config": cfg, "tokens": T, "batch": B, "weights": weights, "chunk": c, "chunk_given": chunk is not None,
        "attention": attention, "int8_skip_mamba": int8_skip_mamba, "gpu_gb": gpu_gb,
        "layers": {"attention": n_attn, "mamba": n_mamba, "mlp": cfg.layer_ffns.count("mlp"),
                   "moe": cfg.layer_ffns.count("moe")},
        "params_total": params_total, "params_active": params_active, "params_by_part": params_by_part,
        "weight_bytes": weight_total, "weight_bytes_by_part": bytes_by_part,
        "kv_cache_bytes": kv_bytes, "mamba_conv_state_bytes": conv_state, "mamba_ssm_state_bytes": ssm_state,
        "mamba_state_bytes": state_bytes, "inputs_embeds_bytes": embeds_bytes,
        "activation_one_shot_bytes": one_shot, "activation_one_shot_block": one_shot_block,
        "activation_chunked_bytes": chunked, "activation_chunked_block": chunked_block,
        "total_one_shot_bytes": total_one_shot, "total_chunked_bytes": total_chunked, "total_bytes": total,
        "fits_one_shot": total_one_shot <= gpu_gb * GB, "fits_chunked": total_chunked <= gpu_gb * GB,
        "fits": total <= gpu_gb * GB,
        "prefill_flops": prefill_flops, "prefill_flops_linear": flops_linear,
        "prefill_flops_attention": flops_attention, "prefill_flops_scan": flops_scan,
        "prefill_flops_lm_head": flops_head, "decode_bytes_per_step": decode_bytes,
        "decode_weight_bytes_per_step": int(decode_weights),
        "multimodal": mm, "images": images, "image_batch": ib, "vision_params": vision_params,
        "vision_params_by_part": {part: sum(w.numel for w in vws if w.part == part) for part in vision_bytes_by_part},
        "vision_weight_bytes": vision_bytes, "vision_weight_bytes_by_part": vision_bytes_by_part,
        "vision_activation_bytes": vision_act, "vision_flops_per_image": vision_flops_image,
        "vision_flops": vision_flops,
    }


def _gb(x: float) -> str:
    return f"{x / GB:9.2f} GB"


def format_plan(p: dict, name: Optional[str] = None) -> str:
    """The readable table `main` prints (GB = 1e9 bytes; GiB where compared with the paper)."""
    cfg, a_kind = p["config"], p["attention"]
    L = p["layers"]
    int8_note = " (Mamba projections kept 16-bit)" if p["weights"] == "int8" and p["int8_skip_mamba"] else ""
    lines = [f"plan: {name or cfg.model_type}  tokens={p['tokens']:,}  batch={p['batch']}  weights={p['weights']}"
             f"{int8_note}  chunk={p['chunk']:,}{'' if p['chunk_given'] else ' (default)'}  attention={a_kind}",
             f"layers: {L['mamba']} mamba + {L['attention']} attention mixers; {L['mlp']} mlp + {L['moe']} moe FFNs",
             f"parameters: {p['params_total'] / 1e9:.3f} B total, {p['params_active'] / 1e9:.3f} B active per token"
             + (f" (LM) + {p['vision_params'] / 1e9:.3f} B vision tower + projector" if p["multimodal"] else ""),
             "", f"{'memory':<44}{'bytes':>12}"]
    for part, b in p["weight_bytes_by_part"].items():
        lines.append(f"  weights: {part:<34}{_gb(b)}   ({p['params_by_part'][part] / 1e9:.3f} B params)")
    for part, b in p["vision_weight_bytes_by_part"].items():
        lines.append(f"  weights: {part:<34}{_gb(b)}   ({p['vision_params_by_part'][part] / 1e9:.3f} B params)")
    rows = [("LM weights (all experts resident)", p["weight_bytes"]),
            ("KV cache (attention layers)", p["kv_cache_bytes"]),
            ("Mamba conv + SSM state (constant in T)", p["mamba_state_bytes"])]
    if p["inputs_embeds_bytes"]:
        rows.append(("prompt inputs_embeds buffer (T x H)", p["inputs_embeds_bytes"]))
    rows += [(f"activation peak one-shot [{p['activation_one_shot_block']}]", p["activation_one_shot_bytes"]),
             (f"activation peak chunk {p['chunk']} [{p['activation_chunked_block']}]", p["activation_chunked_bytes"])]
    if p["multimodal"] is not None:
        rows.insert(1, ("vision tower + projector weights", p["vision_weight_bytes"]))
        rows.append((f"vision activation peak ({p['image_batch']} image(s) at once)", p["vision_activation_bytes"]))
    lines += [f"{label:<44}{_gb(b)}" for label, b in rows]
    for label, key, fit in (("TOTAL one-shot prefill", "total_one_shot_bytes", "fits_one_shot"),
                            (f"TOTAL chunked prefill (chunk {p['chunk']})", "total_chunked_bytes", "fits_chunked")):
        verdict = "fits" if p[fit] else "does NOT fit"
        lines.append(f"{label:<44}{_gb(p[key])}  = {p[key] / GIB:.2f} GiB  -> {verdict} in {p['gpu_gb']:g} GB")
    lines += ["", f"prefill FLOPs: {p['prefill_flops']:.3e}  (linear {p['prefill_flops_linear']:.3e}, attention "
              f"{p['prefill_flops_attention']:.3e}, scan {p['prefill_flops_scan']:.3e}, lm_head "
              f"{p['prefill_flops_lm_head']:.3e})",
              f"decode bytes read per step: {_gb(p['decode_bytes_per_step']).strip()}  (weights "
              f"{_gb(p['decode_weight_bytes_per_step']).strip()} + KV + states)"]
    if p["multimodal"] is not None:
        mm = p["multimodal"]
        n = p["images"]
        lines.append(f"vision: {mm.vision.model_type} {mm.vision.num_layers}L x {mm.vision.hidden_size} "
                     f"({p['vision_params'] / 1e9:.3f} B params with the {mm.projector} projector), "
                     f"{mm.tokens_per_image()} LM tokens per image; vision FLOPs per image "
                     f"{p['vision_flops_per_image']:.3e}" + (f", for {n:,} images {p['vision_flops']:.3e}"
                                                              if n is not None else " (image count unknown)"))
    if name in PAPER_MEMORY_GIB:
        # Compare like with like: the plan at the paper's workload, whatever this run's arguments.
        ref = p if (p["tokens"], p["weights"], p["batch"], p["int8_skip_mamba"]) == (PAPER_TOKENS, "int8", 1, False) \
            else plan(p["multimodal"] or cfg, PAPER_TOKENS, weights="int8", attention=p["attention"])
        paper, planned = PAPER_MEMORY_GIB[name], ref["total_one_shot_bytes"] / GIB
        lines += ["", f"LongLLaVA paper, measured at {PAPER_TOKENS:,} tokens, int8, one-shot: {paper:.1f} GB (read as "
                      f"GiB) | this plan at that workload: {planned:.2f} GiB | paper - plan = {paper - planned:+.2f} "
                      f"GiB ({(paper - planned) / paper:.0%} of the paper's figure)"]
        lines.append("  why: " + PAPER_EXPLANATION)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmodel.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help=f"named config {sorted(NAMED_CONFIGS)} or HF config.json/dir")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--tokens", type=int, help="prompt length in tokens")
    group.add_argument("--images", type=int, help="number of images; tokens = images * --tokens-per-image")
    ap.add_argument("--tokens-per-image", type=int, default=None,
                    help="tokens per image (default: the multimodal config's, else 144: CLIP-336 pooled 2x2)")
    ap.add_argument("--image-batch", type=int, default=1, help="images through the vision tower at once")
    ap.add_argument("--weights", choices=sorted(WEIGHT_DTYPES), default="bf16")
    ap.add_argument("--chunk", type=int, default=None, help=f"prefill chunk (default: one-shot total; "
                                                            f"chunked peak shown at {DEFAULT_CHUNK})")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--int8-skip-mamba", action="store_true", help="keep Mamba projections 16-bit under int8")
    ap.add_argument("--attention", choices=("flash", "eager"), default="flash")
    args = ap.parse_args(argv)
    try:
        mm = resolve_multimodal(args.config)
        per_image = args.tokens_per_image or (mm.tokens_per_image() if mm is not None else 144)
        tokens = args.tokens if args.tokens is not None else args.images * per_image
        p = plan(mm or args.config, tokens, images=args.images, image_batch=args.image_batch, weights=args.weights, chunk=args.chunk, batch=args.batch,
                 inputs_embeds=args.images is not None, int8_skip_mamba=args.int8_skip_mamba,
                 attention=args.attention, gpu_gb=args.gpu_gb)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.config if args.config in NAMED_CONFIGS else None
    print(format_plan(p, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
