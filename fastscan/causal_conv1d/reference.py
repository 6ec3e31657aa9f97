"""Pure-PyTorch causal depthwise conv1d: the `torch` backend and, in float64, the oracle of the tests.

The same computation causal-conv1d's `causal_conv1d_ref` / `causal_conv1d_update_ref` do: prepend the
width-1 initial states (zeros when absent) along time, run F.conv1d with groups=dim, apply silu.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None,
                      cu_seqlens=None):
    """Same arguments and result as `fastscan.causal_conv1d_fn` (activation None, "silu" or "swish").

    Computes in float64 when x is float64, otherwise float32; out and final_states are in x's dtype.
    With cu_seqlens (batch 1), each packed sequence runs on its own.
    """
    if cu_seqlens is not None:
        return _packed(x, weight, bias, initial_states, return_final_states, activation, cu_seqlens)
    dtype_out = x.dtype
    ct = _compute_dtype(x)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if initial_states is None:
        initial_states = x.new_zeros((batch, dim, width - 1), dtype=ct)
    xpad = torch.cat([initial_states.to(ct), x.to(ct)], dim=-1)  # (batch, dim, seqlen + width - 1)
    out = F.conv1d(xpad, weight.to(ct).unsqueeze(1), bias.to(ct) if bias is not None else None, groups=dim)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    out = out.to(dtype_out)
    if not return_final_states:
        return out
    return out, xpad[..., seqlen:].to(dtype_out)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """Same as `fastscan.causal_conv1d_update`: returns out (x's shape) and updates conv_state in place."""
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    ct = _compute_dtype(x)
    dim, width = weight.shape
    seqlen, state_len = x.shape[-1], conv_state.shape[-1]
    window = torch.cat([conv_state[..., state_len - width + 1:].to(ct), x.to(ct)], dim=-1)
    out = F.conv1d(window, weight.to(ct).unsqueeze(1), bias.to(ct) if bias is not None else None, groups=dim)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    shifted = torch.cat([conv_state, x.to(conv_state.dtype)], dim=-1)[..., seqlen:]
    conv_state.copy_(shifted)
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def _packed(x, weight, bias, initial_states, return_final_states, activation, cu_seqlens):
    """The definition of the packed conv: every sequence alone, outputs concatenated along seqlen."""
    bounds = cu_seqlens.tolist()
    dim, width = weight.shape
    outs, finals = [], []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        init = initial_states[i:i + 1] if initial_states is not None else None
        if end == start:  # an empty sequence hands its initial states through
            finals.append(init.to(x.dtype) if init is not None else x.new_zeros((1, dim, width - 1)))
            continue
        out, final = causal_conv1d_ref(x[..., start:end], weight, bias, init, True, activation)
        outs.append(out)
        finals.append(final)
    out = torch.cat(outs, dim=-1)
    return (out, torch.cat(finals)) if return_final_states else out
