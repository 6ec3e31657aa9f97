// Mamba decode step (`selective_state_update`) on the CPU; the math is in csrc/common/state_update_abi.h.
//
// Unit of work: a block of kRowBlock channels of one batch row. First their per-channel scalars
// (dt' with its softplus, D x, the silu gate of z) are computed kW channels at a time; then each
// channel's states are the SIMD lanes: the row is converted into a zero-padded float buffer (one
// vector load per kW states when the state stride is 1, scalar gathers otherwise), updated with the
// fast exp2 of cpu_math.h, summed against C for y, and converted back in place. B and C are
// converted once per call to zero-padded float [batch, group, state] arrays shared by every row.
// OpenMP over blocks when the call is big enough to pay for waking the thread team.
#include <algorithm>
#include <vector>

#include <omp.h>

// GCC 12 reports the _mm512_undefined_ps() inside AVX-512 intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu_math.h"
#include "state_update_abi.h"
#include "status.h"

namespace {
using namespace fs_cpu;

// NOTE: below this many state elements one thread finishes before an OpenMP team would start.
constexpr int64_t kParallelMinElements = 1 << 15;
// Channels whose scalars (softplus of dt, the z gate) are computed together as vectors.
constexpr int kRowBlock = 64;

// dst[i] = float(src[off + i * stride]) for i < n; dst[n .. npad) = 0.
void load_row(float* dst, const void* src, int dtype, int64_t off, int64_t stride, int64_t n, int64_t npad) {
  int64_t i = 0;
  if (stride == 1) {
    for (; i + kW <= n; i += kW) vstore(dst + i, vload_cvt(src, off + i, dtype));
  }
  for (; i < n; ++i) dst[i] = load_scalar(src, off + i * stride, dtype);
  for (; i < npad; ++i) dst[i] = 0.0f;
}

// dst[off + i * stride] = src[i] for i < n, converted to dtype.
void store_row(void* dst, int dtype, int64_t off, int64_t stride, const float* src, int64_t n) {
  int64_t i = 0;
  if (stride == 1) {
    for (; i + kW <= n; i += kW) vstore_cvt(dst, off + i, dtype, vload(src + i));
  }
  for (; i < n; ++i) store_scalar(dst, off + i * stride, dtype, src[i]);
}

int validate(const FsStateUpdateParams* p, const char* fn) {
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
  if (p->batch > 0 && (p->state == nullptr || p->x == nullptr || p->dt == nullptr || p->A == nullptr ||
                       p->B == nullptr || p->C == nullptr || p->y == nullptr)) {
    return fs_fail(FS_ERR_INVALID, "%s: state, x, dt, A, B, C and y must not be NULL", fn);
  }
  return FS_OK;
}

}  // namespace

extern "C" FS_API int fs_selective_state_update(const FsStateUpdateParams* p) {
  const char* fn = "fs_selective_state_update (cpu)";
  if (const int status = validate(p, fn)) return status;
  if (p->batch == 0) return FS_OK;
  const int64_t batch = p->batch, dim = p->dim, N = p->dstate, G = p->n_groups, dpg = dim / G;
  const int64_t Npad = (N + kW - 1) / kW * kW;

  std::vector<float> Bf, Cf;
  try {
    Bf.resize(size_t(batch * G * Npad));
    Cf.resize(size_t(batch * G * Npad));
  } catch (const std::bad_alloc&) {
    return fs_fail(FS_ERR_RUNTIME, "%s: out of memory for B and C", fn);
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      float* bdst = Bf.data() + (b * G + g) * Npad;
      float* cdst = Cf.data() + (b * G + g) * Npad;
      load_row(bdst, p->B, p->dtype, b * p->B_stride[0] + g * p->B_stride[1], p->B_stride[2], N, Npad);
      load_row(cdst, p->C, p->dtype, b * p->C_stride[0] + g * p->C_stride[1], p->C_stride[2], N, Npad);
    }
  }

  const int64_t blocks_per_batch = (dim + kRowBlock - 1) / kRowBlock;
  const int64_t blocks = batch * blocks_per_batch;
#pragma omp parallel if (batch * dim * Npad >= kParallelMinElements)
  {
    std::vector<float> h(static_cast<size_t>(Npad)), a(static_cast<size_t>(Npad));
    // Per-channel scalars of a block: x, dt' (then dt' * x), D * x, the z gate.
    alignas(64) float xs[kRowBlock], dts[kRowBlock], dxs[kRowBlock], gates[kRowBlock];
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t b = block / blocks_per_batch, d0 = (block % blocks_per_batch) * kRowBlock;
      const int rows = int(std::min<int64_t>(kRowBlock, dim - d0));
      for (int r = 0; r < kRowBlock; ++r) {
        const int64_t d = d0 + std::min(r, rows - 1);  // pad with the last row: finite values
        xs[r] = load_scalar(p->x, b * p->x_stride[0] + d * p->x_stride[1], p->dtype);
        dts[r] = load_scalar(p->dt, b * p->dt_stride[0] + d * p->dt_stride[1], p->dtype) +
                 (p->dt_bias ? p->dt_bias[d] : 0.0f);
        dxs[r] = p->D ? p->D[d] * xs[r] : 0.0f;
        gates[r] = p->z ? load_scalar(p->z, b * p->z_stride[0] + d * p->z_stride[1], p->dtype) : 1.0f;
      }
      // The transcendental per-channel math, kW channels at a time.
      for (int r = 0; r < kRowBlock; r += kW) {
        if (p->dt_softplus) vstore(dts + r, vsoftplus(vload(dts + r)));
        if (p->z) {
          const vf zv = vload(gates + r);
          vstore(gates + r, vmul(zv, vsigmoid(zv)));
        }
      }
      for (int r = 0; r < rows; ++r) {
        const int64_t d = d0 + r, g = d / dpg;
        const int64_t state_off = b * p->state_stride[0] + d * p->state_stride[1];
        load_row(h.data(), p->state, p->state_dtype, state_off, p->state_stride[2], N, Npad);
        load_row(a.data(), p->A, FS_FLOAT32, d * p->A_stride[0], p->A_stride[1], N, Npad);
        const float* Bv = Bf.data() + (b * G + g) * Npad;
        const float* Cv = Cf.data() + (b * G + g) * Npad;
        const vf dt_log2e = vset1(dts[r] * kLog2e), dt_x = vset1(dts[r] * xs[r]);
        vf acc = vzero();
        // Padded lanes: a = 0, B = C = 0, h = 0, so they stay 0 and add nothing to y.
        for (int64_t n = 0; n < Npad; n += kW) {
          const vf decay = vexp2_fast(vmul(dt_log2e, vload(a.data() + n)));
          const vf hn = vfma(decay, vload(h.data() + n), vmul(dt_x, vload(Bv + n)));
          vstore(h.data() + n, hn);
          acc = vfma(hn, vload(Cv + n), acc);
        }
        store_row(p->state, p->state_dtype, state_off, p->state_stride[2], h.data(), N);
        const float y = (vhsum(acc) + dxs[r]) * gates[r];
        store_scalar(p->y, b * p->y_stride[0] + d * p->y_stride[1], p->dtype, y);
      }
    }
  }
  return FS_OK;
}
