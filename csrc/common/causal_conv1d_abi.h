// C ABI of the causal depthwise conv1d (mirrored field by field by fastscan/causal_conv1d/native.py).
//
// Math, for every batch b, channel d (W = width, xpad = initial_states ++ x along time, length L+W-1):
//   z[t]   = bias[d] + sum_{k<W} weight[d, k] * xpad[t + k]           t in [0, L)
//   out[t] = silu ? z[t] * sigmoid(z[t]) : z[t]
//   final_states[j] = xpad[L + j]                                      j in [0, W-1)
// so weight[d, W-1] multiplies x[t] itself. initial_states NULL means zeros.
//
// Update (decode): x (batch, dim, T) new tokens, conv_state (batch, dim, S), S >= W-1, in place:
//   window = conv_state[..., S-W+1:] ++ x;  out[t] = act(bias + sum_k weight[k] * window[t + k])
//   conv_state <- (conv_state ++ x)[..., T:T+S]   (old contents shifted left by T, new tokens last)
//
// Strides are in elements, any sign-free layout: a (batch, seqlen, dim) tensor viewed as
// (batch, dim, seqlen) is read and written without a copy. weight is float32 with strides;
// bias float32 contiguous (dim,) or NULL. Accumulation is float32 for every dtype.
//
// Packed variable-length sequences: cu_seqlens (num_seqs + 1,) int32 on the data's device, 0 =
// cu_seqlens[0] <= ... <= cu_seqlens[num_seqs] = seqlen (empty sequences allowed), batch == 1.
// Sequence i is the steps [cu_seqlens[i], cu_seqlens[i+1]) and runs the math above on its own
// xpad_i = initial_states[i] ++ x[start_i:end_i] (the window never reaches across a boundary);
// initial_states, final_states, dfinal_states and dinitial_states are then indexed by sequence
// ((num_seqs, dim, W-1)) instead of by batch. cu_seqlens NULL (num_seqs 0) = unpacked.
#pragma once
#include "fastscan_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

// Widths 2..FS_CONV1D_MAX_WIDTH are implemented (register windows are sized by it).
#define FS_CONV1D_MAX_WIDTH 8

typedef struct FsConv1dParams {
  int64_t batch, dim, seqlen, width;
  int32_t dtype;  // FsDtype of x, initial_states, out, final_states (and dout, dx, ... in the backward)
  int32_t silu;   // 0 or 1
  const void* x;               int64_t x_stride[3];
  const float* weight;         int64_t weight_stride[2];
  const float* bias;           // (dim,) contiguous, or NULL
  const void* initial_states;  int64_t initial_states_stride[3];  // (batch or num_seqs, dim, W-1), or NULL (zeros)
  void* out;                   int64_t out_stride[3];             // forward output; unused by the backward
  void* final_states;          int64_t final_states_stride[3];    // (batch or num_seqs, dim, W-1), or NULL
  void* stream;                // cudaStream_t for the cuda library; ignored elsewhere
  const int32_t* cu_seqlens;   // (num_seqs + 1,) packed-sequence boundaries, or NULL
  int64_t num_seqs;            // 0 when cu_seqlens is NULL
} FsConv1dParams;

// Backward: recomputes the pre-activation from fwd's inputs (fwd.out, fwd.final_states ignored).
typedef struct FsConv1dBwdParams {
  FsConv1dParams fwd;
  const void* dout;           int64_t dout_stride[3];             // (batch, dim, seqlen), dtype
  const void* dfinal_states;  int64_t dfinal_states_stride[3];    // (batch or num_seqs, dim, W-1), dtype, or NULL
  void* dx;                   int64_t dx_stride[3];               // (batch, dim, seqlen), dtype
  float* dweight;                                                 // (dim, W) contiguous
  float* dbias;                                                   // (dim,) or NULL (not computed)
  void* dinitial_states;      int64_t dinitial_states_stride[3];  // dtype, or NULL (not computed)
  void* workspace;  // fs_causal_conv1d_bwd_workspace_bytes(&fwd) bytes (NULL when 0)
} FsConv1dBwdParams;

typedef struct FsConv1dUpdateParams {
  int64_t batch, dim, seqlen, width, state_len;  // seqlen: new tokens T; state_len: S >= width - 1
  int32_t dtype;        // FsDtype of x and out
  int32_t state_dtype;  // FsDtype of conv_state
  int32_t silu;
  int32_t unused;
  const void* x;        int64_t x_stride[3];
  void* conv_state;     int64_t conv_state_stride[3];
  const float* weight;  int64_t weight_stride[2];
  const float* bias;    // (dim,) contiguous, or NULL
  void* out;            int64_t out_stride[3];
  void* stream;
} FsConv1dUpdateParams;

FS_API int fs_causal_conv1d_fwd(const FsConv1dParams* p);
FS_API int64_t fs_causal_conv1d_bwd_workspace_bytes(const FsConv1dParams* p);
FS_API int fs_causal_conv1d_bwd(const FsConv1dBwdParams* p);
FS_API int fs_causal_conv1d_update(const FsConv1dUpdateParams* p);

#ifdef __cplusplus
}  // extern "C"
#endif
