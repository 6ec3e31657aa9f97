// The C ABI shared by every compiled backend (cpu, cuda, cuda_emu) and by fastscan/native.py.
//
// No torch headers: Python hands raw pointers, sizes and strides (in elements) through these
// plain structs, whose layout is mirrored by ctypes.Structure classes in fastscan/native.py.
// Keep the two in sync field by field: a mismatch is silent memory corruption.
//
// Every launcher returns 0 on success, or a nonzero FsStatus; fs_last_error() then returns a
// message (thread-local) that Python raises as an exception.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FS_API __declspec(dllexport)
#else
#define FS_API __attribute__((visibility("default")))
#endif

// dtype codes of the "input" tensors (u, delta, z, B, C) and of the outputs y, du, ddelta, dz.
enum FsDtype { FS_FLOAT32 = 0, FS_FLOAT16 = 1, FS_BFLOAT16 = 2 };

enum FsStatus {
  FS_OK = 0,
  FS_ERR_INVALID = 1,      // an argument the launcher cannot handle (message says which)
  FS_ERR_UNSUPPORTED = 2,  // a valid request this build does not implement
  FS_ERR_RUNTIME = 3,      // CUDA error, allocation failure, ...
};

// ---------------------------------------------------------------------------------------------
// Mamba-1 selective scan.
//
//   delta' = delta + delta_bias[d];  if delta_softplus: delta' = (delta' > 20 ? delta' : log1p(exp(delta')))
//   h_t[n] = exp(delta'_t * A[d, n]) * h_{t-1}[n] + delta'_t * B[g, n, t] * u_t      (g = d / (dim / n_groups))
//   y_t    = sum_n h_t[n] * C[g, n, t] + D[d] * u_t;        if z: y_t *= silu(z_t)
//   h_0 = initial_state (or 0);  last_state = h_seqlen.
//
// Strides are in elements. u, delta, z, y: (batch, dim, seqlen); B, C: (batch, n_groups, dstate,
// seqlen); A: (dim, dstate) float32; initial_state: (batch, dim, dstate) float32.
// D, delta_bias: contiguous float32 (dim,) or NULL. z, initial_state: NULL when absent.
//
// Packed variable-length sequences: cu_seqlens (num_seqs + 1,) int32 on the data's device, 0 =
// cu_seqlens[0] <= ... <= cu_seqlens[num_seqs] = seqlen (empty sequences allowed), batch == 1.
// Sequence i is the steps [cu_seqlens[i], cu_seqlens[i+1]) and starts from initial_state[i]
// (or 0); initial_state, last_state, dlast_state and dinitial_state are then indexed by sequence
// ((num_seqs, dim, dstate)) instead of by batch. cu_seqlens NULL (num_seqs 0) = unpacked.
// ---------------------------------------------------------------------------------------------
typedef struct FsScanParams {
  int64_t batch, dim, seqlen, dstate, n_groups;
  int32_t dtype;           // FsDtype of u, delta, z, B, C and of y
  int32_t delta_softplus;  // 0 or 1
  const void* u;      int64_t u_stride[3];
  const void* delta;  int64_t delta_stride[3];
  const float* A;     int64_t A_stride[2];
  const void* B;      int64_t B_stride[4];
  const void* C;      int64_t C_stride[4];
  const float* D;                // (dim,) contiguous, or NULL
  const void* z;      int64_t z_stride[3];   // or NULL
  const float* delta_bias;       // (dim,) contiguous, or NULL
  const float* initial_state; int64_t initial_state_stride[3];  // or NULL
  void* y;            int64_t y_stride[3];   // forward output (dtype); unused by the backward
  float* last_state;             // (batch or num_seqs, dim, dstate) contiguous float32, or NULL
  void* stream;                  // cudaStream_t for the cuda library; ignored elsewhere
  const int32_t* cu_seqlens;     // (num_seqs + 1,) packed-sequence boundaries, or NULL
  int64_t num_seqs;              // 0 when cu_seqlens is NULL
} FsScanParams;

// Backward. Reads the forward inputs from `fwd` (fwd.y and fwd.last_state are ignored) and
// recomputes the states; nothing from the forward pass is saved except its inputs.
// Every output is contiguous and fully written by the launcher (it zeroes what it accumulates).
typedef struct FsScanBwdParams {
  FsScanParams fwd;
  const void* dy;        int64_t dy_stride[3];   // (batch, dim, seqlen), dtype
  const float* dlast_state;                      // (batch or num_seqs, dim, dstate) contiguous, or NULL (= zero)
  void* du;                                      // (batch, dim, seqlen) contiguous, dtype
  void* ddelta;                                  // (batch, dim, seqlen) contiguous, dtype
  void* dz;                                      // (batch, dim, seqlen) contiguous, dtype; NULL iff fwd.z is NULL
  float* dA;                                     // (dim, dstate)
  float* dB;                                     // (batch, n_groups, dstate, seqlen)
  float* dC;                                     // (batch, n_groups, dstate, seqlen)
  float* dD;                                     // (dim,); NULL iff fwd.D is NULL
  float* ddelta_bias;                            // (dim,); NULL iff fwd.delta_bias is NULL
  float* dinitial_state;                         // (batch or num_seqs, dim, dstate); NULL iff fwd.initial_state is NULL
  void* workspace;                               // fs_selective_scan_bwd_workspace_bytes() bytes, or NULL if 0
} FsScanBwdParams;

FS_API int fs_selective_scan_fwd(const FsScanParams* p);
FS_API int64_t fs_selective_scan_bwd_workspace_bytes(const FsScanParams* p);
FS_API int fs_selective_scan_bwd(const FsScanBwdParams* p);

// Message of the last failed call on this thread ("" if none).
FS_API const char* fs_last_error(void);
// Name of this library's backend: "cpu", "cuda" or "cuda_emu" (a load-time sanity check).
FS_API const char* fs_backend_name(void);

#ifdef __cplusplus
}  // extern "C"
#endif
