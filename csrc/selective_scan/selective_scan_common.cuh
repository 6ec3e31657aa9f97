// Shared pieces of the Mamba-1 selective-scan CUDA kernels (forward and backward):
// launch configurations, dtype conversion, masked/vectorized item loads and stores, the
// (a, b) scan-pair algebra and its warp-level scans, and argument validation.
//
// The scan: h_t = a_t * h_{t-1} + b_t, with a_t = exp(delta'_t A[d,n]), b_t = delta'_t B_t u_t.
// A pair (a, b) is the affine map h -> a*h + b; applying p then q is (p.a*q.a, q.a*p.b + q.b).
// The backward runs the mirrored recurrence e_t = a_t * (beta_t + e_{t+1}) from the right, where
// e_t = dL/dh_{t-1} through h_t and beta_t = dy'_t C_t; its pairs (a, r) compose right-to-left.
#pragma once

#include <stdint.h>
#include <string.h>

#include "cuda_dtype.cuh"
#include "cuda_emu.h"
#include "fastscan_abi.h"
#include "status.h"

namespace fastscan {
namespace selective_scan {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
// Per-state carries live in shared memory (2 x kMaxDstate floats each); the ABI allows any
// dstate, this build rejects larger ones with FS_ERR_UNSUPPORTED.
constexpr int kMaxDstate = 256;

// Launch configurations. A block owns one (batch, channel) row; a chunk is kNThreads * kNItems
// consecutive timesteps; thread t owns items [t*kNItems, (t+1)*kNItems) of each chunk.
// NOTE: kNItems * sizeof(float) is a multiple of 16 bytes so fp32 rows load as float4 pairs; a
// 16-bit row of 8 items is one 16-byte load per thread (a warp reads 512 contiguous bytes).
struct ShortConfig {  // seqlen <= 128: one warp, one chunk
  static constexpr int kNThreads = 32;
  static constexpr int kNItems = 4;
};
struct LongConfig {  // everything else: 1024-step chunks
  static constexpr int kNThreads = 128;
  static constexpr int kNItems = 8;
};
inline int64_t chunk_size_for(int64_t seqlen) {
  return seqlen <= ShortConfig::kNThreads * ShortConfig::kNItems
             ? ShortConfig::kNThreads * ShortConfig::kNItems
             : LongConfig::kNThreads * LongConfig::kNItems;
}
inline int64_t num_chunks_for(int64_t seqlen) {
  const int64_t chunk = chunk_size_for(seqlen);
  return (seqlen + chunk - 1) / chunk;
}

// ---- packed sequences ---------------------------------------------------------------------------
// Grid rows: one per batch row, or one per packed sequence (the config still follows p.seqlen,
// the packed total, since the host may not read cu_seqlens).
inline int64_t grid_rows(const FsScanParams& p) {
  return p.cu_seqlens != nullptr ? p.num_seqs : p.batch;
}

// The steps grid row `seq` owns: [start, start + len) of batch row `batch`. kPacked is a template
// flag, not a test of p.cu_seqlens, so the unpacked kernels compile to exactly what they were
// before packing existed (a runtime branch cost the backward 5 registers and a spill on sm_90).
struct SeqRange {
  int64_t batch, start, len;
};
template <bool kPacked>
__device__ __forceinline__ SeqRange seq_range(const FsScanParams& p, int64_t seq) {
  if constexpr (!kPacked) {
    return SeqRange{seq, 0, p.seqlen};
  } else {
    const int64_t start = p.cu_seqlens[seq];
    return SeqRange{0, start, p.cu_seqlens[seq + 1] - start};
  }
}


// Widest vector (<= 16 bytes) that covers one thread's items.
template <int kBytes>
struct VectorOf {
  using Type = uint4;
};
template <>
struct VectorOf<8> {
  using Type = uint2;
};
template <>
struct VectorOf<4> {
  using Type = unsigned int;
};
template <>
struct VectorOf<2> {
  using Type = unsigned short;
};

template <typename T, int kNItems>
struct ItemIO {
  static constexpr int kBytes = kNItems * static_cast<int>(sizeof(T));
  static constexpr int kVecBytes = kBytes < 16 ? kBytes : 16;
  using Vec = typename VectorOf<kVecBytes>::Type;
  static constexpr int kNVecs = kBytes / kVecBytes;

  // True when a row with this base and element stride can use vector accesses for every
  // thread's full item group (chunk and thread offsets are multiples of kNItems elements).
  __device__ __forceinline__ static bool vectorizable(const void* row, int64_t stride) {
    return stride == 1 && reinterpret_cast<uintptr_t>(row) % kVecBytes == 0;
  }

  // out[i] = row[(l0 + i) * stride] as float, 0 past seqlen.
  __device__ __forceinline__ static void load(const T* __restrict__ row, int64_t stride, int64_t l0,
                                              int64_t seqlen, bool vec, float (&out)[kNItems]) {
    if (vec && l0 + kNItems <= seqlen) {
      Vec raw[kNVecs];
      const Vec* src = reinterpret_cast<const Vec*>(row + l0);
#pragma unroll
      for (int v = 0; v < kNVecs; ++v) raw[v] = src[v];
      T items[kNItems];
      memcpy(items, raw, sizeof(items));
#pragma unroll
      for (int i = 0; i < kNItems; ++i) out[i] = to_float(items[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        out[i] = l0 + i < seqlen ? to_float(row[(l0 + i) * stride]) : 0.0f;
      }
    }
  }

  // row[(l0 + i) * stride] = in[i] for the items before seqlen.
  __device__ __forceinline__ static void store(T* __restrict__ row, int64_t stride, int64_t l0,
                                               int64_t seqlen, bool vec, const float (&in)[kNItems]) {
    if (vec && l0 + kNItems <= seqlen) {
      T items[kNItems];
#pragma unroll
      for (int i = 0; i < kNItems; ++i) items[i] = from_float<T>(in[i]);
      Vec raw[kNVecs];
      memcpy(raw, items, sizeof(items));
      Vec* dst = reinterpret_cast<Vec*>(row + l0);
#pragma unroll
      for (int v = 0; v < kNVecs; ++v) dst[v] = raw[v];
    } else {
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        if (l0 + i < seqlen) row[(l0 + i) * stride] = from_float<T>(in[i]);
      }
    }
  }
};

__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// ---- scans --------------------------------------------------------------------------------------
// Inclusive prefix scan over the lanes of a warp of affine maps (a, b), lane order = time order.
__device__ __forceinline__ void warp_prefix_scan(float& a, float& b, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const float prev_a = __shfl_up_sync(kFullMask, a, offset);
    const float prev_b = __shfl_up_sync(kFullMask, b, offset);
    if (lane >= offset) {
      b = a * prev_b + b;
      a = prev_a * a;
    }
  }
}

// Inclusive suffix scan of the reverse maps e -> a*e + r: lane l ends with lanes l..31 applied
// right to left (the map from the e entering lane 31 from the right to the e leaving lane l).
__device__ __forceinline__ void warp_suffix_scan(float& a, float& r, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const float next_a = __shfl_down_sync(kFullMask, a, offset);
    const float next_r = __shfl_down_sync(kFullMask, r, offset);
    if (lane + offset < 32) {
      r = a * next_r + r;
      a = a * next_a;
    }
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// ---- host-side validation (shared by forward and backward launchers) ----------------------------
inline int validate_scan_params(const FsScanParams* p, const char* fn) {
  if (p == nullptr) return fs_fail(FS_ERR_INVALID, "%s: params is NULL", fn);
  if (p->batch < 0 || p->dim < 0 || p->seqlen < 0 || p->dstate < 1 || p->n_groups < 1) {
    return fs_fail(FS_ERR_INVALID,
                   "%s: bad sizes batch=%lld dim=%lld seqlen=%lld dstate=%lld n_groups=%lld", fn,
                   (long long)p->batch, (long long)p->dim, (long long)p->seqlen,
                   (long long)p->dstate, (long long)p->n_groups);
  }
  if (p->dim % p->n_groups != 0) {
    return fs_fail(FS_ERR_INVALID, "%s: n_groups=%lld must divide dim=%lld", fn,
                   (long long)p->n_groups, (long long)p->dim);
  }
  if (p->dtype != FS_FLOAT32 && p->dtype != FS_FLOAT16 && p->dtype != FS_BFLOAT16) {
    return fs_fail(FS_ERR_INVALID, "%s: unknown dtype code %d", fn, (int)p->dtype);
  }
  if (p->dstate > kMaxDstate) {
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: dstate=%lld exceeds this build's maximum %d", fn,
                   (long long)p->dstate, kMaxDstate);
  }
  if (p->batch > 65535) {
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: batch=%lld exceeds the grid limit 65535", fn,
                   (long long)p->batch);
  }
  if (p->cu_seqlens == nullptr && p->num_seqs != 0) {
    return fs_fail(FS_ERR_INVALID, "%s: num_seqs=%lld without cu_seqlens (expected 0)", fn,
                   (long long)p->num_seqs);
  }
  if (p->cu_seqlens != nullptr && (p->batch != 1 || p->num_seqs < 1)) {
    return fs_fail(FS_ERR_INVALID,
                   "%s: packed sequences need batch 1 and num_seqs >= 1, got batch=%lld "
                   "num_seqs=%lld", fn, (long long)p->batch, (long long)p->num_seqs);
  }
  if (p->num_seqs > 65535) {
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: num_seqs=%lld exceeds the grid limit 65535", fn,
                   (long long)p->num_seqs);
  }
  if (p->dim > 0x7fffffffLL) {
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: dim=%lld exceeds the grid limit", fn,
                   (long long)p->dim);
  }
  const bool empty = p->batch == 0 || p->dim == 0 || p->seqlen == 0;
  if (!empty && (p->u == nullptr || p->delta == nullptr || p->A == nullptr || p->B == nullptr ||
                 p->C == nullptr)) {
    return fs_fail(FS_ERR_INVALID, "%s: u, delta, A, B and C must not be NULL", fn);
  }
  return FS_OK;
}

inline int check_launch(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return fs_fail(FS_ERR_RUNTIME, "%s: kernel launch failed: %s", fn, cudaGetErrorString(err));
  }
  return FS_OK;
}

}  // namespace selective_scan
}  // namespace fastscan
