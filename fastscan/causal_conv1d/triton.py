"""Causal depthwise conv1d in Triton: forward, backward, decode update, host launchers, AOT specs.

    xpad = initial_states ++ x along time (zeros when absent);  W = width
    z[t] = bias + sum_k w[k] xpad[t + k];   out = silu(z) or z;   final_states = xpad[L : L + W - 1]

Layout of the work: a (BLOCK_D channels x BLOCK_L steps) tile per program, grid (batch, channel blocks,
time blocks). A tile reads its W-1 halo steps straight from x (initial_states before step 0), so the
programs are independent. Each tap is one masked load of the shifted tile (cache hits after the
first); the compiler's coalescing follows whichever stride is 1 (the JIT specialises it), so the
same kernel serves (batch, dim, seqlen) and channel-last memory, with a tile shape picked per layout.

Backward, per tile: dz(s) = dout[s] * silu'(z[s]) is recomputed at the W shifts s = t .. t + W-1 that
dx[t] = sum_k w[k] dz[t + W-1-k] needs (W^2 tap loads, all cache hits, no scratch, no barrier);
dweight / dbias are float32 partials per (batch, time block), summed on the host (deterministic).

Packed sequences (cu_seqlens, batch 1, IS_VARLEN): the same tiles over the packed time axis, each step
knowing its sequence through a per-step index (torch.searchsorted on the device, no host sync) and
gathering that sequence's start and length, so the window stops at the boundary: tap k of step t reads
x when it lies in t's sequence and that sequence's initial_states otherwise. The helpers take each
position twice: local to its sequence (for the masks) and packed (for the addresses, an arange in the
main tiles so loads stay coalesced along time); unpacked both are the same expression, which folds.
Per-sequence work (final_states, dinitial_states) is a strided loop of the time-block programs over
blocks of sequences, a (sequence, state slot) pair per column: many short or empty sequences need
no extra launch. One program per time block whatever the sequence lengths, so the grid stays balanced.
"""
import os

import torch
import triton
import triton.language as tl

from .native import like_x

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# NOTE: tile shapes, measured on AOT compiles (width 4, silu, every optional input; regs sm_80/sm_90):
# the forward at 2048 elements / 4 warps took 208-226 registers (each tap's x and initial_states
# loads are hoisted), 1024 takes 80-121 (16 x 64 contiguous) and 106-108 (128 x 8 channel-last).
# The backward (W + 1 dz recomputations, W^2 tap loads) spilled 920-1992 bytes at 2048 elements;
# 512 at 4 warps (8 x 64) takes 137-168, and channel-last 64 x 8 at 8 warps 92-128, no spills.
# Packed sequences (IS_VARLEN) add per-step sequence lengths, local steps and state offsets: the
# forward keeps its tiles (90-128 registers). The backward at the unpacked tiles spilled 16 bytes
# (8 x 64, sm_80, at the 168-register cap) and 8 bytes (64 x 8 / 8 warps, sm_90); 4 x 64 takes
# 88-95 registers, 32 x 8 / 8 warps 64-87.
_GPU_TILES = {  # (kind, channel_last, varlen) -> (BLOCK_D, BLOCK_L, num_warps)
    ("fwd", False, False): (16, 64, 4), ("fwd", True, False): (128, 8, 4),
    ("bwd", False, False): (8, 64, 4), ("bwd", True, False): (64, 8, 8),
    ("fwd", False, True): (16, 64, 4), ("fwd", True, True): (128, 8, 4),
    ("bwd", False, True): (4, 64, 4), ("bwd", True, True): (32, 8, 8),
}
# Under the interpreter: small tiles so the tests cross channel- and time-block boundaries.
_TILES = {key: (16, 32, 1) for key in _GPU_TILES} if _INTERPRET else _GPU_TILES


def _channel_last(x):
    return x.stride(1) == 1 and x.stride(2) != 1


@triton.jit
def _xpad_tile(x_base, init_base, offs_d, mask_d, q, pos, seqlen, init_off, stride_x_d, stride_x_l,
               stride_init_d, stride_init_k, WIDTH: tl.constexpr, HAS_INITIAL: tl.constexpr):
    """xpad[d, q] as float32 (BLOCK_D, len(q)) of a sequence of `seqlen` steps: x[pos - (W-1)] (pos = q plus
    the sequence's packed start), initial_states[q] (at init_base + init_off) for q < W-1, else 0.
    seqlen / init_off: scalars, or one per column (packed sequences). Addresses come from pos alone:
    an arange there keeps the compiler's contiguity, hence coalesced loads along time."""
    src = q - (WIDTH - 1)
    valid = mask_d[:, None] & ((src >= 0) & (src < seqlen))[None, :]
    v = tl.load(x_base + (offs_d[:, None] * stride_x_d + (pos - (WIDTH - 1))[None, :] * stride_x_l), mask=valid,
                other=0.0)
    v = v.to(tl.float32)
    if HAS_INITIAL:
        head = mask_d[:, None] & ((q >= 0) & (src < 0))[None, :]
        h = tl.load(init_base + (offs_d[:, None] * stride_init_d + (init_off + q * stride_init_k)[None, :]),
                    mask=head, other=0.0)
        v += h.to(tl.float32)
    return v


@triton.jit
def _dz_tile(dout_base, x_base, init_base, weight, bias_v, offs_d, mask_d, s, pos, seqlen, init_off,
             stride_x_d, stride_x_l, stride_init_d, stride_init_k, stride_w_d, stride_w_k,
             stride_dout_d, stride_dout_l,
             WIDTH: tl.constexpr, SILU: tl.constexpr, HAS_INITIAL: tl.constexpr):
    """dz[d, s] = dout * silu'(z) (or dout) as float32, 0 outside [0, seqlen); s local to the sequence, pos
    its packed step, seqlen / init_off as in _xpad_tile."""
    valid = mask_d[:, None] & ((s >= 0) & (s < seqlen))[None, :]
    g = tl.load(dout_base + (offs_d[:, None] * stride_dout_d + pos[None, :] * stride_dout_l), mask=valid, other=0.0)
    g = g.to(tl.float32)
    if SILU:
        z = bias_v[:, None] + tl.zeros(g.shape, dtype=tl.float32)
        for k in tl.static_range(WIDTH):
            w_k = tl.load(weight + offs_d * stride_w_d + k * stride_w_k, mask=mask_d, other=0.0)
            z += w_k[:, None] * _xpad_tile(x_base, init_base, offs_d, mask_d, s + k, pos + k, seqlen, init_off,
                                           stride_x_d, stride_x_l, stride_init_d, stride_init_k, WIDTH, HAS_INITIAL)
        sig = tl.sigmoid(z)
        g = g * sig * (1.0 + z * (1.0 - sig))
    return g


@triton.jit
def _packed_columns(cu_seqlens, seq_idx, offs_t, mask_t):
    """Per packed step: its sequence, that sequence's length, the step local to it (int32).
    Steps past the pack read sequence 0: in-bounds addresses, results masked off by the caller."""
    seq = tl.load(seq_idx + offs_t, mask=mask_t, other=0)
    start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - start
    return seq, seqlen, (offs_t - start).to(tl.int32)


@triton.jit
def _state_columns(cu_seqlens, num_seqs, block, SEQ_BLOCK: tl.constexpr, BLOCK_W: tl.constexpr):
    """The state columns of sequences block * SEQ_BLOCK ...: column c is slot c % BLOCK_W of sequence
    block * SEQ_BLOCK + c // BLOCK_W. Returns (sequence as int64, its start as int64, its length, slot,
    the columns to store). Sequences past the last are clamped to it, so every load stays in bounds."""
    offs_c = tl.arange(0, SEQ_BLOCK * BLOCK_W)
    seq = block * SEQ_BLOCK + offs_c // BLOCK_W
    slot = offs_c % BLOCK_W
    keep = seq < num_seqs
    seq = tl.minimum(seq, num_seqs - 1)
    start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - start
    return seq.to(tl.int64), start.to(tl.int64), seqlen, slot, keep


@triton.heuristics({
    "HAS_BIAS": lambda args: args["bias"] is not None,
    "HAS_INITIAL": lambda args: args["initial_states"] is not None,
    "STORE_FINAL": lambda args: args["final_states"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
})
@triton.jit(do_not_specialize=["seqlen", "num_seqs"])
def causal_conv1d_fwd_kernel(
    x, weight, bias, initial_states, out, final_states, cu_seqlens, seq_idx,
    dim, seqlen, num_seqs,
    stride_x_b, stride_x_d, stride_x_l,
    stride_w_d, stride_w_k,
    stride_init_b, stride_init_d, stride_init_k,
    stride_out_b, stride_out_d, stride_out_l,
    WIDTH: tl.constexpr, SILU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """out for one (batch, channel block, time block); final_states from the time block 0 programs.

    grid: (batch, cdiv(dim, BLOCK_D), cdiv(seqlen, BLOCK_L)). Reads the tile of x plus its W-1 halo,
    writes the tile of out once. final_states: contiguous (batch, dim, W-1).
    IS_VARLEN: batch 1, seqlen = the packed length; seq_idx (seqlen,) int32 is each step's sequence;
    initial_states / final_states are per sequence, final_states of sequence block i written by time
    block i mod n_blocks.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    pid_l = tl.program_id(2)
    mask_d = offs_d < dim
    x_base = x + pid_b * stride_x_b
    init_base = initial_states  # None when absent: then _xpad_tile never touches it
    if IS_VARLEN:  # int64 steps: a pack is batch * seqlen steps of one sequence axis
        offs_t = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_t = offs_t < seqlen
        seq, len_t, local_t = _packed_columns(cu_seqlens, seq_idx, offs_t, mask_t)
        init_off = seq.to(tl.int64) * stride_init_b
    else:
        offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_t = offs_t < seqlen
        len_t, local_t, init_off = seqlen, offs_t, 0
        if HAS_INITIAL:
            init_base = initial_states + pid_b * stride_init_b

    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + offs_d, mask=mask_d, other=0.0)[:, None]
    for k in tl.static_range(WIDTH):
        w_k = tl.load(weight + offs_d * stride_w_d + k * stride_w_k, mask=mask_d, other=0.0)
        acc += w_k[:, None] * _xpad_tile(x_base, init_base, offs_d, mask_d, local_t + k, offs_t + k, len_t, init_off,
                                         stride_x_d, stride_x_l, stride_init_d, stride_init_k, WIDTH, HAS_INITIAL)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out_ptrs = out + pid_b * stride_out_b + (offs_d[:, None] * stride_out_d + offs_t[None, :] * stride_out_l)
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])

    if STORE_FINAL:
        if IS_VARLEN:
            # final_states[i] = xpad_i[L_i : L_i + W-1] (part of initial_states[i] when L_i < W-1), for a
            # block of SEQ_BLOCK sequences at a time: (BLOCK_D, BLOCK_L) columns like the main tile
            SEQ_BLOCK: tl.constexpr = BLOCK_L // BLOCK_W  # >= 1: width <= 8 <= BLOCK_L
            for block in range(pid_l, tl.cdiv(num_seqs, SEQ_BLOCK), tl.num_programs(2)):
                seq_s, start_s, len_s, slot, keep = _state_columns(cu_seqlens, num_seqs, block, SEQ_BLOCK, BLOCK_W)
                fin = _xpad_tile(x_base, init_base, offs_d, mask_d, len_s + slot, start_s + len_s + slot, len_s,
                                 seq_s * stride_init_b, stride_x_d, stride_x_l, stride_init_d, stride_init_k,
                                 WIDTH, HAS_INITIAL)
                fin_ptrs = final_states + (offs_d[:, None] * (WIDTH - 1)
                                           + (seq_s * dim * (WIDTH - 1) + slot)[None, :])
                tl.store(fin_ptrs, fin.to(final_states.dtype.element_ty),
                         mask=mask_d[:, None] & (keep & (slot < WIDTH - 1))[None, :])
        elif pid_l == 0:
            offs_j = tl.arange(0, BLOCK_W)
            fin = _xpad_tile(x_base, init_base, offs_d, mask_d, seqlen + offs_j, seqlen + offs_j, seqlen, 0,
                             stride_x_d, stride_x_l, stride_init_d, stride_init_k, WIDTH, HAS_INITIAL)
            fin_ptrs = final_states + pid_b * dim * (WIDTH - 1) + (offs_d[:, None] * (WIDTH - 1) + offs_j[None, :])
            tl.store(fin_ptrs, fin.to(final_states.dtype.element_ty),
                     mask=mask_d[:, None] & (offs_j < WIDTH - 1)[None, :])


@triton.jit
def _store_dinitial(dout_base, x_base, init_base, weight, bias_v, dfin_base, dinit_base,
                    offs_d, mask_d, q, mask_q, start, seqlen, init_off, dfin_off, dinit_off,
                    stride_x_d, stride_x_l, stride_init_d, stride_init_k,
                    stride_w_d, stride_w_k, stride_dout_d, stride_dout_l, stride_dfin_d, stride_dfin_k,
                    WIDTH: tl.constexpr, SILU: tl.constexpr, HAS_INITIAL: tl.constexpr, HAS_DFINAL: tl.constexpr,
                    BLOCK_D: tl.constexpr, NCOLS: tl.constexpr):
    """dinitial_states[seq, :, q] (contiguous) over NCOLS columns (seq, q), stored where mask_q (q < W-1):
    dinitial[q] = sum_{k <= q} w[k] dz[q - k] (+ dfinal_states[seq, q - L] when q >= L). start / seqlen /
    init_off / dfin_off / dinit_off locate each column's sequence as in _xpad_tile (0 / scalars unpacked,
    where the bases already point at the batch row)."""
    gi = tl.zeros((BLOCK_D, NCOLS), dtype=tl.float32)
    if HAS_DFINAL:
        jq = q - seqlen
        gi += tl.load(dfin_base + offs_d[:, None] * stride_dfin_d + (dfin_off + jq * stride_dfin_k)[None, :],
                      mask=mask_d[:, None] & ((jq >= 0) & mask_q)[None, :], other=0.0).to(tl.float32)
    for k in tl.static_range(WIDTH - 1):
        w_k = tl.load(weight + offs_d * stride_w_d + k * stride_w_k, mask=mask_d, other=0.0)
        gi += w_k[:, None] * _dz_tile(dout_base, x_base, init_base, weight, bias_v, offs_d, mask_d,
                                      q - k, start + (q - k), seqlen, init_off, stride_x_d, stride_x_l,
                                      stride_init_d, stride_init_k, stride_w_d, stride_w_k, stride_dout_d,
                                      stride_dout_l, WIDTH, SILU, HAS_INITIAL)
    dinit_ptrs = dinit_base + (offs_d[:, None] * (WIDTH - 1) + (dinit_off + q)[None, :])
    tl.store(dinit_ptrs, gi.to(dinit_base.dtype.element_ty), mask=mask_d[:, None] & mask_q[None, :])


@triton.heuristics({
    "HAS_INITIAL": lambda args: args["initial_states"] is not None,
    "HAS_DFINAL": lambda args: args["dfinal_states"] is not None,
    "HAS_DINITIAL": lambda args: args["dinitial_states"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
})
@triton.jit(do_not_specialize=["seqlen", "num_seqs"])
def causal_conv1d_bwd_kernel(
    x, weight, bias, initial_states, dout, dfinal_states, dx, dweight_part, dbias_part, dinitial_states,
    cu_seqlens, seq_idx, dim, seqlen, num_seqs,
    stride_x_b, stride_x_d, stride_x_l,
    stride_w_d, stride_w_k,
    stride_init_b, stride_init_d, stride_init_k,
    stride_dout_b, stride_dout_d, stride_dout_l,
    stride_dfin_b, stride_dfin_d, stride_dfin_k,
    stride_dx_b, stride_dx_d, stride_dx_l,
    WIDTH: tl.constexpr, SILU: tl.constexpr,
    HAS_INITIAL: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_DINITIAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """dx, and the dweight / dbias partials, of one (batch, channel block, time block).

    grid as the forward. dweight_part (batch, n_lblocks, dim, W) and dbias_part (batch, n_lblocks, dim)
    float32 contiguous, one slot per program. Time block 0 also writes dinitial_states (contiguous).
    bias is a float32 (dim,) tensor (zeros when the op had none).
    IS_VARLEN: as the forward; dinitial_states of sequence block i from time block i mod n_blocks.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    pid_l = tl.program_id(2)
    mask_d = offs_d < dim
    x_base = x + pid_b * stride_x_b
    init_base = initial_states  # None when absent: then _xpad_tile never touches it
    dfin_base = dfinal_states
    if IS_VARLEN:
        offs_t = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_t = offs_t < seqlen
        seq, len_t, local_t = _packed_columns(cu_seqlens, seq_idx, offs_t, mask_t)
        init_off, dfin_off = seq.to(tl.int64) * stride_init_b, seq.to(tl.int64) * stride_dfin_b
    else:
        offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_t = offs_t < seqlen
        len_t, local_t, init_off, dfin_off = seqlen, offs_t, 0, 0
        if HAS_INITIAL:
            init_base = initial_states + pid_b * stride_init_b
        if HAS_DFINAL:
            dfin_base = dfinal_states + pid_b * stride_dfin_b
    dout_base = dout + pid_b * stride_dout_b
    bias_v = tl.load(bias + offs_d, mask=mask_d, other=0.0)

    # dx[t] = sum_k w[k] dz[t + W-1-k] (+ dfinal_states[t + W-1 - L] on the last W-1 steps)
    g = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_DFINAL:
        j = local_t + (WIDTH - 1) - len_t
        tail = mask_d[:, None] & ((j >= 0) & mask_t)[None, :]
        dfin = tl.load(dfin_base + offs_d[:, None] * stride_dfin_d + (dfin_off + j * stride_dfin_k)[None, :],
                       mask=tail, other=0.0)
        g += dfin.to(tl.float32)
    for k in tl.static_range(WIDTH):
        w_k = tl.load(weight + offs_d * stride_w_d + k * stride_w_k, mask=mask_d, other=0.0)
        dz_k = _dz_tile(dout_base, x_base, init_base, weight, bias_v, offs_d, mask_d, local_t + (WIDTH - 1 - k),
                        offs_t + (WIDTH - 1 - k), len_t, init_off, stride_x_d, stride_x_l, stride_init_d,
                        stride_init_k, stride_w_d, stride_w_k, stride_dout_d, stride_dout_l, WIDTH, SILU, HAS_INITIAL)
        g += w_k[:, None] * dz_k
    dx_ptrs = dx + pid_b * stride_dx_b + (offs_d[:, None] * stride_dx_d + offs_t[None, :] * stride_dx_l)
    tl.store(dx_ptrs, g.to(dx.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])

    # dweight[k] += sum_t dz[t] xpad[t + k];  dbias += sum_t dz[t]   (dz is 0 past seqlen)
    dz0 = _dz_tile(dout_base, x_base, init_base, weight, bias_v, offs_d, mask_d, local_t, offs_t, len_t, init_off,
                   stride_x_d, stride_x_l, stride_init_d, stride_init_k, stride_w_d, stride_w_k,
                   stride_dout_d, stride_dout_l, WIDTH, SILU, HAS_INITIAL)
    part = (pid_b * tl.num_programs(2) + pid_l) * dim + offs_d
    for k in tl.static_range(WIDTH):
        x_k = _xpad_tile(x_base, init_base, offs_d, mask_d, local_t + k, offs_t + k, len_t, init_off, stride_x_d,
                         stride_x_l, stride_init_d, stride_init_k, WIDTH, HAS_INITIAL)
        tl.store(dweight_part + part * WIDTH + k, tl.sum(dz0 * x_k, axis=1), mask=mask_d)
    tl.store(dbias_part + part, tl.sum(dz0, axis=1), mask=mask_d)

    if HAS_DINITIAL:
        if IS_VARLEN:
            # SEQ_BLOCK sequences at a time, half the forward's: (BLOCK_D, BLOCK_L) state columns took
            # 128-139 registers (4 x 64 tile, width 4), half of them 88-95, as the main tile alone
            SEQ_BLOCK: tl.constexpr = BLOCK_L // (2 * BLOCK_W) if BLOCK_L >= 2 * BLOCK_W else 1
            for block in range(pid_l, tl.cdiv(num_seqs, SEQ_BLOCK), tl.num_programs(2)):
                seq_s, start_s, len_s, slot, keep = _state_columns(cu_seqlens, num_seqs, block, SEQ_BLOCK, BLOCK_W)
                _store_dinitial(dout_base, x_base, init_base, weight, bias_v, dfinal_states, dinitial_states,
                                offs_d, mask_d, slot, keep & (slot < WIDTH - 1), start_s, len_s,
                                seq_s * stride_init_b, seq_s * stride_dfin_b, seq_s * dim * (WIDTH - 1),
                                stride_x_d, stride_x_l, stride_init_d, stride_init_k, stride_w_d, stride_w_k,
                                stride_dout_d, stride_dout_l, stride_dfin_d, stride_dfin_k,
                                WIDTH, SILU, HAS_INITIAL, HAS_DFINAL, BLOCK_D, SEQ_BLOCK * BLOCK_W)
        elif pid_l == 0:
            offs_q = tl.arange(0, BLOCK_W)
            _store_dinitial(dout_base, x_base, init_base, weight, bias_v, dfin_base,
                            dinitial_states + pid_b * dim * (WIDTH - 1),
                            offs_d, mask_d, offs_q, offs_q < WIDTH - 1, 0, seqlen, 0, 0, 0,
                            stride_x_d, stride_x_l, stride_init_d, stride_init_k, stride_w_d, stride_w_k,
                            stride_dout_d, stride_dout_l, stride_dfin_d, stride_dfin_k,
                            WIDTH, SILU, HAS_INITIAL, HAS_DFINAL, BLOCK_D, BLOCK_W)


@triton.jit
def causal_conv1d_update_kernel(
    x, conv_state, weight, bias, out,
    dim, seqlen, state_len,
    stride_x_b, stride_x_d, stride_x_l,
    stride_s_b, stride_s_d, stride_s_l,
    stride_w_d, stride_w_k,
    stride_out_b, stride_out_d, stride_out_l,
    WIDTH: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Decode step for one (batch, channel block): out for the T new tokens, conv_state shifted in place.

    grid: (batch, cdiv(dim, BLOCK_D)). window[j] = conv_state[S-W+1+j] for j < W-1, x[j-W+1] after.
    Every load of conv_state precedes a barrier that precedes the stores, so no thread overwrites
    an entry another thread has still to read.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < seqlen
    x_rows = x + pid_b * stride_x_b + offs_d[:, None] * stride_x_d
    s_rows = conv_state + pid_b * stride_s_b + offs_d[:, None] * stride_s_d

    acc = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + offs_d, mask=mask_d, other=0.0)[:, None]
    for k in tl.static_range(WIDTH):
        j = offs_t + k
        from_state = mask_d[:, None] & (j < WIDTH - 1)[None, :]
        from_x = mask_d[:, None] & ((j >= WIDTH - 1) & mask_t)[None, :]
        v = tl.load(s_rows + (state_len - (WIDTH - 1) + j)[None, :] * stride_s_l, mask=from_state, other=0.0)
        v = v.to(tl.float32) + tl.load(x_rows + (j - (WIDTH - 1))[None, :] * stride_x_l, mask=from_x,
                                       other=0.0).to(tl.float32)
        w_k = tl.load(weight + offs_d * stride_w_d + k * stride_w_k, mask=mask_d, other=0.0)
        acc += w_k[:, None] * v
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out_ptrs = out + pid_b * stride_out_b + (offs_d[:, None] * stride_out_d + offs_t[None, :] * stride_out_l)
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])

    offs_s = tl.arange(0, BLOCK_S)
    src = offs_s + seqlen
    keep = mask_d[:, None] & ((offs_s < state_len) & (src < state_len))[None, :]
    new = mask_d[:, None] & ((offs_s < state_len) & (src >= state_len))[None, :]
    shifted = tl.load(s_rows + src[None, :] * stride_s_l, mask=keep, other=0.0).to(tl.float32)
    shifted += tl.load(x_rows + (src - state_len)[None, :] * stride_x_l, mask=new, other=0.0).to(tl.float32)
    tl.debug_barrier()
    tl.store(s_rows + offs_s[None, :] * stride_s_l, shifted.to(conv_state.dtype.element_ty),
             mask=mask_d[:, None] & (offs_s < state_len)[None, :])


# ----------------------------------------------------------------------------------------------
# Host launchers (inputs validated by fastscan.causal_conv1d_fn / causal_conv1d_update)
# ----------------------------------------------------------------------------------------------
def _grid_and_tiles(x, kind, varlen):
    batch, dim, seqlen = x.shape
    block_d, block_l, num_warps = _TILES[(kind, _channel_last(x), varlen)]
    block_d = min(block_d, triton.next_power_of_2(dim))
    # max(1, .): an all-empty pack (seqlen 0) still has per-sequence states to write
    grid = (batch, triton.cdiv(dim, block_d), max(1, triton.cdiv(seqlen, block_l)))
    return grid, block_d, block_l, num_warps


def _strides(t, n):
    return t.stride() if t is not None else (0,) * n


def _packing(x, cu_seqlens):
    """(num_seqs, seq_idx): seq_idx[t] = the sequence of packed step t, found on the device (no host sync);
    right=True skips empty sequences (equal boundaries) to the one that holds t. (batch, None) unpacked."""
    if cu_seqlens is None:
        return x.shape[0], None
    steps = torch.arange(x.shape[2], dtype=torch.int32, device=x.device)
    seq_idx = torch.searchsorted(cu_seqlens, steps, right=True, out_int32=True) - 1
    return cu_seqlens.numel() - 1, seq_idx


def causal_conv1d_fwd(x, weight, bias, initial_states, silu, cu_seqlens=None):
    """(out, final_states); final_states (num_seqs, dim, W-1) when cu_seqlens packs sequences along x's time."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    num_states, seq_idx = _packing(x, cu_seqlens)
    out = like_x(x)
    final_states = torch.empty((num_states, dim, width - 1), dtype=x.dtype, device=x.device)
    grid, block_d, block_l, num_warps = _grid_and_tiles(x, "fwd", cu_seqlens is not None)
    causal_conv1d_fwd_kernel[grid](
        x, weight, bias, initial_states, out, final_states, cu_seqlens, seq_idx, dim, seqlen, num_states,
        *x.stride(), *weight.stride(), *_strides(initial_states, 3), *out.stride(),
        WIDTH=width, SILU=bool(silu), BLOCK_D=block_d, BLOCK_L=block_l,
        BLOCK_W=triton.next_power_of_2(width - 1), num_warps=num_warps)
    return out, final_states


def causal_conv1d_bwd(x, weight, bias, initial_states, dout, dfinal_states, silu, need_dinitial, cu_seqlens=None):
    """(dx, dweight, dbias, dinitial_states); per sequence states as in causal_conv1d_fwd."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    num_states, seq_idx = _packing(x, cu_seqlens)
    f32 = dict(dtype=torch.float32, device=x.device)
    grid, block_d, block_l, num_warps = _grid_and_tiles(x, "bwd", cu_seqlens is not None)
    dx = like_x(x)
    dweight_part = torch.empty((batch, grid[2], dim, width), **f32)
    dbias_part = torch.empty((batch, grid[2], dim), **f32)
    dinit = torch.empty((num_states, dim, width - 1), dtype=x.dtype, device=x.device) if need_dinitial else None
    bias_in = bias if bias is not None else torch.zeros((dim,), **f32)
    causal_conv1d_bwd_kernel[grid](
        x, weight, bias_in, initial_states, dout, dfinal_states, dx, dweight_part, dbias_part, dinit,
        cu_seqlens, seq_idx, dim, seqlen, num_states,
        *x.stride(), *weight.stride(), *_strides(initial_states, 3), *dout.stride(), *_strides(dfinal_states, 3),
        *dx.stride(), WIDTH=width, SILU=bool(silu), BLOCK_D=block_d, BLOCK_L=block_l,
        BLOCK_W=triton.next_power_of_2(width - 1), num_warps=num_warps)
    dbias = dbias_part.sum((0, 1)) if bias is not None else None
    return dx, dweight_part.sum((0, 1)), dbias, dinit


def causal_conv1d_update(x, conv_state, weight, bias, silu):
    batch, dim, seqlen = x.shape
    width, state_len = weight.shape[1], conv_state.shape[2]
    out = like_x(x)
    block_t, block_s = triton.next_power_of_2(seqlen), triton.next_power_of_2(state_len)
    block_d = max(1, min(128 if not _INTERPRET else 8, 4096 // max(block_t, block_s), triton.next_power_of_2(dim)))
    grid = (batch, triton.cdiv(dim, block_d))
    causal_conv1d_update_kernel[grid](
        x, conv_state, weight, bias, out, dim, seqlen, state_len,
        *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        WIDTH=width, SILU=bool(silu), HAS_BIAS=bias is not None,
        BLOCK_D=block_d, BLOCK_T=block_t, BLOCK_S=block_s, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (consumed by fastscan/aot.py): width 4 with silu and every optional
# input present (the most registers), both layouts' tiles with their stride-1 axis specialised.
# Packed sequences: the backward only (its register peak and its own channel-last tile); the
# varlen forward (90-136 registers, see the NOTE on tiles) is left out to keep the list short.
# ----------------------------------------------------------------------------------------------
def _jit_fn(kernel):
    while isinstance(kernel, (triton.runtime.autotuner.Heuristics, triton.runtime.autotuner.Autotuner)):
        kernel = kernel.fn
    return kernel


_INPUT_DTYPE_PTRS = {"x", "initial_states", "out", "final_states", "dout", "dfinal_states", "dx",
                     "dinitial_states"}


def _aot_spec(name, kernel, dtype, channel_last, extra_constexprs, num_warps=4):
    fn = _jit_fn(kernel)
    unit_axis = "_d" if channel_last else "_l"
    constexprs = dict(extra_constexprs)
    signature = {}
    for arg in fn.arg_names:
        if arg in _INPUT_DTYPE_PTRS:
            signature[arg] = "*" + dtype
        elif arg in ("weight", "bias", "dweight_part", "dbias_part", "conv_state"):
            signature[arg] = "*fp32"
        elif arg in ("cu_seqlens", "seq_idx"):  # None (a constexpr) unless the spec is IS_VARLEN
            signature[arg] = "*i32" if constexprs.get("IS_VARLEN") else "constexpr"
            if not constexprs.get("IS_VARLEN"):
                constexprs[arg] = None
        elif arg.startswith("stride_") and arg.endswith(unit_axis) and arg.split("_")[1] in ("x", "out", "dout", "dx"):
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg in constexprs:
            signature[arg] = "constexpr"
        else:
            signature[arg] = "i32"
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs, "num_warps": num_warps,
            "num_stages": 1}


def _aot_specs(varlen_kinds=("bwd",)):
    specs = []
    cases = [(dtype, channel_last, False) for dtype, channel_last in (("fp32", False), ("bf16", False), ("bf16", True))]
    cases += [("bf16", channel_last, True) for channel_last in (False, True)]
    for dtype, channel_last, varlen in cases:
        layout = ("cl" if channel_last else "c") + ("_varlen" if varlen else "")
        for kind, kernel, flags in (
                ("fwd", causal_conv1d_fwd_kernel, dict(HAS_BIAS=True, HAS_INITIAL=True, STORE_FINAL=True)),
                ("bwd", causal_conv1d_bwd_kernel, dict(HAS_INITIAL=True, HAS_DFINAL=True, HAS_DINITIAL=True))):
            if varlen and kind not in varlen_kinds:
                continue
            block_d, block_l, num_warps = _GPU_TILES[(kind, channel_last, varlen)]
            constexprs = dict(flags, WIDTH=4, SILU=True, IS_VARLEN=varlen, BLOCK_D=block_d, BLOCK_L=block_l,
                              BLOCK_W=4)
            name = f"causal_conv1d_{kind}_{dtype}_{layout}_w4_d{block_d}_l{block_l}_w{num_warps}"
            specs.append(_aot_spec(name, kernel, dtype, channel_last, constexprs, num_warps))
    specs.append(_aot_spec("causal_conv1d_update_bf16_w4", causal_conv1d_update_kernel, "bf16", False,
                           dict(WIDTH=4, SILU=True, HAS_BIAS=True, BLOCK_D=128, BLOCK_T=4, BLOCK_S=4)))
    return specs


AOT_SPECS = _aot_specs()
