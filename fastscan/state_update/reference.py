"""Pure-PyTorch decode step: the `torch` backend and, in float64, the oracle of the tests.

One step of the selective scan's recurrence, written the way HF transformers' Mamba/Jamba slow
path and mamba-ssm's selective_state_update_ref write it: broadcast over (batch, dim, dstate),
then reduce over dstate for y.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Same arguments and result as `fastscan.selective_state_update` (B, C 2-D or grouped 3-D).

    Computes in float64 when state or x is float64, otherwise float32; writes the new state into
    `state` (rounded to its dtype) and returns y in x's dtype.
    """
    ct = torch.float64 if torch.float64 in (state.dtype, x.dtype) else torch.float32
    dim = state.shape[1]
    if B.dim() == 2:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups = B.shape[1]
    # (batch, groups, dstate) -> (batch, dim, dstate): each channel sees its group's B/C.
    B = B.to(ct).repeat_interleave(dim // groups, dim=1)
    C = C.to(ct).repeat_interleave(dim // groups, dim=1)
    x_c, dt = x.to(ct), dt.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20: x > 20 -> x, as the kernels do
    decay = torch.exp(dt.unsqueeze(-1) * A.to(ct))
    new_state = decay * state.to(ct) + (dt * x_c).unsqueeze(-1) * B
    y = (new_state * C).sum(-1)
    if D is not None:
        y = y + x_c * D.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    state.copy_(new_state)
    return y.to(x.dtype)
