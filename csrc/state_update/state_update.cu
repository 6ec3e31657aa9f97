// Mamba decode step (`selective_state_update`) in CUDA; the math is in csrc/common/state_update_abi.h.
//
// The op is memory-bound: each state element is read once and written once, every other input is a
// (batch, dim) or (dim, dstate) vector. So the kernel's job is coalesced state traffic and enough
// blocks in flight; the dstate loop stays in registers and y is a warp-shuffle sum.
#include <stdint.h>
#include <string.h>

#include "cuda_dtype.cuh"
#include "cuda_emu.h"
#include "state_update_abi.h"
#include "status.h"

namespace fastscan {
namespace state_update {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kThreads = 128;
// Consecutive states per lane: one 16-byte load for a float32 row, 8 bytes for 16-bit rows.
constexpr int kItems = 4;


// The vector type of kItems elements of X.
template <int kBytes>
struct RawVector;
template <>
struct RawVector<16> { using Type = uint4; };
template <>
struct RawVector<8> { using Type = uint2; };

template <typename X>
struct Items {
  using Raw = typename RawVector<kItems * sizeof(X)>::Type;

  // Vector access is legal for every item group of this row: groups start at multiples of kItems.
  __device__ __forceinline__ static bool vectorizable(const X* row, int64_t stride) {
    return stride == 1 && reinterpret_cast<uintptr_t>(row) % sizeof(Raw) == 0;
  }

  // out[i] = row[(n + i) * stride] as float, 0 at and past dstate. `vec`: one vector load (caller
  // checked vectorizable() and n + kItems <= dstate).
  __device__ __forceinline__ static void load(const X* __restrict__ row, int64_t stride, int n, int64_t dstate,
                                              bool vec, float (&out)[kItems]) {
    if (vec) {
      const Raw raw = *reinterpret_cast<const Raw*>(row + n);
      X items[kItems];
      memcpy(items, &raw, sizeof(items));
#pragma unroll
      for (int i = 0; i < kItems; ++i) out[i] = to_float(items[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) out[i] = n + i < dstate ? to_float(row[(n + i) * stride]) : 0.0f;
    }
  }

  __device__ __forceinline__ static void store(X* __restrict__ row, int64_t stride, int n, int64_t dstate, bool vec,
                                               const float (&in)[kItems]) {
    if (vec) {
      X items[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) items[i] = from_float<X>(in[i]);
      Raw raw;
      memcpy(&raw, items, sizeof(items));
      *reinterpret_cast<Raw*>(row + n) = raw;
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (n + i < dstate) row[(n + i) * stride] = from_float<X>(in[i]);
      }
    }
  }
};

// One decode step for every (batch, channel) row.
//
// grid: batch * cdiv(dim, kThreads / kLanes) blocks (1-D: no 65535 limit on batch); block: kThreads.
// A row (b, d) is owned by kLanes consecutive lanes of a warp; lane l holds the kItems consecutive
// states [n0 + l * kItems, n0 + (l + 1) * kItems) of each pass of kLanes * kItems states (one pass up
// to dstate 128; larger dstate loops). With a contiguous state a warp's load is one contiguous run of
// 32 * kItems elements. Each state element is read once and written once; y[b, d] is the xor-shuffle
// sum over the row's lanes, written by its first lane. T: dtype of x, dt, z, B, C, y; S: of state.
template <typename T, typename S, int kLanes>
__global__ void __launch_bounds__(kThreads) selective_state_update_kernel(const FsStateUpdateParams p) {
  constexpr int kRowsPerBlock = kThreads / kLanes;
  // 32-bit index math (the launcher checks dim and the grid fit): a 64-bit division is a
  // subroutine call that costs a stack frame.
  const unsigned dim = static_cast<unsigned>(p.dim);
  const unsigned n_dblocks = (dim + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t b = blockIdx.x / n_dblocks;
  const unsigned d = (blockIdx.x % n_dblocks) * kRowsPerBlock + threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  // Rows past dim compute on row dim - 1 and store nothing: every lane must reach the shuffles.
  const bool active = d < dim;
  const int64_t dc = active ? d : dim - 1;
  const int64_t g = static_cast<unsigned>(dc) / (dim / static_cast<unsigned>(p.n_groups));

  const float x = to_float(static_cast<const T*>(p.x)[b * p.x_stride[0] + dc * p.x_stride[1]]);
  float dt = to_float(static_cast<const T*>(p.dt)[b * p.dt_stride[0] + dc * p.dt_stride[1]]);
  if (p.dt_bias != nullptr) dt += p.dt_bias[dc];
  if (p.dt_softplus) dt = dt <= 20.0f ? log1pf(expf(dt)) : dt;
  const float dt_log2e = dt * kLog2e;
  const float dt_x = dt * x;

  S* state_row = static_cast<S*>(p.state) + b * p.state_stride[0] + dc * p.state_stride[1];
  const float* A_row = p.A + dc * p.A_stride[0];
  const T* B_row = static_cast<const T*>(p.B) + b * p.B_stride[0] + g * p.B_stride[1];
  const T* C_row = static_cast<const T*>(p.C) + b * p.C_stride[0] + g * p.C_stride[1];
  const bool vec_state = Items<S>::vectorizable(state_row, p.state_stride[2]);
  const bool vec_A = Items<float>::vectorizable(A_row, p.A_stride[1]);
  const bool vec_B = Items<T>::vectorizable(B_row, p.B_stride[2]);
  const bool vec_C = Items<T>::vectorizable(C_row, p.C_stride[2]);

  float y_part = 0.0f;
  for (int n0 = 0; n0 < p.dstate; n0 += kLanes * kItems) {
    const int n = n0 + lane * kItems;
    const bool full = n + kItems <= p.dstate;
    float h[kItems], a[kItems], bv[kItems], c[kItems];
    Items<S>::load(state_row, p.state_stride[2], n, p.dstate, full && vec_state, h);
    Items<float>::load(A_row, p.A_stride[1], n, p.dstate, full && vec_A, a);
    Items<T>::load(B_row, p.B_stride[2], n, p.dstate, full && vec_B, bv);
    Items<T>::load(C_row, p.C_stride[2], n, p.dstate, full && vec_C, c);
    // Items past dstate are 0 (a = 0 gives exp 1, times h = 0): they add nothing to y.
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      h[i] = exp2f(dt_log2e * a[i]) * h[i] + dt_x * bv[i];
      y_part += h[i] * c[i];
    }
    if (active && n < p.dstate) Items<S>::store(state_row, p.state_stride[2], n, p.dstate, full && vec_state, h);
  }
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) y_part += __shfl_xor_sync(kFullMask, y_part, offset);

  if (active && lane == 0) {
    float out = y_part;
    if (p.D != nullptr) out += p.D[d] * x;
    if (p.z != nullptr) {
      const float zv = to_float(static_cast<const T*>(p.z)[b * p.z_stride[0] + d * p.z_stride[1]]);
      out *= zv / (1.0f + expf(-zv));
    }
    static_cast<T*>(p.y)[b * p.y_stride[0] + d * p.y_stride[1]] = from_float<T>(out);
  }
}

template <typename T, typename S, int kLanes>
void launch(const FsStateUpdateParams& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kThreads / kLanes;
  const int64_t blocks = p.batch * ((p.dim + kRowsPerBlock - 1) / kRowsPerBlock);
  auto kernel = &selective_state_update_kernel<T, S, kLanes>;
  FS_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, p);
}

// Lanes per row: the fewest that cover dstate in one pass of kItems per lane (32 beyond 128).
template <typename T, typename S>
void launch_for_dstate(const FsStateUpdateParams& p, cudaStream_t stream) {
  if (p.dstate <= 4) return launch<T, S, 1>(p, stream);
  if (p.dstate <= 8) return launch<T, S, 2>(p, stream);
  if (p.dstate <= 16) return launch<T, S, 4>(p, stream);
  if (p.dstate <= 32) return launch<T, S, 8>(p, stream);
  if (p.dstate <= 64) return launch<T, S, 16>(p, stream);
  return launch<T, S, 32>(p, stream);
}

inline int validate(const FsStateUpdateParams* p, const char* fn) {
  if (p == nullptr) return fs_fail(FS_ERR_INVALID, "%s: params is NULL", fn);
  if (p->batch < 0 || p->dim < 1 || p->dstate < 1 || p->n_groups < 1 || p->dim % p->n_groups != 0) {
    return fs_fail(FS_ERR_INVALID, "%s: bad sizes batch=%lld dim=%lld dstate=%lld n_groups=%lld", fn,
                   (long long)p->batch, (long long)p->dim, (long long)p->dstate, (long long)p->n_groups);
  }
  if (p->dtype != FS_FLOAT32 && p->dtype != FS_FLOAT16 && p->dtype != FS_BFLOAT16) {
    return fs_fail(FS_ERR_INVALID, "%s: unknown dtype code %d", fn, (int)p->dtype);
  }
  if (p->state_dtype != FS_FLOAT32 && p->state_dtype != p->dtype) {
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: state dtype code %d must be float32 (0) or the input dtype (%d)", fn,
                   (int)p->state_dtype, (int)p->dtype);
  }
  if (p->dstate > 0x7fffffffLL || p->dim > 0x7fffffffLL) {
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: dim=%lld or dstate=%lld too large", fn, (long long)p->dim,
                   (long long)p->dstate);
  }
  const int64_t rows_per_block = kThreads / 32;  // the fewest rows per block of any configuration
  if (p->batch * ((p->dim + rows_per_block - 1) / rows_per_block) > 0x7fffffffLL) {
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: batch * dim too large for the grid", fn);
  }
  if (p->batch > 0 && (p->state == nullptr || p->x == nullptr || p->dt == nullptr || p->A == nullptr ||
                       p->B == nullptr || p->C == nullptr || p->y == nullptr)) {
    return fs_fail(FS_ERR_INVALID, "%s: state, x, dt, A, B, C and y must not be NULL", fn);
  }
  return FS_OK;
}

}  // namespace state_update
}  // namespace fastscan

extern "C" FS_API int fs_selective_state_update(const FsStateUpdateParams* p) {
  using namespace fastscan::state_update;
  const char* fn = "fs_selective_state_update";
  if (const int status = validate(p, fn)) return status;
  if (p->batch == 0) return FS_OK;
  cudaStream_t stream = static_cast<cudaStream_t>(p->stream);
  const bool f32_state = p->state_dtype == FS_FLOAT32;
  switch (p->dtype) {
    case FS_FLOAT32: launch_for_dstate<float, float>(*p, stream); break;
    case FS_FLOAT16:
      f32_state ? launch_for_dstate<__half, float>(*p, stream) : launch_for_dstate<__half, __half>(*p, stream);
      break;
    case FS_BFLOAT16:
      f32_state ? launch_for_dstate<__nv_bfloat16, float>(*p, stream)
                : launch_for_dstate<__nv_bfloat16, __nv_bfloat16>(*p, stream);
      break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return fs_fail(FS_ERR_RUNTIME, "%s: kernel launch failed: %s", fn, cudaGetErrorString(err));
  return FS_OK;
}
