// Shared by cpu_kernels.cc and onednn_conv.cc (which standardises weights inside its convolutions):
// one thread rule and one statistics routine, so the two libraries give the same bits.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

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
