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
// causal_conv1d_final_states_kernel<T>: one thread per (batch, channel) copies the last W-1 of xpad.
#include "causal_conv1d_common.cuh"

namespace fastscan {
namespace causal_conv1d {

template <typename T>
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
    xs[i] = t >= 0 ? (t < p.seqlen ? to_float(x[t * p.x_stride[2]]) : 0.0f) : initial_at<T>(p, b, d, t0 + i);
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
#pragma unroll
    for (int k = 0; k < kMaxW; ++k)
      if (k < W) acc += w[k] * xs[i + k];
    if (p.silu) acc *= sigmoid(acc);
    out[(t0 + i) * p.out_stride[2]] = from_float<T>(acc);
  }
}

template <typename T>
__global__ __launch_bounds__(kLaneThreads) void causal_conv1d_fwd_lane_kernel(const FsConv1dParams p) {
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kLaneThreads + threadIdx.x;
  if (d >= p.dim) return;
  const int64_t b = blockIdx.z, t0 = static_cast<int64_t>(blockIdx.x) * kLaneChunk;
  const int64_t t1 = min(t0 + kLaneChunk, p.seqlen);
  const int W = static_cast<int>(p.width), first = kMaxW - W;  // taps live in slots first .. kMaxW-1
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride[0] + d * p.x_stride[1];
  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + d * p.out_stride[1];

  float w[kMaxW], win[kMaxW];  // win[kMaxW-1-j] = xpad[t + W-1 - j]: slot kMaxW-1 is x[t]
#pragma unroll
  for (int i = 0; i < kMaxW; ++i) {
    w[i] = i >= first ? p.weight[d * p.weight_stride[0] + (i - first) * p.weight_stride[1]] : 0.0f;
    // Before the first step shifts the window, slots first+1 .. kMaxW-1 hold xpad[t0 .. t0+W-2].
    const int64_t q = t0 + i - first - 1;
    float v = 0.0f;
    if (i > first) v = q >= W - 1 ? to_float(x[(q - (W - 1)) * p.x_stride[2]]) : initial_at<T>(p, b, d, q);
    win[i] = v;
  }
  const float bias = p.bias != nullptr ? p.bias[d] : 0.0f;
  for (int64_t t = t0; t < t1; ++t) {
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

template <typename T>
__global__ void causal_conv1d_final_states_kernel(const FsConv1dParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.batch * p.dim) return;
  const int64_t b = row / p.dim, d = row % p.dim;
  const int W = static_cast<int>(p.width);
  const int64_t* s = p.final_states_stride;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride[0] + d * p.x_stride[1];
  T* fin = static_cast<T*>(p.final_states) + b * s[0] + d * s[1];
  for (int j = 0; j < W - 1; ++j) {
    const int64_t q = p.seqlen + j;  // xpad index
    fin[j * s[2]] = from_float<T>(q >= W - 1 ? to_float(x[(q - (W - 1)) * p.x_stride[2]]) : initial_at<T>(p, b, d, q));
  }
}

template <typename T>
void launch_fwd(const FsConv1dParams& p, cudaStream_t stream) {
  const unsigned chunks = static_cast<unsigned>(num_chunks(p));
  if (p.seqlen > 0) {
    if (use_lane_kernels(p)) {
      const dim3 grid(chunks, static_cast<unsigned>((p.dim + kLaneThreads - 1) / kLaneThreads),
                      static_cast<unsigned>(p.batch));
      FS_LAUNCH(causal_conv1d_fwd_lane_kernel<T>, grid, kLaneThreads, 0, stream, p);
    } else {
      const dim3 grid(static_cast<unsigned>(p.batch * p.dim), chunks);
      FS_LAUNCH(causal_conv1d_fwd_time_kernel<T>, grid, kTimeThreads, 0, stream, p);
    }
  }
  if (p.final_states != nullptr) {
    const unsigned blocks = static_cast<unsigned>((p.batch * p.dim + 255) / 256);
    FS_LAUNCH(causal_conv1d_final_states_kernel<T>, blocks, 256, 0, stream, p);
  }
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
