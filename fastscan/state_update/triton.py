"""Mamba decode step (`selective_state_update`) in Triton: kernel, host launcher, AOT specs.

    dt' = dt + dt_bias[d];  if dt_softplus: dt' = softplus(dt')  (identity above 20)
    h   = exp(dt' A[d, n]) state[b, d, n] + dt' B[b, g, n] x[b, d];   state[b, d, n] = h  (in place)
    y   = sum_n h C[b, g, n] + D[d] x[b, d];   if z: y *= silu(z[b, d])

The op is memory-bound: the state is read once and written once, everything else is a vector.
One program owns a (BLOCK_D, BLOCK_N) tile of one batch row: BLOCK_D channels of one group (so B
and C are one (BLOCK_N,) vector per program) and all dstate states; y is a row sum of the tile.
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = tl.constexpr(1.4426950408889634)

# NOTE: the tile is sized for latency, not reuse (nothing is reused): about 512 state elements per
# program at 4 warps (4 per thread) keeps many programs in flight for a batch-1 decode step
# (dim 1536, dstate 16: 48 channel blocks of 32) and never spills (see AOT_SPECS).
_TILE_ELEMENTS = 512


def _block_d(args):
    block_n = triton.next_power_of_2(args["dstate"])
    return max(1, min(64, _TILE_ELEMENTS // block_n, triton.next_power_of_2(args["dim_per_group"])))


def _num_warps(args):
    return 8 if triton.next_power_of_2(args["dstate"]) >= 256 else 4


@triton.heuristics({
    "HAS_D": lambda args: args["D"] is not None,
    "HAS_Z": lambda args: args["z"] is not None,
    "HAS_DT_BIAS": lambda args: args["dt_bias"] is not None,
    "BLOCK_N": lambda args: triton.next_power_of_2(args["dstate"]),
    "BLOCK_D": _block_d,
    "num_warps": _num_warps,
})
@triton.jit
def selective_state_update_kernel(
    state, x, dt, A, B, C, D, z, dt_bias, y,
    dim, dstate, dim_per_group,
    stride_state_b, stride_state_d, stride_state_n,
    stride_x_b, stride_x_d,
    stride_dt_b, stride_dt_d,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n,
    stride_C_b, stride_C_g, stride_C_n,
    stride_z_b, stride_z_d,
    stride_y_b,
    DT_SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One decode step for BLOCK_D channels of one group of one batch row.

    grid: (batch, groups * cdiv(dim_per_group, BLOCK_D)). Reads its (BLOCK_D, dstate) state tile
    (any strides) once and writes it back once in the state's dtype; reads x, dt, z of its channels
    and B, C of its group once; writes y (contiguous (batch, dim), x's dtype) of its channels.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_gd = tl.program_id(1)
    n_dblocks = tl.cdiv(dim_per_group, BLOCK_D)
    group = pid_gd // n_dblocks
    offs_dg = (pid_gd % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dg < dim_per_group
    offs_d = (group * dim_per_group + offs_dg).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]

    x_d = tl.load(x + pid_b * stride_x_b + offs_d * stride_x_d, mask=mask_d, other=0.0).to(tl.float32)
    dt_d = tl.load(dt + pid_b * stride_dt_b + offs_d * stride_dt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt_d += tl.load(dt_bias + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        # log1p(exp(x)) without a log1p: below -15 exp(x) is exact to fp32 and 1 + exp(x) is not.
        raw = dt_d
        dt_d = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
        dt_d = tl.where(raw < -15.0, tl.exp(raw), dt_d)

    A_tile = tl.load(A + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask_dn,
                     other=0.0).to(tl.float32)
    group_offs = pid_b * stride_B_b + group.to(tl.int64) * stride_B_g
    B_n = tl.load(B + group_offs + offs_n * stride_B_n, mask=mask_n, other=0.0).to(tl.float32)
    group_offs = pid_b * stride_C_b + group.to(tl.int64) * stride_C_g
    C_n = tl.load(C + group_offs + offs_n * stride_C_n, mask=mask_n, other=0.0).to(tl.float32)
    state_ptrs = (state + pid_b * stride_state_b + offs_d[:, None] * stride_state_d
                  + offs_n[None, :] * stride_state_n)
    h = tl.load(state_ptrs, mask=mask_dn, other=0.0).to(tl.float32)

    h = tl.exp2((dt_d * _LOG2E)[:, None] * A_tile) * h + (dt_d * x_d)[:, None] * B_n[None, :]
    tl.store(state_ptrs, h.to(state.dtype.element_ty), mask=mask_dn)

    out = tl.sum(h * C_n[None, :], axis=1)  # masked states are 0 in h and C
    if HAS_D:
        out += tl.load(D + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x_d
    if HAS_Z:
        z_d = tl.load(z + pid_b * stride_z_b + offs_d * stride_z_d, mask=mask_d, other=0.0).to(tl.float32)
        out *= z_d * tl.sigmoid(z_d)
    tl.store(y + pid_b * stride_y_b + offs_d, out.to(y.dtype.element_ty), mask=mask_d)


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Updates `state` in place; returns y (batch, dim) contiguous in x's dtype.

    B, C grouped (batch, groups, dstate); D, dt_bias float32 (dim,) or None.
    """
    batch, dim, dstate = state.shape
    groups = B.shape[1]
    dim_per_group = dim // groups
    y = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    if batch == 0:
        return y
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    z_strides = z.stride() if z is not None else (0, 0)

    def grid(meta):
        return (batch, groups * triton.cdiv(dim_per_group, meta["BLOCK_D"]))

    selective_state_update_kernel[grid](
        state, x, dt, A, B, C, D, z, dt_bias, y,
        dim, dstate, dim_per_group,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *z_strides,
        y.stride(0),
        DT_SOFTPLUS=bool(dt_softplus),
    )
    return y


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (consumed by fastscan/aot.py): the tile the heuristics pick for
# dstate 16 and 64 with every option on and a contiguous state (innermost strides 1, as the JIT
# specialises them) for fp32 inputs and state, bf16 inputs with an fp32 state, and bf16
# throughout; dstate 256 (8 warps) for fp32 and bf16.
# ----------------------------------------------------------------------------------------------
def _jit_fn(kernel):
    # Unwrap heuristics (the interpreter's innermost object is not a JITFunction).
    while isinstance(kernel, triton.runtime.autotuner.Heuristics):
        kernel = kernel.fn
    return kernel


_UNIT_STRIDES = ("stride_state_n", "stride_x_d", "stride_dt_d", "stride_A_n", "stride_B_n", "stride_C_n",
                 "stride_z_d")


def _aot_spec(dtype, state_dtype, dstate):
    fn = _jit_fn(selective_state_update_kernel)
    sizes = {"dstate": dstate, "dim_per_group": 4096}
    constexprs = dict(DT_SOFTPLUS=True, HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True,
                      BLOCK_N=triton.next_power_of_2(dstate), BLOCK_D=_block_d(sizes))
    pointers = {"state": state_dtype, "x": dtype, "dt": dtype, "A": "fp32", "B": dtype, "C": dtype,
                "D": "fp32", "z": dtype, "dt_bias": "fp32", "y": dtype}
    signature = {}
    for name in fn.arg_names:
        if name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    return {"name": f"selective_state_update_{dtype}_state_{state_dtype}_n{dstate}_d{constexprs['BLOCK_D']}",
            "fn": fn, "signature": signature, "constexprs": constexprs, "num_warps": _num_warps(sizes),
            "num_stages": 1}


AOT_SPECS = ([_aot_spec(dtype, state_dtype, dstate)
              for dtype, state_dtype in (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"))
              for dstate in (16, 64)]
             + [_aot_spec("fp32", "fp32", 256), _aot_spec("bf16", "bf16", 256)])
