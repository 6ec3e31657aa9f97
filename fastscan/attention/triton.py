"""Flash attention in Triton: forward with online softmax, backward (dq; dk/dv), split-KV decode.

    s = q k^T * softmax_scale + mask;   out = softmax(s) v;   lse = logsumexp(s) per query row

The mask (see reference.py) is bottom-right causal (query i sees keys j <= i + kv_len - seqlen_q),
per-row `self_only` (row i sees only key i + kv_len - seqlen_q) and the key length kv_len (a scalar,
or per batch row for a KV cache). A row that sees nothing writes out = 0 and lse = +inf, so the
backward's exp(s - lse) is 0 for it. Probabilities are never written to memory: the forward keeps
(max, sum, acc) per row in registers and saves lse; the backward recomputes p = exp(s - lse).

Work layout:
  forward   one program per (query block, batch * head); walks key blocks [lo, hi) of its head's kv
            head (GQA: h // group) in two phases: blocks every row fully sees (no mask), then the
            boundary blocks (causal diagonal, ragged key end, self_only rows) with the mask.
            A query block whose rows are all self_only visits only the keys on its diagonal.
  backward  delta = rowsum(dO * O) first; dk/dv: one program per (key block, batch * kv head) that
            loops over the group's query heads and the query blocks that see its keys (no atomics,
            deterministic); dq: one program per (query block, batch * head), like the forward.
  decode    seqlen_q * group <= 64 rows: one program per (KV split, batch * kv head) whose rows are
            the group's query heads x the query positions, so K/V are read once per kv head; each
            writes a partial (out, lse); a combine kernel merges the splits (flash-decoding).
  packed    (flash_attn_varlen_func) the forward, dk/dv and dq kernels with VARLEN: "batch" is the
            sequence, the grid covers the longest one (max_seqlen_*) and each program reads its
            sequence's rows from cu_seqlens on the device (no host sync), leaving early past its end.
            Sequences of very different lengths leave idle programs; the grid stays shape-only.
Scores and accumulators are float32; fp32 inputs use IEEE dots (no TF32).
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Decode packs group * seqlen_q rows into one M tile; beyond this the forward kernel is better.
_DECODE_MAX_ROWS = 64


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


# ----------------------------------------------------------------------------------------------
# Configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) and the largest headdim each may run with.
# NOTE: measured on AOT compiles for sm_80 and sm_90 (cuobjdump, JIT-like 16-byte alignment, causal
# with a self_only mask, i.e. the most live values): every config listed runs its headdims without
# spilling. The forward's 128 x 64 tile at headdim 128 spills 72 bytes on sm_80 (8 warps), hence
# 128 x 32 there; dk/dv keep two (BLOCK_N, headdim) float32 accumulators plus the K/V tiles live,
# so at headdim 128 only 32 x 32 at 4 warps (190 / 200 registers) and 16 x 64 at 8 warps stay
# below 255 on both archs; at 64, 32 x 128 at 8 warps (225 / 194). Headdims above 128 take the
# smallest tile (not AOT-checked). The first config per headdim is what AOT_SPECS compiles.
# ----------------------------------------------------------------------------------------------
_CONFIG_TABLE = {
    "fwd": [(128, 64, 8, 3, 64), (128, 32, 8, 3, 128), (64, 32, 4, 3, 128), (64, 64, 4, 3, 64), (32, 32, 4, 2, 256)],
    "dkdv": [(32, 128, 8, 2, 64), (32, 64, 8, 2, 64), (32, 32, 4, 2, 128), (16, 64, 8, 2, 128), (16, 32, 4, 1, 256)],
    # NOTE: dq 128x32 at headdim 128 (bf16, 8 warps) compiles to 194 registers with Triton 3.9 but
    # spills 24 bytes on sm_80 with Triton 3.8 (what torch 2.14 pins), so it serves headdim <= 64 only.
    "dq": [(128, 32, 8, 2, 64), (128, 64, 8, 2, 64), (64, 32, 4, 2, 128), (32, 32, 4, 1, 256)],
}
_MAX_HEAD_DIM = {}


def _configs(kind):
    if _INTERPRET:  # autotuning is meaningless under the interpreter; one small config keeps tests fast
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    configs = []
    for m, n, w, s, max_d in _CONFIG_TABLE[kind]:
        configs.append(triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s))
        _MAX_HEAD_DIM[(kind, m, n, w, s)] = max_d
    return configs


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        head_dim = _block_d(kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 0)))
        fits = [c for c in configs if _MAX_HEAD_DIM.get((kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                          c.num_stages), 256) >= head_dim]
        return fits or configs[-1:]
    return prune


def _first_config(kind, head_dim):
    return next(c[:4] for c in _CONFIG_TABLE[kind] if c[4] >= head_dim)


_TUNE_KEY = ["HEAD_DIM", "IS_CAUSAL", "HAS_SELF_ONLY", "HAS_KV_LENS", "VARLEN"]


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------
# NOTE: two Triton 3.9 interpreter bugs with bfloat16, worked around only under the interpreter (the
# compiled kernels never take these branches): tl.dot reads bf16 tiles as raw bits (a 16x16 product
# was off by 2.7e10), so operands are upcast first (exact; the GPU accumulates in fp32 too); and
# fp32 -> bf16 casts truncate (mean bias -1.3e-3 on U(0, 1)) where the GPU rounds to nearest even,
# which tripled the bf16 error against float64, so _cast rounds explicitly first.
_INTERPRET_FIXES = tl.constexpr(_INTERPRET)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    if _INTERPRET_FIXES:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    if _INTERPRET_FIXES:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _row_bounds(offs_m, kv_len, offset, self_rows, IS_CAUSAL: tl.constexpr, HAS_SELF_ONLY: tl.constexpr):
    """Row i sees keys row_lo[i] <= j <= row_hi[i]: the whole mask as two int vectors per query block."""
    diagonal = offs_m + offset
    if IS_CAUSAL:
        row_hi = tl.minimum(diagonal, kv_len - 1)
    else:
        row_hi = offs_m * 0 + (kv_len - 1)
    row_lo = offs_m * 0
    if HAS_SELF_ONLY:
        # diagonal < kv_len always; a negative diagonal leaves the row empty.
        row_lo = tl.where(self_rows != 0, diagonal, row_lo)
        row_hi = tl.where(self_rows != 0, diagonal, row_hi)
    return row_lo, row_hi


@triton.jit
def _load_rows(ptrs, mask_rows, mask_d, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; masks only what may be out of range so full tiles load vectorised."""
    if CHECK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=mask_rows[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=mask_rows[:, None] & mask_d[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return tile


@triton.jit
def _key_range(start_m, seqlen_q, kv_len, offset, self_rows, mask_m,
               IS_CAUSAL: tl.constexpr, HAS_SELF_ONLY: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """(lo, mid, hi) for a query block: [lo, mid) key blocks need no mask, [mid, hi) do."""
    last_row = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
    if IS_CAUSAL:
        hi = tl.minimum(kv_len, last_row + offset + 1)
        full = tl.minimum(kv_len, start_m + offset + 1)  # keys the block's first row sees
    else:
        hi = kv_len
        full = kv_len
    hi = tl.maximum(hi, 0)
    mid = (tl.maximum(full, 0) // BLOCK_N) * BLOCK_N
    lo = hi * 0
    if HAS_SELF_ONLY:
        if tl.max(self_rows, 0) > 0:
            mid = lo
            if tl.min(tl.where(mask_m, self_rows, 1), 0) > 0:
                # Only the block's diagonal keys are visible: skip everything else.
                lo = (tl.maximum(start_m + offset, 0) // BLOCK_N) * BLOCK_N
                hi = tl.maximum(tl.minimum(kv_len, last_row + offset + 1), lo)
                mid = lo
    return lo, mid, hi


@triton.jit
def _varlen_rows(cu_seqlens_q, cu_seqlens_k, seq):
    """(q_start, seqlen_q, k_start, seqlen_k) of packed sequence `seq`: its query rows are
    [q_start, q_start + seqlen_q) of the packed q/out/self_only and its keys [k_start, k_start + seqlen_k)
    of k/v. Read on the device, so the host never waits; starts are int64 for the pointer offsets."""
    q_start = tl.load(cu_seqlens_q + seq)
    k_start = tl.load(cu_seqlens_k + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    return q_start.to(tl.int64), seqlen_q, k_start.to(tl.int64), seqlen_k


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               row_lo, row_hi, offs_d, mask_d, lo, hi, kv_len, qk_scale, MASKED: tl.constexpr,
               EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < kv_len
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask_n, mask_d,
                       MASKED, EVEN_D)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale  # log2 units
        if MASKED:
            visible = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] <= row_hi[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask_n, mask_d,
                       MASKED, EVEN_D)
        acc = _dot(_cast(p, v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.heuristics({
    "HAS_KV_LENS": lambda args: args["kv_lens"] is not None,
    "HAS_SELF_ONLY": lambda args: args["self_only"] is not None,
    "VARLEN": lambda args: args["cu_seqlens_q"] is not None,
    "BLOCK_D": lambda args: _block_d(args["HEAD_DIM"]),
    "DOT_PRECISION": lambda args: "ieee" if args["q"].dtype == torch.float32 else "tf32",
})
@triton.autotune(configs=_configs("fwd"), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune("fwd")})
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def attention_fwd_kernel(
    q, k, v, out, lse, kv_lens, self_only, cu_seqlens_q, cu_seqlens_k,
    seqlen_q, seqlen_k, heads, group, softmax_scale,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh,
    stride_sb, stride_sm,
    IS_CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, HAS_SELF_ONLY: tl.constexpr, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out and lse for BLOCK_M query rows of one (batch, head).

    grid: (cdiv(seqlen_q, BLOCK_M), batch * heads). Reads its q tile once and the K/V blocks of
    [lo, hi) of kv head h // group once each; writes its out rows (q's dtype, last dim contiguous)
    and lse rows ((batch, heads, seqlen_q) float32) once.
    VARLEN (packed sequences): "batch" is the sequence, grid (cdiv(max_seqlen_q, BLOCK_M),
    num_seqs * heads); see _varlen_rows. lse is (heads, total_q).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = pid_bh % heads
    kvh = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    if VARLEN:
        q_start, seqlen_q_b, k_start, kv_len = _varlen_rows(cu_seqlens_q, cu_seqlens_k, b)
        if start_m >= seqlen_q_b:  # past this sequence's queries (the grid covers the longest)
            return
        lse_rows = lse + h * seqlen_q + q_start  # the seqlen_q argument is total_q here
        seqlen_q = seqlen_q_b
        q += q_start * stride_qm
        out += q_start * stride_om
        k += k_start * stride_kn
        v += k_start * stride_vn
        if HAS_SELF_ONLY:
            self_only += q_start * stride_sm
    else:
        lse_rows = lse + pid_bh.to(tl.int64) * seqlen_q
        if HAS_KV_LENS:
            kv_len = tl.load(kv_lens + b)
        else:
            kv_len = seqlen_k
    offset = kv_len - seqlen_q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    if HAS_SELF_ONLY:
        self_rows = tl.load(self_only + b * stride_sb + offs_m * stride_sm, mask=mask_m, other=0).to(tl.int32)
    else:
        self_rows = offs_m * 0

    q_tile = _load_rows(q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask_m, mask_d, True, EVEN_D)
    k_base = k + b * stride_kb + kvh * stride_kh
    v_base = v + b * stride_vb + kvh * stride_vh
    qk_scale = softmax_scale * 1.4426950408889634
    lo, mid, hi = _key_range(start_m, seqlen_q, kv_len, offset, self_rows, mask_m, IS_CAUSAL, HAS_SELF_ONLY,
                             BLOCK_M, BLOCK_N)
    row_lo, row_hi = _row_bounds(offs_m, kv_len, offset, self_rows, IS_CAUSAL, HAS_SELF_ONLY)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q_tile, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               row_lo, row_hi, offs_d, mask_d, lo, mid, kv_len, qk_scale, False, EVEN_D, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q_tile, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               row_lo, row_hi, offs_d, mask_d, mid, hi, kv_len, qk_scale, True, EVEN_D, BLOCK_N, DOT_PRECISION)
    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    row_lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(lse_rows + offs_m, row_lse, mask=mask_m)
    out_ptrs = out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(out_ptrs, _cast(acc, out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seqlen_q"])
def attention_bwd_preprocess_kernel(
    out, dout, delta, seqlen_q, heads,
    stride_ob, stride_om, stride_oh,
    stride_db, stride_dm, stride_dh, stride_dd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) for BLOCK_M rows of one (batch, head).

    grid: (cdiv(seqlen_q, BLOCK_M), batch * heads); writes delta ((batch, heads, seqlen_q) float32).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta + pid_bh.to(tl.int64) * seqlen_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_inner(dk, dv, k_tile, v_tile, q_base, do_base, lse_base, delta_base, self_base,
                stride_qm, stride_qd, stride_dm, stride_dd, stride_sm,
                start_n, offs_n, offs_d, mask_d, lo_m, hi_m, seqlen_q, seqlen_k, offset, qk_scale,
                IS_CAUSAL: tl.constexpr, HAS_SELF_ONLY: tl.constexpr, MASKED: tl.constexpr,
                EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo_m, hi_m, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < seqlen_q
        visit = True
        if HAS_SELF_ONLY:
            self_rows = tl.load(self_base + offs_m * stride_sm, mask=mask_m, other=0).to(tl.int32)
            # A block of self_only rows only reaches the keys of its own diagonal.
            last_row = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
            on_diagonal = (last_row + offset >= start_n) & (start_m + offset < start_n + BLOCK_N)
            visit = (tl.min(tl.where(mask_m, self_rows, 1), 0) == 0) | on_diagonal
        else:
            self_rows = offs_m * 0
        if visit:
            # Rows past seqlen_q load lse = +inf and delta = 0: their p and ds are 0.
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
                         mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            row_lse = tl.load(lse_base + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
            row_delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
            s_t = _dot(k_tile, tl.trans(q), None, DOT_PRECISION) * qk_scale  # (N, M)
            if MASKED:
                row_lo, row_hi = _row_bounds(offs_m, seqlen_k, offset, self_rows, IS_CAUSAL, HAS_SELF_ONLY)
                visible_t = (offs_n[:, None] >= row_lo[None, :]) & (offs_n[:, None] <= row_hi[None, :])
                s_t = tl.where(visible_t, s_t, float("-inf"))
            p_t = tl.exp2(s_t - row_lse[None, :])
            dv = _dot(_cast(p_t, do.dtype), do, dv, DOT_PRECISION)
            dp_t = _dot(v_tile, tl.trans(do), None, DOT_PRECISION)
            ds_t = p_t * (dp_t - row_delta[None, :])
            dk = _dot(_cast(ds_t, q.dtype), q, dk, DOT_PRECISION)
    return dk, dv


@triton.heuristics({
    "HAS_SELF_ONLY": lambda args: args["self_only"] is not None,
    "HAS_KV_LENS": lambda args: False,
    "VARLEN": lambda args: args["cu_seqlens_q"] is not None,
    "BLOCK_D": lambda args: _block_d(args["HEAD_DIM"]),
    "DOT_PRECISION": lambda args: "ieee" if args["q"].dtype == torch.float32 else "tf32",
})
@triton.autotune(configs=_configs("dkdv"), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune("dkdv")})
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def attention_bwd_dkdv_kernel(
    q, k, v, dout, lse, delta, self_only, dk, dv, cu_seqlens_q, cu_seqlens_k,
    seqlen_q, seqlen_k, heads, group, softmax_scale,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_db, stride_dm, stride_dh, stride_dd,
    stride_gb, stride_gn, stride_gh,
    stride_sb, stride_sm,
    IS_CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, HAS_SELF_ONLY: tl.constexpr, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk and dv for BLOCK_N keys of one (batch, kv head), summed over the group's query heads.

    grid: (cdiv(seqlen_k, BLOCK_N), batch * kv_heads). Reads its K/V tile once and, per query head
    of the group, the q/dO tiles, lse and delta of the query blocks that see its keys; writes dk,
    dv (contiguous (batch, seqlen_k, kv_heads, headdim), k's dtype) once.
    VARLEN: "batch" is the packed sequence, grid (cdiv(max_seqlen_k, BLOCK_N), num_seqs * kv_heads);
    lse and delta are (heads, total_q). Every key row belongs to one sequence, so every dk/dv row is
    written once (zeros for the keys of a sequence without queries).
    """
    pid_n = tl.program_id(0)
    pid_bkh = tl.program_id(1)
    kv_heads = heads // group
    b = (pid_bkh // kv_heads).to(tl.int64)
    kvh = (pid_bkh % kv_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    if VARLEN:
        q_start, seqlen_q_b, k_start, seqlen_k_b = _varlen_rows(cu_seqlens_q, cu_seqlens_k, b)
        if start_n >= seqlen_k_b:  # past this sequence's keys (the grid covers the longest)
            return
        row_stride = seqlen_q  # lse/delta row of head h: h * total_q + q_start
        seqlen_q = seqlen_q_b
        seqlen_k = seqlen_k_b
        q += q_start * stride_qm
        dout += q_start * stride_dm
        lse += q_start
        delta += q_start
        k += k_start * stride_kn
        v += k_start * stride_vn
        dk += k_start * stride_gn
        dv += k_start * stride_gn
        if HAS_SELF_ONLY:
            self_only += q_start * stride_sm
    offset = seqlen_k - seqlen_q
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < seqlen_k
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    k_tile = _load_rows(k + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask_n, mask_d, True, EVEN_D)
    v_tile = _load_rows(v + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask_n, mask_d, True, EVEN_D)
    # Query blocks below lo_m see none of these keys; from mid_m on every row sees all of them
    # (keys past seqlen_k need no mask here: their dk/dv rows are never stored).
    if IS_CAUSAL:
        lo_m = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
        mid_m = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        lo_m = tl.minimum(lo_m, seqlen_q)
        mid_m = tl.minimum(tl.maximum(mid_m, lo_m), seqlen_q)
    else:
        lo_m = seqlen_q * 0
        mid_m = lo_m
    qk_scale = softmax_scale * 1.4426950408889634
    dk_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for hg in range(group):
        h = kvh * group + hg
        if VARLEN:
            rows = h * row_stride
        else:
            rows = (b * heads + h) * seqlen_q
        q_base = q + b * stride_qb + h * stride_qh
        do_base = dout + b * stride_db + h * stride_dh
        if HAS_SELF_ONLY:
            self_base = self_only + b * stride_sb
        else:
            self_base = self_only
        dk_acc, dv_acc = _dkdv_inner(dk_acc, dv_acc, k_tile, v_tile, q_base, do_base, lse + rows,
                                     delta + rows, self_base, stride_qm, stride_qd, stride_dm, stride_dd,
                                     stride_sm, start_n, offs_n, offs_d, mask_d, lo_m, mid_m, seqlen_q, seqlen_k, offset,
                                     qk_scale, IS_CAUSAL, HAS_SELF_ONLY, True, EVEN_D, BLOCK_M, BLOCK_N,
                                     DOT_PRECISION)
        dk_acc, dv_acc = _dkdv_inner(dk_acc, dv_acc, k_tile, v_tile, q_base, do_base, lse + rows,
                                     delta + rows, self_base, stride_qm, stride_qd, stride_dm, stride_dd,
                                     stride_sm, start_n, offs_n, offs_d, mask_d, mid_m, seqlen_q, seqlen_q, seqlen_k, offset,
                                     qk_scale, IS_CAUSAL, HAS_SELF_ONLY, HAS_SELF_ONLY, EVEN_D, BLOCK_M, BLOCK_N,
                                     DOT_PRECISION)
    dk_acc = dk_acc * softmax_scale
    mask = mask_n[:, None] & mask_d[None, :]
    grad_offs = b * stride_gb + kvh * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :]
    tl.store(dk + grad_offs, _cast(dk_acc, dk.dtype.element_ty), mask=mask)
    tl.store(dv + grad_offs, _cast(dv_acc, dv.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq, q, do, row_lse, row_delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              row_lo, row_hi, offs_d, mask_d, lo, hi, kv_len, qk_scale, MASKED: tl.constexpr,
              EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < kv_len
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask_n, mask_d,
                       MASKED, EVEN_D)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask_n, mask_d,
                       MASKED, EVEN_D)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        if MASKED:
            visible = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] <= row_hi[:, None])
            s = tl.where(visible, s, float("-inf"))
        p = tl.exp2(s - row_lse[:, None])
        dp = _dot(do, tl.trans(v), None, DOT_PRECISION)
        ds = p * (dp - row_delta[:, None])
        dq = _dot(_cast(ds, k.dtype), k, dq, DOT_PRECISION)
    return dq


@triton.heuristics({
    "HAS_SELF_ONLY": lambda args: args["self_only"] is not None,
    "HAS_KV_LENS": lambda args: False,
    "VARLEN": lambda args: args["cu_seqlens_q"] is not None,
    "BLOCK_D": lambda args: _block_d(args["HEAD_DIM"]),
    "DOT_PRECISION": lambda args: "ieee" if args["q"].dtype == torch.float32 else "tf32",
})
@triton.autotune(configs=_configs("dq"), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune("dq")})
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def attention_bwd_dq_kernel(
    q, k, v, dout, lse, delta, self_only, dq, cu_seqlens_q, cu_seqlens_k,
    seqlen_q, seqlen_k, heads, group, softmax_scale,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_db, stride_dm, stride_dh, stride_dd,
    stride_gb, stride_gm, stride_gh,
    stride_sb, stride_sm,
    IS_CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, HAS_SELF_ONLY: tl.constexpr, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq for BLOCK_M query rows of one (batch, head).

    grid: (cdiv(seqlen_q, BLOCK_M), batch * heads). Reads its q/dO tiles, lse and delta once and the
    K/V blocks of the forward's [lo, hi) once each; writes dq (contiguous, q's dtype) once.
    VARLEN: as the forward (grid over max_seqlen_q and num_seqs * heads; lse, delta (heads, total_q)).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = pid_bh % heads
    kvh = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    if VARLEN:
        q_start, seqlen_q_b, k_start, kv_len = _varlen_rows(cu_seqlens_q, cu_seqlens_k, b)
        if start_m >= seqlen_q_b:
            return
        rows = h * seqlen_q + q_start  # the seqlen_q argument is total_q here
        seqlen_q = seqlen_q_b
        q += q_start * stride_qm
        dout += q_start * stride_dm
        dq += q_start * stride_gm
        k += k_start * stride_kn
        v += k_start * stride_vn
        if HAS_SELF_ONLY:
            self_only += q_start * stride_sm
    else:
        rows = pid_bh.to(tl.int64) * seqlen_q
        kv_len = seqlen_k
    offset = kv_len - seqlen_q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    if HAS_SELF_ONLY:
        self_rows = tl.load(self_only + b * stride_sb + offs_m * stride_sm, mask=mask_m, other=0).to(tl.int32)
    else:
        self_rows = offs_m * 0
    q_tile = _load_rows(q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask_m, mask_d, True, EVEN_D)
    do = _load_rows(dout + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
                    mask_m, mask_d, True, EVEN_D)
    row_lse = tl.load(lse + rows + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
    row_delta = tl.load(delta + rows + offs_m, mask=mask_m, other=0.0)
    k_base = k + b * stride_kb + kvh * stride_kh
    v_base = v + b * stride_vb + kvh * stride_vh
    qk_scale = softmax_scale * 1.4426950408889634
    lo, mid, hi = _key_range(start_m, seqlen_q, kv_len, offset, self_rows, mask_m, IS_CAUSAL, HAS_SELF_ONLY,
                             BLOCK_M, BLOCK_N)
    row_lo, row_hi = _row_bounds(offs_m, kv_len, offset, self_rows, IS_CAUSAL, HAS_SELF_ONLY)
    dq_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq_acc = _dq_inner(dq_acc, q_tile, do, row_lse, row_delta, k_base, v_base, stride_kn, stride_kd, stride_vn,
                       stride_vd, row_lo, row_hi, offs_d, mask_d, lo, mid, kv_len, qk_scale, False, EVEN_D, BLOCK_N, DOT_PRECISION)
    dq_acc = _dq_inner(dq_acc, q_tile, do, row_lse, row_delta, k_base, v_base, stride_kn, stride_kd, stride_vn,
                       stride_vd, row_lo, row_hi, offs_d, mask_d, mid, hi, kv_len, qk_scale, True, EVEN_D, BLOCK_N, DOT_PRECISION)
    dq_acc = dq_acc * softmax_scale
    tl.store(dq + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :],
             _cast(dq_acc, dq.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------
# Decode: split-KV (flash-decoding) and the combine of the splits
# ----------------------------------------------------------------------------------------------
@triton.heuristics({
    "HAS_KV_LENS": lambda args: args["kv_lens"] is not None,
    "HAS_SELF_ONLY": lambda args: args["self_only"] is not None,
    "BLOCK_D": lambda args: _block_d(args["HEAD_DIM"]),
    "DOT_PRECISION": lambda args: "ieee" if args["q"].dtype == torch.float32 else "tf32",
})
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "split_len"])
def attention_decode_split_kernel(
    q, k, v, out_part, lse_part, kv_lens, self_only,
    seqlen_q, seqlen_k, heads, group, softmax_scale, split_len, num_splits,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_sb, stride_sm,
    IS_CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, HAS_SELF_ONLY: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial attention of every (query head of one kv group, query position) over one KV split.

    grid: (num_splits, batch * kv_heads). Row r of the M tile is query head kvh * group + r // seqlen_q
    at position r % seqlen_q (group * seqlen_q <= BLOCK_M). Reads the keys [split * split_len,
    (split + 1) * split_len) of its kv head once (up to kv_len); writes float32 out_part
    (batch, heads, seqlen_q, num_splits, HEAD_DIM), normalised by its own sum, and lse_part
    (batch, heads, seqlen_q, num_splits), -inf for a split in which a row sees nothing.
    """
    split = tl.program_id(0)
    pid_bkh = tl.program_id(1)
    kv_heads = heads // group
    b = (pid_bkh // kv_heads).to(tl.int64)
    kvh = (pid_bkh % kv_heads).to(tl.int64)
    if HAS_KV_LENS:
        kv_len = tl.load(kv_lens + b)
    else:
        kv_len = seqlen_k
    offset = kv_len - seqlen_q
    rows = tl.arange(0, BLOCK_M)
    mask_r = rows < group * seqlen_q
    offs_m = rows % seqlen_q  # query position: what the mask sees
    h = kvh * group + (rows // seqlen_q).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    if HAS_SELF_ONLY:
        self_rows = tl.load(self_only + b * stride_sb + offs_m * stride_sm, mask=mask_r, other=0).to(tl.int32)
    else:
        self_rows = rows * 0
    q_tile = _load_rows(q + b * stride_qb + h[:, None] * stride_qh + offs_m[:, None] * stride_qm
                        + offs_d[None, :] * stride_qd, mask_r, mask_d, True, EVEN_D)
    k_base = k + b * stride_kb + kvh * stride_kh
    v_base = v + b * stride_vb + kvh * stride_vh
    qk_scale = softmax_scale * 1.4426950408889634
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)
    row_lo, row_hi = _row_bounds(offs_m, kv_len, offset, self_rows, IS_CAUSAL, HAS_SELF_ONLY)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # Memory-bound: every block takes the masked path (the mask costs nothing next to the loads).
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q_tile, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               row_lo, row_hi, offs_d, mask_d, lo, hi, kv_len, qk_scale, True, EVEN_D, BLOCK_N, DOT_PRECISION)
    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    row_lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    part_row = ((b * heads + h) * seqlen_q + offs_m) * num_splits + split
    tl.store(lse_part + part_row, row_lse, mask=mask_r)
    tl.store(out_part + part_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_r[:, None] & mask_d[None, :])


@triton.jit
def attention_decode_combine_kernel(
    out_part, lse_part, out, lse, seqlen_q, heads, num_splits,
    stride_ob, stride_om, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the splits of one (batch, head, query) row: lse = logsumexp_s lse_s, out = sum_s e^(lse_s - lse) out_s.

    grid: (batch * heads * seqlen_q,). Reads its (num_splits, HEAD_DIM) partials once; writes its out
    row (q's dtype) and lse ((batch, heads, seqlen_q) float32; +inf and out 0 for a row that sees nothing).
    """
    row = tl.program_id(0).to(tl.int64)
    i = row % seqlen_q
    bh = row // seqlen_q
    b = bh // heads
    h = bh % heads
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    part_lse = tl.load(lse_part + row * num_splits + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(part_lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp(part_lse - m_safe)
    total = tl.sum(weights, 0)
    parts = tl.load(out_part + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    result = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(lse + row, tl.where(total > 0.0, m_safe + tl.log(tl.where(total > 0.0, total, 1.0)), float("inf")))
    tl.store(out + b * stride_ob + i * stride_om + h * stride_oh + offs_d, _cast(result, out.dtype.element_ty),
             mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Host launchers. q (batch, seqlen_q, heads, headdim); k, v (batch, seqlen_k or cache length,
# kv_heads, headdim), any strides; kv_lens int32 (batch,) or None (all seqlen_k keys); self_only
# bool (batch, seqlen_q) or None.
# ----------------------------------------------------------------------------------------------
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so tests exercise the combine


def _self_only_args(self_only):
    if self_only is None:
        return None, (0, 0)
    self_only = self_only.view(torch.uint8) if self_only.dtype == torch.bool else self_only.to(torch.uint8)
    return self_only, self_only.stride()


def attention_forward(q, k, v, kv_lens, self_only, causal, softmax_scale):
    """(out (batch, seqlen_q, heads, headdim) in q's dtype, lse (batch, heads, seqlen_q) float32)."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    self_only, self_strides = _self_only_args(self_only)
    common = (seqlen_q, seqlen_k, heads, group, float(softmax_scale))
    strides = (*q.stride(), *k.stride(), *v.stride())
    if seqlen_q * group <= _DECODE_MAX_ROWS:
        block_n, num_warps, num_stages = _decode_config(head_dim)
        n_blocks = triton.cdiv(seqlen_k, block_n)
        num_splits = max(1, min(n_blocks, triton.cdiv(2 * _num_sms(q.device), batch * kv_heads), 64))
        split_len = triton.cdiv(n_blocks, num_splits) * block_n
        num_splits = triton.cdiv(seqlen_k, split_len)
        out_part = torch.empty((batch, heads, seqlen_q, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((batch, heads, seqlen_q, num_splits), dtype=torch.float32, device=q.device)
        attention_decode_split_kernel[(num_splits, batch * kv_heads)](
            q, k, v, out_part, lse_part, kv_lens, self_only, *common, split_len, num_splits, *strides, *self_strides,
            IS_CAUSAL=bool(causal), HEAD_DIM=head_dim, BLOCK_M=max(16, triton.next_power_of_2(seqlen_q * group)),
            BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
        attention_decode_combine_kernel[(batch * heads * seqlen_q,)](
            out_part, lse_part, out, lse, seqlen_q, heads, num_splits, out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4)
        return out, lse

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)

    attention_fwd_kernel[grid](q, k, v, out, lse, kv_lens, self_only, None, None, *common, *strides,
                               out.stride(0), out.stride(1), out.stride(2), *self_strides,
                               IS_CAUSAL=bool(causal), HEAD_DIM=head_dim)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, self_only, causal, softmax_scale):
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v. out is contiguous (from attention_forward)."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    block_m = 16 if _INTERPRET else 64
    attention_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, block_m), batch * heads)](
        out, dout, delta, seqlen_q, heads, out.stride(0), out.stride(1), out.stride(2), *dout.stride(),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, num_warps=4)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    self_only, self_strides = _self_only_args(self_only)
    common = (seqlen_q, seqlen_k, heads, group, float(softmax_scale))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), batch * kv_heads)](
        q, k, v, dout, lse, delta, self_only, dk, dv, None, None, *common, *strides, dk.stride(0), dk.stride(1),
        dk.stride(2),
        *self_strides, IS_CAUSAL=bool(causal), HEAD_DIM=head_dim)
    attention_bwd_dq_kernel[lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)](
        q, k, v, dout, lse, delta, self_only, dq, None, None, *common, *strides, dq.stride(0), dq.stride(1),
        dq.stride(2),
        *self_strides, IS_CAUSAL=bool(causal), HEAD_DIM=head_dim)
    return dq, dk, dv


# Packed sequences: q (total_q, heads, headdim), k/v (total_k, kv_heads, headdim), cu_seqlens_* int32
# (num_seqs + 1,) on q's device, self_only bool (total_q,) or None. The kernels see batch strides of 0
# and move their pointers to the sequence's first row themselves.
def _varlen_self_only(self_only):
    self_only, strides = _self_only_args(self_only)
    return self_only, (0, strides[-1])


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, self_only, causal, softmax_scale):
    """(out (total_q, heads, headdim) in q's dtype, lse (heads, total_q) float32)."""
    total_q, heads, head_dim = q.shape
    total_k, kv_heads = k.shape[0], k.shape[1]
    num_seqs = cu_seqlens_q.numel() - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    self_only, self_strides = _varlen_self_only(self_only)

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), num_seqs * heads)

    attention_fwd_kernel[grid](q, k, v, out, lse, None, self_only, cu_seqlens_q, cu_seqlens_k,
                               total_q, total_k, heads, heads // kv_heads, float(softmax_scale),
                               0, *q.stride(), 0, *k.stride(), 0, *v.stride(), 0, out.stride(0), out.stride(1),
                               *self_strides, IS_CAUSAL=bool(causal), HEAD_DIM=head_dim)
    return out, lse


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              self_only, causal, softmax_scale):
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v. out is contiguous (from attention_varlen_forward)."""
    total_q, heads, head_dim = q.shape
    total_k, kv_heads = k.shape[0], k.shape[1]
    num_seqs = cu_seqlens_q.numel() - 1
    out = out.contiguous()
    lse = lse.contiguous()
    # delta = rowsum(dO * O) needs no sequence boundaries: the packed rows as one batch row give
    # (1, heads, total_q), lse's layout.
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    block_m = 16 if _INTERPRET else 64
    attention_bwd_preprocess_kernel[(triton.cdiv(total_q, block_m), heads)](
        out, dout, delta, total_q, heads, 0, out.stride(0), out.stride(1), 0, *dout.stride(),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, num_warps=4)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    self_only, self_strides = _varlen_self_only(self_only)
    common = (total_q, total_k, heads, heads // kv_heads, float(softmax_scale))
    strides = (0, *q.stride(), 0, *k.stride(), 0, *v.stride(), 0, *dout.stride())
    attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), num_seqs * kv_heads)](
        q, k, v, dout, lse, delta, self_only, dk, dv, cu_seqlens_q, cu_seqlens_k, *common, *strides,
        0, dk.stride(0), dk.stride(1), *self_strides, IS_CAUSAL=bool(causal), HEAD_DIM=head_dim)
    attention_bwd_dq_kernel[lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), num_seqs * heads)](
        q, k, v, dout, lse, delta, self_only, dq, cu_seqlens_q, cu_seqlens_k, *common, *strides,
        0, dq.stride(0), dq.stride(1), *self_strides, IS_CAUSAL=bool(causal), HEAD_DIM=head_dim)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (consumed by fastscan/aot.py): for headdim 64 (fp16) and 128 (bf16)
# the config each kernel runs with on an H100 (the first, tuned-for-H100 entry of each list),
# causal (the training case) with a self_only mask for the forward/backward, a per-row key
# length for decode; innermost strides 1 and the 16-byte alignment of pointers and strides as the
# JIT specialises them ("attrs": fastscan/aot.py must pass it to ASTSource).
# ----------------------------------------------------------------------------------------------
def _jit_fn(kernel):
    # Unwrap heuristics/autotune (the interpreter's innermost object is not a JITFunction).
    while isinstance(kernel, (triton.runtime.autotuner.Heuristics, triton.runtime.autotuner.Autotuner)):
        kernel = kernel.fn
    return kernel


def _decode_config(head_dim):
    """(BLOCK_N, num_warps, num_stages) of the split kernel: memory-bound, long key blocks."""
    if _INTERPRET:
        return 16, 4, 1
    return (128 if head_dim <= 64 else 64), 4, 3


_KERNELS = {"fwd": attention_fwd_kernel, "dkdv": attention_bwd_dkdv_kernel, "dq": attention_bwd_dq_kernel,
            "decode": attention_decode_split_kernel}
_FLOAT32_POINTERS = {"out_part", "lse_part", "lse", "delta"}
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_dd", "stride_sm"}
_INT_POINTERS = {"kv_lens": "*i32", "self_only": "*u8", "cu_seqlens_q": "*i32", "cu_seqlens_k": "*i32"}


def _aot_spec(kind, dtype, head_dim, varlen=False):
    fn = _jit_fn(_KERNELS[kind])
    if kind == "decode":
        block_m, (block_n, num_warps, num_stages) = 16, _decode_config(head_dim)
    else:
        block_m, block_n, num_warps, num_stages = _first_config(kind, head_dim)
    constexprs = dict(IS_CAUSAL=True, HAS_KV_LENS=kind == "decode", HAS_SELF_ONLY=kind != "decode",
                      HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
                      DOT_PRECISION="tf32")
    if kind != "decode":
        constexprs["VARLEN"] = varlen
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in _INT_POINTERS:
            signature[name] = _INT_POINTERS[name]
        elif name in _FLOAT32_POINTERS:
            signature[name] = "*fp32"
        elif name in ("q", "k", "v", "out", "dout", "dq", "dk", "dv"):
            signature[name] = "*" + dtype
        elif name == "softmax_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    variant = "_varlen" if varlen else ""
    return {"name": f"attention_{kind}{variant}_{dtype}_d{head_dim}_m{block_m}_n{block_n}_w{num_warps}_s{num_stages}",
            "fn": fn, "signature": signature, "constexprs": constexprs, "attrs": _jit_alignment(fn, signature),
            "num_warps": num_warps, "num_stages": num_stages}


def _jit_alignment(fn, signature):
    """The specialisation the JIT gives contiguous, 16-byte-aligned tensors: pointers and strides
    divisible by 16. Without it every element gets its own address and 128-wide tiles spill."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if signature[name].startswith("*") or (signature[name] == "i32" and name.startswith("stride_"))}


def _aot_combine_spec(head_dim):
    fn = attention_decode_combine_kernel
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_S=64)
    signature = {name: ("constexpr" if name in constexprs else "*fp32" if name in ("out_part", "lse_part", "lse")
                        else "*bf16" if name == "out" else "i32") for name in fn.arg_names}
    return {"name": f"attention_decode_combine_bf16_d{head_dim}_s64", "fn": fn, "signature": signature,
            "constexprs": constexprs, "attrs": _jit_alignment(fn, signature), "num_warps": 4, "num_stages": 1}


AOT_SPECS = ([_aot_spec(kind, dtype, head_dim) for kind in ("fwd", "dkdv", "dq", "decode")
              for dtype, head_dim in (("fp16", 64), ("bf16", 128))]
             + [_aot_combine_spec(128)]
             # Packed sequences: the tightest variants (fewest registers to spare with VARLEN's extra scalars).
             + [_aot_spec(kind, dtype, head_dim, varlen=True)
                for kind, dtype, head_dim in (("fwd", "bf16", 128), ("dkdv", "fp16", 64), ("dkdv", "bf16", 128),
                                              ("dq", "bf16", 128))])
