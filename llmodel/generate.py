"""Generation: chunked prefill into a HybridCache, then one token at a time, with sampling and streaming.

Prompts of different lengths: left padding would push pad tokens through every Mamba layer's state
(a recurrent state cannot "mask out" a token it has already absorbed), so instead each row's real
tokens are prefilled on their own into `cache.row(b)` and decode then runs all rows together, each
at its own `cache_seqlens[b]` (attention reads only its row's keys; RoPE uses its row's positions).
Prompts of equal length are prefilled as one batch.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .cache import HybridCache


@torch.no_grad()
def prefill(model, cache: HybridCache, input_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
            chunk_size: Optional[int] = None) -> Tensor:
    """Run a prompt through the model chunk by chunk; return the last position's logits (batch, vocab).

    Each chunk passes through all layers before the next starts, so activations are bounded by the
    chunk: Mamba layers continue from the conv/SSM state the last chunk left, attention layers append
    K/V to the cache and attend over everything cached (causal, bottom-right aligned).
    """
    prompt = input_ids if inputs_embeds is None else inputs_embeds
    if prompt is None:
        raise ValueError("input_ids, inputs_embeds: pass at least one")
    length = prompt.shape[1]
    if length < 1:
        raise ValueError("input_ids / inputs_embeds: the prompt is empty")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1 or None, got {chunk_size}")
    step = chunk_size or length
    logits = None
    for start in range(0, length, step):
        piece = prompt[:, start:start + step]
        if inputs_embeds is None:
            logits = model(input_ids=piece, cache=cache, last_only=True)
        else:
            logits = model(inputs_embeds=piece, cache=cache, last_only=True)
    return logits[:, -1]


@torch.no_grad()
def decode_one_token(model, cache: HybridCache, token: Tensor) -> Tensor:
    """token (batch,) -> next logits (batch, vocab); the Mamba/attention state-update path."""
    return model(input_ids=token[:, None], cache=cache)[:, -1]


def sample(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """logits (batch, vocab) -> token ids (batch,). temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k: expected >= 1 or None, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _as_rows(name: str, value, feature_dims: int) -> list[Tensor]:
    """A (batch, seqlen, ...) tensor or a list of (seqlen, ...) rows -> list of rows."""
    if isinstance(value, Tensor):
        if value.dim() != 1 + 1 + feature_dims:
            raise ValueError(f"{name}: expected {1 + 1 + feature_dims} dims (batch, seqlen{', hidden' * feature_dims}),"
                             f" got shape {tuple(value.shape)}")
        return list(value)
    rows = [torch.as_tensor(r) for r in value]
    for b, r in enumerate(rows):
        if r.dim() != 1 + feature_dims or r.shape[0] < 1:
            raise ValueError(f"{name}[{b}]: expected a non-empty row of {1 + feature_dims} dims, got {tuple(r.shape)}")
    return rows


@torch.no_grad()
def generate(model, input_ids: Union[Tensor, Sequence, None] = None, inputs_embeds: Union[Tensor, Sequence, None] = None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Union[int, Sequence[int], None] = None,
             chunk_size: Optional[int] = None, stream: Optional[Callable[[Tensor], None]] = None,
             pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             seed: Optional[int] = None):
    """Generate up to max_new_tokens per row.

    input_ids: (batch, seqlen) or a list of 1-D rows of different lengths. inputs_embeds: (batch, seqlen,
    hidden) or a list of (seqlen, hidden) rows; when given it is what the model reads, and input_ids (if
    also given) only becomes the returned prompt prefix. eos_token_id: int or list; None uses the
    config's; [] never stops early. A row that emitted eos continues with pad_token_id (default: the
    first eos id). stream(tokens) is called with each step's (batch,) new tokens. seed / generator make
    sampling reproducible.

    Returns (batch, prompt + new) for a tensor prompt, a list of 1-D rows for a list prompt; with only
    inputs_embeds, just the new tokens (HF's convention).
    """
    if input_ids is None and inputs_embeds is None:
        raise ValueError("input_ids, inputs_embeds: pass at least one")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    device = model.embed_tokens.weight.device
    id_rows = _as_rows("input_ids", input_ids, 0) if input_ids is not None else None
    embed_rows = _as_rows("inputs_embeds", inputs_embeds, 1) if inputs_embeds is not None else None
    prompt_rows = embed_rows if embed_rows is not None else id_rows
    if id_rows is not None and embed_rows is not None and [len(r) for r in id_rows] != [len(r) for r in embed_rows]:
        raise ValueError("input_ids, inputs_embeds: rows must have the same lengths when both are given")
    batch, lengths = len(prompt_rows), [len(r) for r in prompt_rows]
    eos = model.config.eos_token_ids if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    cache = model.new_cache(batch, max(lengths) + max_new_tokens)
    key = "inputs_embeds" if embed_rows is not None else "input_ids"
    if len(set(lengths)) == 1:  # equal lengths: one batched prefill
        logits = prefill(model, cache, chunk_size=chunk_size, **{key: torch.stack(prompt_rows).to(device)})
    else:  # each row's real tokens alone, into its own slice of the cache
        logits = torch.cat([prefill(model, cache.row(b), chunk_size=chunk_size, **{key: row[None].to(device)})
                            for b, row in enumerate(prompt_rows)])

    eos_tensor = torch.tensor(eos, device=device, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        new_tokens.append(token)
        if stream is not None:
            stream(token)
        finished |= torch.isin(token, eos_tensor)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = decode_one_token(model, cache, token)

    new = torch.stack(new_tokens, dim=1)  # (batch, steps)
    if id_rows is None:
        return new
    if isinstance(input_ids, Tensor):
        return torch.cat([input_ids.to(device), new], dim=1)
    return [torch.cat([row.to(device), new[b]]) for b, row in enumerate(id_rows)]


__all__ = ["generate", "prefill", "decode_one_token", "sample"]
