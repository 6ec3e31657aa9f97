"""Mamba-1 selective scan in Triton: forward, backward (recomputing states), host launchers.

    delta' = delta + delta_bias[d];  if delta_softplus: delta' = softplus(delta')  (identity above 20)
    h_t[n] = exp(delta'_t A[d, n]) h_{t-1}[n] + delta'_t B[g, n, t] u_t        h_0 = initial_state or 0
    y_t    = sum_n h_t[n] C[g, n, t] + D[d] u_t;   if z: y_t *= silu(z_t)      last_state = h_seqlen

Layout of the work: one program per (batch, group, block of BLOCK_D channels of that group), so a
program never straddles two groups and B/C are loaded once per program as (BLOCK_N, BLOCK_L) tiles.
The program walks the sequence in chunks of BLOCK_L; inside a chunk the recurrence is a parallel
`tl.associative_scan` over a (BLOCK_D, BLOCK_N, BLOCK_L) tile of (a, b) pairs, and the
(BLOCK_D, BLOCK_N) state is carried between chunks in registers. State and sums are float32.

The backward kernel is one fused program per (batch, group, channel block): a forward sweep writes
each chunk's start state to a float32 scratch (batch, dim, n_chunks, dstate) - never the full
(batch, dim, seqlen, dstate) states - then a reverse sweep reloads a chunk's start state,
recomputes h inside the chunk, and runs the reverse scan for the state gradient with its carry in
registers. Fusing both sweeps keeps them on the same BLOCK_L, so autotuning the backward can never
pair chunk states with a different chunk length. Sums over channels (dB, dC) and over batch (dA,
dD, ddelta_bias) are written as float32 partials per program and reduced on the host with torch
(deterministic, no atomics).

Packed variable-length sequences (cu_seqlens, batch 1): the same kernels with IS_VARLEN, one
program per (sequence, group, channel block) scanning that sequence's tokens from its own initial
state; states and their gradients are per sequence. The grid and every buffer are sized from
shapes only (num_seqs, total), never from the boundaries' values, so nothing syncs with the host.
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# NOTE: the interpreter runs `tl.associative_scan` with a user combine function one element at a
# time in Python: the forward of a (1, 4, 128) input with dstate 16 took 2.2 s that way and 0.27 s
# with the scan done as log2(BLOCK_L) vectorised Hillis-Steele steps built on tl.gather, so under
# the interpreter the scan is the latter; everything around the scan is the code the GPU runs.
# FASTSCAN_INTERPRET_ASSOC_SCAN=1 runs the real associative_scan in the interpreter too.
_INTERPRET_GATHER_SCAN = _INTERPRET and os.environ.get("FASTSCAN_INTERPRET_ASSOC_SCAN", "0") != "1"

_LOG2E = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------------------------
# Configs. Budget in fp32 elements of one (BLOCK_D, BLOCK_N, BLOCK_L) tile per warp.
# NOTE: measured on AOT compiles (cuobjdump --dump-resource-usage, all optional inputs on):
# forward at 4 warps, 4096 elements (16 x 16 x 16, 4 x 64 x 16) take 166-168 registers on sm_80 and
# sm_90, 8192 (32 x 16 x 16, 8 x 64 x 16) spill 24-112 bytes of STACK on sm_90. The backward keeps
# about twice as many tiles live: 2048 elements at 4 warps take 168-254 registers without spilling
# (2 x 64 x 16 is the edge: 254), 4 x 64 x 16 spills 144 bytes. Hence 1024 and 512 per warp.
# ----------------------------------------------------------------------------------------------
_FWD_TILE_PER_WARP = 1024
_BWD_TILE_PER_WARP = 512


def _config_list():
    return [triton.Config({"BLOCK_D": block_d, "BLOCK_L": block_l}, num_warps=num_warps)
            for block_d in (1, 2, 4, 8, 16, 32) for block_l in (16, 32) for num_warps in (4, 8)]


def _prune(tile_per_warp):
    """Keep the configs whose tile is within a factor 2 below the spill budget for this dstate."""
    def prune(configs, named_args, **kwargs):
        block_n = triton.next_power_of_2(named_args["dstate"])
        max_block_d = triton.next_power_of_2(named_args["dim_per_group"])
        kept = []
        for config in configs:
            block_d = config.kwargs["BLOCK_D"]
            tile = block_d * block_n * config.kwargs["BLOCK_L"]
            budget = tile_per_warp * config.num_warps
            if block_d <= max_block_d and budget // 2 < tile <= budget:
                kept.append(config)
        if not kept:  # tiny dim or dstate: the largest tile within budget
            fits = [c for c in configs if c.kwargs["BLOCK_D"] <= max_block_d
                    and c.kwargs["BLOCK_D"] * block_n * c.kwargs["BLOCK_L"] <= tile_per_warp * c.num_warps]
            if fits:
                kept = [max(fits, key=lambda c: (c.kwargs["BLOCK_D"] * c.kwargs["BLOCK_L"], -c.num_warps))]
            else:  # dstate beyond 64 (backward) / 128 (forward): smallest tile, most warps
                kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_D"] * c.kwargs["BLOCK_L"], -c.num_warps))]
        return kept

    return prune


def _size_bwd_buffers(nargs):
    """Config pre_hook: size the backward's scratch for this config's BLOCK_D / BLOCK_L."""
    batch, dim, seqlen = nargs["u"].shape
    dstate, dim_per_group = nargs["dstate"], nargs["dim_per_group"]
    n_chunks = triton.cdiv(seqlen, nargs["BLOCK_L"])
    n_dblocks = triton.cdiv(dim_per_group, nargs["BLOCK_D"])
    if nargs["cu_seqlens"] is not None:  # slots of the packed layout, from shapes only
        nargs["chunk_states"].resize_(dim, nargs["cu_seqlens"].shape[0] - 1 + n_chunks, dstate)
    else:
        nargs["chunk_states"].resize_(batch, dim, n_chunks, dstate)
    for name in ("dB_part", "dC_part"):
        nargs[name].resize_(batch, dim // dim_per_group, n_dblocks, dstate, seqlen)


def _with_pre_hook(configs, hook):
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=hook)
            for c in configs]


if _INTERPRET:
    # Autotuning is meaningless under the interpreter; one small config keeps tests fast.
    _FWD_CONFIGS = [triton.Config({"BLOCK_D": 4, "BLOCK_L": 32}, num_warps=4)]
    _BWD_CONFIGS = [triton.Config({"BLOCK_D": 4, "BLOCK_L": 32}, num_warps=4)]
else:
    _FWD_CONFIGS = _config_list()
    _BWD_CONFIGS = _config_list()


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _linear_combine(a_left, b_left, a_right, b_right):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _linear_scan(a, b, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr, GATHER_SCAN: tl.constexpr):
    """Inclusive scan of h -> a h + b along axis 2 (reverse: from the end of the chunk)."""
    if GATHER_SCAN:
        # Interpreter only (see _INTERPRET_GATHER_SCAN): Hillis-Steele with gathers.
        offs = tl.arange(0, BLOCK_L)[None, None, :] + tl.zeros(a.shape, dtype=tl.int32)
        step = 1
        while step < BLOCK_L:
            if REVERSE:
                src = offs + step
                valid = src < BLOCK_L
                src = tl.minimum(src, BLOCK_L - 1)
            else:
                src = offs - step
                valid = src >= 0
                src = tl.maximum(src, 0)
            a_prev = tl.gather(a, src, 2)
            b_prev = tl.gather(b, src, 2)
            b = tl.where(valid, a * b_prev + b, b)
            a = tl.where(valid, a_prev * a, a)
            step *= 2
    else:
        a, b = tl.associative_scan((a, b), axis=2, combine_fn=_linear_combine, reverse=REVERSE)
    return a, b


@triton.jit
def _load_delta(delta_ptrs, mask, bias, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr):
    """delta' as float32 (BLOCK_D, BLOCK_L), 0 where masked (so padded steps are the identity)."""
    raw = tl.load(delta_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if DELTA_SOFTPLUS:
        # log1p(exp(x)) without a log1p: below -15 exp(x) is exact to fp32 and 1 + exp(x) is not.
        dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
        dt = tl.where(raw < -15.0, tl.exp(raw), dt)
    dt = tl.where(mask, dt, 0.0)
    return dt, raw


@triton.jit
def _program_sequence(cu_seqlens, seqlen, IS_VARLEN: tl.constexpr):
    """(state row, batch of the data, first token (int64), length) of this program's sequence.

    Unpacked: program_id(0) is the batch and the sequence is [0, seqlen). Packed: it is sequence i
    of cu_seqlens and the data has batch 1. One program per sequence means sequences of very
    different lengths give an imbalanced grid (the longest one sets the time); accepted, since the
    grid may depend on shapes only (reading the boundaries on the host would sync).
    The kernels add seq_start * stride to their base pointers once, so the chunk loop is the same
    code in both layouts: offsets inside a sequence stay small int32s and the packed kernel keeps
    about the unpacked one's register use (absolute token offsets in the loop spilled 8 bytes of
    the backward on sm_90).
    """
    pid_s = tl.program_id(0).to(tl.int64)
    if IS_VARLEN:
        start = tl.load(cu_seqlens + pid_s)
        seq_len = tl.load(cu_seqlens + pid_s + 1) - start
        seq_start = start.to(tl.int64)
        pid_b = pid_s * 0
    else:
        seq_start = 0
        seq_len = seqlen
        pid_b = pid_s
    return pid_s, pid_b, seq_start, seq_len


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.heuristics({
    "HAS_D": lambda args: args["D"] is not None,
    "HAS_Z": lambda args: args["z"] is not None,
    "HAS_DELTA_BIAS": lambda args: args["delta_bias"] is not None,
    "USE_INITIAL_STATE": lambda args: args["initial_state"] is not None,
    "STORE_FINAL_STATE": lambda args: args["final_state"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
    "BLOCK_N": lambda args: triton.next_power_of_2(args["dstate"]),
    "GATHER_SCAN": lambda args: _INTERPRET_GATHER_SCAN,
})
@triton.autotune(configs=_FWD_CONFIGS, key=["dim", "dstate"],
                 prune_configs_by={"early_config_prune": _prune(_FWD_TILE_PER_WARP)})
@triton.jit(do_not_specialize=["seqlen"])
def selective_scan_fwd_kernel(
    u, delta, A, B, C, D, z, delta_bias, initial_state, y, final_state, cu_seqlens,
    dim, seqlen, dstate, dim_per_group,
    stride_u_b, stride_u_d, stride_u_l,
    stride_delta_b, stride_delta_d, stride_delta_l,
    stride_B_b, stride_B_g, stride_B_n, stride_B_l,
    stride_C_b, stride_C_g, stride_C_n, stride_C_l,
    stride_z_b, stride_z_d, stride_z_l,
    stride_y_b, stride_y_d,
    DELTA_SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, GATHER_SCAN: tl.constexpr,
):
    """y (and last state) for one (batch, group, channel block).

    grid: (batch, groups * cdiv(dim_per_group, BLOCK_D)). Reads u, delta, z of its channels and
    B, C of its group once; writes y of its channels (contiguous (batch, dim, seqlen)) once and
    final_state (contiguous (batch, dim, dstate) float32) once. A, initial_state contiguous.
    IS_VARLEN: batch is 1 and axis 0 of the grid is the sequence i of cu_seqlens; the program
    scans [cu_seqlens[i], cu_seqlens[i + 1]) of the packed tokens, and initial_state / final_state
    are (num_seqs, dim, dstate).
    """
    pid_s, pid_b, seq_start, seq_len = _program_sequence(cu_seqlens, seqlen, IS_VARLEN)
    pid_gd = tl.program_id(1)
    n_dblocks = tl.cdiv(dim_per_group, BLOCK_D)
    group = pid_gd // n_dblocks
    offs_dg = (pid_gd % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dg < dim_per_group
    offs_d = (group * dim_per_group + offs_dg).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    offs_l = tl.arange(0, BLOCK_L)
    mask_dn = mask_d[:, None] & mask_n[None, :]

    A_tile = tl.load(A + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_D:
        D_vec = tl.load(D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = None
    state_offs = (pid_s * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    if USE_INITIAL_STATE:
        h = tl.load(initial_state + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    u_rows = u + (pid_b * stride_u_b + seq_start * stride_u_l) + offs_d[:, None] * stride_u_d
    delta_rows = delta + (pid_b * stride_delta_b + seq_start * stride_delta_l) + offs_d[:, None] * stride_delta_d
    y_rows = y + (pid_b * stride_y_b + seq_start) + offs_d[:, None] * stride_y_d
    # (dstate, BLOCK_L) tiles: int64 scalar base, int32 offsets inside one (batch, group) slab
    # (a pointer tensor costs two registers per element, an int32 offset one).
    B_base = B + (pid_b * stride_B_b + seq_start * stride_B_l) + group.to(tl.int64) * stride_B_g
    C_base = C + (pid_b * stride_C_b + seq_start * stride_C_l) + group.to(tl.int64) * stride_C_g
    B_rows = offs_n[:, None] * stride_B_n
    C_rows = offs_n[:, None] * stride_C_n

    for start in range(0, seq_len, BLOCK_L):
        offs_t = start + offs_l
        mask_t = offs_t < seq_len
        mask_dl = mask_d[:, None] & mask_t[None, :]
        mask_nl = mask_n[:, None] & mask_t[None, :]
        u_t = tl.load(u_rows + offs_t[None, :] * stride_u_l, mask=mask_dl, other=0.0).to(tl.float32)
        dt, _ = _load_delta(delta_rows + offs_t[None, :] * stride_delta_l, mask_dl, bias,
                            HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        B_t = tl.load(B_base + (B_rows + offs_t[None, :] * stride_B_l), mask=mask_nl, other=0.0)
        C_t = tl.load(C_base + (C_rows + offs_t[None, :] * stride_C_l), mask=mask_nl, other=0.0)
        B_t = B_t.to(tl.float32)
        C_t = C_t.to(tl.float32)

        # Padded steps (t >= seq_len) have delta' = 0, u = 0: a = 1, b = 0, the identity.
        a = tl.exp2((dt * _LOG2E)[:, None, :] * A_tile[:, :, None])
        b = (dt * u_t)[:, None, :] * B_t[None, :, :]
        a, b = _linear_scan(a, b, BLOCK_L, False, GATHER_SCAN)
        h_all = a * h[:, :, None] + b
        y_t = tl.sum(h_all * C_t[None, :, :], axis=1)
        if HAS_D:
            y_t += D_vec[:, None] * u_t
        if HAS_Z:
            z_ptrs = (z + (pid_b * stride_z_b + seq_start * stride_z_l) + offs_d[:, None] * stride_z_d
                      + offs_t[None, :] * stride_z_l)
            z_t = tl.load(z_ptrs, mask=mask_dl, other=0.0).to(tl.float32)
            y_t *= z_t * tl.sigmoid(z_t)
        tl.store(y_rows + offs_t[None, :], y_t.to(y.dtype.element_ty), mask=mask_dl)
        # The last column is the state after min(start + BLOCK_L, seq_len) steps.
        h = tl.sum(tl.where((offs_l == BLOCK_L - 1)[None, None, :], h_all, 0.0), axis=2)

    if STORE_FINAL_STATE:
        tl.store(final_state + state_offs, h, mask=mask_dn)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.heuristics({
    "HAS_D": lambda args: args["D"] is not None,
    "HAS_Z": lambda args: args["z"] is not None,
    "HAS_DELTA_BIAS": lambda args: args["delta_bias"] is not None,
    "USE_INITIAL_STATE": lambda args: args["initial_state"] is not None,
    "HAS_DLAST_STATE": lambda args: args["dlast_state"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
    "BLOCK_N": lambda args: triton.next_power_of_2(args["dstate"]),
    "GATHER_SCAN": lambda args: _INTERPRET_GATHER_SCAN,
})
@triton.autotune(configs=_with_pre_hook(_BWD_CONFIGS, _size_bwd_buffers), key=["dim", "dstate"],
                 prune_configs_by={"early_config_prune": _prune(_BWD_TILE_PER_WARP)})
@triton.jit(do_not_specialize=["seqlen"])
def selective_scan_bwd_kernel(
    u, delta, A, B, C, D, z, delta_bias, initial_state, dy, dlast_state, chunk_states,
    du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, ddelta_bias_part, dinitial_state, cu_seqlens,
    dim, seqlen, dstate, dim_per_group,
    stride_u_b, stride_u_d, stride_u_l,
    stride_delta_b, stride_delta_d, stride_delta_l,
    stride_B_b, stride_B_g, stride_B_n, stride_B_l,
    stride_C_b, stride_C_g, stride_C_n, stride_C_l,
    stride_z_b, stride_z_d, stride_z_l,
    stride_dy_b, stride_dy_d, stride_dy_l,
    stride_grad_b, stride_grad_d,
    DELTA_SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, HAS_DLAST_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, GATHER_SCAN: tl.constexpr,
):
    """All gradients for one (batch, group, channel block); same grid as the forward.

    Sweep 1 (forward) writes the state at the start of every chunk to chunk_states
    (batch, dim, n_chunks, dstate) float32. Sweep 2 walks the chunks backwards with the state
    gradient g_t = dy'_t C_t + exp(delta'_{t+1} A) g_{t+1} (g past the end = dlast_state) carried
    between chunks. With a_t = exp(delta'_t A) and x_t = delta'_t B_t u_t (so a_t h_{t-1} = h_t - x_t):
        du_t     = delta'_t sum_n g_t B_t + D dy'_t
        ddelta'_t = u_t sum_n g_t B_t + sum_n A g_t (h_t - x_t)
        dA      += sum_t delta'_t g_t (h_t - x_t)          dB_t += sum_d g_t delta'_t u_t
        dC_t    += sum_d dy'_t h_t                         dinitial_state = a_1 g_1
    Writes du, ddelta, dz (contiguous (batch, dim, seqlen), input dtype) and dinitial_state once;
    float32 partials: dA_part (batch, dim, dstate), dD_part / ddelta_bias_part (batch, dim),
    dB_part / dC_part (batch, groups, n_dblocks, dstate, seqlen), summed on the host.
    IS_VARLEN: axis 0 is the sequence i of cu_seqlens (batch 1), the sweeps cover its tokens only;
    initial/dlast/dinitial states and dA/dD/ddelta_bias partials are per sequence instead of per
    batch; chunk_states is (dim, num_seqs + cdiv(seqlen, BLOCK_L), dstate) and chunk k of sequence
    i has slot i + cu_seqlens[i] // BLOCK_L + k: the slots of consecutive sequences never overlap
    (floor(s / L) + ceil(n / L) <= floor((s + n) / L) + 1), and the size needs no boundary values.
    """
    pid_s, pid_b, seq_start, seq_len = _program_sequence(cu_seqlens, seqlen, IS_VARLEN)
    pid_gd = tl.program_id(1)
    n_dblocks = tl.cdiv(dim_per_group, BLOCK_D)
    n_chunks = tl.cdiv(seq_len, BLOCK_L)
    group = pid_gd // n_dblocks
    pid_dblock = pid_gd % n_dblocks
    offs_dg = pid_dblock * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dg < dim_per_group
    offs_d = (group * dim_per_group + offs_dg).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    offs_l = tl.arange(0, BLOCK_L)
    mask_dn = mask_d[:, None] & mask_n[None, :]

    A_tile = tl.load(A + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A_log2e = A_tile * _LOG2E
    if HAS_D:
        D_vec = tl.load(D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = None
    state_offs = (pid_s * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    if IS_VARLEN:
        # chunk_states[d, slot, n]
        n_slots = tl.num_programs(0) + tl.cdiv(seqlen, BLOCK_L)
        first_slot = pid_s + (seq_start.to(tl.int32) // BLOCK_L)
        chunk_offs = (offs_d[:, None] * n_slots + first_slot) * dstate + offs_n[None, :]
    else:
        # chunk_states[b, d, c, n]
        chunk_offs = (pid_b * dim + offs_d[:, None]) * n_chunks * dstate + offs_n[None, :]

    u_rows = u + (pid_b * stride_u_b + seq_start * stride_u_l) + offs_d[:, None] * stride_u_d
    delta_rows = delta + (pid_b * stride_delta_b + seq_start * stride_delta_l) + offs_d[:, None] * stride_delta_d
    dy_rows = dy + (pid_b * stride_dy_b + seq_start * stride_dy_l) + offs_d[:, None] * stride_dy_d
    grad_rows = (pid_b * stride_grad_b + seq_start) + offs_d[:, None] * stride_grad_d
    # (dstate, BLOCK_L) tiles: int64 scalar base, int32 offsets inside one (batch, group) slab
    # (a pointer tensor costs two registers per element, an int32 offset one).
    B_base = B + (pid_b * stride_B_b + seq_start * stride_B_l) + group.to(tl.int64) * stride_B_g
    C_base = C + (pid_b * stride_C_b + seq_start * stride_C_l) + group.to(tl.int64) * stride_C_g
    B_rows = offs_n[:, None] * stride_B_n
    C_rows = offs_n[:, None] * stride_C_n
    # dB_part[b, g, dblock, n, t] / dC_part, contiguous
    part_base = ((pid_b * (dim // dim_per_group) + group) * n_dblocks + pid_dblock) * dstate * seqlen
    dB_base = dB_part + (part_base + seq_start)
    dC_base = dC_part + (part_base + seq_start)
    part_rows = offs_n[:, None] * seqlen

    # Sweep 1: chunk start states.
    if USE_INITIAL_STATE:
        h = tl.load(initial_state + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for chunk in range(0, n_chunks):
        tl.store(chunk_states + chunk_offs + chunk * dstate, h, mask=mask_dn)
        offs_t = chunk * BLOCK_L + offs_l
        mask_t = offs_t < seq_len
        mask_dl = mask_d[:, None] & mask_t[None, :]
        u_t = tl.load(u_rows + offs_t[None, :] * stride_u_l, mask=mask_dl, other=0.0).to(tl.float32)
        dt, _ = _load_delta(delta_rows + offs_t[None, :] * stride_delta_l, mask_dl, bias,
                            HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        mask_nl = mask_n[:, None] & mask_t[None, :]
        B_t = tl.load(B_base + (B_rows + offs_t[None, :] * stride_B_l), mask=mask_nl, other=0.0).to(tl.float32)
        a = tl.exp2(dt[:, None, :] * A_log2e[:, :, None])
        b = (dt * u_t)[:, None, :] * B_t[None, :, :]
        a, b = _linear_scan(a, b, BLOCK_L, False, GATHER_SCAN)
        h_all = a * h[:, :, None] + b
        h = tl.sum(tl.where((offs_l == BLOCK_L - 1)[None, None, :], h_all, 0.0), axis=2)
    # The reverse sweep reads the states other threads of this program wrote.
    tl.debug_barrier()

    # Sweep 2: reverse. g_carry = g at the first step of the chunk after this one.
    if HAS_DLAST_STATE:
        g_carry = tl.load(dlast_state + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        g_carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, n_chunks):
        chunk = n_chunks - 1 - i
        offs_t = chunk * BLOCK_L + offs_l
        mask_t = offs_t < seq_len
        mask_dl = mask_d[:, None] & mask_t[None, :]
        mask_nl = mask_n[:, None] & mask_t[None, :]
        u_t = tl.load(u_rows + offs_t[None, :] * stride_u_l, mask=mask_dl, other=0.0).to(tl.float32)
        dt, dt_raw = _load_delta(delta_rows + offs_t[None, :] * stride_delta_l, mask_dl, bias,
                                 HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        # delta' one step ahead; 0 (a = 1) past the end, where g is dlast_state.
        mask_next = mask_d[:, None] & (offs_t + 1 < seq_len)[None, :]
        dt_next, _ = _load_delta(delta_rows + (offs_t + 1)[None, :] * stride_delta_l, mask_next, bias,
                                 HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        dy_t = tl.load(dy_rows + offs_t[None, :] * stride_dy_l, mask=mask_dl, other=0.0).to(tl.float32)
        B_t = tl.load(B_base + (B_rows + offs_t[None, :] * stride_B_l), mask=mask_nl, other=0.0)
        C_t = tl.load(C_base + (C_rows + offs_t[None, :] * stride_C_l), mask=mask_nl, other=0.0)
        B_t = B_t.to(tl.float32)
        C_t = C_t.to(tl.float32)
        h_start = tl.load(chunk_states + chunk_offs + chunk * dstate, mask=mask_dn, other=0.0)

        # Recompute h inside the chunk.
        a = tl.exp2(dt[:, None, :] * A_log2e[:, :, None])
        x = (dt * u_t)[:, None, :] * B_t[None, :, :]
        a, b = _linear_scan(a, x, BLOCK_L, False, GATHER_SCAN)
        h_all = a * h_start[:, :, None] + b
        if HAS_Z:
            z_ptrs = (z + (pid_b * stride_z_b + seq_start * stride_z_l) + offs_d[:, None] * stride_z_d
                      + offs_t[None, :] * stride_z_l)
            z_t = tl.load(z_ptrs, mask=mask_dl, other=0.0).to(tl.float32)
            y_t = tl.sum(h_all * C_t[None, :, :], axis=1)
            if HAS_D:
                y_t += D_vec[:, None] * u_t
            sig_z = tl.sigmoid(z_t)
            dz_t = dy_t * y_t * sig_z * (1.0 + z_t * (1.0 - sig_z))
            tl.store(dz + grad_rows + offs_t[None, :], dz_t.to(dz.dtype.element_ty), mask=mask_dl)
            dy_t = dy_t * z_t * sig_z
        dC_t = tl.sum(h_all * dy_t[:, None, :], axis=0)
        tl.store(dC_base + (part_rows + offs_t[None, :]), dC_t, mask=mask_nl)
        # a_t h_{t-1}; at padded steps it is h_{seq_len}, harmless: every use below has delta' = 0
        # or is masked there.
        ah_prev = h_all - x

        # Reverse scan for g.
        a_next = tl.exp2(dt_next[:, None, :] * A_log2e[:, :, None])
        c = dy_t[:, None, :] * C_t[None, :, :]
        a_next, c = _linear_scan(a_next, c, BLOCK_L, True, GATHER_SCAN)
        g = a_next * g_carry[:, :, None] + c
        g_carry = tl.sum(tl.where((offs_l == 0)[None, None, :], g, 0.0), axis=2)

        gB = tl.sum(g * B_t[None, :, :], axis=1)
        q = g * ah_prev
        ddt = gB * u_t + tl.sum(q * A_tile[:, :, None], axis=1)
        dA_acc += tl.sum(q * dt[:, None, :], axis=2)
        dB_t = tl.sum(g * (dt * u_t)[:, None, :], axis=0)
        tl.store(dB_base + (part_rows + offs_t[None, :]), dB_t, mask=mask_nl)
        du_t = gB * dt
        if HAS_D:
            du_t += D_vec[:, None] * dy_t
            dD_acc += tl.sum(dy_t * u_t, axis=1)
        tl.store(du + grad_rows + offs_t[None, :], du_t.to(du.dtype.element_ty), mask=mask_dl)
        if DELTA_SOFTPLUS:
            ddt = tl.where(dt_raw <= 20.0, ddt * tl.sigmoid(dt_raw), ddt)
        ddt = tl.where(mask_dl, ddt, 0.0)
        if HAS_DELTA_BIAS:
            dbias_acc += tl.sum(ddt, axis=1)
        tl.store(ddelta + grad_rows + offs_t[None, :], ddt.to(ddelta.dtype.element_ty), mask=mask_dl)

    if USE_INITIAL_STATE:
        # dh_0 = a_1 g_1 with g_carry = g_1 now; an empty sequence has a = 1: dh_0 = dlast_state.
        first = tl.zeros((1, 1), dtype=tl.int32)
        if IS_VARLEN:
            # Read the length again rather than keep "is it empty" live through sweep 2: that
            # predicate was the one value spilled (8 bytes, sm_80, BLOCK_D 8 BLOCK_L 16 4 warps).
            seq_len = tl.load(cu_seqlens + pid_s + 1) - tl.load(cu_seqlens + pid_s)
        dt0, _ = _load_delta(delta_rows + first, mask_d[:, None] & (first < seq_len), bias,
                             HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        dh0 = tl.exp2(dt0 * A_log2e) * g_carry
        tl.store(dinitial_state + state_offs, dh0, mask=mask_dn)
    tl.store(dA_part + state_offs, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_part + pid_s * dim + offs_d, dD_acc, mask=mask_d)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias_part + pid_s * dim + offs_d, dbias_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _f32_contiguous(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _num_states(batch, cu_seqlens):
    """Programs along grid axis 0 and rows of the state tensors: batch, or sequences when packed."""
    return batch if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _int32_contiguous(t):
    return None if t is None else t.to(torch.int32).contiguous()


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                       return_last_state, cu_seqlens=None):
    """y (u's dtype, contiguous (batch, dim, seqlen)) and last_state (float32) or None.

    cu_seqlens: packed sequences (batch 1), int32 (num_seqs + 1,) on u's device; then
    initial_state and last_state are (num_seqs, dim, dstate).
    """
    batch, dim, seqlen = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    dim_per_group = dim // groups
    A, D, delta_bias, initial_state = map(_f32_contiguous, (A, D, delta_bias, initial_state))
    cu_seqlens = _int32_contiguous(cu_seqlens)
    n_states = _num_states(batch, cu_seqlens)
    y = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=u.device)
    last_state = (torch.empty((n_states, dim, dstate), dtype=torch.float32, device=u.device)
                  if return_last_state else None)
    z_strides = z.stride() if z is not None else (0, 0, 0)

    def grid(meta):
        return (n_states, groups * triton.cdiv(dim_per_group, meta["BLOCK_D"]))

    selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, initial_state, y, last_state, cu_seqlens,
        dim, seqlen, dstate, dim_per_group,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *z_strides, y.stride(0), y.stride(1),
        DELTA_SOFTPLUS=bool(delta_softplus),
    )
    return y, last_state


def selective_scan_bwd(dy, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                       initial_state, cu_seqlens=None):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); None for absent inputs.

    cu_seqlens as in selective_scan_fwd; dlast_state and dinitial_state are then (num_seqs, dim, dstate).
    """
    batch, dim, seqlen = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    dim_per_group = dim // groups
    device = u.device
    A, D, delta_bias, initial_state, dlast_state = map(
        _f32_contiguous, (A, D, delta_bias, initial_state, dlast_state))
    cu_seqlens = _int32_contiguous(cu_seqlens)
    n_states = _num_states(batch, cu_seqlens)
    f32 = dict(dtype=torch.float32, device=device)
    du = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=device)
    ddelta = torch.empty((batch, dim, seqlen), dtype=delta.dtype, device=device)
    dz = torch.empty((batch, dim, seqlen), dtype=z.dtype, device=device) if z is not None else None
    # Per batch or per sequence: one program per row writes each row once.
    dA_part = torch.empty((n_states, dim, dstate), **f32)
    dD_part = torch.empty((n_states, dim), **f32) if D is not None else None
    ddelta_bias_part = torch.empty((n_states, dim), **f32) if delta_bias is not None else None
    dinitial_state = torch.empty((n_states, dim, dstate), **f32) if initial_state is not None else None
    z_strides = z.stride() if z is not None else (0, 0, 0)
    # chunk_states, dB_part and dC_part are sized by the config's BLOCK_D / BLOCK_L; the config's
    # pre_hook (_size_bwd_buffers) resizes them before each launch, autotuning runs included.
    chunk_states = torch.empty(0, **f32)
    dB_part = torch.empty(0, **f32)
    dC_part = torch.empty(0, **f32)

    def grid(meta):
        return (n_states, groups * triton.cdiv(dim_per_group, meta["BLOCK_D"]))

    selective_scan_bwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, initial_state, dy, dlast_state, chunk_states,
        du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, ddelta_bias_part, dinitial_state, cu_seqlens,
        dim, seqlen, dstate, dim_per_group,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *z_strides, *dy.stride(),
        du.stride(0), du.stride(1),
        DELTA_SOFTPLUS=bool(delta_softplus),
    )
    dA = dA_part.sum(0)
    dB = dB_part.sum(2).to(B.dtype)
    dC = dC_part.sum(2).to(C.dtype)
    dD = dD_part.sum(0) if D is not None else None
    ddelta_bias = ddelta_bias_part.sum(0) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (consumed by fastscan/aot.py): every config the autotuner keeps for
# dstate 16 and 64, fp32 and bf16 inputs, all optional inputs present (the most registers), the
# innermost strides 1 as the JIT specialises them for contiguous tensors.
# ----------------------------------------------------------------------------------------------
def _jit_fn(kernel):
    # Unwrap heuristics/autotune (the interpreter's innermost object is not a JITFunction).
    while isinstance(kernel, (triton.runtime.autotuner.Heuristics, triton.runtime.autotuner.Autotuner)):
        kernel = kernel.fn
    return kernel


_POINTER_ARGS = {
    # name -> True when it has the input dtype, False for float32
    "fwd": {"u": True, "delta": True, "A": False, "B": True, "C": True, "D": False, "z": True,
            "delta_bias": False, "initial_state": False, "y": True, "final_state": False},
    "bwd": {"u": True, "delta": True, "A": False, "B": True, "C": True, "D": False, "z": True,
            "delta_bias": False, "initial_state": False, "dy": True, "dlast_state": False,
            "chunk_states": False, "du": True, "ddelta": True, "dz": True, "dA_part": False,
            "dB_part": False, "dC_part": False, "dD_part": False, "ddelta_bias_part": False,
            "dinitial_state": False},
}


def _aot_spec(kind, dtype, dstate, config, varlen=False):
    kernel = selective_scan_fwd_kernel if kind == "fwd" else selective_scan_bwd_kernel
    fn = _jit_fn(kernel)
    constexprs = dict(config.kwargs, BLOCK_N=triton.next_power_of_2(dstate), GATHER_SCAN=False,
                      DELTA_SOFTPLUS=True, HAS_D=True, HAS_Z=True, HAS_DELTA_BIAS=True,
                      USE_INITIAL_STATE=True, IS_VARLEN=varlen)
    constexprs.update({"STORE_FINAL_STATE": True} if kind == "fwd" else {"HAS_DLAST_STATE": True})
    signature = {}
    for name in fn.arg_names:
        if name == "cu_seqlens":  # the JIT makes an absent (None) argument a constexpr
            signature[name] = "*i32" if varlen else "constexpr"
            if not varlen:
                constexprs[name] = None
        elif name in _POINTER_ARGS[kind]:
            signature[name] = "*" + dtype if _POINTER_ARGS[kind][name] else "*fp32"
        elif name.endswith("_l") and name.startswith("stride_"):
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    block = f"d{config.kwargs['BLOCK_D']}_l{config.kwargs['BLOCK_L']}_w{config.num_warps}"
    prefix = "selective_scan_varlen" if varlen else "selective_scan"
    return {"name": f"{prefix}_{kind}_{dtype}_n{dstate}_{block}", "fn": fn,
            "signature": signature, "constexprs": constexprs,
            "num_warps": config.num_warps, "num_stages": config.num_stages}


def _aot_specs(varlen_everywhere=False):
    """Unpacked kernels for every kept config; packed (cu_seqlens) ones in bf16 for every kept
    backward config (a packed backward spilled in one config that is not the largest tile, on one
    arch only) and one forward config per dstate (packed forwards measured within 2 registers of
    the unpacked ones in every config). varlen_everywhere: packed for every config and dtype."""
    specs = []
    for kind, budget in (("fwd", _FWD_TILE_PER_WARP), ("bwd", _BWD_TILE_PER_WARP)):
        for dstate in (16, 64):
            configs = _prune(budget)(_config_list(), {"dstate": dstate, "dim_per_group": 2048})
            for dtype in ("fp32", "bf16"):
                specs += [_aot_spec(kind, dtype, dstate, config) for config in configs]
                if varlen_everywhere or (dtype == "bf16" and kind == "bwd"):
                    specs += [_aot_spec(kind, dtype, dstate, config, varlen=True) for config in configs]
                elif dtype == "bf16":
                    specs.append(_aot_spec(kind, dtype, dstate, configs[0], varlen=True))
    return specs


AOT_SPECS = _aot_specs()
