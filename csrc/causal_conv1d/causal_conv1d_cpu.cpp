// Causal depthwise conv1d on the CPU: forward, backward and the decode-step update (math in
// causal_conv1d_abi.h).
//
// Work is cut in tiles (batch, channel block, time chunk); OpenMP runs the tiles in parallel. A tile
// reads its W-1 halo steps straight from x (or initial_states at the sequence start), so tiles are
// independent in the forward and in the backward.
// Two vector paths, picked by the layout:
//   * time stride 1 ((batch, dim, seqlen) contiguous): one channel per row, vectors of kW steps
//     along time; the W taps are W unaligned loads of the row (L1 hits after the first).
//   * channel stride 1 (channel-last): vectors of kW channels, the time loop outside, weights
//     pre-transposed once per call to [tap][channel] rows.
// Anything else (and the edges: the first W-1 steps, partial vectors) runs the row code on vectors
// gathered element by element.
// Backward per tile: dz = dout * silu'(z) into a tile buffer (z recomputed, W-1 steps past the
// chunk included), then dx[t] = sum_k w[k] dz[t+W-1-k] (+ dfinal_states on the last W-1 steps),
// and the weight / bias sums of the tile as per-tile partials, reduced over (batch, chunk) in a
// fixed order afterwards: deterministic.
// Packed sequences (cu_seqlens): the tiles cut the packed time axis as before, and a tile runs its
// loops once per sequence piece it overlaps, each piece seen as an unpacked row of its own (a Seq:
// its x offset, length and state index), so the window never reaches across a boundary. Piece
// partials add into the tile's; empty sequences only pass their states through.
#include <algorithm>
#include <atomic>
#include <cstdlib>

#include <omp.h>

// GCC 12 reports the _mm512_undefined_ps() inside AVX-512 intrinsics as (maybe-)uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "causal_conv1d_abi.h"
#include "cpu_math.h"
#include "status.h"

namespace {
using fs_cpu::FloatBuf;
using namespace fs_cpu;

constexpr int kMaxW = FS_CONV1D_MAX_WIDTH;
// NOTE: tile sizes: a time-stride-1 row chunk of 2048 steps keeps x, dout and the dz buffer of one
// row (3 x 8 KiB in fp32) in L1/L2; the channel-last tiles (256 channels x 64 steps forward,
// 64 x 128 backward) read 1 KiB / 256 B contiguous runs per step and keep the backward's dz
// buffer at 33 KiB.
constexpr int64_t kRowChunk = 2048;
constexpr int64_t kFwdLanesBlock = 256, kFwdLanesChunk = 64;
constexpr int64_t kBwdLanesBlock = 64, kBwdLanesChunk = 128;


inline float sigmoid_f(float z) { return 1.f / (1.f + std::exp(-z)); }
inline vf vdsilu(vf z) {
  const vf s = vsigmoid(z);
  return vmul(s, vfma(z, vsub(vset1(1.f), s), vset1(1.f)));
}

// Which loops a call runs: time-vectorized rows, channel-vectorized lanes, or scalar rows.
struct Plan {
  bool time_vec = false, lanes = false;
  int64_t block = 1, chunk = kRowChunk, n_dblocks = 0, n_chunks = 0;
};

Plan make_plan(const FsConv1dParams* p, bool lanes_ok, bool time_ok, int64_t lanes_block, int64_t lanes_chunk) {
  Plan pl;
  pl.time_vec = time_ok && p->x_stride[2] == 1 && kW > 1;
  pl.lanes = !pl.time_vec && lanes_ok && p->x_stride[1] == 1 && kW > 1;
  if (pl.lanes) {
    pl.block = lanes_block;
    pl.chunk = lanes_chunk;
  }
  pl.n_dblocks = (p->dim + pl.block - 1) / pl.block;
  pl.n_chunks = std::max<int64_t>(1, (p->seqlen + pl.chunk - 1) / pl.chunk);
  return pl;
}

// One row as the loops see it: batch b of x / out / dout / dx, row of the states (b, or the packed
// sequence), first step `off` on the time axis (0 unless packed) and its length.
struct Seq {
  int64_t b, state, off, len;
};

// f(seq, t0, t1) for each sequence piece of the steps [t0, t1) of batch b, in local steps.
template <class F>
void for_each_piece(const FsConv1dParams* p, int64_t b, int64_t t0, int64_t t1, F&& f) {
  if (!p->cu_seqlens) {
    f(Seq{b, b, 0, p->seqlen}, t0, t1);
    return;
  }
  const int32_t* cu = p->cu_seqlens;
  int64_t i = std::upper_bound(cu, cu + p->num_seqs + 1, int32_t(t0)) - cu - 1;  // last start <= t0
  for (; i < p->num_seqs && cu[i] < t1; ++i) {
    if (cu[i + 1] == cu[i]) continue;
    const Seq sq{0, i, cu[i], cu[i + 1] - cu[i]};
    f(sq, std::max<int64_t>(t0, cu[i]) - cu[i], std::min<int64_t>(t1, cu[i + 1]) - cu[i]);
  }
}

// The sequence of packed row `state` (or batch row `state` when unpacked), for the state loops.
inline Seq seq_of_state(const FsConv1dParams* p, int64_t state) {
  if (!p->cu_seqlens) return Seq{state, state, 0, p->seqlen};
  return Seq{0, state, p->cu_seqlens[state], int64_t(p->cu_seqlens[state + 1]) - p->cu_seqlens[state]};
}
inline int64_t num_states(const FsConv1dParams* p) { return p->cu_seqlens ? p->num_seqs : p->batch; }

// Per-call constants: weights as [tap][channel] rows, bias per channel (zeros when absent).
struct Consts {
  FloatBuf wt, bias;
  bool build(const FsConv1dParams* p, int W) {
    if (!wt.alloc(W * p->dim) || !bias.alloc(p->dim)) return false;
    for (int64_t d = 0; d < p->dim; ++d) {
      for (int k = 0; k < W; ++k) wt.p[k * p->dim + d] = p->weight[d * p->weight_stride[0] + k * p->weight_stride[1]];
      bias.p[d] = p->bias ? p->bias[d] : 0.f;
    }
    return true;
  }
};

// xpad[q] of row (sq, d): initial_states (zeros when absent) for q < W-1, else x[q - (W-1)].
inline float xpad_at(const FsConv1dParams* p, const Seq& sq, int64_t d, int64_t q) {
  const int64_t W1 = p->width - 1;
  if (q >= W1)
    return load_scalar(p->x, sq.b * p->x_stride[0] + d * p->x_stride[1] + (sq.off + q - W1) * p->x_stride[2], p->dtype);
  if (!p->initial_states) return 0.f;
  const int64_t* s = p->initial_states_stride;
  return load_scalar(p->initial_states, sq.state * s[0] + d * s[1] + q * s[2], p->dtype);
}

// xpad[q] of the kW channels d .. d+kW (channel stride 1).
inline vf xpad_lanes(const FsConv1dParams* p, const Seq& sq, int64_t d, int64_t q) {
  const int64_t W1 = p->width - 1;
  if (q >= W1) return vload_cvt(p->x, sq.b * p->x_stride[0] + d + (sq.off + q - W1) * p->x_stride[2], p->dtype);
  alignas(64) float tmp[kW];
  for (int c = 0; c < kW; ++c) tmp[c] = xpad_at(p, sq, d + c, q);
  return vload(tmp);
}

// win[j] = xpad[t + j] of row (sq, d) for j < n + W - 1, zeros up to kW + W - 1: the window of n <= kW
// steps from t, for one vector where the row cannot be loaded directly (packed sequences make such
// heads and tails frequent: a step-by-step scalar path cost ~40x a vector step per step).
template <int W>
inline void gather_xpad(const FsConv1dParams* p, const Seq& sq, int64_t d, int64_t t, int n, float* win) {
  for (int j = 0; j < n + W - 1; ++j) win[j] = xpad_at(p, sq, d, t + j);
  for (int j = n + W - 1; j < kW + W - 1; ++j) win[j] = 0.f;
}

// ---- forward -----------------------------------------------------------------------------------
template <int W>
void fwd_row(const FsConv1dParams* p, const Consts& cs, const Seq& sq, int64_t d, int64_t t0, int64_t t1, bool vec) {
  const int64_t xrow = sq.b * p->x_stride[0] + d * p->x_stride[1] + sq.off * p->x_stride[2];
  const int64_t orow = sq.b * p->out_stride[0] + d * p->out_stride[1] + sq.off * p->out_stride[2];
  vf wv[W];
  for (int k = 0; k < W; ++k) wv[k] = vset1(cs.wt.p[k * p->dim + d]);
  const vf bv = vset1(cs.bias.p[d]);
  for (int64_t t = t0; t < t1;) {
    if (vec && t >= W - 1 && t + kW <= t1) {
      vf acc = bv;
      for (int k = 0; k < W; ++k) acc = vfma(wv[k], vload_cvt(p->x, xrow + t - (W - 1) + k, p->dtype), acc);
      if (p->silu) acc = vmul(acc, vsigmoid(acc));
      vstore_cvt(p->out, orow + t, p->dtype, acc);
      t += kW;
    } else {  // the first W-1 steps, a tail under kW steps or time stride != 1: a gathered window
      const int n = int(std::min<int64_t>(kW, t1 - t));
      alignas(64) float win[kW + kMaxW];
      gather_xpad<W>(p, sq, d, t, n, win);
      vf acc = bv;
      for (int k = 0; k < W; ++k) acc = vfma(wv[k], vload(win + k), acc);
      if (p->silu) acc = vmul(acc, vsigmoid(acc));
      vstore(win, acc);
      for (int j = 0; j < n; ++j) store_scalar(p->out, orow + (t + j) * p->out_stride[2], p->dtype, win[j]);
      t += n;
    }
  }
}

// Channels [d0, d1) (a multiple of kW wide), steps [t0, t1); x and out have channel stride 1.
template <int W>
void fwd_lanes(const FsConv1dParams* p, const Consts& cs, const Seq& sq, int64_t d0, int64_t d1, int64_t t0, int64_t t1) {
  const int64_t D = p->dim;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t xoff = sq.b * p->x_stride[0] + (sq.off + t - (W - 1)) * p->x_stride[2];
    const int64_t ooff = sq.b * p->out_stride[0] + (sq.off + t) * p->out_stride[2];
    for (int64_t d = d0; d < d1; d += kW) {
      vf acc = vload(cs.bias.p + d);
      for (int k = 0; k < W; ++k) {
        const vf xk = t + k >= W - 1 ? vload_cvt(p->x, xoff + k * p->x_stride[2] + d, p->dtype)
                                     : xpad_lanes(p, sq, d, t + k);
        acc = vfma(vload(cs.wt.p + k * D + d), xk, acc);
      }
      if (p->silu) acc = vmul(acc, vsigmoid(acc));
      vstore_cvt(p->out, ooff + d, p->dtype, acc);
    }
  }
}

template <int W>
void fwd_all(const FsConv1dParams* p, const Consts& cs) {
  const bool out_time1 = p->out_stride[2] == 1, out_chan1 = p->out_stride[1] == 1;
  const Plan pl = make_plan(p, out_chan1, out_time1, kFwdLanesBlock, kFwdLanesChunk);
  const int64_t items = p->batch * pl.n_dblocks * pl.n_chunks;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t tc = item % pl.n_chunks, db = (item / pl.n_chunks) % pl.n_dblocks, b = item / (pl.n_chunks * pl.n_dblocks);
    const int64_t t0 = tc * pl.chunk, t1 = std::min(p->seqlen, t0 + pl.chunk);
    const int64_t d0 = db * pl.block, d1 = std::min(p->dim, d0 + pl.block);
    if (p->cu_seqlens && pl.time_vec) {
      // Packed rows of time stride 1: one vector pass over the tile as if unpacked (exact wherever a
      // window stays inside one sequence), then each sequence's first W-1 steps again from its own
      // states; cheaper than cutting the vector loop at every boundary.
      const Seq whole{0, 0, 0, p->seqlen};
      for (int64_t d = d0; d < d1; ++d) fwd_row<W>(p, cs, whole, d, t0, t1, true);
      for_each_piece(p, b, t0, t1, [&](const Seq& sq, int64_t s0, int64_t s1) {
        if (s0 < W - 1)
          for (int64_t d = d0; d < d1; ++d) fwd_row<W>(p, cs, sq, d, s0, std::min<int64_t>(s1, W - 1), true);
      });
      continue;
    }
    for_each_piece(p, b, t0, t1, [&](const Seq& sq, int64_t s0, int64_t s1) {
      int64_t d = d0;
      if (pl.lanes) {
        const int64_t dv = d0 + (d1 - d0) / kW * kW;
        fwd_lanes<W>(p, cs, sq, d0, dv, s0, s1);
        d = dv;
      }
      for (; d < d1; ++d) fwd_row<W>(p, cs, sq, d, s0, s1, pl.time_vec);
    });
  }
  if (p->final_states) {
    const int64_t* s = p->final_states_stride;
#pragma omp parallel for schedule(static)
    for (int64_t bd = 0; bd < num_states(p) * p->dim; ++bd) {
      const int64_t i = bd / p->dim, d = bd % p->dim;
      const Seq sq = seq_of_state(p, i);
      for (int j = 0; j < W - 1; ++j)
        store_scalar(p->final_states, i * s[0] + d * s[1] + j * s[2], p->dtype, xpad_at(p, sq, d, sq.len + j));
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------
inline float dfinal_at(const FsConv1dBwdParams* q, const Seq& sq, int64_t d, int64_t j) {
  if (!q->dfinal_states) return 0.f;
  const int64_t* s = q->dfinal_states_stride;
  return load_scalar(q->dfinal_states, sq.state * s[0] + d * s[1] + j * s[2], q->fwd.dtype);
}

// dxpad[pos] for pos < W-1 (the initial states) from a dz buffer that starts at step 0 (unread when
// the row is empty).
template <int W>
void store_dinit(const FsConv1dBwdParams* q, const Consts& cs, const Seq& sq, int64_t d, const float* dz,
                 int64_t dz_stride) {
  const FsConv1dParams* p = &q->fwd;
  const int64_t* s = q->dinitial_states_stride;
  for (int pos = 0; pos < W - 1; ++pos) {
    float acc = pos >= sq.len ? dfinal_at(q, sq, d, pos - sq.len) : 0.f;
    for (int k = 0; k <= pos; ++k)
      if (pos - k < sq.len) acc += cs.wt.p[k * p->dim + d] * dz[(pos - k) * dz_stride];
    store_scalar(q->dinitial_states, sq.state * s[0] + d * s[1] + pos * s[2], p->dtype, acc);
  }
}

// One row (sq, d), steps [t0, t1). dz: buffer of t1 - t0 + W - 1 floats. part: W + 1 sums added in.
template <int W>
void bwd_row(const FsConv1dBwdParams* q, const Consts& cs, const Seq& sq, int64_t d, int64_t t0, int64_t t1, bool vec,
             float* dz, float* part) {
  const FsConv1dParams* p = &q->fwd;
  const int64_t L = sq.len, D = p->dim;
  const int dt = p->dtype;
  const int64_t xrow = sq.b * p->x_stride[0] + d * p->x_stride[1] + sq.off * p->x_stride[2];
  const int64_t grow = sq.b * q->dout_stride[0] + d * q->dout_stride[1] + sq.off * q->dout_stride[2];
  const int64_t dxrow = sq.b * q->dx_stride[0] + d * q->dx_stride[1] + sq.off * q->dx_stride[2];
  const int64_t se = std::min(t1 + W - 1, L), n = t1 - t0 + W - 1;
  vf wv[W];
  for (int k = 0; k < W; ++k) wv[k] = vset1(cs.wt.p[k * D + d]);
  const vf bv = vset1(cs.bias.p[d]);
  for (int64_t s = t0; s < se;) {  // dz over the chunk and W-1 steps past it
    if (vec && s >= W - 1 && s + kW <= se) {
      vf g = vload_cvt(q->dout, grow + s, dt);
      if (p->silu) {
        vf z = bv;
        for (int k = 0; k < W; ++k) z = vfma(wv[k], vload_cvt(p->x, xrow + s - (W - 1) + k, dt), z);
        g = vmul(g, vdsilu(z));
      }
      vstore(dz + (s - t0), g);
      s += kW;
    } else {  // as in fwd_row: one vector over gathered inputs
      const int m = int(std::min<int64_t>(kW, se - s));
      alignas(64) float tmp[kW + kMaxW];
      for (int j = 0; j < kW; ++j) tmp[j] = j < m ? load_scalar(q->dout, grow + (s + j) * q->dout_stride[2], dt) : 0.f;
      vf g = vload(tmp);
      if (p->silu) {
        gather_xpad<W>(p, sq, d, s, m, tmp);
        vf z = bv;
        for (int k = 0; k < W; ++k) z = vfma(wv[k], vload(tmp + k), z);
        g = vmul(g, vdsilu(z));
      }
      vstore(tmp, g);
      for (int j = 0; j < m; ++j) dz[s - t0 + j] = tmp[j];
      s += m;
    }
  }
  for (int64_t j = se - t0; j < n + kW; ++j) dz[j] = 0.f;  // + kW: gathered vectors read past n

  vf wacc[W], bacc = vzero();
  for (int k = 0; k < W; ++k) wacc[k] = vzero();
  const int64_t vec_end = std::min(t1, L - (W - 1));  // past it dfinal_states adds in
  for (int64_t t = t0; t < t1;) {
    const float* dzt = dz + (t - t0);
    if (vec && t >= W - 1 && t + kW <= vec_end) {
      vf g = vzero();
      for (int k = 0; k < W; ++k) g = vfma(wv[k], vload(dzt + (W - 1 - k)), g);
      vstore_cvt(q->dx, dxrow + t, dt, g);
      const vf dzv = vload(dzt);
      for (int k = 0; k < W; ++k) wacc[k] = vfma(dzv, vload_cvt(p->x, xrow + t - (W - 1) + k, dt), wacc[k]);
      bacc = vadd(bacc, dzv);
      t += kW;
    } else {  // the first W-1 steps, the last W-1 (dfinal_states), tails: gathered vectors
      const int m = int(std::min<int64_t>(kW, t1 - t));
      alignas(64) float tmp[kW + kMaxW];
      for (int j = 0; j < kW; ++j) tmp[j] = j < m && t + j + W - 1 >= L ? dfinal_at(q, sq, d, t + j + W - 1 - L) : 0.f;
      vf g = vload(tmp);
      for (int k = 0; k < W; ++k) g = vfma(wv[k], vload(dzt + (W - 1 - k)), g);
      vstore(tmp, g);
      for (int j = 0; j < m; ++j) store_scalar(q->dx, dxrow + (t + j) * q->dx_stride[2], dt, tmp[j]);
      for (int j = 0; j < kW; ++j) tmp[j] = j < m ? dzt[j] : 0.f;  // dz past t1 belongs to the next tile
      const vf dzv = vload(tmp);
      gather_xpad<W>(p, sq, d, t, m, tmp);
      for (int k = 0; k < W; ++k) wacc[k] = vfma(dzv, vload(tmp + k), wacc[k]);
      bacc = vadd(bacc, dzv);
      t += m;
    }
  }
  for (int k = 0; k < W; ++k) part[k] += vhsum(wacc[k]);
  part[W] += vhsum(bacc);
  if (t0 == 0 && q->dinitial_states) store_dinit<W>(q, cs, sq, d, dz, 1);
}

// Channels [d0, d1) (a multiple of kW, at most kBwdLanesBlock), steps [t0, t1); channel stride 1
// for x, dout and dx. dz: (t1 - t0 + W - 1) x kBwdLanesBlock floats. part(d): W + 1 sums of d, added in.
template <int W>
void bwd_lanes(const FsConv1dBwdParams* q, const Consts& cs, const Seq& sq, int64_t d0, int64_t d1, int64_t t0,
               int64_t t1, float* dz, float* part, int64_t part_stride) {
  const FsConv1dParams* p = &q->fwd;
  const int64_t L = sq.len, D = p->dim, S = kBwdLanesBlock;
  const int64_t b = sq.b, off = sq.off;
  // xpad[q] of channels d .. d+kW: x inline, the rare state steps through xpad_lanes.
  const int64_t xbase = b * p->x_stride[0] + (off - (W - 1)) * p->x_stride[2];
  const int dt = p->dtype;
  auto xpad = [&](int64_t d, int64_t pos) {
    return pos >= W - 1 ? vload_cvt(p->x, xbase + pos * p->x_stride[2] + d, dt) : xpad_lanes(p, sq, d, pos);
  };
  const int64_t se = std::min(t1 + W - 1, L), n = t1 - t0 + W - 1;
  for (int64_t s = t0; s < n + t0; ++s) {
    float* row = dz + (s - t0) * S;
    for (int64_t d = d0; d < d1; d += kW) {
      vf g = vzero();
      if (s < se) {
        g = vload_cvt(q->dout, b * q->dout_stride[0] + (off + s) * q->dout_stride[2] + d, dt);
        if (p->silu) {
          vf z = vload(cs.bias.p + d);
          for (int k = 0; k < W; ++k) z = vfma(vload(cs.wt.p + k * D + d), xpad(d, s + k), z);
          g = vmul(g, vdsilu(z));
        }
      }
      vstore(row + (d - d0), g);
    }
  }
  for (int64_t d = d0; d < d1; d += kW) {
    vf wv[W], wacc[W], bacc = vzero();
    for (int k = 0; k < W; ++k) {
      wv[k] = vload(cs.wt.p + k * D + d);
      wacc[k] = vzero();
    }
    for (int64_t t = t0; t < t1; ++t) {
      const float* dzt = dz + (t - t0) * S + (d - d0);
      vf g = vzero();
      if (t + W - 1 >= L) {
        alignas(64) float tmp[kW];
        for (int c = 0; c < kW; ++c) tmp[c] = dfinal_at(q, sq, d + c, t + W - 1 - L);
        g = vload(tmp);
      }
      for (int k = 0; k < W; ++k) g = vfma(wv[k], vload(dzt + (W - 1 - k) * S), g);
      vstore_cvt(q->dx, b * q->dx_stride[0] + (off + t) * q->dx_stride[2] + d, dt, g);
      const vf dzv = vload(dzt);
      for (int k = 0; k < W; ++k) wacc[k] = vfma(dzv, xpad(d, t + k), wacc[k]);
      bacc = vadd(bacc, dzv);
    }
    alignas(64) float tmp[kW];
    for (int k = 0; k <= W; ++k) {
      vstore(tmp, k < W ? wacc[k] : bacc);
      for (int c = 0; c < kW; ++c) part[(d + c) * part_stride + k] += tmp[c];
    }
    if (t0 == 0 && q->dinitial_states)
      for (int c = 0; c < kW; ++c) store_dinit<W>(q, cs, sq, d + c, dz + (d + c - d0), S);
  }
}

Plan bwd_plan(const FsConv1dBwdParams* q) {
  const bool lanes_ok = q->dout_stride[1] == 1 && q->dx_stride[1] == 1;
  const bool time_ok = q->dout_stride[2] == 1 && q->dx_stride[2] == 1;
  return make_plan(&q->fwd, lanes_ok, time_ok, kBwdLanesBlock, kBwdLanesChunk);
}

template <int W>
int bwd_all(const FsConv1dBwdParams* q, const Consts& cs, float* partials) {
  const FsConv1dParams* p = &q->fwd;
  const Plan pl = bwd_plan(q);
  const int64_t items = p->batch * pl.n_dblocks * pl.n_chunks, P = W + 1, D = p->dim;
  const int64_t buf_floats = std::max(kRowChunk + kMaxW + kW, (kBwdLanesChunk + kMaxW) * kBwdLanesBlock);
  std::atomic<bool> failed{false};
#pragma omp parallel
  {
    FloatBuf buf;
    if (!buf.alloc(buf_floats)) failed = true;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      if (!buf.p) continue;
      const int64_t tc = item % pl.n_chunks, db = (item / pl.n_chunks) % pl.n_dblocks,
                    b = item / (pl.n_chunks * pl.n_dblocks);
      const int64_t t0 = tc * pl.chunk, t1 = std::min(p->seqlen, t0 + pl.chunk);
      const int64_t d0 = db * pl.block, d1 = std::min(D, d0 + pl.block);
      float* part = partials + (b * pl.n_chunks + tc) * D * P;
      std::fill(part + d0 * P, part + d1 * P, 0.f);
      for_each_piece(p, b, t0, t1, [&](const Seq& sq, int64_t s0, int64_t s1) {
        int64_t d = d0;
        if (pl.lanes) {
          const int64_t dv = d0 + (d1 - d0) / kW * kW;
          if (dv > d0) bwd_lanes<W>(q, cs, sq, d0, dv, s0, s1, buf.p, part, P);
          d = dv;
        }
        for (; d < d1; ++d) bwd_row<W>(q, cs, sq, d, s0, s1, pl.time_vec, buf.p, part + d * P);
      });
    }
  }
  if (failed) return fs_fail(FS_ERR_RUNTIME, "causal_conv1d_bwd (cpu): cannot allocate per-thread buffers");
  if (p->cu_seqlens && q->dinitial_states) {  // empty sequences: no piece; dinitial = dfinal
#pragma omp parallel for schedule(static)
    for (int64_t bd = 0; bd < p->num_seqs * D; ++bd) {
      const Seq sq = seq_of_state(p, bd / D);
      if (sq.len == 0) store_dinit<W>(q, cs, sq, bd % D, nullptr, 0);
    }
  }
  const int64_t n_parts = p->batch * pl.n_chunks;
#pragma omp parallel for schedule(static)
  for (int64_t d = 0; d < D; ++d) {
    float acc[kMaxW + 1] = {};
    for (int64_t i = 0; i < n_parts; ++i)
      for (int k = 0; k < P; ++k) acc[k] += partials[(i * D + d) * P + k];
    for (int k = 0; k < W; ++k) q->dweight[d * W + k] = acc[k];
    if (q->dbias) q->dbias[d] = acc[W];
  }
  return FS_OK;
}

int64_t bwd_partial_floats(const FsConv1dBwdParams* q) {
  const Plan pl = bwd_plan(q);
  return q->fwd.batch * pl.n_chunks * q->fwd.dim * (q->fwd.width + 1);
}

int check_params(const FsConv1dParams* p, const char* fn) {
  if (!p) return fs_fail(FS_ERR_INVALID, "%s (cpu): params is NULL", fn);
  if (p->batch < 0 || p->dim < 0 || p->seqlen < 0)
    return fs_fail(FS_ERR_INVALID, "%s (cpu): bad sizes batch=%lld dim=%lld seqlen=%lld", fn, (long long)p->batch,
                   (long long)p->dim, (long long)p->seqlen);
  if (p->width < 2 || p->width > kMaxW)
    return fs_fail(FS_ERR_UNSUPPORTED, "%s (cpu): width=%lld outside 2..%d", fn, (long long)p->width, kMaxW);
  if (p->dtype != FS_FLOAT32 && p->dtype != FS_FLOAT16 && p->dtype != FS_BFLOAT16)
    return fs_fail(FS_ERR_INVALID, "%s (cpu): unknown dtype code %d", fn, p->dtype);
  if (p->batch * p->dim * p->seqlen > 0 && (!p->x || !p->weight))
    return fs_fail(FS_ERR_INVALID, "%s (cpu): x and weight must not be NULL", fn);
  if (p->cu_seqlens && (p->batch != 1 || p->num_seqs < 1))
    return fs_fail(FS_ERR_INVALID, "%s (cpu): packed sequences need batch 1 and num_seqs >= 1, got %lld and %lld", fn,
                   (long long)p->batch, (long long)p->num_seqs);
  return FS_OK;
}

template <template <int> class F, class... Args>
int dispatch_width(int64_t width, Args&&... args) {
  switch (width) {
    case 2: return F<2>::run(args...);
    case 3: return F<3>::run(args...);
    case 4: return F<4>::run(args...);
    case 5: return F<5>::run(args...);
    case 6: return F<6>::run(args...);
    case 7: return F<7>::run(args...);
    default: return F<8>::run(args...);
  }
}

template <int W>
struct Fwd {
  static int run(const FsConv1dParams* p, const Consts& cs) {
    fwd_all<W>(p, cs);
    return FS_OK;
  }
};
template <int W>
struct Bwd {
  static int run(const FsConv1dBwdParams* q, const Consts& cs, float* partials) { return bwd_all<W>(q, cs, partials); }
};

}  // namespace

extern "C" FS_API int fs_causal_conv1d_fwd(const FsConv1dParams* p) {
  if (int rc = check_params(p, "causal_conv1d_fwd")) return rc;
  if (p->batch == 0 || p->dim == 0) return FS_OK;
  if (p->seqlen > 0 && !p->out) return fs_fail(FS_ERR_INVALID, "causal_conv1d_fwd (cpu): out must not be NULL");
  Consts cs;
  if (!cs.build(p, int(p->width))) return fs_fail(FS_ERR_RUNTIME, "causal_conv1d_fwd (cpu): out of memory");
  return dispatch_width<Fwd>(p->width, p, cs);
}

// The cpu backward allocates its own partials.
extern "C" FS_API int64_t fs_causal_conv1d_bwd_workspace_bytes(const FsConv1dParams*) { return 0; }

extern "C" FS_API int fs_causal_conv1d_bwd(const FsConv1dBwdParams* q) {
  if (!q) return fs_fail(FS_ERR_INVALID, "causal_conv1d_bwd (cpu): params is NULL");
  const FsConv1dParams* p = &q->fwd;
  if (int rc = check_params(p, "causal_conv1d_bwd")) return rc;
  if (p->batch == 0 || p->dim == 0) return FS_OK;
  if (!q->dweight || (p->seqlen > 0 && (!q->dout || !q->dx)))
    return fs_fail(FS_ERR_INVALID, "causal_conv1d_bwd (cpu): dout, dx and dweight must not be NULL");
  Consts cs;
  FloatBuf partials;
  if (!cs.build(p, int(p->width)) || !partials.alloc(bwd_partial_floats(q)))
    return fs_fail(FS_ERR_RUNTIME, "causal_conv1d_bwd (cpu): out of memory");
  return dispatch_width<Bwd>(p->width, q, cs, partials.p);
}

extern "C" FS_API int fs_causal_conv1d_update(const FsConv1dUpdateParams* u) {
  if (!u) return fs_fail(FS_ERR_INVALID, "causal_conv1d_update (cpu): params is NULL");
  if (u->width < 2 || u->width > kMaxW)
    return fs_fail(FS_ERR_UNSUPPORTED, "causal_conv1d_update (cpu): width=%lld outside 2..%d", (long long)u->width, kMaxW);
  if (u->state_len < u->width - 1 || u->batch < 0 || u->dim < 0 || u->seqlen < 0)
    return fs_fail(FS_ERR_INVALID, "causal_conv1d_update (cpu): bad sizes (state_len=%lld, width=%lld)",
                   (long long)u->state_len, (long long)u->width);
  const int64_t W = u->width, S = u->state_len, T = u->seqlen;
  const int64_t *xs = u->x_stride, *ss = u->conv_state_stride, *os = u->out_stride;
#pragma omp parallel for schedule(static)
  for (int64_t bd = 0; bd < u->batch * u->dim; ++bd) {
    const int64_t b = bd / u->dim, d = bd % u->dim;
    const int64_t xrow = b * xs[0] + d * xs[1], srow = b * ss[0] + d * ss[1], orow = b * os[0] + d * os[1];
    float w[kMaxW], win[kMaxW];
    for (int k = 0; k < W; ++k) w[k] = u->weight[d * u->weight_stride[0] + k * u->weight_stride[1]];
    for (int k = 0; k < W - 1; ++k) win[k] = load_scalar(u->conv_state, srow + (S - W + 1 + k) * ss[2], u->state_dtype);
    const float bias = u->bias ? u->bias[d] : 0.f;
    for (int64_t t = 0; t < T; ++t) {
      win[W - 1] = load_scalar(u->x, xrow + t * xs[2], u->dtype);
      float z = bias;
      for (int k = 0; k < W; ++k) z += w[k] * win[k];
      for (int k = 0; k < W - 1; ++k) win[k] = win[k + 1];
      if (u->silu) z *= sigmoid_f(z);
      store_scalar(u->out, orow + t * os[2], u->dtype, z);
    }
    // Shift left by T in place: ascending order reads every old entry before overwriting it.
    for (int64_t i = 0; i < S; ++i) {
      const int64_t src = i + T;
      const float v = src < S ? load_scalar(u->conv_state, srow + src * ss[2], u->state_dtype)
                              : load_scalar(u->x, xrow + (src - S) * xs[2], u->dtype);
      store_scalar(u->conv_state, srow + i * ss[2], u->state_dtype, v);
    }
  }
  return FS_OK;
}
