// Mamba-1 selective scan on the CPU: forward and backward (math in fastscan_abi.h).
//
// Unit of work: a "tile" = kW channels (the SIMD lanes: 16 with AVX-512) of one (batch, group).
// The channels of a group share B and C, so inside a tile the state h[n] is one vector per state,
// B[n, t] and C[n, t] are broadcasts, and y_t = sum_n h[n] C[n] needs no horizontal reduction.
// Time is cut in chunks of kChunk steps: per chunk the tile's u, delta, z (dy) are gathered into
// [t][lane] float buffers (converted from the dtype; an in-register 16x16 transpose when the time
// stride is 1, plain vector loads when the channel stride is 1, scalar gathers otherwise).
// B and C are converted once per call into [batch, group, t, n] float arrays read by every tile.
//
// Forward: OpenMP over all tiles; the state block of up to 16 states lives in registers.
// Backward: per tile, a forward pass keeps the state at every chunk start; then chunks in reverse:
// recompute the chunk's states and exp(delta A) into buffers, and walk back in time with
// g_t = dy'_t C_t + exp(delta_{t+1} A) g_{t+1}. dB/dC (sums over a group's channels) go to
// per-thread accumulators, reduced in thread order after each (batch, group): deterministic for a
// given thread count. dA, dD, ddelta_bias have one writer per channel per batch index.
//
// Packed sequences (cu_seqlens, batch 1): a forward item is (sequence, group, tile) and scans only
// the sequence's steps from its own initial state; items are handed out dynamically because their
// lengths differ. In the backward a tile walks all sequences in order, so dA, dD, ddelta_bias keep
// one writer per channel and dB/dC stay deterministic.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <vector>

#include <omp.h>

// GCC 12 reports the _mm512_undefined_ps() inside AVX-512 intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu_math.h"
#include "status.h"

namespace {
using fs_cpu::FloatBuf;
using namespace fs_cpu;

constexpr int kChunk = 64;

struct Shape {
  int64_t batch, dim, L, N, G, dpg, tiles;  // dpg: channels per group; tiles: per group
};

// The steps [begin, end) of batch row b that one scan covers, and the index of its states
// (initial_state, last_state, dlast_state, dinitial_state): the batch row, or the packed sequence.
struct Span {
  int64_t b, seq, begin, end;
};
Span span_of(const FsScanParams* p, int64_t row) {
  if (!p->cu_seqlens) return Span{row, row, 0, p->seqlen};
  return Span{0, row, p->cu_seqlens[row], p->cu_seqlens[row + 1]};
}
int64_t span_rows(const FsScanParams* p) { return p->cu_seqlens ? p->num_seqs : p->batch; }


// buf[t * kW + c] = float(src[off + c * sd + t * st]) for t < T, c < w; lanes c >= w are 0.
void load_tile(float* buf, const void* src, int dtype, int64_t off, int64_t sd, int64_t st, int w, int T) {
  int t = 0;
  const int64_t esize = dtype == FS_FLOAT32 ? 4 : 2;
  (void)esize;
#if !defined(FS_SIMD_SCALAR)
  if (w == kW && sd == 1) {
    for (; t < T; ++t) {
#if defined(FS_SIMD_AVX512) || defined(FS_SIMD_AVX2)
      _mm_prefetch(static_cast<const char*>(src) + (off + (t + 16) * st) * esize, _MM_HINT_T0);
#endif
      vstore(buf + t * kW, vload_cvt(src, off + t * st, dtype));
    }
    return;
  }
#endif
#if defined(FS_SIMD_AVX512)
  if (w == kW && st == 1) {
    for (; t + 16 <= T; t += 16) {
      __m512 r[16];
      for (int c = 0; c < 16; ++c) {
        // 16 rows far apart defeat the hardware prefetcher: fetch the same rows one chunk ahead
        _mm_prefetch(static_cast<const char*>(src) + (off + c * sd + t + kChunk) * esize, _MM_HINT_T0);
        r[c] = vload_cvt(src, off + c * sd + t, dtype);
      }
      transpose16(r);
      for (int j = 0; j < 16; ++j) vstore(buf + (t + j) * kW, r[j]);
    }
  }
#endif
  for (; t < T; ++t)
    for (int c = 0; c < kW; ++c)
      buf[t * kW + c] = c < w ? load_scalar(src, off + c * sd + t * st, dtype) : 0.f;
}

// dst[off + c * sd + t * st] = buf[t * kW + c] for t < T, c < w (converted to dtype).
void store_tile(void* dst, int dtype, int64_t off, int64_t sd, int64_t st, int w, int T, const float* buf) {
  int t = 0;
#if !defined(FS_SIMD_SCALAR)
  if (w == kW && sd == 1) {
    for (; t < T; ++t) vstore_cvt(dst, off + t * st, dtype, vload(buf + t * kW));
    return;
  }
#endif
#if defined(FS_SIMD_AVX512)
  if (w == kW && st == 1) {
    for (; t + 16 <= T; t += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = vload(buf + (t + j) * kW);
      transpose16(r);
      for (int c = 0; c < 16; ++c) vstore_cvt(dst, off + c * sd + t, dtype, r[c]);
    }
  }
#endif
  for (; t < T; ++t)
    for (int c = 0; c < w; ++c) store_scalar(dst, off + c * sd + t * st, dtype, buf[t * kW + c]);
}

// B or C (batch, G, N, L) with strides -> float out[((b * G + g) * L + t) * N + n].
void convert_bc(float* out, const void* src, const int64_t* s, int dtype, const Shape& sh) {
  const int64_t rows = sh.batch * sh.G * sh.L;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = r % sh.L, bg = r / sh.L, g = bg % sh.G, b = bg / sh.G;
    const int64_t base = b * s[0] + g * s[1] + t * s[3];
    float* o = out + r * sh.N;
    for (int64_t n = 0; n < sh.N; ++n) o[n] = load_scalar(src, base + n * s[2], dtype);
  }
}

// Per-(channel, step) inputs of one chunk of a tile: delta' (after bias and softplus), delta' * u, u.
// xpre (optional) receives delta + bias before the softplus.
struct ChunkIn {
  float *dl, *dtu, *u, *z, *xpre;
};

void load_chunk_inputs(const FsScanParams* p, const ChunkIn& ci, int64_t b, int64_t d0, int w, int64_t t0,
                       int T, const float* bias_lanes) {
  load_tile(ci.dl, p->delta, p->dtype, b * p->delta_stride[0] + d0 * p->delta_stride[1] + t0 * p->delta_stride[2],
            p->delta_stride[1], p->delta_stride[2], w, T);
  load_tile(ci.u, p->u, p->dtype, b * p->u_stride[0] + d0 * p->u_stride[1] + t0 * p->u_stride[2],
            p->u_stride[1], p->u_stride[2], w, T);
  if (p->z && ci.z)
    load_tile(ci.z, p->z, p->dtype, b * p->z_stride[0] + d0 * p->z_stride[1] + t0 * p->z_stride[2],
              p->z_stride[1], p->z_stride[2], w, T);
  const vf bias = vload(bias_lanes);
  for (int t = 0; t < T; ++t) {
    vf x = vadd(vload(ci.dl + t * kW), bias);
    if (ci.xpre) vstore(ci.xpre + t * kW, x);
    if (p->delta_softplus) x = vsoftplus(x);
    vstore(ci.dl + t * kW, x);
    vstore(ci.dtu + t * kW, vmul(x, vload(ci.u + t * kW)));
  }
}

// Per-lane constants of a tile: A * log2(e) and A as [n][lane], D and delta_bias as [lane].
void load_tile_constants(const FsScanParams* p, const Shape& sh, int64_t d0, int w, float* A2, float* Araw,
                         float* Dl, float* biasl) {
  for (int64_t n = 0; n < sh.N; ++n)
    for (int c = 0; c < kW; ++c) {
      float a = c < w ? p->A[(d0 + c) * p->A_stride[0] + n * p->A_stride[1]] : 0.f;
      A2[n * kW + c] = a * kLog2e;
      if (Araw) Araw[n * kW + c] = a;
    }
  for (int c = 0; c < kW; ++c) {
    Dl[c] = (p->D && c < w) ? p->D[d0 + c] : 0.f;
    biasl[c] = (p->delta_bias && c < w) ? p->delta_bias[d0 + c] : 0.f;
  }
}

void load_initial_state(const FsScanParams* p, const Shape& sh, int64_t seq, int64_t d0, int w, float* h) {
  for (int64_t n = 0; n < sh.N; ++n)
    for (int c = 0; c < kW; ++c)
      h[n * kW + c] = (p->initial_state && c < w)
                          ? p->initial_state[seq * p->initial_state_stride[0] + (d0 + c) * p->initial_state_stride[1] +
                                             n * p->initial_state_stride[2]]
                          : 0.f;
}

// NS states n0 .. n0 + NS of a tile over T steps, the states in registers: h <- exp(dl A) h + dtu B,
// y[t] += sum_n h C. h, A2: [n][lane] at the block; Bc, Cc: [t][N] at the block's first state.
template <int NS>
void scan_block(float* h, const float* A2, const float* Bc, const float* Cc, int64_t N, const float* dl,
                const float* dtu, float* y, int T) {
  vf hr[NS];
  for (int n = 0; n < NS; ++n) hr[n] = vload(h + n * kW);
  for (int t = 0; t < T; ++t) {
    const vf dt = vload(dl + t * kW), bu = vload(dtu + t * kW);
    const float* Bt = Bc + t * N;
    const float* Ct = Cc + t * N;
    vf acc0 = vzero(), acc1 = vzero();
#pragma GCC unroll 16
    for (int n = 0; n < NS; ++n) {
      vf a = vexp2_fast(vmul(dt, vload(A2 + n * kW)));
      hr[n] = vfma(a, hr[n], vmul(bu, vset1(Bt[n])));
      if (n & 1)
        acc1 = vfma(hr[n], vset1(Ct[n]), acc1);
      else
        acc0 = vfma(hr[n], vset1(Ct[n]), acc0);
    }
    vstore(y + t * kW, vadd(vload(y + t * kW), vadd(acc0, acc1)));
  }
  for (int n = 0; n < NS; ++n) vstore(h + n * kW, hr[n]);
}

void scan_all_states(float* h, const float* A2, const float* Bc, const float* Cc, int64_t N, const float* dl,
                     const float* dtu, float* y, int T) {
  int64_t n0 = 0;
  while (n0 < N) {
    const int64_t rem = N - n0;
    float* hb = h + n0 * kW;
    const float* ab = A2 + n0 * kW;
    if (rem >= 16) {
      scan_block<16>(hb, ab, Bc + n0, Cc + n0, N, dl, dtu, y, T);
      n0 += 16;
    } else if (rem >= 8) {
      scan_block<8>(hb, ab, Bc + n0, Cc + n0, N, dl, dtu, y, T);
      n0 += 8;
    } else if (rem >= 4) {
      scan_block<4>(hb, ab, Bc + n0, Cc + n0, N, dl, dtu, y, T);
      n0 += 4;
    } else if (rem >= 2) {
      scan_block<2>(hb, ab, Bc + n0, Cc + n0, N, dl, dtu, y, T);
      n0 += 2;
    } else {
      scan_block<1>(hb, ab, Bc + n0, Cc + n0, N, dl, dtu, y, T);
      n0 += 1;
    }
  }
}

int check_params(const FsScanParams* p, Shape& sh) {
  if (!p) return fs_fail(FS_ERR_INVALID, "selective_scan (cpu): params is NULL");
  if (p->batch < 0 || p->dim < 0 || p->seqlen < 0 || p->dstate < 0 || p->n_groups <= 0)
    return fs_fail(FS_ERR_INVALID,
                   "selective_scan (cpu): bad sizes batch=%lld dim=%lld seqlen=%lld dstate=%lld n_groups=%lld",
                   (long long)p->batch, (long long)p->dim, (long long)p->seqlen, (long long)p->dstate,
                   (long long)p->n_groups);
  if (p->dim % p->n_groups != 0)
    return fs_fail(FS_ERR_INVALID, "selective_scan (cpu): dim=%lld is not a multiple of n_groups=%lld",
                   (long long)p->dim, (long long)p->n_groups);
  if (p->dtype != FS_FLOAT32 && p->dtype != FS_FLOAT16 && p->dtype != FS_BFLOAT16)
    return fs_fail(FS_ERR_INVALID, "selective_scan (cpu): unknown dtype code %d", p->dtype);
  const bool work = p->batch > 0 && p->dim > 0;
  if (work && p->seqlen > 0 && (!p->u || !p->delta || !p->B || !p->C))
    return fs_fail(FS_ERR_INVALID, "selective_scan (cpu): u, delta, B and C must not be NULL");
  if (work && p->dstate > 0 && !p->A) return fs_fail(FS_ERR_INVALID, "selective_scan (cpu): A must not be NULL");
  if (!p->cu_seqlens && p->num_seqs != 0)
    return fs_fail(FS_ERR_INVALID, "selective_scan (cpu): num_seqs=%lld without cu_seqlens (expected 0)",
                   (long long)p->num_seqs);
  if (p->cu_seqlens) {
    if (p->batch != 1 || p->num_seqs < 1)
      return fs_fail(FS_ERR_INVALID,
                     "selective_scan (cpu): packed sequences need batch 1 and num_seqs >= 1, got batch=%lld num_seqs=%lld",
                     (long long)p->batch, (long long)p->num_seqs);
    // The boundaries are host memory here: checking them is cheap and guards every index below.
    const int32_t* cu = p->cu_seqlens;
    if (cu[0] != 0 || cu[p->num_seqs] != p->seqlen)
      return fs_fail(FS_ERR_INVALID, "selective_scan (cpu): cu_seqlens must run from 0 to seqlen=%lld, got %d .. %d",
                     (long long)p->seqlen, cu[0], cu[p->num_seqs]);
    for (int64_t i = 0; i < p->num_seqs; ++i)
      if (cu[i + 1] < cu[i])
        return fs_fail(FS_ERR_INVALID, "selective_scan (cpu): cu_seqlens decreases at %lld: %d then %d",
                       (long long)i, cu[i], cu[i + 1]);
  }
  sh.batch = p->batch;
  sh.dim = p->dim;
  sh.L = p->seqlen;
  sh.N = p->dstate;
  sh.G = p->n_groups;
  sh.dpg = p->dim / p->n_groups;
  sh.tiles = (sh.dpg + kW - 1) / kW;
  return FS_OK;
}

int convert_b_and_c(const FsScanParams* p, const Shape& sh, FloatBuf& Bf, FloatBuf& Cf) {
  const int64_t n = sh.batch * sh.G * sh.L * sh.N;
  if (!Bf.alloc(n) || !Cf.alloc(n))
    return fs_fail(FS_ERR_RUNTIME, "selective_scan (cpu): cannot allocate %lld floats for B/C", (long long)(2 * n));
  if (n > 0) {
    convert_bc(Bf.p, p->B, p->B_stride, p->dtype, sh);
    convert_bc(Cf.p, p->C, p->C_stride, p->dtype, sh);
  }
  return FS_OK;
}

// Per-thread buffers of the forward.
struct FwdWork {
  float *A2, *h, *Dl, *biasl, *y;
  ChunkIn ci;
};

// Forward of one tile of group g over the span's steps.
void fwd_tile(const FsScanParams* p, const Shape& sh, const Span& s, int64_t g, int64_t tile, const float* Bf,
              const float* Cf, FwdWork& wk) {
  const int64_t N = sh.N, bg = s.b * sh.G + g;
  const int64_t d0 = g * sh.dpg + tile * kW;
  const int w = int(std::min<int64_t>(kW, sh.dpg - tile * kW));
  const ChunkIn& ci = wk.ci;
  float* y = wk.y;
  load_tile_constants(p, sh, d0, w, wk.A2, nullptr, wk.Dl, wk.biasl);
  load_initial_state(p, sh, s.seq, d0, w, wk.h);
  const vf Dv = vload(wk.Dl);
  for (int64_t t0 = s.begin; t0 < s.end; t0 += kChunk) {
    const int T = int(std::min<int64_t>(kChunk, s.end - t0));
    load_chunk_inputs(p, ci, s.b, d0, w, t0, T, wk.biasl);
    for (int t = 0; t < T; ++t) vstore(y + t * kW, vzero());
    const int64_t bc_off = (bg * sh.L + t0) * N;
    scan_all_states(wk.h, wk.A2, Bf + bc_off, Cf + bc_off, N, ci.dl, ci.dtu, y, T);
    for (int t = 0; t < T; ++t) {
      vf yv = vfma(Dv, vload(ci.u + t * kW), vload(y + t * kW));
      if (p->z) {
        const vf zv = vload(ci.z + t * kW);
        yv = vmul(yv, vmul(zv, vsigmoid(zv)));
      }
      vstore(y + t * kW, yv);
    }
    store_tile(p->y, p->dtype, s.b * p->y_stride[0] + d0 * p->y_stride[1] + t0 * p->y_stride[2], p->y_stride[1],
               p->y_stride[2], w, T, y);
  }
  if (p->last_state)
    for (int c = 0; c < w; ++c)
      for (int64_t n = 0; n < N; ++n) p->last_state[(s.seq * sh.dim + d0 + c) * N + n] = wk.h[n * kW + c];
}

}  // namespace

extern "C" FS_API int fs_selective_scan_fwd(const FsScanParams* p) {
  Shape sh;
  if (int rc = check_params(p, sh)) return rc;
  if (sh.batch == 0 || sh.dim == 0) return FS_OK;
  if (sh.L > 0 && !p->y) return fs_fail(FS_ERR_INVALID, "selective_scan_fwd (cpu): y must not be NULL");
  FloatBuf Bf, Cf;
  if (int rc = convert_b_and_c(p, sh, Bf, Cf)) return rc;

  // An item is one tile of one (batch row or packed sequence, group).
  const int64_t items = span_rows(p) * sh.G * sh.tiles;
  std::atomic<bool> alloc_failed{false};
#pragma omp parallel
  {
    FloatBuf work;
    const int64_t N = sh.N;
    if (!work.alloc(kW * (3 * N + 2 + 5 * kChunk))) alloc_failed = true;
    // Every thread must meet the worksharing loop or none: decide together.
#pragma omp barrier
    if (!alloc_failed) {
      FwdWork wk;
      wk.A2 = work.p;
      wk.h = wk.A2 + N * kW;
      wk.Dl = wk.h + N * kW;
      wk.biasl = wk.Dl + kW;
      wk.ci.dl = wk.biasl + kW;
      wk.ci.dtu = wk.ci.dl + kChunk * kW;
      wk.ci.u = wk.ci.dtu + kChunk * kW;
      wk.ci.z = wk.ci.u + kChunk * kW;
      wk.ci.xpre = nullptr;
      wk.y = wk.ci.z + kChunk * kW;
      auto run = [&](int64_t item) {
        const int64_t tile = item % sh.tiles, rg = item / sh.tiles;
        fwd_tile(p, sh, span_of(p, rg / sh.G), rg % sh.G, tile, Bf.p, Cf.p, wk);
      };
      if (p->cu_seqlens) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; ++item) run(item);
      } else {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) run(item);
      }
    }
  }
  if (alloc_failed) return fs_fail(FS_ERR_RUNTIME, "selective_scan_fwd (cpu): cannot allocate per-thread buffers");
  return FS_OK;
}

extern "C" FS_API int64_t fs_selective_scan_bwd_workspace_bytes(const FsScanParams*) { return 0; }


namespace {

// Per-thread buffers of the backward.
struct BwdWork {
  float *A2, *Araw, *Dl, *biasl, *hstart_all, *H, *Aexp, *gc, *dA, *dyp, *dy, *du, *dd, *dz;
  ChunkIn ci;
};

// Backward of the tile of channels [d0, d0 + w) of group g over the span's steps; the tile's
// constants are in wk. Adds to wk.dA, dDacc, dbacc and to this thread's [t][n] accumulators
// accB/accC of (span.b, g); writes du, ddelta, dz of the span and dinitial_state[span.seq].
void bwd_span(const FsScanBwdParams* q, const Shape& sh, const Span& s, int64_t g, int64_t d0, int w,
              const float* Bf, const float* Cf, BwdWork& wk, float* accB, float* accC, vf& dDacc, vf& dbacc) {
  const FsScanParams* p = &q->fwd;
  const int64_t N = sh.N, L = sh.L, b = s.b, bg = b * sh.G + g;
  const int64_t nchunks = (s.end - s.begin + kChunk - 1) / kChunk;
  const vf Dv = vload(wk.Dl);
  const ChunkIn& ci = wk.ci;
  const float* Bbg = Bf + bg * L * N;
  const float* Cbg = Cf + bg * L * N;

  // forward pass: the state at the start of every chunk
  float* h = wk.hstart_all;
  load_initial_state(p, sh, s.seq, d0, w, h);
  for (int64_t k = 0; k + 1 < nchunks; ++k) {
    const int64_t t0 = s.begin + k * kChunk;
    const int T = int(std::min<int64_t>(kChunk, s.end - t0));
    load_chunk_inputs(p, ci, b, d0, w, t0, T, wk.biasl);
    float* hn = h + N * kW;
    for (int64_t i = 0; i < N * kW; ++i) hn[i] = h[i];
    for (int t = 0; t < T; ++t) {
      const vf dt = vload(ci.dl + t * kW), bu = vload(ci.dtu + t * kW);
      const float* Bt = Bbg + (t0 + t) * N;
      for (int64_t n = 0; n < N; ++n) {
        vf a = vexp2_fast(vmul(dt, vload(wk.A2 + n * kW)));
        vstore(hn + n * kW, vfma(a, vload(hn + n * kW), vmul(bu, vset1(Bt[n]))));
      }
    }
    h = hn;
  }

  // g carry starts as dlast_state
  for (int64_t n = 0; n < N; ++n)
    for (int c = 0; c < kW; ++c)
      wk.gc[n * kW + c] = (q->dlast_state && c < w) ? q->dlast_state[(s.seq * sh.dim + d0 + c) * N + n] : 0.f;

  for (int64_t k = nchunks - 1; k >= 0; --k) {
    const int64_t t0 = s.begin + k * kChunk;
    const int T = int(std::min<int64_t>(kChunk, s.end - t0));
    const float* h0 = wk.hstart_all + k * N * kW;
    load_chunk_inputs(p, ci, b, d0, w, t0, T, wk.biasl);
    load_tile(wk.dy, q->dy, p->dtype, b * q->dy_stride[0] + d0 * q->dy_stride[1] + t0 * q->dy_stride[2],
              q->dy_stride[1], q->dy_stride[2], w, T);
    const float* Bc = Bbg + t0 * N;
    const float* Cc = Cbg + t0 * N;
    // recompute the chunk's states H[t] (after step t), exp(delta A) and y' (before the gate)
    for (int t = 0; t < T; ++t) {
      const vf dt = vload(ci.dl + t * kW), bu = vload(ci.dtu + t * kW);
      const float* hp = t ? wk.H + (t - 1) * N * kW : h0;
      float* ht = wk.H + t * N * kW;
      float* at = wk.Aexp + t * N * kW;
      vf acc = vzero();
      for (int64_t n = 0; n < N; ++n) {
        vf a = vexp2_fast(vmul(dt, vload(wk.A2 + n * kW)));
        vstore(at + n * kW, a);
        vf hv = vfma(a, vload(hp + n * kW), vmul(bu, vset1(Bc[t * N + n])));
        vstore(ht + n * kW, hv);
        acc = vfma(hv, vset1(Cc[t * N + n]), acc);
      }
      const vf uv = vload(ci.u + t * kW), dyv = vload(wk.dy + t * kW);
      const vf yv = vfma(Dv, uv, acc);
      vf dyp = dyv;
      if (p->z) {
        const vf zv = vload(ci.z + t * kW);
        const vf sig = vsigmoid(zv);
        dyp = vmul(dyv, vmul(zv, sig));
        // silu'(z) = sig (1 + z (1 - sig))
        const vf dsilu = vmul(sig, vfma(zv, vsub(vset1(1.f), sig), vset1(1.f)));
        vstore(wk.dz + t * kW, vmul(vmul(dyv, yv), dsilu));
      }
      vstore(wk.dyp + t * kW, dyp);
      dDacc = vfma(dyp, uv, dDacc);
    }
    // reverse in time
    for (int t = T - 1; t >= 0; --t) {
      const vf dt = vload(ci.dl + t * kW), bu = vload(ci.dtu + t * kW), dyp = vload(wk.dyp + t * kW);
      const float* hp = t ? wk.H + (t - 1) * N * kW : h0;
      const float* ht = wk.H + t * N * kW;
      const float* at = wk.Aexp + t * N * kW;
      const float* Bt = Bc + t * N;
      const float* Ct = Cc + t * N;
      float* aB = accB + (t0 + t) * N;
      float* aC = accC + (t0 + t) * N;
      vf duacc = vzero(), ddacc = vzero();
      for (int64_t n = 0; n < N; ++n) {
        const vf gv = vfma(dyp, vset1(Ct[n]), vload(wk.gc + n * kW));
        const vf a = vload(at + n * kW);
        aC[n] += vhsum(vmul(dyp, vload(ht + n * kW)));
        aB[n] += vhsum(vmul(gv, bu));
        duacc = vfma(gv, vset1(Bt[n]), duacc);
        const vf qv = vmul(vmul(gv, a), vload(hp + n * kW));
        ddacc = vfma(qv, vload(wk.Araw + n * kW), ddacc);
        vstore(wk.dA + n * kW, vfma(qv, dt, vload(wk.dA + n * kW)));
        vstore(wk.gc + n * kW, vmul(gv, a));
      }
      const vf uv = vload(ci.u + t * kW);
      vstore(wk.du + t * kW, vfma(dt, duacc, vmul(Dv, dyp)));
      vf ddel = vfma(uv, duacc, ddacc);
      if (p->delta_softplus) {
        const vf x = vload(ci.xpre + t * kW);
        ddel = vmul(ddel, vselect_gt(x, 20.f, vset1(1.f), vsigmoid(x)));
      }
      dbacc = vadd(dbacc, ddel);
      vstore(wk.dd + t * kW, ddel);
    }
    const int64_t off = (b * sh.dim + d0) * L + t0;
    store_tile(q->du, p->dtype, off, L, 1, w, T, wk.du);
    store_tile(q->ddelta, p->dtype, off, L, 1, w, T, wk.dd);
    if (p->z) store_tile(q->dz, p->dtype, off, L, 1, w, T, wk.dz);
  }

  if (q->dinitial_state)
    for (int c = 0; c < w; ++c)
      for (int64_t n = 0; n < N; ++n) q->dinitial_state[(s.seq * sh.dim + d0 + c) * N + n] = wk.gc[n * kW + c];
}

// Backward of one tile of (b, g): unpacked, the row b; packed (b = 0), every sequence in order.
void bwd_tile(const FsScanBwdParams* q, const Shape& sh, int64_t b, int64_t g, int64_t tile, const float* Bf,
              const float* Cf, BwdWork& wk, float* accB, float* accC) {
  const FsScanParams* p = &q->fwd;
  const int64_t N = sh.N;
  const int64_t d0 = g * sh.dpg + tile * kW;
  const int w = int(std::min<int64_t>(kW, sh.dpg - tile * kW));
  load_tile_constants(p, sh, d0, w, wk.A2, wk.Araw, wk.Dl, wk.biasl);
  for (int64_t i = 0; i < N * kW; ++i) wk.dA[i] = 0.f;
  vf dDacc = vzero(), dbacc = vzero();
  if (p->cu_seqlens) {
    for (int64_t seq = 0; seq < p->num_seqs; ++seq)
      bwd_span(q, sh, span_of(p, seq), g, d0, w, Bf, Cf, wk, accB, accC, dDacc, dbacc);
  } else {
    bwd_span(q, sh, span_of(p, b), g, d0, w, Bf, Cf, wk, accB, accC, dDacc, dbacc);
  }
  for (int c = 0; c < w; ++c)
    for (int64_t n = 0; n < N; ++n) q->dA[(d0 + c) * N + n] += wk.dA[n * kW + c];
  alignas(64) float lanes[kW];
  if (q->dD) {
    vstore(lanes, dDacc);
    for (int c = 0; c < w; ++c) q->dD[d0 + c] += lanes[c];
  }
  if (q->ddelta_bias) {
    vstore(lanes, dbacc);
    for (int c = 0; c < w; ++c) q->ddelta_bias[d0 + c] += lanes[c];
  }
}

}  // namespace

extern "C" FS_API int fs_selective_scan_bwd(const FsScanBwdParams* q) {
  if (!q) return fs_fail(FS_ERR_INVALID, "selective_scan_bwd (cpu): params is NULL");
  const FsScanParams* p = &q->fwd;
  Shape sh;
  if (int rc = check_params(p, sh)) return rc;
  const int64_t N = sh.N, L = sh.L;
  if (!q->dA && sh.dim * N > 0) return fs_fail(FS_ERR_INVALID, "selective_scan_bwd (cpu): dA must not be NULL");
  if ((p->D != nullptr) != (q->dD != nullptr))
    return fs_fail(FS_ERR_INVALID, "selective_scan_bwd (cpu): dD must be given exactly when D is");
  if ((p->delta_bias != nullptr) != (q->ddelta_bias != nullptr))
    return fs_fail(FS_ERR_INVALID, "selective_scan_bwd (cpu): ddelta_bias must be given exactly when delta_bias is");
  if ((p->z != nullptr) != (q->dz != nullptr))
    return fs_fail(FS_ERR_INVALID, "selective_scan_bwd (cpu): dz must be given exactly when z is");
  const bool work = sh.batch > 0 && sh.dim > 0;
  if (work && L > 0 && (!q->dy || !q->du || !q->ddelta || !q->dB || !q->dC))
    return fs_fail(FS_ERR_INVALID, "selective_scan_bwd (cpu): dy, du, ddelta, dB and dC must not be NULL");

  // zero what is accumulated over the batch
  for (int64_t i = 0; i < sh.dim * N; ++i) q->dA[i] = 0.f;
  if (q->dD)
    for (int64_t i = 0; i < sh.dim; ++i) q->dD[i] = 0.f;
  if (q->ddelta_bias)
    for (int64_t i = 0; i < sh.dim; ++i) q->ddelta_bias[i] = 0.f;
  if (!work) {  // batch == 0 or dim == 0: dB, dC are the only outputs that can be nonempty
    for (int64_t i = 0; i < sh.batch * sh.G * N * L; ++i) q->dB[i] = q->dC[i] = 0.f;
    return FS_OK;
  }
  FloatBuf Bf, Cf;
  if (int rc = convert_b_and_c(p, sh, Bf, Cf)) return rc;

  const int nthreads = omp_get_max_threads();
  std::vector<FloatBuf> acc(size_t(nthreads) * 2);
  std::atomic<bool> alloc_failed{false};
  const int64_t nchunks = (L + kChunk - 1) / kChunk;
#pragma omp parallel num_threads(nthreads)
  {
    const int me = omp_get_thread_num();
    FloatBuf work_buf;
    BwdWork wk;
    const int64_t per_chunk = int64_t(kChunk) * kW;
    const int64_t states = N * kW;
    bool ok = acc[2 * me].alloc(L * N) && acc[2 * me + 1].alloc(L * N) &&
              work_buf.alloc(states * (4 + std::max<int64_t>(nchunks, 1) + 2 * kChunk) + 2 * kW + per_chunk * 11);
    if (!ok) alloc_failed = true;
#pragma omp barrier
    if (!alloc_failed) {
      float* f = work_buf.p;
      auto take = [&](int64_t n) { float* r = f; f += n; return r; };
      wk.A2 = take(states);
      wk.Araw = take(states);
      wk.gc = take(states);
      wk.dA = take(states);
      wk.hstart_all = take(states * std::max<int64_t>(nchunks, 1));
      wk.H = take(states * kChunk);
      wk.Aexp = take(states * kChunk);
      wk.Dl = take(kW);
      wk.biasl = take(kW);
      wk.ci.dl = take(per_chunk);
      wk.ci.dtu = take(per_chunk);
      wk.ci.u = take(per_chunk);
      wk.ci.z = take(per_chunk);
      wk.ci.xpre = take(per_chunk);
      wk.dyp = take(per_chunk);
      wk.dy = take(per_chunk);
      wk.du = take(per_chunk);
      wk.dd = take(per_chunk);
      wk.dz = take(per_chunk);
      float* accB = acc[2 * me].p;
      float* accC = acc[2 * me + 1].p;
      const int nt = omp_get_num_threads();
      for (int64_t bg = 0; bg < sh.batch * sh.G; ++bg) {
        const int64_t b = bg / sh.G, g = bg % sh.G;
        for (int64_t i = 0; i < L * N; ++i) accB[i] = accC[i] = 0.f;
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < sh.tiles; ++tile) bwd_tile(q, sh, b, g, tile, Bf.p, Cf.p, wk, accB, accC);
        // deterministic reduction over threads (fixed order), transposed to (dstate, seqlen)
#pragma omp for schedule(static)
        for (int64_t t = 0; t < L; ++t)
          for (int64_t n = 0; n < N; ++n) {
            float sb = 0.f, sc = 0.f;
            for (int th = 0; th < nt; ++th) {
              sb += acc[2 * th].p[t * N + n];
              sc += acc[2 * th + 1].p[t * N + n];
            }
            q->dB[(bg * N + n) * L + t] = sb;
            q->dC[(bg * N + n) * L + t] = sc;
          }
      }
    }
  }
  if (alloc_failed) return fs_fail(FS_ERR_RUNTIME, "selective_scan_bwd (cpu): cannot allocate per-thread buffers");
  return FS_OK;
}
