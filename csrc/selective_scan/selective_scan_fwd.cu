// Mamba-1 selective scan, forward (math in fastscan_abi.h).
//
// selective_scan_fwd_kernel<kNThreads, kNItems, T>
//   grid (dim, batch); one block owns the row (b, d) and walks it in chunks of
//   kNThreads * kNItems timesteps, thread t owning kNItems consecutive steps of each chunk.
//   Per chunk it reads u, delta (and z) once, then for each state n reads B[n], C[n] once,
//   composes its items' (a, b) pairs sequentially, scans the thread totals across the block
//   (warp shuffles, then one shared-memory step across warps, one __syncthreads per state),
//   continues from the state carried over from the previous chunk, and accumulates
//   y += h * C[n] in registers. y is written once per chunk; last_state once at the end.
//   State and accumulation are fp32 for every input dtype.
//   Packed sequences (p.cu_seqlens): grid (dim, num_seqs); the block owns channel d of sequence
//   i, i.e. the steps [cu_seqlens[i], cu_seqlens[i+1]) of batch row 0, with its own initial and
//   last state. Sequences of very different lengths make the blocks uneven, which is accepted: the
//   grid must follow from shapes alone (no host read of cu_seqlens).
#include "selective_scan_common.cuh"

namespace fastscan {
namespace selective_scan {

template <int kNThreads, int kNItems, typename T, bool kPacked>
__global__ __launch_bounds__(kNThreads) void selective_scan_fwd_kernel(const FsScanParams p) {
  constexpr int kNWarps = kNThreads / 32;
  constexpr int kChunk = kNThreads * kNItems;
  using IO = ItemIO<T, kNItems>;
  // Double-buffered so one barrier per state suffices: a buffer is rewritten two scans later,
  // after every thread has passed the barrier of the scan in between.
  __shared__ float2 warp_totals[2][kNWarps];
  __shared__ float carry[2][kMaxDstate];  // state at the start of the chunk, by chunk parity

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t d = blockIdx.x;
  // seq indexes the states; (b, start, seqlen) the steps. Unpacked: seq = b, start = 0.
  const int64_t seq = blockIdx.y;
  const SeqRange r = seq_range<kPacked>(p, seq);
  const int64_t b = r.batch, start = r.start, seqlen = r.len;
  const int dstate = static_cast<int>(p.dstate);
  const int64_t g = d / (p.dim / p.n_groups);

  const T* u = static_cast<const T*>(p.u) + b * p.u_stride[0] + d * p.u_stride[1] +
               start * p.u_stride[2];
  const T* delta = static_cast<const T*>(p.delta) + b * p.delta_stride[0] +
                   d * p.delta_stride[1] + start * p.delta_stride[2];
  const T* z = p.z == nullptr ? nullptr
                              : static_cast<const T*>(p.z) + b * p.z_stride[0] +
                                    d * p.z_stride[1] + start * p.z_stride[2];
  T* y = static_cast<T*>(p.y) + b * p.y_stride[0] + d * p.y_stride[1] + start * p.y_stride[2];
  const T* B = static_cast<const T*>(p.B) + b * p.B_stride[0] + g * p.B_stride[1] +
               start * p.B_stride[3];
  const T* C = static_cast<const T*>(p.C) + b * p.C_stride[0] + g * p.C_stride[1] +
               start * p.C_stride[3];
  const float* A = p.A + d * p.A_stride[0];
  const float D = p.D == nullptr ? 0.0f : p.D[d];
  const float bias = p.delta_bias == nullptr ? 0.0f : p.delta_bias[d];

  const bool u_vec = IO::vectorizable(u, p.u_stride[2]);
  const bool delta_vec = IO::vectorizable(delta, p.delta_stride[2]);
  const bool z_vec = z != nullptr && IO::vectorizable(z, p.z_stride[2]);
  const bool y_vec = IO::vectorizable(y, p.y_stride[2]);
  const bool B_vec = IO::vectorizable(B, p.B_stride[3]) &&
                     (p.B_stride[2] * static_cast<int64_t>(sizeof(T))) % IO::kVecBytes == 0;
  const bool C_vec = IO::vectorizable(C, p.C_stride[3]) &&
                     (p.C_stride[2] * static_cast<int64_t>(sizeof(T))) % IO::kVecBytes == 0;

  for (int n = tid; n < dstate; n += kNThreads) {
    carry[0][n] = p.initial_state == nullptr
                      ? 0.0f
                      : p.initial_state[seq * p.initial_state_stride[0] +
                                        d * p.initial_state_stride[1] +
                                        n * p.initial_state_stride[2]];
  }
  __syncthreads();

  const int64_t nchunks = (seqlen + kChunk - 1) / kChunk;
  int step = 0;
  for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
    const int64_t l0 = chunk * kChunk + static_cast<int64_t>(tid) * kNItems;
    const int parity = static_cast<int>(chunk & 1);
    float dt[kNItems], dtu[kNItems], out[kNItems];
    {
      float u_vals[kNItems];
      IO::load(u, p.u_stride[2], l0, seqlen, u_vec, u_vals);
      IO::load(delta, p.delta_stride[2], l0, seqlen, delta_vec, dt);
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        float x = dt[i] + bias;
        if (p.delta_softplus) x = softplus(x);
        // Steps past seqlen get delta' = 0: the identity map (a = 1, b = 0), so the carry
        // leaving the last chunk is exactly h_seqlen.
        dt[i] = l0 + i < seqlen ? x : 0.0f;
        dtu[i] = dt[i] * u_vals[i];
        out[i] = D * u_vals[i];
      }
    }

    for (int n = 0; n < dstate; ++n, ++step) {
      const float A2 = A[n * p.A_stride[1]] * kLog2e;
      float Bn[kNItems], Cn[kNItems];
      IO::load(B + n * p.B_stride[2], p.B_stride[3], l0, seqlen, B_vec, Bn);
      IO::load(C + n * p.C_stride[2], p.C_stride[3], l0, seqlen, C_vec, Cn);
      float a[kNItems], bu[kNItems];
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        a[i] = exp2f(dt[i] * A2);
        bu[i] = dtu[i] * Bn[i];
      }
      float total_a = a[0], total_b = bu[0];
#pragma unroll
      for (int i = 1; i < kNItems; ++i) {
        total_b = a[i] * total_b + bu[i];
        total_a = total_a * a[i];
      }
      warp_prefix_scan(total_a, total_b, lane);
      if (lane == 31) warp_totals[step & 1][warp] = make_float2(total_a, total_b);
      __syncthreads();

      float h = carry[parity][n];  // state entering this warp
#pragma unroll
      for (int w = 0; w < kNWarps - 1; ++w) {
        if (w < warp) {
          const float2 t = warp_totals[step & 1][w];
          h = t.x * h + t.y;
        }
      }
      const float h_end = total_a * h + total_b;  // state after this thread's last item
      const float h_prev_lane = __shfl_up_sync(kFullMask, h_end, 1);
      if (lane > 0) h = h_prev_lane;
      if (tid == kNThreads - 1) carry[parity ^ 1][n] = h_end;
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        h = a[i] * h + bu[i];
        out[i] += h * Cn[i];
      }
    }

    if (z != nullptr) {
      float z_vals[kNItems];
      IO::load(z, p.z_stride[2], l0, seqlen, z_vec, z_vals);
#pragma unroll
      for (int i = 0; i < kNItems; ++i) out[i] *= z_vals[i] * sigmoid(z_vals[i]);
    }
    IO::store(y, p.y_stride[2], l0, seqlen, y_vec, out);
  }

  if (p.last_state != nullptr) {
    __syncthreads();
    const int final_parity = static_cast<int>(nchunks & 1);
    for (int n = tid; n < dstate; n += kNThreads) {
      p.last_state[(seq * p.dim + d) * dstate + n] = carry[final_parity][n];
    }
  }
}

template <typename Config, typename T>
void launch_fwd(const FsScanParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(grid_rows(p)));
  if (p.cu_seqlens != nullptr) {
    auto kernel = &selective_scan_fwd_kernel<Config::kNThreads, Config::kNItems, T, true>;
    FS_LAUNCH(kernel, grid, Config::kNThreads, 0, stream, p);
  } else {
    auto kernel = &selective_scan_fwd_kernel<Config::kNThreads, Config::kNItems, T, false>;
    FS_LAUNCH(kernel, grid, Config::kNThreads, 0, stream, p);
  }
}

template <typename T>
void launch_fwd_for_length(const FsScanParams& p, cudaStream_t stream) {
  if (chunk_size_for(p.seqlen) == ShortConfig::kNThreads * ShortConfig::kNItems) {
    launch_fwd<ShortConfig, T>(p, stream);
  } else {
    launch_fwd<LongConfig, T>(p, stream);
  }
}

}  // namespace selective_scan
}  // namespace fastscan

extern "C" FS_API int fs_selective_scan_fwd(const FsScanParams* p) {
  using namespace fastscan::selective_scan;
  const char* fn = "fs_selective_scan_fwd";
  if (const int status = validate_scan_params(p, fn)) return status;
  if (p->batch == 0 || p->dim == 0) return FS_OK;
  if (p->seqlen > 0 && p->y == nullptr) return fs_fail(FS_ERR_INVALID, "%s: y is NULL", fn);
  cudaStream_t stream = static_cast<cudaStream_t>(p->stream);
  switch (p->dtype) {
    case FS_FLOAT32: launch_fwd_for_length<float>(*p, stream); break;
    case FS_FLOAT16: launch_fwd_for_length<__half>(*p, stream); break;
    case FS_BFLOAT16: launch_fwd_for_length<__nv_bfloat16>(*p, stream); break;
  }
  return check_launch(fn);
}
