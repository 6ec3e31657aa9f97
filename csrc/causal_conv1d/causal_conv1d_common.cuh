// Shared pieces of the causal conv1d CUDA kernels: launch shapes, dtype conversion, silu and its
// derivative, the layout choice and host-side validation (math in causal_conv1d_abi.h).
//
// Width is a runtime value <= kMaxW: windows are kMaxW-register arrays indexed only by unrolled
// constants (a runtime index would put them in local memory), with the taps right-aligned so that
// slot kMaxW-1 always holds the newest step.
//
// Packed sequences (cu_seqlens): every kernel is templated on kVarlen, so the unpacked instances
// compile exactly as before. The grids stay those of a batch-1 call over the packed time axis (they
// depend on shapes only); a program finds the sequence of its steps by binary search in
// cu_seqlens and reads the initial states, not the previous sequence's x, where the window reaches
// back past the sequence start. Long and short sequences cost the same per step.
#pragma once

#include <stdint.h>

#include "cuda_dtype.cuh"
#include "cuda_emu.h"
#include "causal_conv1d_abi.h"
#include "status.h"

namespace fastscan {
namespace causal_conv1d {

constexpr int kMaxW = FS_CONV1D_MAX_WIDTH;
constexpr unsigned kFullMask = 0xffffffffu;

// Time-major kernels (time stride 1): a block owns kTimeChunk steps of one (batch, channel) row.
constexpr int kTimeThreads = 128;
constexpr int kTimeItems = 4;
constexpr int kTimeChunk = kTimeThreads * kTimeItems;
// Channel-last kernels: a block owns kLaneThreads channels x kLaneChunk steps, a thread one channel.
// NOTE: 128 steps per chunk keeps the re-read halo (W-1 steps) under 6% of the reads at width 8.
constexpr int kLaneThreads = 128;
constexpr int kLaneChunk = 128;


// Element i of a tensor whose dtype is only known at run time (the update's conv_state).
__device__ __forceinline__ float load_any(const void* p, int64_t i, int dtype) {
  if (dtype == FS_FLOAT16) return to_float(static_cast<const __half*>(p)[i]);
  if (dtype == FS_BFLOAT16) return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}
__device__ __forceinline__ void store_any(void* p, int64_t i, int dtype, float v) {
  if (dtype == FS_FLOAT16) static_cast<__half*>(p)[i] = from_float<__half>(v);
  else if (dtype == FS_BFLOAT16) static_cast<__nv_bfloat16*>(p)[i] = from_float<__nv_bfloat16>(v);
  else static_cast<float*>(p)[i] = v;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + __expf(-z)); }
__device__ __forceinline__ float dsilu(float z) {
  const float s = sigmoid(z);
  return s * (1.0f + z * (1.0f - s));
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// The packed sequence holding step t: the largest i in [lo, hi] with cu[i] <= t (the caller knows
// cu[lo] <= t, or t < 0 and gets lo). An empty sequence shares its start with the next and loses.
__device__ __forceinline__ int find_seq(const int32_t* cu, int lo, int hi, int64_t t) {
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// xpad[q] of row (b, d) for q < W-1: the initial states, zeros when absent (b: the sequence when packed).
template <typename T>
__device__ __forceinline__ float initial_at(const FsConv1dParams& p, int64_t b, int64_t d, int64_t q) {
  if (p.initial_states == nullptr) return 0.0f;
  const int64_t* s = p.initial_states_stride;
  return to_float(static_cast<const T*>(p.initial_states)[b * s[0] + d * s[1] + q * s[2]]);
}

// The channel-last kernels when channels are contiguous and time is not; otherwise the time-major
// ones (correct for any strides, coalesced when time is contiguous).
inline bool use_lane_kernels(const FsConv1dParams& p) { return p.x_stride[1] == 1 && p.x_stride[2] != 1; }

inline int64_t num_chunks(const FsConv1dParams& p) {
  const int64_t chunk = use_lane_kernels(p) ? kLaneChunk : kTimeChunk;
  return p.seqlen > 0 ? (p.seqlen + chunk - 1) / chunk : 1;
}

inline int validate_params(const FsConv1dParams* p, const char* fn) {
  if (p == nullptr) return fs_fail(FS_ERR_INVALID, "%s: params is NULL", fn);
  if (p->batch < 0 || p->dim < 0 || p->seqlen < 0)
    return fs_fail(FS_ERR_INVALID, "%s: bad sizes batch=%lld dim=%lld seqlen=%lld", fn, (long long)p->batch,
                   (long long)p->dim, (long long)p->seqlen);
  if (p->width < 2 || p->width > kMaxW)
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: width=%lld outside 2..%d", fn, (long long)p->width, kMaxW);
  if (p->dtype != FS_FLOAT32 && p->dtype != FS_FLOAT16 && p->dtype != FS_BFLOAT16)
    return fs_fail(FS_ERR_INVALID, "%s: unknown dtype code %d", fn, (int)p->dtype);
  if (p->batch > 65535 || p->batch * p->dim > 0x7fffffffLL || num_chunks(*p) > 65535)
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: batch=%lld dim=%lld seqlen=%lld exceed the grid limits", fn,
                   (long long)p->batch, (long long)p->dim, (long long)p->seqlen);
  if (p->batch * p->dim * p->seqlen > 0 && (p->x == nullptr || p->weight == nullptr))
    return fs_fail(FS_ERR_INVALID, "%s: x and weight must not be NULL", fn);
  if (p->cu_seqlens != nullptr && (p->batch != 1 || p->num_seqs < 1 || p->num_seqs * p->dim > 0x7fffffffLL))
    return fs_fail(FS_ERR_INVALID, "%s: packed sequences need batch 1 and 1 <= num_seqs (* dim < 2^31), got %lld and %lld",
                   fn, (long long)p->batch, (long long)p->num_seqs);
  return FS_OK;
}

inline int check_launch(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return fs_fail(FS_ERR_RUNTIME, "%s: kernel launch failed: %s", fn, cudaGetErrorString(err));
  return FS_OK;
}

}  // namespace causal_conv1d
}  // namespace fastscan
