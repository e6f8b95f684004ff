"""Compiled CPU kernels (MindSpore `ops.Custom`, func_type "aot"): GroupNorm (optionally with the
following ReLU fused in), weight standardisation, each with its backward, and the all-finite
gradient check.

Why: on CPU, MindSpore 2.8's `GroupNorm`/`GroupNormGrad` kernels run at ~9 ns per element (an
elementwise op: ~0.3 ns), and they were ~half of a BiT training step (activations and weight
standardisation). Composites of reductions were faster but kept 2-4x the memory. The kernels here
(`SOURCE` below, single-threaded and vectorised, statistics accumulated in float64) are the same
maths and keep the fused op's memory: they save only the per-row mean and 1/std for the backward
pass (the fused ReLU's backward reads the output, which the next convolution keeps anyway). The
finite check reads the exponent bits of every gradient once; MindSpore's CPU reductions made the
portable check (a sum per tensor) ~17 % of an R50x1 step. docs/performance.md has the measurements.

Float32 only (models/resnetv2.py sends half-precision models to MindSpore's ops). Used only where
the CPU is MindSpore's only device and a C++ compiler builds them; otherwise the
`*_primitive()` functions return None and the callers keep MindSpore's ops (a failed build warns
once). Set BIT_TRANSFER_CPU_KERNELS=0 to force those. The library is built once per source version
and compiler target (-march=native: keyed by the instruction sets the compiler enables here, not the
host name) into paths.home()/kernels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

# Inline (not a package-data file) so every install has it.
SOURCE = r"""
// GroupNorm and weight standardisation forward/backward, and a finite check, for MindSpore CPU
// custom (aot) ops. Single-threaded (see CXX_FLAGS); float64 statistics.
#include <cmath>
#include <cstdint>
#include <vector>

// Forward over R rows of K = Cg*HW values: row r is group (r % G) of sample r / G, its channel j
// is (r % G)*Cg + j. gamma == nullptr: no affine (weight standardisation).
// RELU: y = max(0, GroupNorm(x)) in the same pass (the pre-activation units always follow GN with ReLU).
template <bool RELU>
static void gn_forward(const float *x, const float *gamma, const float *beta, float eps, float *y, float *mean_out,
                       float *rstd_out, int64_t R, int64_t Cg, int64_t HW, int64_t G) {
  const int64_t K = Cg * HW;
  for (int64_t r = 0; r < R; ++r) {
    const float *xr = x + r * K;
    // Two passes (mean, then squared deviations), accumulated in float64 lanes: `omp simd
    // reduction` lets the compiler vectorise them (a plain double += loop is one serial chain,
    // which made the forward 3-4x slower than the backward).
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < K; ++i) s += xr[i];
    const double m = s / K;
    double v = 0.0;
#pragma omp simd reduction(+ : v)
    for (int64_t i = 0; i < K; ++i) { const double d = xr[i] - m; v += d * d; }
    const float rstd = static_cast<float>(1.0 / std::sqrt(v / K + eps));
    const float mf = static_cast<float>(m);
    mean_out[r] = mf;
    rstd_out[r] = rstd;
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
                        int64_t G) {
  const int64_t K = Cg * HW;
  std::vector<double> pg(gamma ? R * Cg : 0), pb(gamma ? R * Cg : 0);  // per (row, channel): sum dz*xhat, sum dz
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

extern "C" int gn_fwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return gn_fwd_impl<false>(nparam, params, shapes);
}
extern "C" int gn_relu_fwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return gn_fwd_impl<true>(nparam, params, shapes);
}
extern "C" int gn_bwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return gn_bwd_impl<false>(nparam, params, shapes);
}
extern "C" int gn_relu_bwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return gn_bwd_impl<true>(nparam, params, shapes);
}

// Weight standardisation of a conv kernel in its own (O, I, kh, kw) layout, one row per output
// channel, no affine (no reshape copies around the op): (w, eps (1,)) -> (y, mean (O,), rstd (O,)).
static int64_t trailing(int ndim, const int64_t *shape) {
  int64_t k = 1;
  for (int d = 1; d < ndim; ++d) k *= shape[d];
  return k;
}
extern "C" int ws_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 5) return 1;
  gn_forward<false>(CF(0), nullptr, nullptr, *CF(1), F(2), F(3), F(4), shapes[0][0], 1, trailing(ndims[0], shapes[0]), 1);
  return 0;
}
// (dy, w, mean, rstd) -> dw
extern "C" int ws_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 5) return 1;
  gn_backward<false>(CF(0), CF(1), CF(2), CF(3), nullptr, nullptr, F(4), nullptr, nullptr, shapes[0][0], 1,
                     trailing(ndims[0], shapes[0]), 1);
  return 0;
}
#undef F
#undef CF

// All inputs (float32, any shapes) free of inf and NaN -> bool output. One pass over the exponent
// bits at memory speed; MindSpore 2.8's CPU ReduceSum (the portable check) took ~70 ms of a
// ~410 ms R50x1 step for the same 23.5 M gradient values.
extern "C" int all_finite(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam < 2) return 1;
  uint32_t bad = 0;
  for (int t = 0; t < nparam - 1; ++t) {
    int64_t n = 1;
    for (int d = 0; d < ndims[t]; ++d) n *= shapes[t][d];
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
# -fopenmp-simd: only the `omp simd` hints, no threads. With OpenMP threads the kernel was faster
# on an idle machine but 2x slower than the built-in op when another job held a core (spinning
# barriers next to MindSpore's own thread pool); single-threaded it stayed ahead in both cases.
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC"]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def target_features(cxx: str) -> str:
    """What `-march=native` means to this compiler on this CPU: its predefined macros under CXX_FLAGS
    (__AVX512F__, __AVX2__, ..., __VERSION__). ~15 ms, so once per process; "" if the query fails
    (the build then fails with the compiler's own message)."""
    try:
        out = subprocess.run([cxx, *CXX_FLAGS, "-E", "-dM", "-x", "c++", "-"], input="", capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return "\n".join(sorted(out.splitlines()))


def library_key(target: str) -> str:
    """Source, flags and the compiler's target features: not the host name, so a shared home or a
    re-provisioned host with another CPU never loads a library built for instructions it lacks
    (an illegal-instruction crash), and one CPU model shares one build."""
    return hashlib.sha256("\n".join([SOURCE, " ".join(CXX_FLAGS), target]).encode()).hexdigest()[:16]


def _library_path(cxx: str) -> Path:
    from bit_transfer import paths

    return paths.home() / "kernels" / f"cpu_kernels-{library_key(target_features(cxx))}.so"


def build() -> Path | None:
    """Compile the kernel library (atomic rename, so concurrent processes are safe).

    None when there is no C++ compiler; RuntimeError (with the compiler's message) when it fails.
    """
    cxx = _compiler()
    if not cxx:
        return None
    lib = _library_path(cxx)
    if lib.exists():
        return lib
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        return _compile(cxx, lib)
    except OSError as e:  # BIT_TRANSFER_HOME a file, read-only, full: the built-in ops still work
        raise RuntimeError(f"cannot write {lib.parent} ({e.strerror or e}); check BIT_TRANSFER_HOME") from None


def _compile(cxx: str, lib: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "cpu_kernels.cc", Path(tmp) / "cpu_kernels.so"
        src.write_text(SOURCE)
        try:
            subprocess.run([cxx, *CXX_FLAGS, "-o", str(out), str(src)], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError as e:
            first = next((ln for ln in e.stderr.decode(errors="replace").splitlines() if "error" in ln), "")
            raise RuntimeError(f"{cxx} failed: {first.strip()[:300]}") from None
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"{cxx} failed: {e}") from None
        os.replace(out, lib)
    return lib


@functools.cache
def _ops():
    """{name: Custom primitive} (gn, gn_relu, ws, all_finite), or None where MindSpore's ops must be used."""
    if os.environ.get("BIT_TRANSFER_CPU_KERNELS", "1") == "0":
        return None
    from bit_transfer import runtime

    if runtime.available_devices() != ("CPU",):
        return None
    try:
        lib = build()
    except RuntimeError as e:
        lib, why = None, str(e)
    else:
        why = "no C++ compiler (g++) found"
    if lib is None:
        warnings.warn(
            f"bit-transfer: compiled CPU kernels unavailable ({why}); GroupNorm uses MindSpore's built-in op, "
            "about 2x slower training on CPU. Install g++ or set BIT_TRANSFER_CPU_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    import mindspore as ms
    from mindspore import ops

    f32 = ms.float32

    def group_norm(relu: bool):
        """Forward primitive whose bprop is the matching backward kernel."""
        name = "gn_relu" if relu else "gn"
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
            out_shape=lambda x, gamma, beta, eps: (x, (x[0],), (x[0],)),
            out_dtype=lambda *_: (f32, f32, f32),
            func_type="aot",
            bprop=bprop,
        )

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
    return {"gn": group_norm(relu=False), "gn_relu": group_norm(relu=True), "ws": ws, "all_finite": finite}


def group_norm_primitive(relu: bool = False):
    """The forward Custom primitive `(x (R, Cg, HW), gamma (C,), beta (C,), eps (1,)) -> (y, mean, rstd)`
    with R = N*groups and C = groups*Cg (float32), y = GroupNorm(x) or, with `relu`, max(0, GroupNorm(x));
    None where the built-in op must be used."""
    found = _ops()
    return None if found is None else found["gn_relu" if relu else "gn"]


def weight_standardisation_primitive():
    """`(w (O, ...) float32, eps (1,)) -> (w_std, mean (O,), rstd (O,))`, w_std[o] = (w[o] - mean) * rstd
    over all of w[o] (BiT's StdConv2d), or None where MindSpore's ops must be used."""
    found = _ops()
    return None if found is None else found["ws"]


def all_finite_primitive():
    """`(*tensors float32) -> bool (1,)`: no inf or NaN anywhere, or None where MindSpore's ops must be used."""
    found = _ops()
    return None if found is None else found["all_finite"]


def available() -> bool:
    """Whether models and train steps built now use the compiled kernels."""
    return _ops() is not None
