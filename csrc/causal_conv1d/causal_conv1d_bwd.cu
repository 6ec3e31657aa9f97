// Causal depthwise conv1d, backward (math in causal_conv1d_abi.h). With xpad = initial ++ x:
//   dz[s]     = dout[s] * silu'(z[s])  (or dout[s]),  z recomputed from x
//   dxpad[q]  = sum_k w[k] dz[q - k]  (+ dfinal_states[q - L] for q >= L);  dx[t] = dxpad[t + W-1],
//               dinitial_states[q] = dxpad[q] for q < W-1
//   dweight[k] = sum_{b,s} dz[s] xpad[s + k],   dbias = sum_{b,s} dz[s]
//
// causal_conv1d_bwd_time_kernel<T>   (time stride 1, or any strides)
//   grid (batch * dim, n_chunks), kTimeThreads threads; a block owns kTimeChunk steps of one row.
//   Shared memory holds xpad for the chunk plus 2(W-1) steps and dz for the chunk plus W-1 steps
//   past it (computed once, coalesced dout loads); thread i then owns steps t0 + i + j*kTimeThreads.
// causal_conv1d_bwd_lane_kernel<T>   (channel-last)
//   grid (n_chunks, cdiv(dim, kLaneThreads), batch); thread = one channel, kLaneChunk steps plus
//   W-1 past them: a forward walk with the x window and the dz window in registers; at step s it
//   emits dxpad[s], which needs dz[s-W+1 .. s] only.
// Weight/bias sums: each block (time kernel, block-reduced through warp shuffles) or thread (lane
// kernel) writes its partial to the workspace (batch, n_chunks, dim, kMaxW + 1); then
// causal_conv1d_reduce_kernel sums them over (batch, chunk) in a fixed order: deterministic, no atomics.
// Packed (kVarlen): the same grids over the packed steps. The time kernel records each step's
// sequence in shared memory and masks dz past the step's sequence end (dfinal_states of that
// sequence enters instead); the lane kernel walks its chunk one sequence piece at a time, each piece
// starting from fresh windows. dinitial_states comes from causal_conv1d_dinit_varlen_kernel, one
// thread per (sequence, channel), which also serves empty and short sequences.
#include "causal_conv1d_common.cuh"

namespace fastscan {
namespace causal_conv1d {

constexpr int kParts = kMaxW + 1;  // W weight sums (slots 0 .. W-1), the bias sum in slot kMaxW

template <typename T>
__device__ __forceinline__ float dfinal_at(const FsConv1dBwdParams& q, int64_t b, int64_t d, int64_t j) {
  if (q.dfinal_states == nullptr) return 0.0f;
  const int64_t* s = q.dfinal_states_stride;
  return to_float(static_cast<const T*>(q.dfinal_states)[b * s[0] + d * s[1] + j * s[2]]);
}

template <typename T>
__device__ __forceinline__ void store_dinitial(const FsConv1dBwdParams& q, int64_t b, int64_t d, int64_t j, float v) {
  const int64_t* s = q.dinitial_states_stride;
  static_cast<T*>(q.dinitial_states)[b * s[0] + d * s[1] + j * s[2]] = from_float<T>(v);
}

template <typename T, bool kVarlen>
__global__ __launch_bounds__(kTimeThreads) void causal_conv1d_bwd_time_kernel(const FsConv1dBwdParams q,
                                                                              float* partials) {
  constexpr int kNWarps = kTimeThreads / 32;
  constexpr int kSpan = kTimeChunk + 2 * kMaxW;
  __shared__ float xs[kSpan];   // xs[i] = xpad[t0 + i] (packed: x only, states read where needed)
  __shared__ float dzs[kSpan];  // dzs[i] = dz[t0 - (W-1) + i], 0 outside [t0, L)
  __shared__ float red[kNWarps][kParts];
  __shared__ int seqs[kVarlen ? kSpan : 1];  // seqs[i]: the sequence of step t0 - (W-1) + i, i >= W-1
  const FsConv1dParams& p = q.fwd;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim, chunk = blockIdx.y;
  const int64_t t0 = chunk * kTimeChunk, L = p.seqlen;
  const int W = static_cast<int>(p.width);
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride[0] + d * p.x_stride[1];
  const T* dout = static_cast<const T*>(q.dout) + b * q.dout_stride[0] + d * q.dout_stride[1];
  T* dx = static_cast<T*>(q.dx) + b * q.dx_stride[0] + d * q.dx_stride[1];

  float w[kMaxW];
#pragma unroll
  for (int k = 0; k < kMaxW; ++k) w[k] = k < W ? p.weight[d * p.weight_stride[0] + k * p.weight_stride[1]] : 0.0f;
  const float bias = p.bias != nullptr ? p.bias[d] : 0.0f;
  for (int i = tid; i < kTimeChunk + 2 * (W - 1); i += kTimeThreads) {
    const int64_t t = t0 + i - (W - 1);
    if (kVarlen) xs[i] = t >= 0 && t < L ? to_float(x[t * p.x_stride[2]]) : 0.0f;
    else xs[i] = t >= 0 ? (t < L ? to_float(x[t * p.x_stride[2]]) : 0.0f) : initial_at<T>(p, b, d, t0 + i);
  }
  int lo = 0, hi = 0;  // the sequences of the first and last step this block computes dz for
  if (kVarlen) {
    lo = find_seq(p.cu_seqlens, 0, static_cast<int>(p.num_seqs) - 1, t0);
    hi = find_seq(p.cu_seqlens, lo, static_cast<int>(p.num_seqs) - 1, min(t0 + kTimeChunk + W - 1, L) - 1);
  }
  __syncthreads();
  for (int i = tid; i < kTimeChunk + 2 * (W - 1); i += kTimeThreads) {
    const int64_t s = t0 - (W - 1) + i;
    float g = 0.0f;
    if (s >= t0 && s < L) {
      int seq = 0;
      int64_t sl = W;  // step within its sequence
      if (kVarlen) {
        seq = find_seq(p.cu_seqlens, lo, hi, s);
        seqs[i] = seq;
        sl = s - p.cu_seqlens[seq];
      }
      g = to_float(dout[s * q.dout_stride[2]]);
      if (p.silu) {
        float z = bias;
        if (kVarlen && sl < W - 1) {
#pragma unroll
          for (int k = 0; k < kMaxW; ++k)
            if (k < W) z += w[k] * (sl + k >= W - 1 ? xs[s - t0 + k] : initial_at<T>(p, seq, d, sl + k));
        } else {
#pragma unroll
          for (int k = 0; k < kMaxW; ++k)
            if (k < W) z += w[k] * xs[s - t0 + k];
        }
        g *= dsilu(z);
      }
    }
    dzs[i] = g;
  }
  __syncthreads();

  float acc[kParts];
#pragma unroll
  for (int k = 0; k < kParts; ++k) acc[k] = 0.0f;
#pragma unroll
  for (int j = 0; j < kTimeItems; ++j) {
    const int i = tid + j * kTimeThreads;
    const int64_t t = t0 + i;
    if (t >= L) break;
    int64_t state = b, start = 0, end = L;  // t's sequence (its row of the states) and its steps
    if (kVarlen) {
      state = seqs[i + W - 1];
      start = p.cu_seqlens[state];
      end = p.cu_seqlens[state + 1];
    }
    float g = t + W - 1 >= end ? dfinal_at<T>(q, state, d, t + W - 1 - end) : 0.0f;
#pragma unroll
    for (int k = 0; k < kMaxW; ++k)  // dz of step t + W-1 - k, none past the sequence
      if (k < W && (!kVarlen || t + W - 1 - k < end)) g += w[k] * dzs[i + 2 * (W - 1) - k];
    dx[t * q.dx_stride[2]] = from_float<T>(g);
    const float dz = dzs[i + W - 1];
    if (kVarlen && t - start < W - 1) {
#pragma unroll
      for (int k = 0; k < kMaxW; ++k)
        if (k < W) acc[k] += dz * (t - start + k >= W - 1 ? xs[i + k] : initial_at<T>(p, state, d, t - start + k));
    } else {
#pragma unroll
      for (int k = 0; k < kMaxW; ++k)
        if (k < W) acc[k] += dz * xs[i + k];
    }
    acc[kMaxW] += dz;
  }
  if (!kVarlen && chunk == 0 && q.dinitial_states != nullptr && tid < W - 1) {
    float g = tid >= L ? dfinal_at<T>(q, b, d, tid - L) : 0.0f;
#pragma unroll
    for (int k = 0; k < kMaxW; ++k)  // unrolled: a runtime index would move w to local memory
      if (k <= tid) g += w[k] * dzs[W - 1 + tid - k];
    store_dinitial<T>(q, b, d, tid, g);
  }

#pragma unroll
  for (int k = 0; k < kParts; ++k) {
    const float v = warp_sum(acc[k]);
    if (lane == 0) red[warp][k] = v;
  }
  __syncthreads();
  if (tid < kParts) {
    float v = 0.0f;
#pragma unroll
    for (int w2 = 0; w2 < kNWarps; ++w2) v += red[w2][tid];
    partials[((b * gridDim.y + chunk) * p.dim + d) * kParts + tid] = v;
  }
}

template <typename T, bool kVarlen>
__global__ __launch_bounds__(kLaneThreads) void causal_conv1d_bwd_lane_kernel(const FsConv1dBwdParams q,
                                                                              float* partials) {
  const FsConv1dParams& p = q.fwd;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kLaneThreads + threadIdx.x;
  if (d >= p.dim) return;
  const int64_t b = blockIdx.z, chunk = blockIdx.x, L = p.seqlen;
  const int64_t t0 = chunk * kLaneChunk, t1 = min(t0 + kLaneChunk, L);
  const int W = static_cast<int>(p.width), first = kMaxW - W;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride[0] + d * p.x_stride[1];
  const T* dout = static_cast<const T*>(q.dout) + b * q.dout_stride[0] + d * q.dout_stride[1];
  T* dx = static_cast<T*>(q.dx) + b * q.dx_stride[0] + d * q.dx_stride[1];

  // wr: taps right-aligned (slot i <-> tap i - first); xwin[kMaxW-1-j] = xpad[s + W-1 - j];
  // dzwin[kMaxW-1-j] = dz[s - j] (zeros before the piece: only a sequence's start emits from them).
  float wr[kMaxW], xwin[kMaxW], dzwin[kMaxW], acc[kMaxW], bias_acc = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxW; ++i) {
    wr[i] = i >= first ? p.weight[d * p.weight_stride[0] + (i - first) * p.weight_stride[1]] : 0.0f;
    acc[i] = 0.0f;
  }
  const float bias = p.bias != nullptr ? p.bias[d] : 0.0f;
  int seq = static_cast<int>(b);  // row of the states
  int64_t start = 0, end = L;     // the steps of that sequence
  if (kVarlen) {
    seq = find_seq(p.cu_seqlens, 0, static_cast<int>(p.num_seqs) - 1, t0);
    start = p.cu_seqlens[seq];
    end = p.cu_seqlens[seq + 1];
  }
  // One pass per sequence piece [a, a_end) of the chunk (a single pass when unpacked).
  for (int64_t a = t0;;) {
    const int64_t a_end = min(t1, end);
#pragma unroll
    for (int i = 0; i < kMaxW; ++i) {
      const int64_t qx = a - start + i - first - 1;  // as in the forward lane kernel
      float v = 0.0f;
      if (i > first) v = qx >= W - 1 ? to_float(x[(start + qx - (W - 1)) * p.x_stride[2]]) : initial_at<T>(p, seq, d, qx);
      xwin[i] = v;
      dzwin[i] = 0.0f;
    }
    const int64_t s_end = a_end + W - 1;
    for (int64_t s = a; s < s_end; ++s) {
#pragma unroll
      for (int i = 0; i < kMaxW - 1; ++i) {
        xwin[i] = xwin[i + 1];
        dzwin[i] = dzwin[i + 1];
      }
      float dz = 0.0f;
      xwin[kMaxW - 1] = 0.0f;
      if (s < end) {
        xwin[kMaxW - 1] = to_float(x[s * p.x_stride[2]]);
        dz = to_float(dout[s * q.dout_stride[2]]);
        if (p.silu) {
          float z = bias;
#pragma unroll
          for (int i = 0; i < kMaxW; ++i)
            if (i >= first) z += wr[i] * xwin[i];
          dz *= dsilu(z);
        }
      }
      dzwin[kMaxW - 1] = dz;
      if (s < a_end) {
#pragma unroll
        for (int i = 0; i < kMaxW; ++i) acc[i] += dz * xwin[i];  // slots < first are never read back
        bias_acc += dz;
      }
      // dxpad[s] = sum_k w[k] dz[s - k], w[k] = wr[first + k], dz[s - k] = dzwin[kMaxW-1-k]
      float gx = s >= end ? dfinal_at<T>(q, seq, d, s - end) : 0.0f;
#pragma unroll
      for (int i = 0; i < kMaxW; ++i)
        if (i >= first) gx += wr[i] * dzwin[first + kMaxW - 1 - i];
      if (s >= a + W - 1) {
        dx[(s - (W - 1)) * q.dx_stride[2]] = from_float<T>(gx);
      } else if (!kVarlen && t0 == 0 && q.dinitial_states != nullptr) {
        store_dinitial<T>(q, b, d, s, gx);
      }
    }
    if (!kVarlen || a_end >= t1) break;
    a = a_end;  // == end: the next non-empty sequence starts here
    do ++seq; while (p.cu_seqlens[seq + 1] <= a);
    start = a;
    end = p.cu_seqlens[seq + 1];
  }
  float* part = partials + ((b * gridDim.x + chunk) * p.dim + d) * kParts;
#pragma unroll
  for (int i = 0; i < kMaxW; ++i)
    if (i >= first) part[i - first] = acc[i];
  part[kMaxW] = bias_acc;
}

__global__ void causal_conv1d_reduce_kernel(const FsConv1dBwdParams q, const float* partials, int64_t n_parts) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t dim = q.fwd.dim;
  if (d >= dim) return;
  const int W = static_cast<int>(q.fwd.width);
  float acc[kParts];
#pragma unroll
  for (int k = 0; k < kParts; ++k) acc[k] = 0.0f;
  for (int64_t i = 0; i < n_parts; ++i) {
#pragma unroll
    for (int k = 0; k < kParts; ++k)
      if (k < W || k == kMaxW) acc[k] += partials[(i * dim + d) * kParts + k];
  }
#pragma unroll
  for (int k = 0; k < kMaxW; ++k)
    if (k < W) q.dweight[d * W + k] = acc[k];
  if (q.dbias != nullptr) q.dbias[d] = acc[kMaxW];
}

// Packed dinitial_states, one thread per (sequence, channel): dxpad[j] for j < W-1 needs dz of the
// sequence's first W-1 steps only (recomputed here; zeros past its end), plus dfinal_states where
// the sequence is shorter than W-1 (all of it for an empty one).
template <typename T>
__global__ void causal_conv1d_dinit_varlen_kernel(const FsConv1dBwdParams q) {
  const FsConv1dParams& p = q.fwd;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.num_seqs * p.dim) return;
  const int64_t seq = row / p.dim, d = row % p.dim;
  const int W = static_cast<int>(p.width);
  const int64_t start = p.cu_seqlens[seq], len = p.cu_seqlens[seq + 1] - start;
  const T* x = static_cast<const T*>(p.x) + d * p.x_stride[1];
  const T* dout = static_cast<const T*>(q.dout) + d * q.dout_stride[1];
  // All arrays are indexed by unrolled constants only (registers, not local memory).
  float w[kMaxW], xp[2 * kMaxW - 2], dz[kMaxW - 1];  // xp[j] = xpad[j], 0 past the sequence
#pragma unroll
  for (int k = 0; k < kMaxW; ++k) w[k] = k < W ? p.weight[d * p.weight_stride[0] + k * p.weight_stride[1]] : 0.0f;
#pragma unroll
  for (int j = 0; j < 2 * kMaxW - 2; ++j) {
    float v = 0.0f;
    if (j < W - 1) v = initial_at<T>(p, seq, d, j);
    else if (j - (W - 1) < min(len, static_cast<int64_t>(W - 1))) v = to_float(x[(start + j - (W - 1)) * p.x_stride[2]]);
    xp[j] = v;
  }
  const float bias = p.bias != nullptr ? p.bias[d] : 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxW - 1; ++j) {
    float g = 0.0f;
    if (j < W - 1 && j < len) {
      g = to_float(dout[(start + j) * q.dout_stride[2]]);
      if (p.silu) {
        float z = bias;
#pragma unroll
        for (int k = 0; k < kMaxW; ++k)
          if (k < W) z += w[k] * xp[j + k];
        g *= dsilu(z);
      }
    }
    dz[j] = g;
  }
#pragma unroll
  for (int j = 0; j < kMaxW - 1; ++j) {
    if (j < W - 1) {
      float g = j >= len ? dfinal_at<T>(q, seq, d, j - len) : 0.0f;
#pragma unroll
      for (int k = 0; k <= j; ++k) g += w[k] * dz[j - k];
      store_dinitial<T>(q, seq, d, j, g);
    }
  }
}

template <typename T, bool kVarlen>
void launch_bwd(const FsConv1dBwdParams& q, float* partials, cudaStream_t stream) {
  const FsConv1dParams& p = q.fwd;
  const unsigned chunks = static_cast<unsigned>(num_chunks(p));
  if (use_lane_kernels(p)) {
    const dim3 grid(chunks, static_cast<unsigned>((p.dim + kLaneThreads - 1) / kLaneThreads),
                    static_cast<unsigned>(p.batch));
    FS_LAUNCH((causal_conv1d_bwd_lane_kernel<T, kVarlen>), grid, kLaneThreads, 0, stream, q, partials);
  } else {
    const dim3 grid(static_cast<unsigned>(p.batch * p.dim), chunks);
    FS_LAUNCH((causal_conv1d_bwd_time_kernel<T, kVarlen>), grid, kTimeThreads, 0, stream, q, partials);
  }
  const unsigned blocks = static_cast<unsigned>((p.dim + 127) / 128);
  FS_LAUNCH(causal_conv1d_reduce_kernel, blocks, 128, 0, stream, q, static_cast<const float*>(partials),
            p.batch * static_cast<int64_t>(chunks));
  if (kVarlen && q.dinitial_states != nullptr) {
    const unsigned dblocks = static_cast<unsigned>((p.num_seqs * p.dim + 127) / 128);
    FS_LAUNCH(causal_conv1d_dinit_varlen_kernel<T>, dblocks, 128, 0, stream, q);
  }
}

template <typename T>
void launch_bwd(const FsConv1dBwdParams& q, float* partials, cudaStream_t stream) {
  if (q.fwd.cu_seqlens != nullptr) launch_bwd<T, true>(q, partials, stream);
  else launch_bwd<T, false>(q, partials, stream);
}

}  // namespace causal_conv1d
}  // namespace fastscan

extern "C" FS_API int64_t fs_causal_conv1d_bwd_workspace_bytes(const FsConv1dParams* p) {
  using namespace fastscan::causal_conv1d;
  if (p == nullptr) return 0;
  return p->batch * num_chunks(*p) * p->dim * kParts * static_cast<int64_t>(sizeof(float));
}

extern "C" FS_API int fs_causal_conv1d_bwd(const FsConv1dBwdParams* q) {
  using namespace fastscan::causal_conv1d;
  const char* fn = "fs_causal_conv1d_bwd";
  if (q == nullptr) return fs_fail(FS_ERR_INVALID, "%s: params is NULL", fn);
  if (const int status = validate_params(&q->fwd, fn)) return status;
  if (q->fwd.batch == 0 || q->fwd.dim == 0) return FS_OK;
  if (q->dweight == nullptr || q->workspace == nullptr || (q->fwd.seqlen > 0 && (q->dout == nullptr || q->dx == nullptr)))
    return fs_fail(FS_ERR_INVALID, "%s: dout, dx, dweight and workspace must not be NULL", fn);
  cudaStream_t stream = static_cast<cudaStream_t>(q->fwd.stream);
  float* partials = static_cast<float*>(q->workspace);
  switch (q->fwd.dtype) {
    case FS_FLOAT32: launch_bwd<float>(*q, partials, stream); break;
    case FS_FLOAT16: launch_bwd<__half>(*q, partials, stream); break;
    case FS_BFLOAT16: launch_bwd<__nv_bfloat16>(*q, partials, stream); break;
  }
  return check_launch(fn);
}
