// Fused 2D token pooling on the CPU, forward and backward (math and layout in pool2d_abi.h).
//
// OpenMP over (image, pooled row); a task walks the pooled tokens of its row. Per token, the window's
// x rows (C channels each) are streamed one after another into a float32 row of C accumulators
// that stays in L1 (4 KiB for C = 1024), kW channels at a time (one SIMD vector: 16 with AVX-512)
// when the channel axis is contiguous, one at a time for the tail or strided channels; then the
// row is scaled and stored once. Each x row is one contiguous run, which the prefetcher follows.
// NOTE: the first version reduced each kW-channel slice over the window in registers, jumping
// between the window's rows every 64 bytes with the strides re-read from the params struct (the
// intrinsics' stores may alias it) and a multiply chain per load: 1.6 ms for 16 x 576 x 1024 fp32
// against 0.8 ms for torch's channels-last avg_pool2d on 2 cores; this one takes 1.1 ms there
// (1.9 ms on one core, as torch) and 0.3 ms in bf16 (torch 0.46). Dtype and mode are template
// parameters, so the per-element loads fold to one instruction sequence.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <omp.h>

// GCC 12 reports the _mm512_undefined_ps() inside AVX-512 intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu_math.h"
#include "pool2d_abi.h"
#include "pool2d_validate.h"
#include "status.h"

namespace {
using namespace fs_cpu;

// One channel at a time, any channel stride.
struct ScalarLanes {
  using V = float;
  using M = bool;
  static V load(const void* base, int64_t i, int dtype) { return load_scalar(base, i, dtype); }
  static void store(void* base, int64_t i, int dtype, V v) { store_scalar(base, i, dtype, v); }
  static V get(const float* p) { return *p; }
  static void put(float* p, V v) { *p = v; }
  static V set1(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V mul(V a, V b) { return a * b; }
  // v replaces the running maximum: strictly greater (the first of equal maxima stays), or the
  // first NaN (then the maximum stays NaN).
  static M take(V v, V best) { return v > best || (std::isnan(v) && !std::isnan(best)); }
  static M equal(V a, V b) { return a == b; }
  static V select(M m, V if_true, V if_false) { return m ? if_true : if_false; }
};

// kW contiguous channels at a time.
struct VectorLanes {
  using V = vf;
  static V load(const void* base, int64_t i, int dtype) { return vload_cvt(base, i, dtype); }
  static void store(void* base, int64_t i, int dtype, V v) { vstore_cvt(base, i, dtype, v); }
  static V get(const float* p) { return vload(p); }
  static void put(float* p, V v) { vstore(p, v); }
  static V set1(float x) { return vset1(x); }
  static V add(V a, V b) { return vadd(a, b); }
  static V mul(V a, V b) { return vmul(a, b); }
#if defined(FS_SIMD_AVX512)
  using M = __mmask16;
  static M take(V v, V best) {
    return _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) |
           (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) & _mm512_cmp_ps_mask(best, best, _CMP_ORD_Q));
  }
  static M equal(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static V select(M m, V if_true, V if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
#elif defined(FS_SIMD_AVX2)
  using M = __m256;
  static M take(V v, V best) {
    return _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ),
                        _mm256_and_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(best, best, _CMP_ORD_Q)));
  }
  static M equal(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static V select(M m, V if_true, V if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
#else
  using M = bool;
  static M take(V v, V best) { return ScalarLanes::take(v, best); }
  static M equal(V a, V b) { return a == b; }
  static V select(M m, V if_true, V if_false) { return m ? if_true : if_false; }
#endif
};

struct Window {
  int64_t h0, w0;
  int hn, wn;
};

Window window_of(const FsPool2dParams& p, int64_t oh, int64_t ow) {
  Window w;
  w.h0 = oh * p.kh;
  w.w0 = ow * p.kw;
  w.hn = static_cast<int>(std::min(p.kh, p.H - w.h0));
  w.wn = static_cast<int>(std::min(p.kw, p.W - w.w0));
  return w;
}

// Element offset of channel 0 of pooled token `token` of `image` in y or dy.
int64_t pooled_offset(const FsPool2dParams& p, const int64_t* stride, int64_t image, int64_t token) {
  return p.index != nullptr ? (p.index[image] + token) * stride[1] : image * stride[0] + token * stride[1];
}

// Channel loop split: [0, vector_end) kW at a time, the rest one at a time.
template <class F>
inline void for_channels(int64_t C, int64_t vector_end, F&& body) {
  int64_t c = 0;
  for (; c < vector_end; c += kW) body(VectorLanes{}, c);
  for (; c < C; ++c) body(ScalarLanes{}, c);
}

// acc[c] (op)= src[off + c * stride] for one x row; `first` initialises acc.
template <int kDtype, bool kMax>
inline void accumulate_row(float* acc, const void* src, int64_t off, int64_t stride, int64_t C, int64_t vector_end,
                           bool first) {
  for_channels(C, vector_end, [&](auto lanes, int64_t c) {
    using L = decltype(lanes);
    const typename L::V v = L::load(src, off + c * stride, kDtype);
    if (first) {
      L::put(acc + c, v);
    } else {
      const typename L::V a = L::get(acc + c);
      L::put(acc + c, kMax ? L::select(L::take(v, a), v, a) : L::add(a, v));
    }
  });
}

template <int kDtype, bool kMax>
void pool_forward(const FsPool2dParams& p) {
  const int64_t C = p.C, xs1 = p.x_stride[1], xs2 = p.x_stride[2], ys2 = p.y_stride[2];
  const int64_t x_vector_end = xs2 == 1 ? C / kW * kW : 0, y_vector_end = ys2 == 1 ? C / kW * kW : 0;
#pragma omp parallel
  {
    std::vector<float> acc_row(C);
    float* acc = acc_row.data();
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.num_images * p.Ho; ++task) {
      const int64_t image = task / p.Ho, oh = task % p.Ho;
      const int64_t x_off = image * p.x_stride[0];
      for (int64_t ow = 0; ow < p.Wo; ++ow) {
        const Window w = window_of(p, oh, ow);
        for (int dh = 0; dh < w.hn; ++dh) {
          for (int dw = 0; dw < w.wn; ++dw) {
            const int64_t row = x_off + ((w.h0 + dh) * p.W + w.w0 + dw) * xs1;
            accumulate_row<kDtype, kMax>(acc, p.x, row, xs2, C, x_vector_end, dh == 0 && dw == 0);
          }
        }
        const float scale = kMax ? 1.f : 1.f / float(w.hn * w.wn);
        const int64_t y_off = pooled_offset(p, p.y_stride, image, oh * p.Wo + ow);
        for_channels(C, y_vector_end, [&](auto lanes, int64_t c) {
          using L = decltype(lanes);
          typename L::V v = L::get(acc + c);
          if (!kMax) v = L::mul(v, L::set1(scale));
          L::store(p.y, y_off + c * ys2, kDtype, v);
        });
      }
    }
  }
}

template <int kDtype, bool kMax>
void pool_backward(const FsPool2dBwdParams& b) {
  const FsPool2dParams& p = b.fwd;
  const int64_t C = p.C, xs1 = p.x_stride[1], xs2 = p.x_stride[2], dys2 = b.dy_stride[2];
  const int64_t full = C / kW * kW;
  const int64_t x_vector_end = xs2 == 1 ? full : 0, dy_vector_end = dys2 == 1 ? full : 0;
#pragma omp parallel
  {
    // g: dy (scaled by 1 / count for avg); best / pos: running max and its window position
    std::vector<float> rows(3 * C);
    float *g = rows.data(), *best = g + C, *pos = best + C;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.num_images * p.Ho; ++task) {
      const int64_t image = task / p.Ho, oh = task % p.Ho;
      const int64_t x_off = image * p.x_stride[0], dx_off = image * p.H * p.W * C;
      for (int64_t ow = 0; ow < p.Wo; ++ow) {
        const Window w = window_of(p, oh, ow);
        const float scale = kMax ? 1.f : 1.f / float(w.hn * w.wn);
        const int64_t dy_off = pooled_offset(p, b.dy_stride, image, oh * p.Wo + ow);
        for_channels(C, dy_vector_end, [&](auto lanes, int64_t c) {
          using L = decltype(lanes);
          L::put(g + c, L::mul(L::load(b.dy, dy_off + c * dys2, kDtype), L::set1(scale)));
        });
        if (kMax) {
          for (int dh = 0; dh < w.hn; ++dh) {
            for (int dw = 0; dw < w.wn; ++dw) {
              const int64_t row = x_off + ((w.h0 + dh) * p.W + w.w0 + dw) * xs1;
              const bool first = dh == 0 && dw == 0;
              const float here = float(dh * w.wn + dw);
              for_channels(C, x_vector_end, [&](auto lanes, int64_t c) {
                using L = decltype(lanes);
                const typename L::V v = L::load(p.x, row + c * xs2, kDtype);
                if (first) {  // position 0 also wins when every valid value is -inf
                  L::put(best + c, v);
                  L::put(pos + c, L::set1(0.f));
                } else {
                  const typename L::V current = L::get(best + c);
                  const typename L::M t = L::take(v, current);
                  L::put(best + c, L::select(t, v, current));
                  L::put(pos + c, L::select(t, L::set1(here), L::get(pos + c)));
                }
              });
            }
          }
        }
        for (int dh = 0; dh < w.hn; ++dh) {
          for (int dw = 0; dw < w.wn; ++dw) {
            const int64_t row = dx_off + ((w.h0 + dh) * p.W + w.w0 + dw) * C;
            const float here = float(dh * w.wn + dw);
            for_channels(C, full, [&](auto lanes, int64_t c) {
              using L = decltype(lanes);
              typename L::V out = L::get(g + c);
              if (kMax) out = L::select(L::equal(L::get(pos + c), L::set1(here)), out, L::set1(0.f));
              L::store(b.dx, row + c, kDtype, out);
            });
          }
        }
      }
    }
  }
}

template <class Params, class Run>
void by_dtype(int dtype, const Params& params, Run run) {
  switch (dtype) {
    case FS_FLOAT16: run(std::integral_constant<int, FS_FLOAT16>{}, params); break;
    case FS_BFLOAT16: run(std::integral_constant<int, FS_BFLOAT16>{}, params); break;
    default: run(std::integral_constant<int, FS_FLOAT32>{}, params); break;
  }
}

}  // namespace

extern "C" FS_API int fs_pool2d_tokens_fwd(const FsPool2dParams* p) {
  const char* fn = "fs_pool2d_tokens_fwd";
  if (const int status = validate_pool2d_params(p, fn)) return status;
  if (p->num_images == 0 || p->C == 0) return FS_OK;
  if (p->y == nullptr) return fs_fail(FS_ERR_INVALID, "%s: y is NULL", fn);
  const auto run = [](auto dtype, const FsPool2dParams& params) {
    params.mode == FS_POOL_MAX ? pool_forward<decltype(dtype)::value, true>(params)
                               : pool_forward<decltype(dtype)::value, false>(params);
  };
  by_dtype(p->dtype, *p, run);
  return FS_OK;
}

extern "C" FS_API int fs_pool2d_tokens_bwd(const FsPool2dBwdParams* b) {
  const char* fn = "fs_pool2d_tokens_bwd";
  if (b == nullptr) return fs_fail(FS_ERR_INVALID, "%s: params is NULL", fn);
  if (const int status = validate_pool2d_params(&b->fwd, fn)) return status;
  if (b->fwd.num_images == 0 || b->fwd.C == 0) return FS_OK;
  if (b->dy == nullptr || b->dx == nullptr) return fs_fail(FS_ERR_INVALID, "%s: dy or dx is NULL", fn);
  const auto run = [](auto dtype, const FsPool2dBwdParams& params) {
    params.fwd.mode == FS_POOL_MAX ? pool_backward<decltype(dtype)::value, true>(params)
                                   : pool_backward<decltype(dtype)::value, false>(params);
  };
  by_dtype(b->fwd.dtype, *b, run);
  return FS_OK;
}
