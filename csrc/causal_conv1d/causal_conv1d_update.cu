// Causal conv1d decode step: out for T new tokens and conv_state shifted left by T in place
// (math in causal_conv1d_abi.h).
//
// causal_conv1d_update_kernel
//   grid (cdiv(dim, kUpdateThreads), batch); one thread per (batch, channel): it reads the last W-1
//   state entries into a register window, runs the T tokens through it, then shifts its state row
//   in ascending order (each old entry is read before it is overwritten). Adjacent threads touch
//   adjacent channels, so x and out accesses coalesce for (batch, dim[, T]) tensors. Decode moves a
//   few bytes per channel: dtypes are switched at run time rather than instantiated.
#include "causal_conv1d_common.cuh"

namespace fastscan {
namespace causal_conv1d {

constexpr int kUpdateThreads = 128;

__global__ __launch_bounds__(kUpdateThreads) void causal_conv1d_update_kernel(const FsConv1dUpdateParams u) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kUpdateThreads + threadIdx.x;
  if (d >= u.dim) return;
  const int64_t b = blockIdx.y;
  const int W = static_cast<int>(u.width), first = kMaxW - W;
  const int64_t S = u.state_len, T = u.seqlen;
  const int64_t xrow = b * u.x_stride[0] + d * u.x_stride[1];
  const int64_t srow = b * u.conv_state_stride[0] + d * u.conv_state_stride[1];
  const int64_t orow = b * u.out_stride[0] + d * u.out_stride[1];
  const int64_t ss = u.conv_state_stride[2];

  float w[kMaxW], win[kMaxW];  // right-aligned as in the forward lane kernel
#pragma unroll
  for (int i = 0; i < kMaxW; ++i) {
    w[i] = i >= first ? u.weight[d * u.weight_stride[0] + (i - first) * u.weight_stride[1]] : 0.0f;
    // before the first shift, slots first+1 .. kMaxW-1 hold the last W-1 state entries
    win[i] = i > first ? load_any(u.conv_state, srow + (S - kMaxW + i) * ss, u.state_dtype) : 0.0f;
  }
  const float bias = u.bias != nullptr ? u.bias[d] : 0.0f;
  for (int64_t t = 0; t < T; ++t) {
#pragma unroll
    for (int i = 0; i < kMaxW - 1; ++i) win[i] = win[i + 1];
    win[kMaxW - 1] = load_any(u.x, xrow + t * u.x_stride[2], u.dtype);
    float acc = bias;
#pragma unroll
    for (int i = 0; i < kMaxW; ++i)
      if (i >= first) acc += w[i] * win[i];
    if (u.silu) acc *= sigmoid(acc);
    store_any(u.out, orow + t * u.out_stride[2], u.dtype, acc);
  }
  for (int64_t i = 0; i < S; ++i) {
    const int64_t src = i + T;
    const float v = src < S ? load_any(u.conv_state, srow + src * ss, u.state_dtype)
                            : load_any(u.x, xrow + (src - S) * u.x_stride[2], u.dtype);
    store_any(u.conv_state, srow + i * ss, u.state_dtype, v);
  }
}

}  // namespace causal_conv1d
}  // namespace fastscan

extern "C" FS_API int fs_causal_conv1d_update(const FsConv1dUpdateParams* u) {
  using namespace fastscan::causal_conv1d;
  const char* fn = "fs_causal_conv1d_update";
  if (u == nullptr) return fs_fail(FS_ERR_INVALID, "%s: params is NULL", fn);
  if (u->width < 2 || u->width > kMaxW)
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: width=%lld outside 2..%d", fn, (long long)u->width, kMaxW);
  if (u->state_len < u->width - 1 || u->batch < 0 || u->dim < 0 || u->seqlen < 0 || u->batch > 65535)
    return fs_fail(FS_ERR_INVALID, "%s: bad sizes batch=%lld dim=%lld state_len=%lld width=%lld", fn,
                   (long long)u->batch, (long long)u->dim, (long long)u->state_len, (long long)u->width);
  if (u->batch == 0 || u->dim == 0) return FS_OK;
  const dim3 grid(static_cast<unsigned>((u->dim + kUpdateThreads - 1) / kUpdateThreads), static_cast<unsigned>(u->batch));
  FS_LAUNCH(causal_conv1d_update_kernel, grid, kUpdateThreads, 0, static_cast<cudaStream_t>(u->stream), *u);
  return check_launch(fn);
}
