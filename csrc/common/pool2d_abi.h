// C ABI of the fused 2D token pooling (fastscan.pool2d_tokens), mirrored by ctypes structures in
// fastscan/pool2d/native.py field by field. Conventions as in fastscan_abi.h (strides in elements,
// FsDtype codes, FsStatus return, `stream` is a cudaStream_t for the cuda library).
//
// x holds num_images grids of H x W patch tokens, row-major (token h * W + w), C channels each.
// Windows of kh x kw tokens with stride (kh, kw) tile the grid; the pooled grid is Ho x Wo with
// Ho = ceil(H / kh), Wo = ceil(W / kw). A window on the bottom or right edge may be cut short: it
// covers only its valid tokens (ceil mode without padding).
//   avg: y = sum over the window's valid tokens / number of valid tokens
//   max: y = max over the window's valid tokens (NaN if any of them is NaN)
// Windows never overlap and cover every token, so each input element is read once and each output
// element written once, in the forward and in the backward.
//
// Output rows: pooled token t of image i goes to row  index[i] + t  of y when index is not NULL
// (y is then a (T, C) buffer, y_stride[0] is unused; the caller guarantees the ranges lie inside
// y and do not overlap), else to y[i, t, :].
#pragma once
#include "fastscan_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

enum FsPoolMode { FS_POOL_AVG = 0, FS_POOL_MAX = 1 };

typedef struct FsPool2dParams {
  int64_t num_images, H, W, C;  // x: (num_images, H * W, C)
  int64_t kh, kw;               // window = stride, each >= 1
  int64_t Ho, Wo;               // ceil(H / kh), ceil(W / kw)
  int32_t dtype;                // FsDtype of x and y
  int32_t mode;                 // FsPoolMode
  const void* x;  int64_t x_stride[3];
  void* y;        int64_t y_stride[3];  // (num_images, Ho * Wo, C), or rows of a (T, C) buffer with index
  const int64_t* index;                 // (num_images,) row offsets into y (device memory for cuda), or NULL
  void* stream;
} FsPool2dParams;

// Backward: dx = d(loss)/dx from dy. avg: every valid token of a window gets dy / count. max: the
// window's first maximal token (the first NaN, if any, in row-major window order; torch's rule for
// ties) gets dy, the others 0; the argmax is recomputed from fwd.x, nothing is saved by the forward.
// dy rows are found the way the forward found y's rows (fwd.index); fwd.y is ignored.
typedef struct FsPool2dBwdParams {
  FsPool2dParams fwd;
  const void* dy;  int64_t dy_stride[3];  // like fwd.y: (num_images, Ho * Wo, C) or a (T, C) buffer with fwd.index
  void* dx;                               // (num_images, H * W, C) contiguous, dtype; fully written
} FsPool2dBwdParams;

FS_API int fs_pool2d_tokens_fwd(const FsPool2dParams* p);
FS_API int fs_pool2d_tokens_bwd(const FsPool2dBwdParams* p);

#ifdef __cplusplus
}  // extern "C"
#endif
