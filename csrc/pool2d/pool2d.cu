// Fused 2D token pooling, forward and backward (math and layout in csrc/common/pool2d_abi.h).
//
// Both kernels use the same work split (launch_shape): a block is threads_c x tokens_per_block
// <= 256 threads and owns tokens_per_block consecutive pooled tokens of one image; thread (tx, ty) owns
// pooled token tile * tokens_per_block + ty and the channel vectors tx, tx + threads_c, ... of kVec
// channels each.
// Channels are the contiguous axis of x and y, so a warp reads 32 consecutive vectors of one token
// row: coalesced, 16-byte loads when the layout allows (kVec = 16 / sizeof(T)), scalar otherwise.
// The pooled grid is small (144 tokens for 24 x 24 / 2), so the grid is flat over
// (image, token tile) and large enough to fill the GPU for a handful of images.
// No shared memory, no barriers: a thread whose token is past the end simply returns.
// NOTE: no __launch_bounds__(256): with it, nvcc 13.0's ptxas spilled 8-24 bytes in three to seven
// of these kernels on sm_80 / sm_90 while using only 48 registers; without it none spills (<= 64).
#include <math.h>
#include <stdint.h>

#include "cuda_dtype.cuh"
#include "cuda_emu.h"
#include "pool2d_abi.h"
#include "pool2d_validate.h"
#include "status.h"

namespace fastscan {
namespace pool2d {


// 16-bit element bits <-> float (the 16-byte path unpacks words itself: an array of __half or
// __nv_bfloat16 filled by memcpy made ptxas put it on the stack).
template <typename T>
__device__ __forceinline__ float bits_to_float(unsigned bits);
template <>
__device__ __forceinline__ float bits_to_float<__half>(unsigned bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
template <>
__device__ __forceinline__ float bits_to_float<__nv_bfloat16>(unsigned bits) { return __uint_as_float(bits << 16); }
template <typename T>
__device__ __forceinline__ unsigned float_to_bits(float x);
template <>
__device__ __forceinline__ unsigned float_to_bits<__half>(float x) { return __half_as_ushort(__float2half_rn(x)); }
template <>
__device__ __forceinline__ unsigned float_to_bits<__nv_bfloat16>(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// kVec consecutive elements as floats; one 16-byte access when kVec * sizeof(T) == 16.
template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* __restrict__ src, int64_t stride, float (&out)[kVec]) {
  if constexpr (kVec * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(words[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = bits_to_float<T>((words[i / 2] >> (16 * (i % 2))) & 0xffffu);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = to_float(src[i * stride]);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* __restrict__ dst, int64_t stride, const float (&in)[kVec]) {
  if constexpr (kVec * sizeof(T) == 16) {
    unsigned words[4];
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) words[i] = __float_as_uint(in[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) words[i] = float_to_bits<T>(in[2 * i]) | (float_to_bits<T>(in[2 * i + 1]) << 16);
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) dst[i * stride] = from_float<T>(in[i]);
  }
}

// The pooled token a thread owns and its window, or false when the thread has none.
struct Window {
  int64_t image, token, h0, w0;
  int hn, wn;  // valid rows / columns of the window (short on the bottom / right edge)
};

// 32-bit index math (the launcher checks that it fits): a 64-bit division is a called subroutine,
// a 32-bit one a handful of instructions.
__device__ __forceinline__ bool locate(const FsPool2dParams& p, Window& win) {
  const unsigned tokens = static_cast<unsigned>(p.Ho * p.Wo), Wo = static_cast<unsigned>(p.Wo);
  const unsigned tiles = (tokens + blockDim.y - 1) / blockDim.y;
  const unsigned token = (blockIdx.x % tiles) * blockDim.y + threadIdx.y;
  if (token >= tokens) return false;
  win.image = blockIdx.x / tiles;
  win.token = token;
  const unsigned oh = token / Wo, ow = token % Wo;
  win.h0 = static_cast<int64_t>(oh) * p.kh;
  win.w0 = static_cast<int64_t>(ow) * p.kw;
  win.hn = static_cast<int>(p.H - win.h0 < p.kh ? p.H - win.h0 : p.kh);
  win.wn = static_cast<int>(p.W - win.w0 < p.kw ? p.W - win.w0 : p.kw);
  return true;
}

// Offset of pooled token `token` of `image` in y (or dy): a row of the packed buffer with index.
__device__ __forceinline__ int64_t pooled_row(const FsPool2dParams& p, int64_t stride_image, int64_t stride_token,
                                              int64_t image, int64_t token) {
  return p.index != nullptr ? (p.index[image] + token) * stride_token : image * stride_image + token * stride_token;
}

// pool2d_tokens_fwd_kernel: y[token, c] = avg or max over the token's window of x[., c].
// grid: num_images * cdiv(Ho * Wo, tokens_per_block); reads each x element once, writes y once.
template <typename T, int kVec, bool kMax>
__global__ void pool2d_tokens_fwd_kernel(const FsPool2dParams p) {
  Window win;
  if (!locate(p, win)) return;
  const T* x = static_cast<const T*>(p.x) + win.image * p.x_stride[0];
  T* y = static_cast<T*>(p.y) + pooled_row(p, p.y_stride[0], p.y_stride[1], win.image, win.token);
  const float scale = 1.0f / static_cast<float>(win.hn * win.wn);
  const int64_t step_w = p.x_stride[1], step_h = p.W * p.x_stride[1];
  const T* x_window = x + (win.h0 * p.W + win.w0) * step_w;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < p.C; c += blockDim.x * kVec) {
    float acc[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = kMax ? -INFINITY : 0.0f;
    const T* row = x_window + c * p.x_stride[2];
    for (int dh = 0; dh < win.hn; ++dh, row += step_h) {
      for (int dw = 0; dw < win.wn; ++dw) {
        float v[kVec];
        load_vec<T, kVec>(row + dw * step_w, p.x_stride[2], v);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          if (kMax) {
            acc[i] = (v[i] > acc[i] || v[i] != v[i]) ? v[i] : acc[i];  // NaN sticks once taken
          } else {
            acc[i] += v[i];
          }
        }
      }
    }
    if (!kMax) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] *= scale;
    }
    store_vec<T, kVec>(y + c * p.y_stride[2], p.y_stride[2], acc);
  }
}

// pool2d_tokens_bwd_kernel: dx of one pooled token's window from dy[token].
// grid as the forward; reads dy once (and, for max, the window of x once to recompute the argmax),
// writes every dx element of the window once (0 for the non-argmax tokens of a max window).
template <typename T, int kVec, bool kMax>
__global__ void pool2d_tokens_bwd_kernel(const FsPool2dBwdParams b) {
  const FsPool2dParams& p = b.fwd;
  Window win;
  if (!locate(p, win)) return;
  const T* x = static_cast<const T*>(p.x) + win.image * p.x_stride[0];
  const T* dy = static_cast<const T*>(b.dy) + pooled_row(p, b.dy_stride[0], b.dy_stride[1], win.image, win.token);
  T* dx = static_cast<T*>(b.dx) + win.image * p.H * p.W * p.C;
  const float scale = 1.0f / static_cast<float>(win.hn * win.wn);
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < p.C; c += blockDim.x * kVec) {
    float g[kVec];
    load_vec<T, kVec>(dy + c * b.dy_stride[2], b.dy_stride[2], g);
    int best_pos[kVec] = {};
    if (kMax) {
      float best[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        best[i] = -INFINITY;
        best_pos[i] = 0;  // the window's first token: right when every valid value is -inf
      }
      for (int dh = 0; dh < win.hn; ++dh) {
        const T* row = x + ((win.h0 + dh) * p.W + win.w0) * p.x_stride[1] + c * p.x_stride[2];
        for (int dw = 0; dw < win.wn; ++dw) {
          float v[kVec];
          load_vec<T, kVec>(row + dw * p.x_stride[1], p.x_stride[2], v);
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            // strictly greater keeps the first of equal maxima; the first NaN wins over numbers
            const bool take = v[i] > best[i] || (v[i] != v[i] && best[i] == best[i]);
            best[i] = take ? v[i] : best[i];
            best_pos[i] = take ? dh * win.wn + dw : best_pos[i];
          }
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) g[i] *= scale;
    }
    for (int dh = 0; dh < win.hn; ++dh) {
      T* row = dx + ((win.h0 + dh) * p.W + win.w0) * p.C + c;
      for (int dw = 0; dw < win.wn; ++dw) {
        float out[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) out[i] = (!kMax || best_pos[i] == dh * win.wn + dw) ? g[i] : 0.0f;
        store_vec<T, kVec>(row + dw * p.C, 1, out);
      }
    }
  }
}

// ---- host side --------------------------------------------------------------------------------

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// True when every (token, channel-vector) access of this tensor can be one aligned 16-byte access.
inline bool vector_layout(const void* base, const int64_t* stride, bool indexed, int64_t C, int vec) {
  if (stride[2] != 1 || C % vec != 0 || stride[1] % vec != 0 || !aligned16(base)) return false;
  return indexed || stride[0] % vec == 0;
}

struct LaunchShape {
  dim3 grid, block;
};

// 256 threads: up to 128 over channel vectors, the rest over pooled tokens.
inline LaunchShape launch_shape(const FsPool2dParams& p, int vec) {
  const int64_t vectors = (p.C + vec - 1) / vec;
  int threads_c = static_cast<int>(vectors >= 128 ? 128 : (vectors + 31) / 32 * 32);
  const int tokens_per_block = 256 / threads_c;
  const int64_t tiles = (p.Ho * p.Wo + tokens_per_block - 1) / tokens_per_block;
  return {dim3(static_cast<unsigned>(p.num_images * tiles)), dim3(threads_c, tokens_per_block)};
}

template <typename T, bool kMax>
void launch_fwd(const FsPool2dParams& p) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = vector_layout(p.x, p.x_stride, false, p.C, kVec) &&
                   vector_layout(p.y, p.y_stride, p.index != nullptr, p.C, kVec);
  const LaunchShape s = launch_shape(p, vec ? kVec : 1);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  if (vec) {
    FS_LAUNCH((pool2d_tokens_fwd_kernel<T, kVec, kMax>), s.grid, s.block, 0, stream, p);
  } else {
    FS_LAUNCH((pool2d_tokens_fwd_kernel<T, 1, kMax>), s.grid, s.block, 0, stream, p);
  }
}

template <typename T, bool kMax>
void launch_bwd(const FsPool2dBwdParams& b) {
  constexpr int kVec = 16 / sizeof(T);
  const FsPool2dParams& p = b.fwd;
  const int64_t dx_stride[3] = {p.H * p.W * p.C, p.C, 1};
  const bool vec = (!kMax || vector_layout(p.x, p.x_stride, false, p.C, kVec)) &&
                   vector_layout(b.dy, b.dy_stride, p.index != nullptr, p.C, kVec) &&
                   vector_layout(b.dx, dx_stride, false, p.C, kVec);
  const LaunchShape s = launch_shape(p, vec ? kVec : 1);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  if (vec) {
    FS_LAUNCH((pool2d_tokens_bwd_kernel<T, kVec, kMax>), s.grid, s.block, 0, stream, b);
  } else {
    FS_LAUNCH((pool2d_tokens_bwd_kernel<T, 1, kMax>), s.grid, s.block, 0, stream, b);
  }
}

// The CPU checks plus the CUDA path's 32-bit index limit.
inline int validate(const FsPool2dParams* p, const char* fn) {
  if (const int status = validate_pool2d_params(p, fn)) return status;
  if (p->Ho * p->Wo * p->num_images > INT32_MAX) {  // locate() and the flat grid are 32-bit
    return fs_fail(FS_ERR_UNSUPPORTED, "%s: %lld images x %lld pooled tokens exceed 2^31", fn,
                   (long long)p->num_images, (long long)(p->Ho * p->Wo));
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

}  // namespace pool2d
}  // namespace fastscan

extern "C" FS_API int fs_pool2d_tokens_fwd(const FsPool2dParams* p) {
  using namespace fastscan::pool2d;
  const char* fn = "fs_pool2d_tokens_fwd";
  if (const int status = validate(p, fn)) return status;
  if (p->num_images == 0 || p->C == 0) return FS_OK;
  if (p->y == nullptr) return fs_fail(FS_ERR_INVALID, "%s: y is NULL", fn);
  const bool is_max = p->mode == FS_POOL_MAX;
  switch (p->dtype) {
    case FS_FLOAT32: is_max ? launch_fwd<float, true>(*p) : launch_fwd<float, false>(*p); break;
    case FS_FLOAT16: is_max ? launch_fwd<__half, true>(*p) : launch_fwd<__half, false>(*p); break;
    case FS_BFLOAT16: is_max ? launch_fwd<__nv_bfloat16, true>(*p) : launch_fwd<__nv_bfloat16, false>(*p); break;
  }
  return check_launch(fn);
}

extern "C" FS_API int fs_pool2d_tokens_bwd(const FsPool2dBwdParams* b) {
  using namespace fastscan::pool2d;
  const char* fn = "fs_pool2d_tokens_bwd";
  if (b == nullptr) return fs_fail(FS_ERR_INVALID, "%s: params is NULL", fn);
  if (const int status = validate(&b->fwd, fn)) return status;
  if (b->fwd.num_images == 0 || b->fwd.C == 0) return FS_OK;
  if (b->dy == nullptr || b->dx == nullptr) return fs_fail(FS_ERR_INVALID, "%s: dy or dx is NULL", fn);
  const bool is_max = b->fwd.mode == FS_POOL_MAX;
  switch (b->fwd.dtype) {
    case FS_FLOAT32: is_max ? launch_bwd<float, true>(*b) : launch_bwd<float, false>(*b); break;
    case FS_FLOAT16: is_max ? launch_bwd<__half, true>(*b) : launch_bwd<__half, false>(*b); break;
    case FS_BFLOAT16: is_max ? launch_bwd<__nv_bfloat16, true>(*b) : launch_bwd<__nv_bfloat16, false>(*b); break;
  }
  return check_launch(fn);
}
