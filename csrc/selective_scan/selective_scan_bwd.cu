// Mamba-1 selective scan, backward (math in fastscan_abi.h). Nothing from the forward is saved
// except its inputs: states are recomputed.
//
// selective_scan_bwd_kernel<kNThreads, kNItems, T>
//   grid (dim, batch); one block owns the row (b, d), chunks and items as in the forward.
//   Phase 1 (forward, chunks 0 .. nchunks-2): scans each chunk only for its end state and writes
//     the state entering chunk c+1 to the workspace, (batch, dim, nchunks-1, dstate) fp32.
//   Phase 2 (chunks in reverse): per chunk reads u, delta, dy (and z) once; per state n reads
//     B[n], C[n] once and runs two block scans behind one __syncthreads:
//       forward  h_t = a_t h_{t-1} + delta'_t B_t u_t, from the chunk's start state (workspace),
//       reverse  e_t = a_t (beta_t + e_{t+1}),  beta_t = dy'_t C_t,  e entering from the right =
//                the e leaving the next chunk (dlast_state for the last one);
//     so g_t = dL/dh_t = beta_t + e_{t+1}. Then, per item:
//       dC_t += dy'_t h_t, dB_t += g_t delta'_t u_t   (atomics: reduced over the group's channels)
//       du_t += g_t delta'_t B_t, ddelta'_t += g_t (B_t u_t + A a_t h_{t-1}),
//       dA += g_t delta'_t a_t h_{t-1}   (warp sum, then a shared-memory accumulator per n).
//     With z: y'_t (before gating, D u included) is rebuilt on the way, dz = dy y' silu'(z),
//     dy' = dy silu(z). du, ddelta, dz are written once per chunk.
//   At the end: dinitial_state = e_1, dA/dD/ddelta_bias are added with one atomic per block.
//   Packed sequences (p.cu_seqlens): grid (dim, num_seqs), the block owns channel d of sequence i
//   (steps [cu_seqlens[i], cu_seqlens[i+1]) of batch row 0) and its own dlast/dinitial state; its
//   chunk states go to workspace slots i + start_i / kChunk + k of channel d (see
//   workspace_bytes). Uneven sequence lengths make uneven blocks, accepted as in the forward.
#include "selective_scan_common.cuh"

namespace fastscan {
namespace selective_scan {

// NOTE: left free, ptxas takes 201 registers on sm_80 at 128 threads x 8 items (2 blocks/SM);
// asking for 3 blocks/SM gives 164-167 (sm_80) / 154-156 (sm_90) with no spills, while 4 spills
// ~180 bytes. The 32-thread config asks for 12 blocks/SM (<= 168 registers): 16 spilled on sm_80.
template <int kNThreads, int kNItems, typename T, bool kPacked>
__global__ __launch_bounds__(kNThreads, kNThreads >= 128 ? 3 : 12) void selective_scan_bwd_kernel(
    const FsScanBwdParams bp) {
  constexpr int kNWarps = kNThreads / 32;
  constexpr int kChunk = kNThreads * kNItems;
  using IO = ItemIO<T, kNItems>;
  __shared__ float2 prefix_totals[2][kNWarps];  // double-buffered by scan parity (see forward)
  __shared__ float2 suffix_totals[2][kNWarps];
  __shared__ float h_carry[2][kMaxDstate];  // phase 1 (thread 0 only): state at chunk start
  __shared__ float e_carry[2][kMaxDstate];  // phase 2: e leaving the later chunk, by parity
  __shared__ float dA_sum[kMaxDstate];

  const FsScanParams& p = bp.fwd;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t d = blockIdx.x;
  // seq indexes the states; (b, start, seqlen) the steps. Unpacked: seq = b, start = 0.
  const int64_t seq = blockIdx.y;
  const SeqRange range = seq_range<kPacked>(p, seq);
  const int64_t b = range.batch, start = range.start, seqlen = range.len;
  const int dstate = static_cast<int>(p.dstate);
  const int64_t n_groups = p.n_groups;
  const int64_t g = d / (p.dim / n_groups);
  const int64_t row = b * p.dim + d;            // row of the contiguous (batch, dim, ...) outputs
  const int64_t state_row = seq * p.dim + d;  // row of dlast_state / dinitial_state
  // The contiguous outputs' rows are p.seqlen (the packed total) long. Unpacked, name it by the
  // local copy: re-reading p.seqlen cost the sm_90 kernels 4 registers.
  const int64_t row_len = kPacked ? p.seqlen : seqlen;
  const int64_t out_offset = row * row_len + start;

  const T* u = static_cast<const T*>(p.u) + b * p.u_stride[0] + d * p.u_stride[1] +
               start * p.u_stride[2];
  const T* delta = static_cast<const T*>(p.delta) + b * p.delta_stride[0] +
                   d * p.delta_stride[1] + start * p.delta_stride[2];
  const T* z = p.z == nullptr ? nullptr
                              : static_cast<const T*>(p.z) + b * p.z_stride[0] +
                                    d * p.z_stride[1] + start * p.z_stride[2];
  const T* dy = static_cast<const T*>(bp.dy) + b * bp.dy_stride[0] + d * bp.dy_stride[1] +
                start * bp.dy_stride[2];
  const T* B = static_cast<const T*>(p.B) + b * p.B_stride[0] + g * p.B_stride[1] +
               start * p.B_stride[3];
  const T* C = static_cast<const T*>(p.C) + b * p.C_stride[0] + g * p.C_stride[1] +
               start * p.C_stride[3];
  const float* A = p.A + d * p.A_stride[0];
  const float D = p.D == nullptr ? 0.0f : p.D[d];
  const float bias = p.delta_bias == nullptr ? 0.0f : p.delta_bias[d];
  T* du_out = static_cast<T*>(bp.du) + out_offset;
  T* ddelta_out = static_cast<T*>(bp.ddelta) + out_offset;
  T* dz_out = bp.dz == nullptr ? nullptr : static_cast<T*>(bp.dz) + out_offset;
  float* dB = bp.dB + (b * n_groups + g) * dstate * row_len + start;
  float* dC = bp.dC + (b * n_groups + g) * dstate * row_len + start;

  // Which rows allow vector accesses, as bits of one register (seven bools spilled on sm_90).
  enum : unsigned { kU = 1, kDelta = 2, kZ = 4, kDy = 8, kB = 16, kC = 32, kOut = 64 };
  unsigned vec = 0;
  vec |= IO::vectorizable(u, p.u_stride[2]) ? kU : 0u;
  vec |= IO::vectorizable(delta, p.delta_stride[2]) ? kDelta : 0u;
  vec |= z != nullptr && IO::vectorizable(z, p.z_stride[2]) ? kZ : 0u;
  vec |= IO::vectorizable(dy, bp.dy_stride[2]) ? kDy : 0u;
  vec |= IO::vectorizable(B, p.B_stride[3]) &&
                 (p.B_stride[2] * static_cast<int64_t>(sizeof(T))) % IO::kVecBytes == 0
             ? kB
             : 0u;
  vec |= IO::vectorizable(C, p.C_stride[3]) &&
                 (p.C_stride[2] * static_cast<int64_t>(sizeof(T))) % IO::kVecBytes == 0
             ? kC
             : 0u;
  // du, ddelta, dz share one layout, so one test covers all three.
  vec |= IO::vectorizable(du_out, 1) && IO::vectorizable(ddelta_out, 1) &&
                 (dz_out == nullptr || IO::vectorizable(dz_out, 1))
             ? kOut
             : 0u;

  const int64_t nchunks = (seqlen + kChunk - 1) / kChunk;
  const int64_t first_slot =
      !kPacked
          ? row * (nchunks - 1)
          : d * (p.num_seqs + (p.seqlen + kChunk - 1) / kChunk) + seq + start / kChunk;
  float* chunk_states =
      nchunks > 1 ? static_cast<float*>(bp.workspace) + first_slot * dstate : nullptr;

  for (int n = tid; n < dstate; n += kNThreads) {
    h_carry[0][n] = p.initial_state == nullptr
                        ? 0.0f
                        : p.initial_state[seq * p.initial_state_stride[0] +
                                          d * p.initial_state_stride[1] +
                                          n * p.initial_state_stride[2]];
    e_carry[0][n] = bp.dlast_state == nullptr ? 0.0f : bp.dlast_state[state_row * dstate + n];
    dA_sum[n] = 0.0f;
  }
  __syncthreads();

  // Loads one chunk's delta' (0 past seqlen) and u; returns through the arrays.
  auto load_dt_u = [&](int64_t l0, float (&dt)[kNItems], float (&u_vals)[kNItems],
                       float (&softplus_grad)[kNItems]) {
    IO::load(u, p.u_stride[2], l0, seqlen, (vec & kU) != 0, u_vals);
    IO::load(delta, p.delta_stride[2], l0, seqlen, (vec & kDelta) != 0, dt);
#pragma unroll
    for (int i = 0; i < kNItems; ++i) {
      float x = dt[i] + bias;
      softplus_grad[i] = 1.0f;
      if (p.delta_softplus) {
        softplus_grad[i] = x > 20.0f ? 1.0f : sigmoid(x);
        x = softplus(x);
      }
      dt[i] = l0 + i < seqlen ? x : 0.0f;
    }
  };

  int step = 0;
  // ---- phase 1: states entering chunks 1 .. nchunks-1 -------------------------------------------
  for (int64_t chunk = 0; chunk + 1 < nchunks; ++chunk) {
    const int64_t l0 = chunk * kChunk + static_cast<int64_t>(tid) * kNItems;
    const int parity = static_cast<int>(chunk & 1);
    float dt[kNItems], u_vals[kNItems], unused[kNItems];
    load_dt_u(l0, dt, u_vals, unused);
    for (int n = 0; n < dstate; ++n, ++step) {
      const float A2 = A[n * p.A_stride[1]] * kLog2e;
      float Bn[kNItems];
      IO::load(B + n * p.B_stride[2], p.B_stride[3], l0, seqlen, (vec & kB) != 0, Bn);
      float total_a = 1.0f, total_b = 0.0f;
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        const float a = exp2f(dt[i] * A2);
        total_b = a * total_b + dt[i] * u_vals[i] * Bn[i];
        total_a = total_a * a;
      }
      warp_prefix_scan(total_a, total_b, lane);
      if (lane == 31) prefix_totals[step & 1][warp] = make_float2(total_a, total_b);
      __syncthreads();
      if (tid == 0) {
        float h = h_carry[parity][n];
#pragma unroll
        for (int w = 0; w < kNWarps; ++w) {
          const float2 t = prefix_totals[step & 1][w];
          h = t.x * h + t.y;
        }
        h_carry[parity ^ 1][n] = h;
        chunk_states[chunk * dstate + n] = h;
      }
    }
  }

  // ---- phase 2: chunks in reverse -------------------------------------------------------------
  float dD_part = 0.0f, dbias_part = 0.0f;
  int reverse_parity = 0;
  for (int64_t chunk = nchunks - 1; chunk >= 0; --chunk, reverse_parity ^= 1) {
    const int64_t l0 = chunk * kChunk + static_cast<int64_t>(tid) * kNItems;
    float dt[kNItems], u_vals[kNItems], softplus_grad[kNItems];
    load_dt_u(l0, dt, u_vals, softplus_grad);
    float dyp[kNItems], dz_factor[kNItems], y_pre[kNItems], du[kNItems], ddt[kNItems];
    IO::load(dy, bp.dy_stride[2], l0, seqlen, (vec & kDy) != 0, dyp);
    if (z != nullptr) {
      float z_vals[kNItems];
      IO::load(z, p.z_stride[2], l0, seqlen, (vec & kZ) != 0, z_vals);
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        const float s = sigmoid(z_vals[i]);
        dz_factor[i] = dyp[i] * s * (1.0f + z_vals[i] * (1.0f - s));  // dy * silu'(z)
        dyp[i] *= z_vals[i] * s;                                       // dy * silu(z)
      }
    }
#pragma unroll
    for (int i = 0; i < kNItems; ++i) {
      y_pre[i] = D * u_vals[i];
      du[i] = D * dyp[i];
      ddt[i] = 0.0f;
      dD_part += dyp[i] * u_vals[i];
    }

    for (int n = 0; n < dstate; ++n, ++step) {
      const float An = A[n * p.A_stride[1]];
      const float A2 = An * kLog2e;
      float Bn[kNItems], Cn[kNItems];
      IO::load(B + n * p.B_stride[2], p.B_stride[3], l0, seqlen, (vec & kB) != 0, Bn);
      IO::load(C + n * p.C_stride[2], p.C_stride[3], l0, seqlen, (vec & kC) != 0, Cn);
      float a[kNItems];
#pragma unroll
      for (int i = 0; i < kNItems; ++i) a[i] = exp2f(dt[i] * A2);
      // Thread totals: forward (pa, pb) left to right, reverse (ra, rr) right to left.
      float pa = 1.0f, pb = 0.0f;
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        pb = a[i] * pb + dt[i] * u_vals[i] * Bn[i];
        pa = pa * a[i];
      }
      float ra = pa, rr = 0.0f;
#pragma unroll
      for (int i = kNItems - 1; i >= 0; --i) rr = a[i] * (dyp[i] * Cn[i] + rr);
      warp_prefix_scan(pa, pb, lane);
      warp_suffix_scan(ra, rr, lane);
      if (lane == 31) prefix_totals[step & 1][warp] = make_float2(pa, pb);
      if (lane == 0) suffix_totals[step & 1][warp] = make_float2(ra, rr);
      __syncthreads();

      // State entering this thread's first item.
      float h = chunk > 0 ? chunk_states[(chunk - 1) * dstate + n]
                : p.initial_state == nullptr
                    ? 0.0f
                    : p.initial_state[seq * p.initial_state_stride[0] +
                                      d * p.initial_state_stride[1] +
                                      n * p.initial_state_stride[2]];
#pragma unroll
      for (int w = 0; w < kNWarps - 1; ++w) {
        if (w < warp) {
          const float2 t = prefix_totals[step & 1][w];
          h = t.x * h + t.y;
        }
      }
      const float h_end = pa * h + pb;
      const float h_prev_lane = __shfl_up_sync(kFullMask, h_end, 1);
      if (lane > 0) h = h_prev_lane;
      // e entering this thread's last item from the right.
      float e = e_carry[reverse_parity][n];
#pragma unroll
      for (int w = kNWarps - 1; w > 0; --w) {
        if (w > warp) {
          const float2 t = suffix_totals[step & 1][w];
          e = t.x * e + t.y;
        }
      }
      const float e_begin = ra * e + rr;
      const float e_next_lane = __shfl_down_sync(kFullMask, e_begin, 1);
      if (lane < 31) e = e_next_lane;

      float h_before[kNItems];
      float* dC_row = dC + n * row_len;
      float* dB_row = dB + n * row_len;
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        h_before[i] = h;
        h = a[i] * h + dt[i] * u_vals[i] * Bn[i];
        y_pre[i] += h * Cn[i];
        if (l0 + i < seqlen) atomicAdd(dC_row + l0 + i, dyp[i] * h);
      }
      float dA_part = 0.0f;
#pragma unroll
      for (int i = kNItems - 1; i >= 0; --i) {
        const float grad_h = dyp[i] * Cn[i] + e;
        if (l0 + i < seqlen) atomicAdd(dB_row + l0 + i, grad_h * dt[i] * u_vals[i]);
        du[i] += grad_h * dt[i] * Bn[i];
        const float via_a = grad_h * a[i] * h_before[i];
        ddt[i] += grad_h * Bn[i] * u_vals[i] + An * via_a;
        dA_part += dt[i] * via_a;
        e = a[i] * grad_h;
      }
      if (tid == 0) e_carry[reverse_parity ^ 1][n] = e;
      dA_part = warp_sum(dA_part);
      if (lane == 0) atomicAdd(&dA_sum[n], dA_part);
    }

    float ddelta[kNItems];
#pragma unroll
    for (int i = 0; i < kNItems; ++i) {
      ddelta[i] = ddt[i] * softplus_grad[i];
      if (l0 + i < seqlen) dbias_part += ddelta[i];
    }
    IO::store(du_out, 1, l0, seqlen, (vec & kOut) != 0, du);
    IO::store(ddelta_out, 1, l0, seqlen, (vec & kOut) != 0, ddelta);
    if (dz_out != nullptr) {
#pragma unroll
      for (int i = 0; i < kNItems; ++i) dz_factor[i] *= y_pre[i];
      IO::store(dz_out, 1, l0, seqlen, (vec & kOut) != 0, dz_factor);
    }
  }

  dD_part = warp_sum(dD_part);
  dbias_part = warp_sum(dbias_part);
  if (lane == 0) {
    if (bp.dD != nullptr) atomicAdd(bp.dD + d, dD_part);
    if (bp.ddelta_bias != nullptr) atomicAdd(bp.ddelta_bias + d, dbias_part);
  }
  __syncthreads();
  for (int n = tid; n < dstate; n += kNThreads) {
    atomicAdd(bp.dA + d * dstate + n, dA_sum[n]);
    if (bp.dinitial_state != nullptr) {
      bp.dinitial_state[state_row * dstate + n] = e_carry[reverse_parity][n];
    }
  }
}

template <typename Config, typename T>
void launch_bwd(const FsScanBwdParams& bp, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(bp.fwd.dim), static_cast<unsigned>(grid_rows(bp.fwd)));
  if (bp.fwd.cu_seqlens != nullptr) {
    auto kernel = &selective_scan_bwd_kernel<Config::kNThreads, Config::kNItems, T, true>;
    FS_LAUNCH(kernel, grid, Config::kNThreads, 0, stream, bp);
  } else {
    auto kernel = &selective_scan_bwd_kernel<Config::kNThreads, Config::kNItems, T, false>;
    FS_LAUNCH(kernel, grid, Config::kNThreads, 0, stream, bp);
  }
}

template <typename T>
void launch_bwd_for_length(const FsScanBwdParams& bp, cudaStream_t stream) {
  if (chunk_size_for(bp.fwd.seqlen) == ShortConfig::kNThreads * ShortConfig::kNItems) {
    launch_bwd<ShortConfig, T>(bp, stream);
  } else {
    launch_bwd<LongConfig, T>(bp, stream);
  }
}

// Chunk states of the backward's phase 1, one dstate-float slot per chunk boundary. Unpacked:
// (batch, dim, nchunks - 1) slots. Packed: the host cannot read the lengths, so sequence i uses
// slots i + start_i / chunk + k (k < nchunks_i - 1) of its channel; as
// start_i / chunk + ceil(len_i / chunk) <= end_i / chunk + 1, they stay below sequence i+1's first
// slot, and num_seqs + ceil(total / chunk) slots per channel hold them all.
inline int64_t workspace_bytes(const FsScanParams& p) {
  const int64_t nchunks = num_chunks_for(p.seqlen);
  if (nchunks <= 1) return 0;  // no sequence is longer than the packed total
  const int64_t slots = p.cu_seqlens != nullptr ? p.num_seqs + nchunks : p.batch * (nchunks - 1);
  return p.dim * slots * p.dstate * 4;
}

}  // namespace selective_scan
}  // namespace fastscan

extern "C" FS_API int64_t fs_selective_scan_bwd_workspace_bytes(const FsScanParams* p) {
  using namespace fastscan::selective_scan;
  if (validate_scan_params(p, "fs_selective_scan_bwd_workspace_bytes") != FS_OK) return -1;
  return workspace_bytes(*p);
}

extern "C" FS_API int fs_selective_scan_bwd(const FsScanBwdParams* bp) {
  using namespace fastscan::selective_scan;
  const char* fn = "fs_selective_scan_bwd";
  if (bp == nullptr) return fs_fail(FS_ERR_INVALID, "%s: params is NULL", fn);
  const FsScanParams& p = bp->fwd;
  if (const int status = validate_scan_params(&p, fn)) return status;
  if ((bp->dz == nullptr) != (p.z == nullptr)) {
    return fs_fail(FS_ERR_INVALID, "%s: dz must be given exactly when z is", fn);
  }
  if ((bp->dD == nullptr) != (p.D == nullptr)) {
    return fs_fail(FS_ERR_INVALID, "%s: dD must be given exactly when D is", fn);
  }
  if ((bp->ddelta_bias == nullptr) != (p.delta_bias == nullptr)) {
    return fs_fail(FS_ERR_INVALID, "%s: ddelta_bias must be given exactly when delta_bias is", fn);
  }
  if ((bp->dinitial_state == nullptr) != (p.initial_state == nullptr)) {
    return fs_fail(FS_ERR_INVALID,
                   "%s: dinitial_state must be given exactly when initial_state is", fn);
  }
  if (bp->dA == nullptr) return fs_fail(FS_ERR_INVALID, "%s: dA is NULL", fn);
  const bool has_rows = p.batch > 0 && p.dim > 0;
  const bool has_steps = has_rows && p.seqlen > 0;
  if (has_steps && (bp->dy == nullptr || bp->du == nullptr || bp->ddelta == nullptr ||
                    bp->dB == nullptr || bp->dC == nullptr)) {
    return fs_fail(FS_ERR_INVALID, "%s: dy, du, ddelta, dB and dC must not be NULL", fn);
  }
  const int64_t ws_bytes = workspace_bytes(p);
  if (ws_bytes > 0 && bp->workspace == nullptr) {
    return fs_fail(FS_ERR_INVALID, "%s: workspace of %lld bytes is NULL", fn, (long long)ws_bytes);
  }

  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  // Outputs reduced across channels (or batch) are accumulated with atomics: zero them first.
  const size_t f32 = sizeof(float);
  cudaMemsetAsync(bp->dA, 0, static_cast<size_t>(p.dim * p.dstate) * f32, stream);
  if (bp->dB != nullptr) {
    cudaMemsetAsync(bp->dB, 0,
                    static_cast<size_t>(p.batch * p.n_groups * p.dstate * p.seqlen) * f32, stream);
  }
  if (bp->dC != nullptr) {
    cudaMemsetAsync(bp->dC, 0,
                    static_cast<size_t>(p.batch * p.n_groups * p.dstate * p.seqlen) * f32, stream);
  }
  if (bp->dD != nullptr) cudaMemsetAsync(bp->dD, 0, static_cast<size_t>(p.dim) * f32, stream);
  if (bp->ddelta_bias != nullptr) {
    cudaMemsetAsync(bp->ddelta_bias, 0, static_cast<size_t>(p.dim) * f32, stream);
  }
  if (const int status = check_launch(fn)) return status;
  if (!has_rows) return FS_OK;

  switch (p.dtype) {
    case FS_FLOAT32: launch_bwd_for_length<float>(*bp, stream); break;
    case FS_FLOAT16: launch_bwd_for_length<__half>(*bp, stream); break;
    case FS_BFLOAT16: launch_bwd_for_length<__nv_bfloat16>(*bp, stream); break;
  }
  return check_launch(fn);
}
