"""Pure-PyTorch selective scan: the `torch` backend and, in float64, the oracle of the tests.

It is the same sequential loop HF transformers' Jamba/Mamba "slow path" and mamba-ssm's
selective_scan_ref run: discretize everything up front as (batch, dim, seqlen, dstate) tensors,
then one step per token. Readable, differentiable by autograd, and slow by design.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, cu_seqlens=None):
    """Same arguments and result as `fastscan.selective_scan_fn` (B, C 3-D or grouped 4-D).

    Computes in float64 when u is float64, otherwise float32; y is returned in u's dtype and
    last_state in the compute dtype. With cu_seqlens (batch 1), each packed sequence runs on its own.
    """
    if cu_seqlens is not None:
        return _packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
                       cu_seqlens)
    dtype_out = u.dtype
    ct = _compute_dtype(u)
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups = B.shape[1]
    # (batch, groups, dstate, seqlen) -> (batch, dim, seqlen, dstate): each channel sees its group's B/C.
    B = B.to(ct).repeat_interleave(dim // groups, dim=1).transpose(2, 3)
    C = C.to(ct).repeat_interleave(dim // groups, dim=1).transpose(2, 3)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20: x > 20 -> x, as the kernels do

    delta_A = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (batch, dim, seqlen, dstate)
    delta_B_u = delta.unsqueeze(-1) * B * u.unsqueeze(-1)
    state = (initial_state.to(ct) if initial_state is not None
             else u.new_zeros(batch, dim, dstate))
    ys = []
    # unbind rather than index per step: the backward of x[:, :, t] would allocate a zero gradient
    # the size of x for every step (quadratic in seqlen); unbind's backward is one stack.
    for dA_t, dBu_t, C_t in zip(delta_A.unbind(2), delta_B_u.unbind(2), C.unbind(2)):
        state = dA_t * state + dBu_t
        ys.append((state * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_out)
    return (y, state) if return_last_state else y


def _packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, cu_seqlens):
    """The definition of the packed scan: every sequence alone, outputs concatenated along seqlen."""
    bounds = cu_seqlens.tolist()
    dim, dstate = A.shape
    ys, states = [], []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        init = initial_state[i:i + 1] if initial_state is not None else None
        if end == start:  # an empty sequence hands its initial state through
            states.append(init if init is not None
                          else u.new_zeros((1, dim, dstate), dtype=_compute_dtype(u)))
            continue
        piece = lambda t: t[..., start:end] if t is not None else None
        y, last = selective_scan_ref(piece(u), piece(delta), A, piece(B), piece(C), D, piece(z), delta_bias,
                                     delta_softplus, True, init)
        ys.append(y)
        states.append(last)
    y = torch.cat(ys, dim=-1) if ys else u.new_zeros(u.shape)
    last_state = torch.cat(states).to(_compute_dtype(u))
    return (y, last_state) if return_last_state else y
