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
`*_primitive()` functions return None and the callers keep MindSpore's ops (a failed build warns
once). Set BIT_TRANSFER_CPU_KERNELS=0 to force those. The library is built once per source version
and compiler target (-march=native, without AVX-512 where oneDNN is capped below it: keyed by the
instruction sets the compiler enables, not the host name) into settings.home()/kernels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"  # the C++ sources, shipped as package data
SOURCE = CSRC / "cpu_kernels.cc"
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


def source_text(source: Path) -> str:
    """A kernel's source as the compiler sees it: the .cc and every header beside it (what the key hashes)."""
    headers = sorted(Path(source).parent.glob("*.h"))
    return "\n".join(p.read_text() for p in [Path(source), *headers])


def library_key(target: str, source: Path | None = None, flags: list[str] | None = None, extra: str = "") -> str:
    """Source, flags and the compiler's target features: not the host name, so a shared home or a
    re-provisioned host with another CPU never loads a library built for instructions it lacks
    (an illegal-instruction crash), and one CPU model shares one build. `extra`: what else the
    library depends on (oneDNN's version header)."""
    source, flags = SOURCE if source is None else source, CXX_FLAGS if flags is None else flags
    text = source_text(source) + ("\n// " + extra if extra else "")
    return hashlib.sha256("\n".join([text, " ".join(flags), target]).encode()).hexdigest()[:16]


def _library_path(cxx: str, name: str = "cpu_kernels", source: Path | None = None,
                  flags: list[str] | None = None, extra: str = "") -> Path:
    from bit_transfer import settings

    key = library_key(target_features(cxx), source, flags, extra)
    return settings.home() / "kernels" / f"{name}-{key}.so"


def build(name: str = "cpu_kernels", source: Path | None = None, flags: list[str] | None = None,
          link: list[str] = (), extra: str = "") -> Path | None:
    """Compile a kernel library (default: csrc/cpu_kernels.cc with CXX_FLAGS) once per key into
    settings.home()/kernels (atomic rename, so concurrent processes are safe). `link` follows the
    source on the command line (libraries; kernels/onednn.py links oneDNN).

    None when there is no C++ compiler; RuntimeError (with the compiler's first errors) when it fails.
    """
    cxx = _compiler()
    if not cxx:
        return None
    source, flags = SOURCE if source is None else source, CXX_FLAGS if flags is None else flags
    lib = _library_path(cxx, name, source, flags + list(link), extra)
    if lib.exists():
        return lib
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        return _compile([cxx, *target_flags(), *flags, f"-I{Path(source).parent}"], Path(source), list(link), lib)
    except OSError as e:  # BIT_TRANSFER_HOME a file, read-only, full: the built-in ops still work
        raise RuntimeError(f"cannot write {lib.parent} ({e.strerror or e}); check BIT_TRANSFER_HOME") from None


def _compile(command: list[str], source: Path, link: list[str], lib: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / "kernels.so"
        try:
            subprocess.run([*command, "-o", str(out), str(source), *link], check=True, capture_output=True, timeout=300)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{command[0]} failed: {first_errors(e.stderr.decode(errors='replace'))}") from None
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"{command[0]} failed: {e}") from None
        os.replace(out, lib)
    return lib


def first_errors(stderr: str, most: int = 3) -> str:
    """The compiler's first `most` error lines (file:line:col: error: ...), joined into one line."""
    errors = [ln.strip() for ln in stderr.splitlines() if " error" in ln or ln.startswith("error")]
    if errors:
        return " | ".join(errors[:most])[:600]
    return (stderr.strip().splitlines() or ["no output"])[-1][:300]


_background: dict[str, threading.Thread] = {}


def build_in_background(name: str, build_fn) -> None:
    """Start compiling a kernel library in a thread (g++ runs outside the GIL) so the compile overlaps
    the rest of start-up (imports, data checks); `wait_for_build(name)` joins it before the library is
    needed. Errors are left to the foreground build, which raises them again with its warning."""
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
    """The built kernel library, or None where MindSpore's ops must be used (one warning when it cannot be built)."""
    if os.environ.get("BIT_TRANSFER_CPU_KERNELS", "1") == "0":
        return None
    from bit_transfer.system import device as runtime

    if runtime.available_devices() != ("CPU",):
        return None
    wait_for_build("cpu_kernels")
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
