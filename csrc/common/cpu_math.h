// SIMD helpers for the CPU kernels: a float vector type `vf` of kW lanes (AVX-512: 16, AVX2+FMA: 8,
// otherwise a scalar "vector" of 1 lane), exp/log/softplus/sigmoid on it, and fp32/fp16/bf16 loads
// and stores with conversion to and from float.
//
// No -ffast-math: NaN and inf must keep their IEEE meaning, so the fast functions below are written
// to propagate NaN and to flush very negative exp arguments to 0 (never to NaN).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define FS_SIMD_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define FS_SIMD_AVX2 1
#include <immintrin.h>
#endif

#include "fastscan_abi.h"

namespace fs_cpu {

// 64-byte aligned float array, freed on scope exit; alloc() returns false on failure.
struct FloatBuf {
  float* p = nullptr;
  FloatBuf() = default;
  FloatBuf(const FloatBuf&) = delete;
  FloatBuf& operator=(const FloatBuf&) = delete;
  ~FloatBuf() { std::free(p); }
  bool alloc(int64_t n) {
    std::free(p);
    size_t bytes = (size_t(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64 * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    return p != nullptr;
  }
};

// ---- scalar dtype conversion -----------------------------------------------------------------
inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40);
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}
inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) return bits_to_float(sign | float_to_bits(float(mant) * 5.9604644775390625e-8f));
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}
inline uint16_t float_to_fp16(float f) {  // round to nearest even (F. Giesen's float_to_half_fast3_rtne)
  uint32_t x = float_to_bits(f), sign = x & 0x80000000u;
  x ^= sign;
  uint16_t o;
  if (x >= 0x47800000u) {  // >= 65536: inf, or NaN
    o = x > 0x7f800000u ? 0x7e00 : 0x7c00;
  } else if (x < 0x38800000u) {  // below the smallest normal half: let the FPU round the subnormal
    o = uint16_t(float_to_bits(bits_to_float(x) + 0.5f) - 0x3f000000u);
  } else {
    uint32_t mant_odd = (x >> 13) & 1u;
    x += (uint32_t(15 - 127) << 23) + 0xfffu + mant_odd;
    o = uint16_t(x >> 13);
  }
  return uint16_t(o | (sign >> 16));
}

inline float load_scalar(const void* base, int64_t i, int dtype) {
  switch (dtype) {
    case FS_FLOAT16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case FS_BFLOAT16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}
inline void store_scalar(void* base, int64_t i, int dtype, float v) {
  switch (dtype) {
    case FS_FLOAT16: static_cast<uint16_t*>(base)[i] = float_to_fp16(v); break;
    case FS_BFLOAT16: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^f on [0, 1): minimax fit of the relative error, 1.5e-7 in float arithmetic.
constexpr float kExp2C0 = 0.9999999403953552f, kExp2C1 = 0.6931530833244324f,
                kExp2C2 = 0.2401534467935562f, kExp2C3 = 0.05582680180668831f,
                kExp2C4 = 0.008988762274384499f, kExp2C5 = 0.0018778160447254777f;

// ---- vector type -------------------------------------------------------------------------------
#if defined(FS_SIMD_AVX512)
constexpr int kW = 16;
typedef __m512 vf;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
// 1/x for finite nonzero x to ~1 ulp: 14-bit estimate and one Newton step (vdivps is slow).
inline vf vrcp(vf x) {
  vf r = _mm512_rcp14_ps(x);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.f)), r);
}
// max(c, x) / min(c, x) with a constant c: returns x when x is NaN (so NaN propagates).
inline vf vmax_c(float c, vf x) { return _mm512_max_ps(_mm512_set1_ps(c), x); }
inline vf vmin_c(float c, vf x) { return _mm512_min_ps(_mm512_set1_ps(c), x); }
inline vf vselect_gt(vf x, float thr, vf if_gt, vf otherwise) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(thr), _CMP_GT_OQ), otherwise, if_gt);
}
inline float vhsum(vf v) { return _mm512_reduce_add_ps(v); }

// 2^t. vreduceps gives f = t - floor(t) in [0, 1) in one instruction; vscalefps multiplies by
// 2^floor(t) and saturates to 0 / inf instead of wrapping the exponent bits.
inline vf vexp2_fast(vf t) {
  vf f = _mm512_reduce_ps(t, 0x09);  // round down, suppress precision exceptions
  vf p = _mm512_fmadd_ps(_mm512_set1_ps(kExp2C5), f, _mm512_set1_ps(kExp2C4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C0));
  return _mm512_scalef_ps(p, t);
}
inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }
inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// x = m * 2^e with m in (0.707, 1.414], for positive normal x.
inline void vlog_split(vf x, vf& m, vf& ef) {
  __m512i i = _mm512_castps_si512(x);
  __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(i, 23), _mm512_set1_epi32(127));
  m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(i, _mm512_set1_epi32(0x7fffff)),
                                             _mm512_set1_epi32(0x3f800000)));
  __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_epi32(e, big, e, _mm512_set1_epi32(1));
  ef = _mm512_cvtepi32_ps(e);
}
#else
#if defined(FS_SIMD_AVX2)
constexpr int kW = 8;
typedef __m256 vf;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vrcp(vf x) { return _mm256_div_ps(_mm256_set1_ps(1.f), x); }
inline vf vmax_c(float c, vf x) { return _mm256_max_ps(_mm256_set1_ps(c), x); }
inline vf vmin_c(float c, vf x) { return _mm256_min_ps(_mm256_set1_ps(c), x); }
inline vf vselect_gt(vf x, float thr, vf if_gt, vf otherwise) {
  return _mm256_blendv_ps(otherwise, if_gt, _mm256_cmp_ps(x, _mm256_set1_ps(thr), _CMP_GT_OQ));
}
inline float vhsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// p * 2^n for integral n, saturating: below 2^-126 gives 0, above 2^127 gives inf.
inline vf vscale2(vf p, vf n) {
  vf nc = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-127.f)), _mm256_set1_ps(128.f));
  __m256i e = _mm256_cvtps_epi32(nc);
  // split the scale in two factors so that n = 128 and n = -127 stay representable
  __m256i e1 = _mm256_srai_epi32(e, 1), e2 = _mm256_sub_epi32(e, e1);
  vf s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, _mm256_set1_epi32(127)), 23));
  vf s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, _mm256_set1_epi32(127)), 23));
  vf r = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  vf under = _mm256_cmp_ps(n, _mm256_set1_ps(-126.f), _CMP_LT_OQ);
  vf over = _mm256_cmp_ps(n, _mm256_set1_ps(128.f), _CMP_GE_OQ);
  r = _mm256_andnot_ps(under, r);
  return _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), over);
}
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vexp2_fast(vf t) {
  vf n = _mm256_floor_ps(t);
  vf f = _mm256_sub_ps(t, n);
  vf p = _mm256_fmadd_ps(_mm256_set1_ps(kExp2C5), f, _mm256_set1_ps(kExp2C4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C0));
  // t = -inf gives f = NaN; the scale below is 0 there, but 0 * NaN is NaN: mask it.
  vf r = vscale2(p, n);
  return _mm256_andnot_ps(_mm256_cmp_ps(t, _mm256_set1_ps(-126.f), _CMP_LT_OQ), r);
}
inline void vlog_split(vf x, vf& m, vf& ef) {
  __m256i i = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(i, 23), _mm256_set1_epi32(127));
  m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(i, _mm256_set1_epi32(0x7fffff)),
                                             _mm256_set1_epi32(0x3f800000)));
  vf big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // mask lanes are -1
  ef = _mm256_cvtepi32_ps(e);
}
#else
#define FS_SIMD_SCALAR 1
constexpr int kW = 1;
typedef float vf;
inline vf vzero() { return 0.f; }
inline vf vset1(float x) { return x; }
inline vf vload(const float* p) { return *p; }
inline void vstore(float* p, vf v) { *p = v; }
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vsub(vf a, vf b) { return a - b; }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vdiv(vf a, vf b) { return a / b; }
inline vf vfma(vf a, vf b, vf c) { return std::fma(a, b, c); }
inline vf vrcp(vf x) { return 1.f / x; }
inline vf vmax_c(float c, vf x) { return std::isnan(x) ? x : (x > c ? x : c); }
inline vf vmin_c(float c, vf x) { return std::isnan(x) ? x : (x < c ? x : c); }
inline vf vselect_gt(vf x, float thr, vf if_gt, vf otherwise) { return x > thr ? if_gt : otherwise; }
inline float vhsum(vf v) { return v; }
inline vf vexp2_fast(vf t) { return std::exp2(t); }
inline vf vscale2(vf p, vf n) { return std::ldexp(p, int(std::fmax(std::fmin(n, 300.f), -300.f))); }
inline vf vround(vf x) { return std::nearbyint(x); }
#endif
#endif

// natural log of a positive normal x: log(m) + e log(2) with log(m) = 2 atanh(s), s = (m-1)/(m+1).
inline vf vlog(vf x) {
#if defined(FS_SIMD_SCALAR)
  return std::log(x);
#else
  vf m, ef;
  vlog_split(x, m, ef);
  vf s = vmul(vsub(m, vset1(1.f)), vrcp(vadd(m, vset1(1.f))));
  vf s2 = vmul(s, s);
  vf q = vfma(vset1(1.f / 11), s2, vset1(1.f / 9));
  q = vfma(q, s2, vset1(1.f / 7));
  q = vfma(q, s2, vset1(1.f / 5));
  q = vfma(q, s2, vset1(1.f / 3));
  q = vfma(q, s2, vset1(1.f));
  vf two_s = vadd(s, s);
  return vfma(ef, vset1(0.693147180559945f), vmul(two_s, q));
#endif
}

// exp(x) to ~2e-7 relative for the per-(channel, step) math (softplus, silu): Cody-Waite reduction
// by ln2 (two-part constant) and a degree-7 Taylor polynomial on |r| <= ln2/2.
inline vf vexp(vf x) {
#if defined(FS_SIMD_SCALAR)
  return std::exp(x);
#else
  x = vmin_c(88.7f, vmax_c(-104.f, x));
  vf n = vround(vmul(x, vset1(kLog2e)));
  vf r = vfma(n, vset1(-0.693145751953125f), x);
  r = vfma(n, vset1(-1.428606765330187e-06f), r);
  vf p = vfma(vset1(1.f / 5040), r, vset1(1.f / 720));
  p = vfma(p, r, vset1(1.f / 120));
  p = vfma(p, r, vset1(1.f / 24));
  p = vfma(p, r, vset1(1.f / 6));
  p = vfma(p, r, vset1(0.5f));
  p = vfma(p, r, vset1(1.f));
  p = vfma(p, r, vset1(1.f));
  return vscale2(p, n);
#endif
}

// softplus as the reference defines it: x > 20 ? x : log1p(exp(x)).
inline vf vsoftplus(vf x) {
#if defined(FS_SIMD_SCALAR)
  return x > 20.f ? x : std::log1p(std::exp(x));
#else
  vf e = vexp(vmin_c(20.f, x));
  vf w = vadd(vset1(1.f), e);
  // log1p(e) = log(w) * e / (w - 1) with w = fl(1 + e) (exact when w == 1: then log1p(e) = e)
  vf wm1 = vsub(w, vset1(1.f));
  vf ratio = vmul(e, vrcp(wm1));  // lanes with wm1 == 0 are replaced below
  vf lp = vmul(vlog(w), ratio);
  lp = vselect_gt(wm1, 0.f, lp, e);
  return vselect_gt(x, 20.f, x, lp);
#endif
}

// 1 / (1 + exp(-x))
// 1 / (1 + exp(-x)); vexp saturates at exp(88) so the denominator stays finite (result 0, not NaN).
inline vf vsigmoid(vf x) { return vrcp(vadd(vset1(1.f), vexp(vmin_c(88.f, vsub(vzero(), x))))); }

// ---- vector loads and stores with dtype conversion ------------------------------------------------
// kW consecutive elements base[i .. i + kW) of the given dtype.
inline vf vload_cvt(const void* base, int64_t i, int dtype) {
#if defined(FS_SIMD_AVX512)
  if (dtype == FS_FLOAT32) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
  if (dtype == FS_FLOAT16) return _mm512_cvtph_ps(raw);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
#elif defined(FS_SIMD_AVX2)
  if (dtype == FS_FLOAT32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
#if defined(__F16C__)
  if (dtype == FS_FLOAT16) return _mm256_cvtph_ps(raw);
#else
  if (dtype == FS_FLOAT16) {
    alignas(32) float tmp[8];
    for (int k = 0; k < 8; ++k) tmp[k] = load_scalar(base, i + k, dtype);
    return _mm256_load_ps(tmp);
  }
#endif
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
#else
  return load_scalar(base, i, dtype);
#endif
}

inline void vstore_cvt(void* base, int64_t i, int dtype, vf v) {
#if defined(FS_SIMD_AVX512)
  if (dtype == FS_FLOAT32) { _mm512_storeu_ps(static_cast<float*>(base) + i, v); return; }
  __m256i* dst = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i);
  if (dtype == FS_FLOAT16) {
    _mm256_storeu_si256(dst, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
  __m512i x = _mm512_castps_si512(v);
  __m512i rounded = _mm512_add_epi32(
      x, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1))));
  __m512i hi = _mm512_srli_epi32(rounded, 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  hi = _mm512_mask_or_epi32(hi, nan, _mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
  _mm256_storeu_si256(dst, _mm512_cvtepi32_epi16(hi));
#elif defined(FS_SIMD_AVX2) && defined(__F16C__)
  if (dtype == FS_FLOAT32) { _mm256_storeu_ps(static_cast<float*>(base) + i, v); return; }
  if (dtype == FS_FLOAT16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int k = 0; k < 8; ++k) store_scalar(base, i + k, dtype, tmp[k]);
#elif defined(FS_SIMD_AVX2)
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int k = 0; k < 8; ++k) store_scalar(base, i + k, dtype, tmp[k]);
#else
  store_scalar(base, i, dtype, v);
#endif
}

#if defined(FS_SIMD_AVX512)
// In-register transpose of a 16 x 16 float tile: r[i][j] -> r[j][i].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // 4 x 4 transposes inside each 128-bit lane: r[4G + j] lane k = rows 4G..4G+3 of column 4k + j
  for (int g = 0; g < 4; ++g) {
    r[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // 4 x 4 transpose of the 128-bit blocks among r[j], r[4 + j], r[8 + j], r[12 + j]
  for (int j = 0; j < 4; ++j) {
    __m512 x0 = _mm512_shuffle_f32x4(r[j], r[4 + j], _MM_SHUFFLE(2, 0, 2, 0));
    __m512 x1 = _mm512_shuffle_f32x4(r[j], r[4 + j], _MM_SHUFFLE(3, 1, 3, 1));
    __m512 y0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], _MM_SHUFFLE(2, 0, 2, 0));
    __m512 y1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], _MM_SHUFFLE(3, 1, 3, 1));
    t[j] = _mm512_shuffle_f32x4(x0, y0, _MM_SHUFFLE(2, 0, 2, 0));
    t[8 + j] = _mm512_shuffle_f32x4(x0, y0, _MM_SHUFFLE(3, 1, 3, 1));
    t[4 + j] = _mm512_shuffle_f32x4(x1, y1, _MM_SHUFFLE(2, 0, 2, 0));
    t[12 + j] = _mm512_shuffle_f32x4(x1, y1, _MM_SHUFFLE(3, 1, 3, 1));
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

}  // namespace fs_cpu
