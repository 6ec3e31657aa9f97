// C ABI of the Mamba decode step `fs_selective_state_update` (cpu, cuda, cuda_emu libraries).
// Mirrored field by field by FsStateUpdateParams in fastscan/state_update/native.py.
//
// For every batch b, channel d and state n (g = d / (dim / n_groups)):
//   dt'  = dt[b, d] + dt_bias[d];  if dt_softplus: dt' = (dt' > 20 ? dt' : log1p(exp(dt')))
//   h    = exp(dt' * A[d, n]) * state[b, d, n] + dt' * B[b, g, n] * x[b, d]      (in float32)
//   state[b, d, n] = h   (in place, rounded to state_dtype)
//   y[b, d] = sum_n h * C[b, g, n] + D[d] * x[b, d];   if z: y *= silu(z[b, d])
//
// Strides are in elements and may be anything (state may be a slice of a larger cache, with any
// batch, channel and state stride). The state is read once and written once by one owner per
// element; it must not overlap any input.
#pragma once
#include "fastscan_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct FsStateUpdateParams {
  int64_t batch, dim, dstate, n_groups;
  int32_t dtype;         // FsDtype of x, dt, z, B, C and of y
  int32_t state_dtype;   // FsDtype of state (float32 or `dtype`)
  int32_t dt_softplus;   // 0 or 1
  int32_t reserved;      // 0; keeps the pointers 8-byte aligned on every ABI
  void* state;        int64_t state_stride[3];   // (batch, dim, dstate), updated in place
  const void* x;      int64_t x_stride[2];       // (batch, dim)
  const void* dt;     int64_t dt_stride[2];      // (batch, dim)
  const float* A;     int64_t A_stride[2];       // (dim, dstate) float32
  const void* B;      int64_t B_stride[3];       // (batch, n_groups, dstate)
  const void* C;      int64_t C_stride[3];       // (batch, n_groups, dstate)
  const float* D;                                // (dim,) contiguous float32, or NULL
  const void* z;      int64_t z_stride[2];       // (batch, dim), or NULL
  const float* dt_bias;                          // (dim,) contiguous float32, or NULL
  void* y;            int64_t y_stride[2];       // (batch, dim) output, dtype
  void* stream;                                  // cudaStream_t for the cuda library; ignored elsewhere
} FsStateUpdateParams;

FS_API int fs_selective_state_update(const FsStateUpdateParams* p);

#ifdef __cplusplus
}  // extern "C"
#endif
