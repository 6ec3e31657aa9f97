// Causal depthwise conv1d, forward (math in causal_conv1d_abi.h).
//
// causal_conv1d_fwd_time_kernel<T>   (time stride 1, or any strides)
//   grid (batch * dim, n_chunks), kTimeThreads threads; a block owns kTimeChunk steps of one row.
//   It stages xpad[t0 .. t0 + kTimeChunk + W - 1) in shared memory with coalesced loads (the W-1
//   halo comes from x, or initial_states at the start), then thread i computes steps
//   t0 + i + j * kTimeThreads (conflict-free shared reads, coalesced stores). One read of x, one
//   write of out.
// causal_conv1d_fwd_lane_kernel<T>   (channel stride 1: channel-last)
//   grid (n_chunks, cdiv(dim, kLaneThreads), batch); thread = one channel, kLaneChunk steps; it
//   loads the W-1 halo steps, then walks time with the window in registers: each step one
//   coalesced load of x (a warp reads 32 adjacent channels) and one coalesced store.
// causal_conv1d_final_states_kernel<T>: one thread per (batch or sequence, channel) copies the last
//   W-1 of its xpad.
// Packed (kVarlen): the same grids over the packed steps; the time kernel stages x only and swaps in
// the initial states per step where a step's window reaches back past its sequence start; a lane
// thread reloads its window from the next sequence's states when its walk crosses a boundary.
#include "causal_conv1d_common.cuh"

namespace fastscan {
namespace causal_conv1d {

template <typename T, bool kVarlen>
__global__ __launch_bounds__(kTimeThreads) void causal_conv1d_fwd_time_kernel(const FsConv1dParams p) {
  __shared__ float xs[kTimeChunk + kMaxW];
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTimeChunk;
  const int W = static_cast<int>(p.width);
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride[0] + d * p.x_stride[1];
  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + d * p.out_stride[1];

  for (int i = tid; i < kTimeChunk + W - 1; i += kTimeThreads) {
    const int64_t t = t0 + i - (W - 1);  // xpad[t0 + i] = x[t]
    if (kVarlen) xs[i] = t >= 0 && t < p.seqlen ? to_float(x[t * p.x_stride[2]]) : 0.0f;
    else xs[i] = t >= 0 ? (t < p.seqlen ? to_float(x[t * p.x_stride[2]]) : 0.0f) : initial_at<T>(p, b, d, t0 + i);
  }
  int lo = 0, hi = 0;  // the sequences of this block's first and last steps
  if (kVarlen) {
    lo = find_seq(p.cu_seqlens, 0, static_cast<int>(p.num_seqs) - 1, t0);
    hi = find_seq(p.cu_seqlens, lo, static_cast<int>(p.num_seqs) - 1, min(t0 + kTimeChunk, p.seqlen) - 1);
  }
  float w[kMaxW];
#pragma unroll
  for (int k = 0; k < kMaxW; ++k) w[k] = k < W ? p.weight[d * p.weight_stride[0] + k * p.weight_stride[1]] : 0.0f;
  const float bias = p.bias != nullptr ? p.bias[d] : 0.0f;
  __syncthreads();

#pragma unroll
  for (int j = 0; j < kTimeItems; ++j) {
    const int i = tid + j * kTimeThreads;
    if (t0 + i >= p.seqlen) break;
    float acc = bias;
    int k0 = 0;  // the first tap that reads x
    if (kVarlen) {
      const int seq = find_seq(p.cu_seqlens, lo, hi, t0 + i);
      const int64_t tl = t0 + i - p.cu_seqlens[seq];  // step within its sequence
      // Taps k < W-1-tl reach back past the sequence start into its initial states. A runtime loop
      // with weights from global memory: unrolled, this rare path made ptxas spill on sm_80.
      for (int k = 0; k < W - 1 - tl; ++k)
        acc += p.weight[d * p.weight_stride[0] + k * p.weight_stride[1]] * initial_at<T>(p, seq, d, tl + k);
      k0 = static_cast<int>(max(static_cast<int64_t>(0), W - 1 - tl));
    }
#pragma unroll
    for (int k = 0; k < kMaxW; ++k)
      if (k < W && k >= k0) acc += w[k] * xs[i + k];
    if (p.silu) acc *= sigmoid(acc);
    out[(t0 + i) * p.out_stride[2]] = from_float<T>(acc);
  }
}

template <typename T, bool kVarlen>
__global__ __launch_bounds__(kLaneThreads) void causal_conv1d_fwd_lane_kernel(const FsConv1dParams p) {
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kLaneThreads + threadIdx.x;
  if (d >= p.dim) return;
  const int64_t b = blockIdx.z, t0 = static_cast<int64_t>(blockIdx.x) * kLaneChunk;
  const int64_t t1 = min(t0 + kLaneChunk, p.seqlen);
  const int W = static_cast<int>(p.width), first = kMaxW - W;  // taps live in slots first .. kMaxW-1
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride[0] + d * p.x_stride[1];
  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + d * p.out_stride[1];

  int seq = static_cast<int>(b);                // row of the states
  int64_t start = 0, end = p.seqlen;            // the steps of that sequence
  if (kVarlen) {
    seq = find_seq(p.cu_seqlens, 0, static_cast<int>(p.num_seqs) - 1, t0);
    start = p.cu_seqlens[seq];
    end = p.cu_seqlens[seq + 1];
  }
  float w[kMaxW], win[kMaxW];  // win[kMaxW-1-j] = xpad[t + W-1 - j]: slot kMaxW-1 is x[t]
#pragma unroll
  for (int i = 0; i < kMaxW; ++i) {
    w[i] = i >= first ? p.weight[d * p.weight_stride[0] + (i - first) * p.weight_stride[1]] : 0.0f;
    // Before the first step shifts the window, slots first+1 .. kMaxW-1 hold xpad[t0 .. t0+W-2]
    // (xpad of the sequence: q counts from its start).
    const int64_t q = t0 - start + i - first - 1;
    float v = 0.0f;
    if (i > first) v = q >= W - 1 ? to_float(x[(start + q - (W - 1)) * p.x_stride[2]]) : initial_at<T>(p, seq, d, q);
    win[i] = v;
  }
  const float bias = p.bias != nullptr ? p.bias[d] : 0.0f;
  for (int64_t t = t0; t < t1; ++t) {
    if (kVarlen && t == end) {  // the next non-empty sequence starts: its window is its initial states
      do ++seq; while (p.cu_seqlens[seq + 1] <= t);
      end = p.cu_seqlens[seq + 1];
#pragma unroll
      for (int i = 0; i < kMaxW; ++i)
        if (i > first) win[i] = initial_at<T>(p, seq, d, i - first - 1);
    }
#pragma unroll
    for (int i = 0; i < kMaxW - 1; ++i) win[i] = win[i + 1];
    win[kMaxW - 1] = to_float(x[t * p.x_stride[2]]);
    float acc = bias;
#pragma unroll
    for (int i = 0; i < kMaxW; ++i)
      if (i >= first) acc += w[i] * win[i];
    if (p.silu) acc *= sigmoid(acc);
    out[t * p.out_stride[2]] = from_float<T>(acc);
  }
}

template <typename T, bool kVarlen>
__global__ void causal_conv1d_final_states_kernel(const FsConv1dParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= (kVarlen ? p.num_seqs : p.batch) * p.dim) return;
  const int64_t b = row / p.dim, d = row % p.dim;  // b: the sequence when packed
  const int W = static_cast<int>(p.width);
  const int64_t* s = p.final_states_stride;
  int64_t start = 0, len = p.seqlen;
  const T* x = static_cast<const T*>(p.x) + d * p.x_stride[1];
  if (kVarlen) {
    start = p.cu_seqlens[b];
    len = p.cu_seqlens[b + 1] - start;
  } else {
    x += b * p.x_stride[0];
  }
  T* fin = static_cast<T*>(p.final_states) + b * s[0] + d * s[1];
  for (int j = 0; j < W - 1; ++j) {
    const int64_t q = len + j;  // xpad index
    fin[j * s[2]] =
        from_float<T>(q >= W - 1 ? to_float(x[(start + q - (W - 1)) * p.x_stride[2]]) : initial_at<T>(p, b, d, q));
  }
}

template <typename T, bool kVarlen>
void launch_fwd(const FsConv1dParams& p, cudaStream_t stream) {
  const unsigned chunks = static_cast<unsigned>(num_chunks(p));
  if (p.seqlen > 0) {
    if (use_lane_kernels(p)) {
      const dim3 grid(chunks, static_cast<unsigned>((p.dim + kLaneThreads - 1) / kLaneThreads),
                      static_cast<unsigned>(p.batch));
      FS_LAUNCH((causal_conv1d_fwd_lane_kernel<T, kVarlen>), grid, kLaneThreads, 0, stream, p);
    } else {
      const dim3 grid(static_cast<unsigned>(p.batch * p.dim), chunks);
      FS_LAUNCH((causal_conv1d_fwd_time_kernel<T, kVarlen>), grid, kTimeThreads, 0, stream, p);
    }
  }
  if (p.final_states != nullptr) {
    const unsigned blocks = static_cast<unsigned>(((kVarlen ? p.num_seqs : p.batch) * p.dim + 255) / 256);
    FS_LAUNCH((causal_conv1d_final_states_kernel<T, kVarlen>), blocks, 256, 0, stream, p);
  }
}

template <typename T>
void launch_fwd(const FsConv1dParams& p, cudaStream_t stream) {
  if (p.cu_seqlens != nullptr) launch_fwd<T, true>(p, stream);
  else launch_fwd<T, false>(p, stream);
}

}  // namespace causal_conv1d
}  // namespace fastscan

extern "C" FS_API int fs_causal_conv1d_fwd(const FsConv1dParams* p) {
  using namespace fastscan::causal_conv1d;
  const char* fn = "fs_causal_conv1d_fwd";
  if (const int status = validate_params(p, fn)) return status;
  if (p->batch == 0 || p->dim == 0) return FS_OK;
  if (p->seqlen > 0 && p->out == nullptr) return fs_fail(FS_ERR_INVALID, "%s: out is NULL", fn);
  cudaStream_t stream = static_cast<cudaStream_t>(p->stream);
  switch (p->dtype) {
    case FS_FLOAT32: launch_fwd<float>(*p, stream); break;
    case FS_FLOAT16: launch_fwd<__half>(*p, stream); break;
    case FS_BFLOAT16: launch_fwd<__nv_bfloat16>(*p, stream); break;
  }
  return check_launch(fn);
}
