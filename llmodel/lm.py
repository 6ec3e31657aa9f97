"""The hybrid decoder: per layer a mixer (Mamba | attention) and an FFN (SwiGLU MLP | MoE | none).

Parameter names follow HF's JambaForCausalLM (minus its `model.` prefix) so Jamba checkpoints map
one to one; checkpoint.py renames the Mamba/Qwen2/Llama layouts onto the same names.

Every sequence op goes through fastscan's public API. With a HybridCache the forward continues from
the cache (a prefill chunk or one decode token) and updates it; without one it is the plain
full-sequence forward used for scoring and training. With a `Packing` (training), one row holds several
sequences back to back and every mixer keeps them apart: the conv window and the SSM state restart at
each boundary and attention is block-diagonal (fastscan's cu_seqlens ops), RoPE positions restart too.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastscan import causal_conv1d_fn, causal_conv1d_update, selective_scan_fn, selective_state_update
from fastscan.attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

from .cache import HybridCache
from .config import LMConfig

# ---------------------------------------------------------------- packed sequences

class Packing(NamedTuple):
    """Several sequences packed into one row (batch 1), as the varlen ops take them.

    cu_seqlens: int32 (num_seqs + 1,) boundaries on the model's device; max_seqlen: the longest sequence
    (attention's launch grid); position_ids: (1, total) positions restarting at 0 in each sequence;
    self_only: None or (1, total) bool, rows that attend only to themselves (EE-MLLM's visual rows; set by
    LongLLaVA for composite-attention models).
    """
    cu_seqlens: Tensor
    max_seqlen: int
    position_ids: Tensor
    self_only: Optional[Tensor] = None

    @classmethod
    def from_lengths(cls, lengths, device=None) -> "Packing":
        lengths = [int(n) for n in lengths]
        if not lengths or min(lengths) < 1:
            raise ValueError(f"lengths: expected at least one sequence, each >= 1 token, got {lengths}")
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        return cls(cu.to(device), max(lengths), positions.to(device))


# ---------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in float32, round to the input dtype, then scale — HF's exact order (parity in bf16).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Softmax router over experts, top-k per token; each expert runs only on the tokens routed to it."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.top_k, self.renormalize = config.moe.top_k, config.moe.renormalize
        self.router = nn.Linear(config.hidden_size, config.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
                                     for _ in range(config.moe.num_experts))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (tokens, k)
        if self.renormalize:  # Jamba does not; Mixtral-style models do
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        # Sort the (token, slot) pairs by expert so each expert gathers its tokens in one index_select.
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token_of, weight_of = order // self.top_k, weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                tokens = token_of[start:start + count]
                y = expert(x.index_select(0, tokens)) * weight_of[start:start + count, None]
                out.index_add_(0, tokens, y)
            start += count
        return out.reshape(shape)


class MambaMixer(nn.Module):
    """Mamba-1 block as Jamba has it (inner_layernorms=True) or as plain Mamba (False)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        m, d_inner = config.mamba, config.d_inner
        self.d_state, self.dt_rank = m.d_state, m.dt_rank
        self.in_proj = nn.Linear(config.hidden_size, 2 * d_inner, bias=m.proj_bias)
        # nn.Conv1d only holds the (d_inner, 1, d_conv) weight in HF's layout; fastscan does the conv.
        self.conv1d = nn.Conv1d(d_inner, d_inner, m.d_conv, groups=d_inner, bias=m.conv_bias)
        self.x_proj = nn.Linear(d_inner, m.dt_rank + 2 * m.d_state, bias=False)
        self.dt_proj = nn.Linear(m.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, m.d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, config.hidden_size, bias=m.proj_bias)
        if m.inner_layernorms:
            self.dt_layernorm = RMSNorm(m.dt_rank, config.rms_norm_eps)
            self.b_layernorm = RMSNorm(m.d_state, config.rms_norm_eps)
            self.c_layernorm = RMSNorm(m.d_state, config.rms_norm_eps)
        self.inner_layernorms = m.inner_layernorms
        self.reset_ssm_parameters(m.dt_min, m.dt_max, m.dt_init_floor)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        """Mamba's initialisation of the SSM, for training from scratch: A = -(1..d_state) in every channel
        (S4D-real), D = 1, and the dt bias set to softplus^-1 of a step drawn log-uniformly in [dt_min,
        dt_max] per channel, so the state starts out remembering ~1/dt tokens (10..1000). nn.Linear's
        default bias would start every dt near softplus(0) = 0.7: a memory of a token or two, which the
        multi-image lookups ("which image has X") could not learn their way out of."""
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        d_inner, d_state = self.A_log.shape
        device = self.A_log.device  # explicit: a meta-device context may be active while loading
        self.A_log.copy_(torch.arange(1, d_state + 1, dtype=torch.float32, device=device).log().expand(d_inner, d_state))
        self.D.fill_(1.0)
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(d_inner, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) == dt

    def _ssm_params(self, x: Tensor):
        """x (b, l, d_inner) after the conv -> dt (b, l, d_inner) without bias, B and C (b, l, d_state)."""
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_layernorms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        # The dt bias goes to the kernel as delta_bias so it lands inside the softplus, as in Mamba.
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, hidden: Tensor, cache: Optional[HybridCache] = None, layer_idx: int = 0,
                packing: Optional[Packing] = None) -> Tensor:
        A = -torch.exp(self.A_log.float())
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d_inner) each; views, no copy
        conv_weight, dt_bias = self.conv1d.weight.squeeze(1), self.dt_proj.bias.float()
        if cache is not None and hidden.shape[1] == 1:  # decode: advance both states in place
            conv_state, ssm_state = cache.conv_state[layer_idx], cache.ssm_state[layer_idx]
            xc = causal_conv1d_update(x[:, 0], conv_state, conv_weight, self.conv1d.bias, activation="silu")
            dt, B, C = self._ssm_params(xc[:, None])
            y = selective_state_update(ssm_state, xc, dt[:, 0], A, B[:, 0], C[:, 0], D=self.D.float(), z=z[:, 0],
                                       dt_bias=dt_bias, dt_softplus=True)
            return self.out_proj(y[:, None])
        # Full sequence or a prefill chunk: kernels read the (b, l, d) tensors through (b, d, l) views.
        conv_init = cache.conv_state[layer_idx] if cache is not None else None
        ssm_init = cache.ssm_state[layer_idx] if cache is not None else None
        cu_seqlens = packing.cu_seqlens if packing is not None else None
        xc = causal_conv1d_fn(x.transpose(1, 2), conv_weight, self.conv1d.bias, initial_states=conv_init,
                              return_final_states=cache is not None, activation="silu", cu_seqlens=cu_seqlens)
        if cache is not None:
            xc, conv_final = xc
            cache.conv_state[layer_idx].copy_(conv_final)
        dt, B, C = self._ssm_params(xc.transpose(1, 2))
        y = selective_scan_fn(xc, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D=self.D.float(),
                              z=z.transpose(1, 2), delta_bias=dt_bias, delta_softplus=True,
                              return_last_state=cache is not None, initial_state=ssm_init, cu_seqlens=cu_seqlens)
        if cache is not None:
            y, ssm_final = y
            cache.ssm_state[layer_idx].copy_(ssm_final)
        return self.out_proj(y.transpose(1, 2))


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AttentionMixer(nn.Module):
    """Grouped-query causal attention with optional q/k/v bias and optional (linear-scaled) RoPE."""

    def __init__(self, config: LMConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attention_out_bias)
        self.rope_theta, self.rope_factor = c.rope_theta, c.rope_scaling_factor

    def _rope(self, q: Tensor, k: Tensor, start: Tensor, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Rotate q, k (b, l, heads, d) at positions start[b] + t (or the given (b, l) positions); computed
        in float32 as HF does."""
        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, device=q.device, dtype=torch.float32) / d))
        if positions is None:
            positions = start.float()[:, None] + torch.arange(q.shape[1], device=q.device, dtype=torch.float32)
        freqs = (positions.float() / self.rope_factor)[..., None] * inv_freq  # (b, l, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # broadcast over heads
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def _qkv(self, hidden: Tensor, cache: Optional[HybridCache], packing: Optional[Packing]):
        b, l, _ = hidden.shape
        q = self.q_proj(hidden).view(b, l, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(b, l, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(b, l, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            start = cache.cache_seqlens if cache is not None else torch.zeros(b, device=hidden.device)
            q, k = self._rope(q, k, start, packing.position_ids if packing is not None else None)
        return q, k, v

    @staticmethod
    def _packed(q: Tensor, k: Tensor, v: Tensor, packing: Packing, self_only: Optional[Tensor] = None) -> Tensor:
        """Block-diagonal causal attention over the sequences of one packed row: (1, T, h, d) -> same."""
        cu, n = packing.cu_seqlens, packing.max_seqlen
        return flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, n, n, causal=True,
                                      self_only=self_only[0] if self_only is not None else None)[None]

    def forward(self, hidden: Tensor, cache: Optional[HybridCache] = None, layer_idx: int = 0,
                packing: Optional[Packing] = None) -> Tensor:
        b, l, _ = hidden.shape
        q, k, v = self._qkv(hidden, cache, packing)
        if packing is not None:
            out = self._packed(q, k, v, packing)
        elif cache is None:
            out = flash_attn_func(q, k, v, causal=True)
        else:
            # Writes this chunk's K/V at each row's cache_seqlens, then attends causally (bottom-right) over
            # the row's cache: one call serves a prefill chunk and a decode token.
            out = flash_attn_with_kvcache(q, cache.key[layer_idx], cache.value[layer_idx], k=k, v=v,
                                          cache_seqlens=cache.cache_seqlens, causal=True)
        return self.o_proj(out.reshape(b, l, -1))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h += mixer(norm(h)); h += ffn(norm(h))."""

    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_kind, self.ffn_kind = config.layer_mixers[layer_idx], config.layer_ffns[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Attribute names are Jamba's (`mamba` / `self_attn`), so state_dict keys match its checkpoints.
        if self.mixer_kind == "mamba":
            self.mamba = MambaMixer(config)
        else:
            self.self_attn = AttentionMixer(config)
        if self.ffn_kind != "none":
            self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.feed_forward = (MoE(config) if self.ffn_kind == "moe"
                                 else MLP(config.hidden_size, config.intermediate_size, config.mlp_bias))

    @property
    def mixer(self) -> nn.Module:
        return self.mamba if self.mixer_kind == "mamba" else self.self_attn

    def forward(self, hidden: Tensor, cache: Optional[HybridCache] = None, packing: Optional[Packing] = None) -> Tensor:
        hidden = hidden + self.mixer(self.input_layernorm(hidden), cache, self.layer_idx, packing)
        if self.ffn_kind != "none":
            hidden = hidden + self.feed_forward(self.pre_ff_layernorm(hidden))
        return hidden


class HybridLM(nn.Module):
    """Embedding -> layers -> final RMSNorm -> lm_head. Plain nn.Modules, so freezing is requires_grad_."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False

    def new_cache(self, batch_size: int, max_len: int) -> HybridCache:
        p = self.embed_tokens.weight
        return HybridCache(self.config, batch_size, max_len, dtype=p.dtype, device=p.device)

    def forward(self, input_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                cache: Optional[HybridCache] = None, last_only: bool = False, packing: Optional[Packing] = None,
                return_hidden: bool = False) -> Tensor:
        """Logits (batch, seqlen, vocab), or (batch, 1, vocab) with last_only.

        input_ids (batch, seqlen) or inputs_embeds (batch, seqlen, hidden), exactly one. With `cache`
        the tokens continue each row's cached sequence and the cache is advanced by seqlen. With `packing`
        (batch 1, no cache) the row holds several sequences that do not see each other. return_hidden:
        the final-normed hidden states instead of logits (a training loss applies lm_head chunk by chunk).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: pass exactly one")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds: expected (batch, seqlen, {self.config.hidden_size}), "
                             f"got {tuple(hidden.shape)}")
        if packing is not None:
            if cache is not None or hidden.shape[0] != 1:
                raise ValueError(f"packing: packed sequences need batch 1 and no cache, got batch {hidden.shape[0]}"
                                 f"{' and a cache' if cache is not None else ''}")
            if packing.position_ids.shape != hidden.shape[:2]:
                raise ValueError(f"packing: position_ids {tuple(packing.position_ids.shape)} do not match the input "
                                 f"{tuple(hidden.shape[:2])}")
        if cache is not None:
            if cache.batch_size != hidden.shape[0]:
                raise ValueError(f"cache: batch_size {cache.batch_size} != input batch {hidden.shape[0]}")
            cache.check_room(hidden.shape[1])
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                # Recompute each layer in backward: activation memory of one layer, not all of them.
                hidden = checkpoint(layer, hidden, None, packing, use_reentrant=False)
            else:
                hidden = layer(hidden, cache, packing)
        if cache is not None:
            cache.advance(hidden.shape[1])
        if last_only:
            hidden = hidden[:, -1:]
        hidden = self.final_layernorm(hidden)
        return hidden if return_hidden else self.lm_head(hidden)


__all__ = ["HybridLM", "DecoderLayer", "MambaMixer", "AttentionMixer", "MLP", "MoE", "RMSNorm", "Packing"]
