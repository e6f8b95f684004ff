"""Compiled CPU kernels (MindSpore `ops.Custom`, func_type "aot"): GroupNorm (optionally with the
following ReLU fused in), weight standardisation, the stem's zero-padded max-pool on channels-last
activations, each with its backward, and the all-finite gradient check.

Why: on CPU, MindSpore 2.8's `GroupNorm`/`GroupNormGrad` kernels run at ~9 ns per element (an
elementwise op: ~0.3 ns), and they were ~half of a BiT training step (activations and weight
standardisation). Composites of reductions were faster but kept 2-4x the memory. The kernels here
(`SOURCE` below, vectorised, statistics accumulated in float64; the channels-last GroupNorm of
the oneDNN models also on OpenMP threads) are the same
maths and keep the fused op's memory: they save only the per-row mean and 1/std for the backward
pass (the fused ReLU's backward reads the output, which the next convolution keeps anyway). The
finite check reads the exponent bits of every gradient once; MindSpore's CPU reductions made the
portable check (a sum per tensor) ~17 % of an R50x1 step. docs/performance.md has the measurements.

Float32 only (models/resnetv2.py sends half-precision models to MindSpore's ops). Used only where
the CPU is MindSpore's only device and a C++ compiler builds them; otherwise the
`*_primitive()` functions return None and the callers keep MindSpore's ops (a failed build says
why in one line on stderr, once). Set BIT_TRANSFER_CPU_KERNELS=0 to force those. The library is
built once per source version and compiler target (-march=native, without AVX-512 where oneDNN is
capped below it: keyed by the instruction sets the compiler enables, not the host name) into
paths.home()/kernels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import sys
import threading
from pathlib import Path

# C++ both kernel libraries compile (this SOURCE and onednn_conv's, which standardises weights inside
# its convolutions): one thread rule and one statistics routine, so the two give the same bits.
# Needs <algorithm>, <cmath>, <cstdint> and, under -fopenmp, <omp.h>.
SHARED_SOURCE = r"""
// Threads for the kernels that run between oneDNN's convolutions (channels-last GroupNorm, weight
// standardisation, the finite check; on the same GNU OpenMP team): one per 256 K values up to the
// OpenMP maximum; 1 without -fopenmp. The NCHW GroupNorm (models without oneDNN) stays on 1.
static int threads(int64_t values) {
#ifdef _OPENMP
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), values >> 18)));
#else
  return 1;
#endif
}

// Mean and 1 / sqrt(var + eps) of K values: two passes (mean, then squared deviations), accumulated
// in float64 lanes: `omp simd reduction` lets the compiler vectorise them (a plain double += loop is
// one serial chain, which made the GroupNorm forward 3-4x slower than its backward).
static void row_statistics(const float *x, int64_t K, float eps, float *mean, float *rstd) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < K; ++i) s += x[i];
  const double m = s / K;
  double v = 0.0;
#pragma omp simd reduction(+ : v)
  for (int64_t i = 0; i < K; ++i) { const double d = x[i] - m; v += d * d; }
  *mean = static_cast<float>(m);
  *rstd = static_cast<float>(1.0 / std::sqrt(v / K + eps));
}
"""

# Inline (not a package-data file) so every install has it.
SOURCE = r"""
// GroupNorm and weight standardisation forward/backward, and a finite check, for MindSpore CPU
// custom (aot) ops. Single-threaded but for the channels-last GroupNorm (see CXX_FLAGS); float64 statistics.
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
""" + SHARED_SOURCE + r"""
// Forward over R rows of K = Cg*HW values: row r is group (r % G) of sample r / G, its channel j
// is (r % G)*Cg + j. gamma == nullptr: no affine (weight standardisation).
// RELU: y = max(0, GroupNorm(x)) in the same pass (the pre-activation units always follow GN with ReLU).
template <bool RELU>
static void gn_forward(const float *x, const float *gamma, const float *beta, float eps, float *y, float *mean_out,
                       float *rstd_out, int64_t R, int64_t Cg, int64_t HW, int64_t G, int nthreads = 1) {
  const int64_t K = Cg * HW;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const float *xr = x + r * K;
    row_statistics(xr, K, eps, mean_out + r, rstd_out + r);
    const float mf = mean_out[r], rstd = rstd_out[r];
    const int64_t c0 = (r % G) * Cg;
    float *yr = y + r * K;
    // (x - mean) * a + beta, not x * a + (beta - mean * a): the folded form cancels two products
    // of size |mean| * a, so an element equal to its group mean (a one-element group, a 1x1 map
    // with one channel per group) came out as FMA rounding noise (~1e-4 for a = 1/sqrt(eps)),
    // not beta, and that noise changed with the batch size (tests/test_cpu_kernels.py).
    for (int64_t j = 0; j < Cg; ++j) {
      const float a = rstd * (gamma ? gamma[c0 + j] : 1.f), b = beta ? beta[c0 + j] : 0.f;
      const float *xs = xr + j * HW;
      float *ys = yr + j * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) {
        const float z = (xs[i] - mf) * a + b;
        ys[i] = RELU ? (z > 0.f ? z : 0.f) : z;
      }
    }
  }
}

// Backward of gn_forward. RELU: dy is the gradient of max(0, z) and y = max(0, z) the forward
// output: dz = dy where y > 0, else 0 (ReluGrad's rule). gamma == nullptr: no affine, no dgamma/dbeta.
template <bool RELU>
static void gn_backward(const float *dy, const float *x, const float *mean, const float *rstd, const float *gamma,
                        const float *y, float *dx, float *dgamma, float *dbeta, int64_t R, int64_t Cg, int64_t HW,
                        int64_t G, int nthreads = 1) {
  const int64_t K = Cg * HW;
  std::vector<double> pg(gamma ? R * Cg : 0), pb(gamma ? R * Cg : 0);  // per (row, channel): sum dz*xhat, sum dz
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const float m = mean[r], rs = rstd[r];
    const int64_t c0 = (r % G) * Cg;
    const float *xr = x + r * K, *dyr = dy + r * K, *yr = RELU ? y + r * K : nullptr;
    double sg = 0.0, sgx = 0.0;  // sum gamma*dz, sum gamma*dz*xhat over the row
    for (int64_t j = 0; j < Cg; ++j) {
      const float *xs = xr + j * HW, *ds = dyr + j * HW, *ys = RELU ? yr + j * HW : nullptr;
      float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = 0; i < HW; ++i) {
        const float d = RELU ? (ys[i] > 0.f ? ds[i] : 0.f) : ds[i];
        a += d * ((xs[i] - m) * rs);
        b += d;
      }
      if (gamma) {
        pg[r * Cg + j] = a;
        pb[r * Cg + j] = b;
      }
      const double gj = gamma ? gamma[c0 + j] : 1.0;
      sg += gj * b;
      sgx += gj * a;
    }
    const float mg = static_cast<float>(sg / K), mgx = static_cast<float>(sgx / K);
    float *dxr = dx + r * K;
    for (int64_t j = 0; j < Cg; ++j) {
      const float gm = (gamma ? gamma[c0 + j] : 1.f) * rs;
      const float *xs = xr + j * HW, *ds = dyr + j * HW, *ys = RELU ? yr + j * HW : nullptr;
      float *out = dxr + j * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) {
        const float d = RELU ? (ys[i] > 0.f ? ds[i] : 0.f) : ds[i];
        out[i] = gm * d - rs * (mg + ((xs[i] - m) * rs) * mgx);
      }
    }
  }
  if (!gamma) return;
  const int64_t N = R / G, C = G * Cg;
  for (int64_t c = 0; c < C; ++c) { dgamma[c] = 0.f; dbeta[c] = 0.f; }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < Cg; ++j) {
        dgamma[g * Cg + j] += static_cast<float>(pg[(n * G + g) * Cg + j]);
        dbeta[g * Cg + j] += static_cast<float>(pb[(n * G + g) * Cg + j]);
      }
}

#define F(i) static_cast<float *>(params[i])
#define CF(i) static_cast<const float *>(params[i])

// GroupNorm: (x (R, Cg, HW), gamma (C,), beta (C,), eps (1,)) -> (y, mean (R,), rstd (R,)); G = C / Cg.
template <bool RELU>
static int gn_fwd_impl(int nparam, void **params, int64_t **shapes) {
  if (nparam != 7) return 1;
  const int64_t R = shapes[0][0], Cg = shapes[0][1], HW = shapes[0][2], G = shapes[1][0] / Cg;
  gn_forward<RELU>(CF(0), CF(1), CF(2), *CF(3), F(4), F(5), F(6), R, Cg, HW, G);
  return 0;
}

// (dy, x, mean, rstd, gamma[, y if RELU]) -> (dx, dgamma, dbeta)
template <bool RELU>
static int gn_bwd_impl(int nparam, void **params, int64_t **shapes) {
  if (nparam != (RELU ? 9 : 8)) return 1;
  const int64_t R = shapes[0][0], Cg = shapes[0][1], HW = shapes[0][2], G = shapes[4][0] / Cg;
  const int o = RELU ? 6 : 5;
  gn_backward<RELU>(CF(0), CF(1), CF(2), CF(3), CF(4), RELU ? CF(5) : nullptr, F(o), F(o + 1), F(o + 2), R, Cg, HW, G);
  return 0;
}

// The MindSpore aot entry point `name` running `impl<relu>`.
#define BT_GN_ENTRY(name, impl, relu)                                                                        \
  extern "C" int name(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) { \
    return impl<relu>(nparam, params, shapes);                                                             \
  }
BT_GN_ENTRY(gn_fwd, gn_fwd_impl, false)
BT_GN_ENTRY(gn_relu_fwd, gn_fwd_impl, true)
BT_GN_ENTRY(gn_bwd, gn_bwd_impl, false)
BT_GN_ENTRY(gn_relu_bwd, gn_bwd_impl, true)

// GroupNorm of the oneDNN convolutions' activations (bit_transfer/onednn_conv.py), channels-last
// in blocks: x (N, CB, HW, L), channel cb * L + l of pixel p at ((n * CB + cb) * HW + p) * L + l.
// Channels-last (N, HW, C) is CB = 1, L = C; oneDNN's blocked nChw8c (AVX2 machines) is L = 8.
// G groups of Cg = C / G consecutive channels (a group may span blocks); mean/rstd row n * G + g.
// Per sample, the per-channel sums run along the contiguous lanes (vectorised over L); statistics
// in float64 as above. (Blocks of ~64 channels, each pass over all pixels, to keep a block in L2
// between passes: 1.7x slower channels-last, the strided 256-byte rows defeat the prefetcher.)
struct Blocks {
  int64_t N, CB, HW, L, G;
  int64_t C() const { return CB * L; }
  // The sample's (cb, p) rows of L lanes, in memory order: f(offset of the row, its first channel).
  template <typename F>
  void rows(int64_t n, F f) const {
    for (int64_t cb = 0; cb < CB; ++cb)
      for (int64_t p = 0; p < HW; ++p) f(((n * CB + cb) * HW + p) * L, cb * L);
  }
};
// The kernels' lane count: LW if given at compile time (blocks of 8: the loops unroll, 1.2x faster
// than a run-time 8), else B.L.
#define BT_LANES (LW ? LW : B.L)

template <bool RELU, int LW>
static void gn_nhwc_forward(const float *x, const float *gamma, const float *beta, float eps, float *y, float *mean_out,
                            float *rstd_out, const Blocks &B) {
  const int64_t C = B.C(), G = B.G, Cg = C / G, L = BT_LANES;
  const double K = static_cast<double>(Cg * B.HW);
#pragma omp parallel for num_threads(threads(B.N * B.HW * C)) schedule(static)
  for (int64_t n = 0; n < B.N; ++n) {
    // One pass for both statistics: float64 sums of x and x^2 per channel (var = E[x^2] - E[x]^2
    // loses float32 precision only when |mean| > ~1e4 std; a second pass over the sample, as the
    // NCHW kernel's, cost ~25 % of this kernel).
    std::vector<double> acc(C, 0.0), acc2(C, 0.0);
    std::vector<float> m(C), a(C), b(C);
    B.rows(n, [&](int64_t at, int64_t c0) {
      const float *xp = x + at;
      double *s = acc.data() + c0, *s2 = acc2.data() + c0;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const double v = xp[l];
        s[l] += v;
        s2[l] += v * v;
      }
    });
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0.0, sq = 0.0;
      for (int64_t j = 0; j < Cg; ++j) sum += acc[g * Cg + j], sq += acc2[g * Cg + j];
      const double mean = sum / K, var = std::max(sq / K - mean * mean, 0.0);
      const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
      mean_out[n * G + g] = static_cast<float>(mean);
      rstd_out[n * G + g] = rstd;
      for (int64_t j = 0; j < Cg; ++j) {
        m[g * Cg + j] = static_cast<float>(mean);
        a[g * Cg + j] = rstd * gamma[g * Cg + j];
        b[g * Cg + j] = beta[g * Cg + j];
      }
    }
    B.rows(n, [&](int64_t at, int64_t c0) {
      const float *xp = x + at, *mc = m.data() + c0, *ac = a.data() + c0, *bc = b.data() + c0;
      float *yp = y + at;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const float z = (xp[l] - mc[l]) * ac[l] + bc[l];
        yp[l] = RELU ? (z > 0.f ? z : 0.f) : z;
      }
    });
  }
}

template <bool RELU, int LW>
static void gn_nhwc_backward(const float *dy, const float *x, const float *mean, const float *rstd, const float *gamma,
                             const float *y, float *dx, float *dgamma, float *dbeta, const Blocks &B) {
  const int64_t C = B.C(), G = B.G, Cg = C / G, L = BT_LANES, N = B.N;
  const double K = static_cast<double>(Cg * B.HW);
  // Per sample and channel: sum dz*xhat and sum dz over the pixels, in float (as gn_backward's
  // per-channel sums; float64 lanes kept this loop from vectorising: 7x slower).
  std::vector<float> sa(N * C, 0.f), sb(N * C, 0.f);
#pragma omp parallel for num_threads(threads(N * B.HW * C)) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    std::vector<float> m(C), rs(C), gm(C), mg(C), mgx(C);
    float *an = sa.data() + n * C, *bn = sb.data() + n * C;
    for (int64_t c = 0; c < C; ++c) {
      m[c] = mean[n * G + c / Cg];
      rs[c] = rstd[n * G + c / Cg];
    }
    B.rows(n, [&](int64_t at, int64_t c0) {
      const float *xp = x + at, *dp = dy + at, *yp = RELU ? y + at : nullptr;
      const float *mc = m.data() + c0, *rc = rs.data() + c0;
      float *ac = an + c0, *bc = bn + c0;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const float d = RELU ? (yp[l] > 0.f ? dp[l] : 0.f) : dp[l];
        ac[l] += d * ((xp[l] - mc[l]) * rc[l]);
        bc[l] += d;
      }
    });
    for (int64_t g = 0; g < G; ++g) {
      double sg = 0.0, sgx = 0.0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        sg += gamma[c] * bn[c];
        sgx += gamma[c] * an[c];
      }
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        mg[c] = static_cast<float>(sg / K);
        mgx[c] = static_cast<float>(sgx / K);
        gm[c] = gamma[c] * rs[c];
      }
    }
    B.rows(n, [&](int64_t at, int64_t c0) {
      const float *xp = x + at, *dp = dy + at, *yp = RELU ? y + at : nullptr;
      const float *mc = m.data() + c0, *rc = rs.data() + c0, *gc = gm.data() + c0, *mgc = mg.data() + c0,
                  *mxc = mgx.data() + c0;
      float *out = dx + at;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const float d = RELU ? (yp[l] > 0.f ? dp[l] : 0.f) : dp[l];
        out[l] = gc[l] * d - rc[l] * (mgc[l] + ((xp[l] - mc[l]) * rc[l]) * mxc[l]);
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {  // over samples in float64, in order (the same for any thread count)
    double tg = 0.0, tb = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      tg += sa[n * C + c];
      tb += sb[n * C + c];
    }
    dgamma[c] = static_cast<float>(tg);
    dbeta[c] = static_cast<float>(tb);
  }
}

// (x (N, CB, HW, L), gamma (C,), beta (C,), eps (1,)) -> (y, mean (N*G,), rstd (N*G,)): G from mean's size.
template <bool RELU>
static int gn_nhwc_fwd_impl(int nparam, void **params, int64_t **shapes) {
  if (nparam != 7) return 1;
  const int64_t *xs = shapes[0];
  const Blocks B{xs[0], xs[1], xs[2], xs[3], shapes[5][0] / xs[0]};
  (B.L == 8 ? gn_nhwc_forward<RELU, 8> : gn_nhwc_forward<RELU, 0>)(CF(0), CF(1), CF(2), *CF(3), F(4), F(5), F(6), B);
  return 0;
}
// (dy, x, mean, rstd, gamma[, y if RELU]) -> (dx, dgamma, dbeta)
template <bool RELU>
static int gn_nhwc_bwd_impl(int nparam, void **params, int64_t **shapes) {
  if (nparam != (RELU ? 9 : 8)) return 1;
  const int o = RELU ? 6 : 5;
  const int64_t *xs = shapes[1];
  const Blocks B{xs[0], xs[1], xs[2], xs[3], shapes[2][0] / xs[0]};
  (B.L == 8 ? gn_nhwc_backward<RELU, 8> : gn_nhwc_backward<RELU, 0>)(
      CF(0), CF(1), CF(2), CF(3), CF(4), RELU ? CF(5) : nullptr, F(o), F(o + 1), F(o + 2), B);
  return 0;
}
BT_GN_ENTRY(gn_nhwc_fwd, gn_nhwc_fwd_impl, false)
BT_GN_ENTRY(gn_relu_nhwc_fwd, gn_nhwc_fwd_impl, true)
BT_GN_ENTRY(gn_nhwc_bwd, gn_nhwc_bwd_impl, false)
BT_GN_ENTRY(gn_relu_nhwc_bwd, gn_nhwc_bwd_impl, true)
#undef BT_GN_ENTRY
#undef BT_LANES

// Weight standardisation of a conv kernel in its own (O, I, kh, kw) layout, one row per output
// channel, no affine (no reshape copies around the op): (w, eps (1,)) -> (y, mean (O,), rstd (O,)).
static int64_t trailing(int ndim, const int64_t *shape) {
  int64_t k = 1;
  for (int d = 1; d < ndim; ++d) k *= shape[d];
  return k;
}
extern "C" int ws_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 5) return 1;
  const int64_t O = shapes[0][0], K = trailing(ndims[0], shapes[0]);
  gn_forward<false>(CF(0), nullptr, nullptr, *CF(1), F(2), F(3), F(4), O, 1, K, 1, threads(O * K));
  return 0;
}
// (dy, w, mean, rstd) -> dw
extern "C" int ws_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 5) return 1;
  const int64_t O = shapes[0][0], K = trailing(ndims[0], shapes[0]);
  gn_backward<false>(CF(0), CF(1), CF(2), CF(3), nullptr, nullptr, F(4), nullptr, nullptr, O, 1, K, 1, threads(O * K));
  return 0;
}
#undef F
#undef CF

// The stem's max-pool on channels-last activations with zero padding (the official stem zero-pads,
// then pools without padding: a padded zero can be the maximum, the pre-activation stem output being
// signed). cfg = [kernel, stride, pad, same]: TF-SAME padding from the input size (`same`), else `pad`
// on every side (as onednn_conv's geometry). Forward (x (N,H,W,C), cfg) -> (y (N,OH,OW,C), at), `at`
// the input pixel (h * W + w) each maximum came from, -1 for a padded zero; the first maximum in
// window order wins. Backward (dy, at, x (its shape only)) -> dx. Threads over samples.
struct Pool {
  int64_t N, H, W, C, OH, OW, k, s, top, left;
  Pool(const int64_t *xs, const int64_t *ys, const int32_t *cfg)
      : N(xs[0]), H(xs[1]), W(xs[2]), C(xs[3]), OH(ys[1]), OW(ys[2]), k(cfg[0]), s(cfg[1]) {
    top = left = cfg[2];
    if (cfg[3]) {  // TF-SAME: the odd pixel of padding after
      top = std::max<int64_t>((OH - 1) * s + k - H, 0) / 2;
      left = std::max<int64_t>((OW - 1) * s + k - W, 0) / 2;
    }
  }
};

extern "C" int max_pool_nhwc_fwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4) return 1;
  const Pool p(shapes[0], shapes[2], static_cast<const int32_t *>(params[1]));
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[2]);
  int32_t *at = static_cast<int32_t *>(params[3]);
  const int64_t C = p.C;
#pragma omp parallel for num_threads(threads(p.N * p.H * p.W * C))
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t oh = 0; oh < p.OH; ++oh)
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        float *yo = y + ((n * p.OH + oh) * p.OW + ow) * C;
        int32_t *ao = at + ((n * p.OH + oh) * p.OW + ow) * C;
        for (int64_t c = 0; c < C; ++c) yo[c] = -INFINITY, ao[c] = -1;
        for (int64_t i = 0; i < p.k; ++i)
          for (int64_t j = 0; j < p.k; ++j) {
            const int64_t h = oh * p.s + i - p.top, w = ow * p.s + j - p.left;
            const bool inside = h >= 0 && h < p.H && w >= 0 && w < p.W;
            const float *xp = inside ? x + ((n * p.H + h) * p.W + w) * C : nullptr;
            const int32_t pos = inside ? static_cast<int32_t>(h * p.W + w) : -1;
            for (int64_t c = 0; c < C; ++c) {
              const float v = inside ? xp[c] : 0.0f;
              if (v > yo[c]) yo[c] = v, ao[c] = pos;
            }
          }
      }
  return 0;
}

extern "C" int max_pool_nhwc_bwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4) return 1;
  const int64_t N = shapes[2][0], HW = shapes[2][1] * shapes[2][2], C = shapes[2][3];
  const int64_t OHW = shapes[0][1] * shapes[0][2];
  const float *dy = static_cast<const float *>(params[0]);
  const int32_t *at = static_cast<const int32_t *>(params[1]);
  float *dx = static_cast<float *>(params[3]);
#pragma omp parallel for num_threads(threads(N * HW * C))
  for (int64_t n = 0; n < N; ++n) {
    float *dxn = dx + n * HW * C;
    std::fill(dxn, dxn + HW * C, 0.0f);
    for (int64_t o = 0; o < OHW; ++o) {
      const float *d = dy + (n * OHW + o) * C;
      const int32_t *a = at + (n * OHW + o) * C;
      for (int64_t c = 0; c < C; ++c)
        if (a[c] >= 0) dxn[a[c] * C + c] += d[c];
    }
  }
  return 0;
}

// All inputs (float32, any shapes) free of inf and NaN -> bool output. One pass over the exponent
// bits at memory speed; MindSpore 2.8's CPU ReduceSum (the portable check) took ~70 ms of a
// ~410 ms R50x1 step for the same 23.5 M gradient values.
extern "C" int all_finite(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam < 2) return 1;
  std::vector<int64_t> sizes(nparam - 1, 1);
  int64_t total = 0;
  for (int t = 0; t < nparam - 1; ++t) {
    for (int d = 0; d < ndims[t]; ++d) sizes[t] *= shapes[t][d];
    total += sizes[t];
  }
  uint32_t bad = 0;
#pragma omp parallel for num_threads(threads(total)) schedule(dynamic) reduction(| : bad)
  for (int t = 0; t < nparam - 1; ++t) {
    const int64_t n = sizes[t];
    const uint32_t *u = static_cast<const uint32_t *>(params[t]);
    uint32_t acc = 0;
#pragma omp simd reduction(| : acc)
    for (int64_t i = 0; i < n; ++i) acc |= static_cast<uint32_t>((u[i] & 0x7f800000u) == 0x7f800000u);
    bad |= acc;
  }
  *static_cast<bool *>(params[nparam - 1]) = bad == 0;
  return 0;
}
"""
# -fopenmp: the NCHW kernels stay single-threaded (with OpenMP threads they were faster on an idle
# machine but 2x slower than the built-in op when another job held a core: spinning barriers next to
# MindSpore's own thread pool). The channels-last GroupNorm runs between oneDNN's convolutions, which
# use the same GNU OpenMP team anyway: 2 threads made it 2x faster (R50x1 step: Custom ops 505 -> 345 ms).
# The target (-march=native, see target_flags) comes first on every kernel command line.
CXX_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]

# oneDNN's names for instruction sets below AVX-512 (ONEDNN_MAX_CPU_ISA values, oneDNN's docs:
# "CPU dispatcher control"): SSE41, AVX, AVX2, AVX2_VNNI, AVX2_VNNI_2.
BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")


def target_flags() -> list[str]:
    """What the kernels are compiled for: this CPU (-march=native), without AVX-512 where oneDNN is
    capped below it (ONEDNN_MAX_CPU_ISA or DNNL_MAX_CPU_ISA, read as oneDNN reads them): one cap then
    holds for every kernel of the run, our loops run at the vector width oneDNN's do, and an AVX-512
    machine can stand in for an AVX2 one (benchmarks/train_step.py --isa avx2, the AVX2 tests)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    x86 = platform.machine() in ("x86_64", "AMD64")  # the flag is x86's (oneDNN ignores these names elsewhere)
    return ["-march=native", *(["-mno-avx512f"] if x86 and cap.upper() in BELOW_AVX512 else [])]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def target_features(cxx: str) -> str:
    """What target_flags mean to this compiler on this CPU: its predefined macros (__AVX512F__,
    __AVX2__, ..., __VERSION__); "" if the query fails (the build then fails with the compiler's
    own message)."""
    return _predefined_macros(cxx, tuple(target_flags()))


@functools.cache
def _predefined_macros(cxx: str, target: tuple[str, ...]) -> str:
    """~15 ms, so once per process and target."""
    try:
        out = subprocess.run([cxx, *target, *CXX_FLAGS, "-E", "-dM", "-x", "c++", "-"], input="",
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return "\n".join(sorted(out.splitlines()))


def library_key(target: str, source: str | None = None, flags: list[str] | None = None) -> str:
    """Source, flags and the compiler's target features: not the host name, so a shared home or a
    re-provisioned host with another CPU never loads a library built for instructions it lacks
    (an illegal-instruction crash), and one CPU model shares one build."""
    source, flags = SOURCE if source is None else source, CXX_FLAGS if flags is None else flags
    return hashlib.sha256("\n".join([source, " ".join(flags), target]).encode()).hexdigest()[:16]


def _library_path(cxx: str, name: str = "cpu_kernels", source: str | None = None,
                  flags: list[str] | None = None) -> Path:
    from bit_transfer import paths

    return paths.home() / "kernels" / f"{name}-{library_key(target_features(cxx), source, flags)}.so"


def build(name: str = "cpu_kernels", source: str | None = None, flags: list[str] | None = None,
          link: list[str] = ()) -> Path | None:
    """Compile a kernel library (default: this module's SOURCE with CXX_FLAGS) once per key into
    paths.home()/kernels (atomic rename, so concurrent processes are safe). `link` follows the
    source on the command line (libraries; bit_transfer/onednn_conv.py links oneDNN).

    None when there is no C++ compiler; RuntimeError (with the compiler's message) when it fails.
    """
    cxx = _compiler()
    if not cxx:
        return None
    source, flags = SOURCE if source is None else source, CXX_FLAGS if flags is None else flags
    lib = _library_path(cxx, name, source, flags + list(link))
    if lib.exists():
        return lib
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        return _compile([cxx, *target_flags(), *flags], source, list(link), lib)
    except OSError as e:  # BIT_TRANSFER_HOME a file, read-only, full: the built-in ops still work
        raise CacheUnwritable(f"cannot write the kernel cache {lib.parent} ({e.strerror or e})") from None


class CacheUnwritable(RuntimeError):
    """The kernel cache (paths.home()/kernels) cannot be written: the compiler is not the cause."""


_said: set[str] = set()


def notice(line: str) -> None:
    """`line` once per process, as one plain line on stderr (not a Python warning: no file:line, no
    source line): what is slower and why, from a build that fell back to MindSpore's ops."""
    if line not in _said:
        _said.add(line)
        print(f"bit-transfer: {line}", file=sys.stderr, flush=True)


def fallback_fix(e: Exception | None, silence: str) -> str:
    """The fix for a kernel build that failed with `e` (None: no compiler), naming its real cause."""
    if isinstance(e, CacheUnwritable):
        return f"set BIT_TRANSFER_HOME to a writable directory, or {silence} to silence this"
    if e is None:
        return f"install g++, or set {silence} to silence this"
    return f"set {silence} to silence this"


def _compile(command: list[str], source: str, link: list[str], lib: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "kernels.cc", Path(tmp) / "kernels.so"
        src.write_text(source)
        try:
            subprocess.run([*command, "-o", str(out), str(src), *link], check=True, capture_output=True, timeout=300)
        except subprocess.CalledProcessError as e:
            first = next((ln for ln in e.stderr.decode(errors="replace").splitlines() if "error" in ln), "")
            raise RuntimeError(f"{command[0]} failed: {first.strip()[:300]}") from None
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"{command[0]} failed: {e}") from None
        os.replace(out, lib)
    return lib


_background: dict[str, threading.Thread] = {}


def build_in_background(name: str, build_fn) -> None:
    """Start compiling a kernel library in a thread (g++ runs outside the GIL) so the compile overlaps
    the rest of start-up (imports, data checks); `wait_for_build(name)` joins it before the library is
    needed. Errors are left to the foreground build, which meets them again and says why."""
    def quietly():
        try:
            build_fn()
        except Exception:  # noqa: BLE001 - reported by the foreground build
            pass

    if name not in _background:
        _background[name] = threading.Thread(target=quietly, name=f"build-{name}", daemon=True)
        _background[name].start()


def wait_for_build(name: str) -> None:
    thread = _background.get(name)
    if thread is not None:
        thread.join()


def _gn_name(relu: bool, nhwc: bool) -> str:
    """The GroupNorm kernel's name in SOURCE (its entry points add _fwd / _bwd) and in _ops()."""
    return ("gn_relu" if relu else "gn") + ("_nhwc" if nhwc else "")


@functools.cache
def _library() -> Path | None:
    """The built kernel library, or None where MindSpore's ops must be used (one line on stderr when it
    cannot be built)."""
    if os.environ.get("BIT_TRANSFER_CPU_KERNELS", "1") == "0":
        return None
    from bit_transfer import runtime

    if runtime.available_devices() != ("CPU",):
        return None
    wait_for_build("cpu_kernels")
    error = None
    try:
        lib = build()
    except RuntimeError as e:
        lib, error = None, e
    if lib is None:
        why = str(error) if error else "no C++ compiler (g++) found"
        notice(f"compiled CPU kernels unavailable ({why}); GroupNorm uses MindSpore's built-in op, about 2x "
               f"slower training on CPU; {fallback_fix(error, 'BIT_TRANSFER_CPU_KERNELS=0')}")
    return lib


@functools.cache
def _ops():
    """{name: Custom primitive} (gn, gn_relu, ws, all_finite), or None where MindSpore's ops must be used."""
    lib = _library()
    if lib is None:
        return None
    import mindspore as ms
    from mindspore import ops

    f32 = ms.float32
    ws_bwd = ops.Custom(f"{lib}:ws_bwd", out_shape=lambda dy, w, mean, rstd: dy, out_dtype=lambda *_: f32, func_type="aot")

    def ws_bprop(w, eps, out, dout):
        return ws_bwd(dout[0], w, out[1], out[2]), ops.zeros_like(eps)

    ws = ops.Custom(
        f"{lib}:ws_fwd",
        out_shape=lambda w, eps: (w, (w[0],), (w[0],)),
        out_dtype=lambda *_: (f32, f32, f32),
        func_type="aot",
        bprop=ws_bprop,
    )
    finite = ops.Custom(
        f"{lib}:all_finite",
        out_shape=lambda *shapes: (1,),
        out_dtype=lambda *dtypes: ms.bool_,
        func_type="aot",
    )
    kernels = {"ws": ws, "all_finite": finite}
    for relu in (False, True):
        kernels[_gn_name(relu, False)] = _group_norm_op(lib, relu, False, lambda x: (x[0],))
    return kernels


def _group_norm_op(lib: Path, relu: bool, nhwc: bool, rows):
    """GroupNorm's forward Custom primitive, mean/rstd of shape `rows(x's shape)`, whose bprop is the
    matching backward kernel."""
    import mindspore as ms
    from mindspore import ops

    f32 = ms.float32
    name = _gn_name(relu, nhwc)
    bwd = ops.Custom(
        f"{lib}:{name}_bwd",
        out_shape=lambda dy, x, mean, rstd, gamma, *y: (dy, gamma, gamma),
        out_dtype=lambda *_: (f32, f32, f32),
        func_type="aot",
    )

    def bprop(x, gamma, beta, eps, out, dout):
        if relu:  # the ReLU output masks the incoming gradient
            dx, dgamma, dbeta = bwd(dout[0], x, out[1], out[2], gamma, out[0])
        else:
            dx, dgamma, dbeta = bwd(dout[0], x, out[1], out[2], gamma)
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    return ops.Custom(
        f"{lib}:{name}_fwd",
        out_shape=lambda x, gamma, beta, eps: (x, rows(x), rows(x)),
        out_dtype=lambda *_: (f32, f32, f32),
        func_type="aot",
        bprop=bprop,
    )


@functools.cache
def _channels_last_group_norm(relu: bool, groups: int):
    """The oneDNN layouts' GroupNorm for `groups` groups (its mean/rstd shape needs the count)."""
    lib = _library()
    if lib is None:
        return None
    op = _group_norm_op(lib, relu, True, lambda x: (x[0] * groups,))
    op.add_prim_attr("groups", groups)  # shapes are cached per function and attributes (onednn_conv)
    return op


def out_size(size: int, kernel: int, stride: int, pad: int, same: bool) -> int:
    """Output length of one spatial dim of a convolution (onednn_conv) or pool (max_pool_primitive):
    TF-SAME (`same`) keeps ceil(size / stride); else `pad` per side."""
    return -(-size // stride) if same else (size + 2 * pad - kernel) // stride + 1


@functools.cache
def max_pool_primitive(kernel: int, stride: int, pad: int, same: bool):
    """The stem's zero-padded max-pool on channels-last activations, `(x (N,H,W,C), cfg) -> (y, at)`
    (SOURCE's max_pool_nhwc; `cfg` = int32 [kernel, stride, pad, same], padding as
    onednn_conv.config), whose bprop routes each gradient to the pixel its maximum came from. None
    where MindSpore's ops must be used."""
    lib = _library()
    if lib is None:
        return None
    import mindspore as ms
    from mindspore import ops

    def shape(x, *_):
        return [x[0], out_size(x[1], kernel, stride, pad, same), out_size(x[2], kernel, stride, pad, same), x[3]]

    bwd = ops.Custom(f"{lib}:max_pool_nhwc_bwd", out_shape=lambda dy, at, x: x, out_dtype=lambda *_: ms.float32,
                     func_type="aot")

    def bprop(x, cfg, out, dout):
        return bwd(dout[0], out[1], x), ops.zeros_like(cfg)

    op = ops.Custom(f"{lib}:max_pool_nhwc_fwd", out_shape=lambda x, cfg: (shape(x), shape(x)),
                    out_dtype=lambda *_: (ms.float32, ms.int32), func_type="aot", bprop=bprop)
    op.add_prim_attr("geometry", f"{kernel},{stride},{pad},{int(same)}")  # as onednn_conv.conv_primitive
    return op


def group_norm_primitive(relu: bool = False, groups: int = 0):
    """The forward Custom primitive `(x (R, Cg, HW), gamma (C,), beta (C,), eps (1,)) -> (y, mean, rstd)`
    with R = N*groups and C = groups*Cg (float32), y = GroupNorm(x) or, with `relu`, max(0, GroupNorm(x)).
    With `groups` > 0, the channels-last kernel of the oneDNN models: x (N, CB, HW, L), channel cb*L + l
    (channels-last: CB = 1, L = C; oneDNN's blocked nChw8c: L = 8), mean/rstd (N*groups,).
    None where the built-in op must be used."""
    if groups:
        return _channels_last_group_norm(relu, groups)
    found = _ops()
    return None if found is None else found[_gn_name(relu, False)]


def weight_standardisation_primitive():
    """`(w (O, ...) float32, eps (1,)) -> (w_std, mean (O,), rstd (O,))`, w_std[o] = (w[o] - mean) * rstd
    over all of w[o] (BiT's StdConv2d), or None where MindSpore's ops must be used."""
    found = _ops()
    return None if found is None else found["ws"]


def all_finite_primitive():
    """`(*tensors float32) -> bool (1,)`: no inf or NaN anywhere, or None where MindSpore's ops must be used."""
    found = _ops()
    return None if found is None else found["all_finite"]


def clear_caches() -> None:
    """Forget the library and the primitives (tests: after changing the source or the environment)."""
    for cached in (_library, _ops, _channels_last_group_norm, max_pool_primitive):
        cached.cache_clear()


def available() -> bool:
    """Whether models and train steps built now use the compiled kernels."""
    return _ops() is not None
