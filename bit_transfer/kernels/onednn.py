"""Channels-last convolutions on oneDNN 3.x for MindSpore on CPU (`ops.Custom` aot kernels with their
backward).

Why: MindSpore 2.8 bundles oneDNN 2.2 and hands it plain NCHW/OIHW layouts, so every CPU
convolution runs as im2col + GEMM (~65 % of an R50x1 training step). oneDNN 3's brgemm convolutions
read and write channels-last (N, H, W, C) activations as they are and run near the FMA peak on AVX2
and AVX-512, so a model on these kernels keeps its activations channels-last from the stem's
convolution to the pooling (models/resnetv2.py `set_layout`; GroupNorm and the stem's max-pool have
channels-last kernels in cpu_kernels.py). oneDNN-in-NCHW with reorders of the activations per call
was no faster than MindSpore's convolutions. On AVX2 machines (no AVX-512) the activations are in
oneDNN's blocked nChw8c instead, (N, C/8, H, W, 8) tensors (`activation_block`): there oneDNN 3.2's
kernels for it ran R50x1's convolutions 10 % faster than its channels-last ones. The kernels tell
the two apart by the activation's rank.

Weights stay (O, I, kh, kw) Parameters. Three ways into oneDNN's blocked layouts (one per-thread
buffer): BiT's weight standardisation runs inside the kernels (`standardise`: the forward writes the
standardised weight straight into the layout its primitive reads, backward-data again into its
own, backward-weights reads the blocked gradient: no standardised copy, no reorders); plain
convolutions reorder per call; inference weights (`config(packed=True)`) are packed once and kept.
A residual block's last convolution adds the shortcut as it writes its output (`residual`). The
maths is the same; values and gradients match MindSpore's ops to ~1e-6 of the largest value
(tests/kernels/test_onednn.py). Measurements: docs/performance.md.

Inference (packed weights) runs 3x3 stride-1 convolutions as Winograd F(4x4, 3x3) where that pays
(`winograd_tile` in SOURCE: enough tiles in the batch, transformed weight <= 64 MB): 4x fewer
multiplications as one batched GEMM between our tile transforms (oneDNN's matmul; on AVX2, where
that is oneDNN's reference gemm, which repacks the weight on every call, our own on the kept
weight: eval 4-5 % faster), 1.3-2.8x faster per
convolution than oneDNN 3.2's direct kernels (which have no fp32 Winograd), values within ~3e-6
of the largest output (a direct convolution's rounding: ~1e-6), and a kept weight copy 4x the
3x3 weight's. Where a batch has too few 4x4 tiles (R50's last stage at micro-batch 8), F(2x2, 3x3):
2.25x fewer multiplications, a copy 1.8x the weight's, 1.3-1.8x faster there. Training's
weight-standardised convolutions run Winograd too (forward, backward-data, backward-weights) where
a micro-batch has at least 64 tiles, the weight standardised and transformed on every call (R50x1's
step 7-13 % faster on AVX2, 3-5 % on AVX-512). BIT_TRANSFER_WINOGRAD=0 turns it off everywhere.

oneDNN comes from the package registry (`onednn-cpu-gomp` and `onednn-devel-cpu-gomp`: the
library built with GNU OpenMP, the runtime MindSpore already loads, and its headers), installed into
the environment's prefix. Two oneDNNs live in one process: MindSpore's own (2.8: libdnnl.so.2,
oneDNN 2.2; 2.10: libdnnl.so.3, oneDNN 3.10) and ours. Ours is a private copy of the wheel's
library under another soname (`private_library`: the loader reuses a loaded soname, so linking the
wheel's libdnnl.so.3 ran our kernels on MindSpore 2.10's oneDNN), a dependency of our kernel library
alone (which MindSpore loads with RTLD_LOCAL), and that library exports only its kernel entry points
(-fvisibility=hidden); tests/kernels/test_onednn.py checks which oneDNN our kernels call, that both
answer in one process and that neither is global.

Used only where the compiled CPU kernels are (CPU the only device, BIT_TRANSFER_CPU_KERNELS not 0),
for float32, when oneDNN 3 is installed and the library builds; BIT_TRANSFER_ONEDNN=0 turns these
off alone. Otherwise models use NCHW and `ops.conv2d` (one line on stderr says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

from bit_transfer import settings
from bit_transfer.kernels import build as cpu_kernels
from bit_transfer.system import files

from bit_transfer.kernels import ops as kernel_ops

SOURCE = cpu_kernels.CSRC / "onednn_conv.cc"
# For this CPU (cpu_kernels.target_flags: -march=native, AVX-512 off where oneDNN is capped below it)
# and -fopenmp: the weight standardisation loops run here, vectorised (at O3: a pragma in SOURCE), on
# the OpenMP team oneDNN uses (GNU OpenMP, the runtime of both oneDNNs); the library is keyed by the
# target. -O1 elsewhere: the wrapper only binds buffers and calls oneDNN, and -O3 for the whole file
# took 2.1 s to build against 1.1 s (every first run waits for it).
FLAGS = ["-O1", "-fopenmp", "-std=c++17", "-fvisibility=hidden", "-shared", "-fPIC"]
INSTALL = "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0"
PRIVATE_SONAME = "libbtdn.so.3"  # as long as libdnnl.so.3 (soname.rename), and no oneDNN's


def prefix() -> Path | None:
    """Where oneDNN 3's headers and libdnnl.so.3 are: $DNNLROOT (oneDNN's own convention), else this
    Python environment (where the wheels put them)."""
    for root in (os.environ.get("DNNLROOT"), sys.prefix):
        if root and (Path(root) / "include/oneapi/dnnl/dnnl.hpp").is_file() and (Path(root) / "lib/libdnnl.so.3").exists():
            return Path(root)
    return None


def private_library(root: Path, version: str) -> Path:
    """A copy of this prefix's libdnnl.so.3 renamed libbtdn.so.3 (its soname too), in a folder of
    settings.home()/kernels keyed by the oneDNN version header and the file's size and time: the loader
    reuses a loaded soname, and MindSpore 2.10 loads its own libdnnl.so.3 (oneDNN 3.10) first. The
    folder records the wheel's file, so the copy of a reinstalled wheel is pruned (kernels/build.py)."""
    from bit_transfer.kernels import soname

    wheel = (root / "lib/libdnnl.so.3").resolve()
    stat = wheel.stat()
    key = hashlib.sha256(f"{version}\n{wheel}\n{stat.st_size} {stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = settings.home() / "kernels"
    copy = cache / f"onednn-{key}" / PRIVATE_SONAME
    if files.touch(copy):  # touched first: a prune elsewhere spares what was used within the hour
        cpu_kernels.prune_daily(cache)
        return copy
    try:
        cache.mkdir(parents=True, exist_ok=True)
        cpu_kernels.prune(cache)  # before writing 54 MB: room on a full disk
        copy.parent.mkdir(exist_ok=True)
        work = files.private_workdir(cache, copy.parent.name)
        try:
            shutil.copyfile(wheel, work / PRIVATE_SONAME)
            soname.rename(work / PRIVATE_SONAME, PRIVATE_SONAME)
            cpu_kernels.record_source(copy.parent, wheel)  # a reinstalled wheel makes this copy prunable
            files.publish(work / PRIVATE_SONAME, copy, mode=0o755)  # concurrent processes write the same bytes
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except soname.NotALibrary as e:
        raise RuntimeError(f"{wheel}: {e}") from None
    except OSError as e:
        raise cpu_kernels.CacheUnwritable(f"cannot write the kernel cache {copy.parent} ({e.strerror or e})") from None
    return copy


def _build() -> Path | None:
    """The kernel library linked against a private copy of this prefix's oneDNN (`private_library`; rpath:
    no LD_LIBRARY_PATH), keyed by the oneDNN version header and the copy's folder too, so a new oneDNN
    rebuilds it. Raises RuntimeError saying why not."""
    root = prefix()
    if root is None:
        raise RuntimeError(f"oneDNN 3 not installed ({INSTALL})")
    version = (root / "include/oneapi/dnnl/dnnl_version.h").read_text(errors="replace")
    dnnl = private_library(root, version)
    flags = [*FLAGS, f"-I{root / 'include'}"]
    lib = cpu_kernels.build("onednn_conv", SOURCE, flags, [str(dnnl), f"-Wl,-rpath,{dnnl.parent}", "-ldl"],
                            extra=" ".join(version.split()))
    if lib is None:
        raise RuntimeError("no C++ compiler (g++) found")
    return lib


@functools.cache
def library() -> Path | None:
    """The built kernel library, or None where MindSpore's convolutions must be used (one line on stderr
    when oneDNN or the compiler is missing or the build fails)."""
    if not settings.onednn() or not kernel_ops.available():
        return None
    cpu_kernels.wait_for_build("onednn_conv")
    try:
        return _build()
    except RuntimeError as e:
        cpu_kernels.notice(f"oneDNN convolutions unavailable ({e}); convolutions use MindSpore's built-in op, "
                           f"about 1.3x slower training on CPU; {cpu_kernels.fallback_fix(e, 'BIT_TRANSFER_ONEDNN=0')}")
        return None


def prebuild() -> None:
    """Compile both kernel libraries (cpu_kernels' and this one) in the background, side by side, at
    the start of a CPU run: a first run's start-up then pays ~1 s of compile instead of both in turn
    when the model is built. Nothing happens where the kernels are switched off."""
    if not settings.cpu_kernels():
        return
    cpu_kernels.build_in_background("cpu_kernels", cpu_kernels.build)
    if settings.onednn() and prefix() is not None:
        cpu_kernels.build_in_background("onednn_conv", _build)


@functools.cache
def conv_primitive(stride: int, pad: int, same: bool, residual: bool = False, standardise: bool = False):
    """`(x (N,H,W,C), w (O,C,kh,kw), cfg) -> y (N,OH,OW,O)` float32 (channels-last activations; or
    blocked: x (N,C/8,H,W,8) -> y (N,O/8,OH,OW,8)), the
    convolution with this stride and padding (`same`: TF-SAME from the input size; else `pad` on
    every side), whose bprop runs oneDNN's backward-data and backward-weights kernels (two ops: a
    gradient nobody reads, the stem's input, is dropped from the graph). `cfg` is `config(...)`.
    `residual`: `(x, w, r, cfg) -> conv(x, w) + r`, the add done by the convolution as it writes y
    (a residual block's last conv: no separate pass over the activations).
    `standardise` (BiT's StdConv2d): `(x, w, [r,] eps, cfg) -> (y, mean, rstd)`, the convolution
    with w standardised per output channel inside the kernels (forward and both backwards write or
    read oneDNN's blocked layouts directly), mean/rstd (O,) its statistics; the gradient is the raw
    weight's. None where unavailable."""
    lib = library()
    if lib is None:
        return None

    def fwd_shape(x, w, *_):  # channels-last (N, H, W, C) or blocked (N, C/8, H, W, 8)
        if len(x) == 5:
            return [x[0], w[0] // 8, kernel_ops.out_size(x[2], w[2], stride, pad, same),
                    kernel_ops.out_size(x[3], w[3], stride, pad, same), 8]
        return [x[0], kernel_ops.out_size(x[1], w[2], stride, pad, same),
                kernel_ops.out_size(x[2], w[3], stride, pad, same), w[0]]

    op = (_standardising_conv if standardise else _plain_conv)(lib, fwd_shape, residual)
    # MindSpore caches a Custom op's inferred shape by its function and attributes: without this,
    # two geometries of one function shared the first one's output shape (PyNative).
    op.add_prim_attr("geometry", f"{stride},{pad},{int(same)},{int(residual)}")
    return op


def _standardising_conv(lib: Path, fwd_shape, residual: bool):
    import mindspore as ms
    from mindspore import ops

    f32 = lambda *_: ms.float32  # noqa: E731
    data = ops.Custom(f"{lib}:conv_ws_bwd_data", out_shape=lambda dy, w, m, r, x, cfg: x, out_dtype=f32,
                      func_type="aot")
    weights = ops.Custom(f"{lib}:conv_ws_bwd_weights", out_shape=lambda dy, x, w, m, r, cfg: w, out_dtype=f32,
                         func_type="aot")

    # The bprops call the ops themselves: a helper function between them (a closure called from
    # a closure) failed once to compile, "The name 'data' is not defined" (MindSpore 2.8).
    def bprop(x, w, eps, cfg, out, dout):
        return (data(dout[0], w, out[1], out[2], x, cfg), weights(dout[0], x, w, out[1], out[2], cfg),
                ops.zeros_like(eps), ops.zeros_like(cfg))

    def bprop_residual(x, w, r, eps, cfg, out, dout):
        return (data(dout[0], w, out[1], out[2], x, cfg), weights(dout[0], x, w, out[1], out[2], cfg), dout[0],
                ops.zeros_like(eps), ops.zeros_like(cfg))

    return ops.Custom(f"{lib}:conv_ws_fwd", out_shape=lambda x, w, *_: (fwd_shape(x, w), (w[0],), (w[0],)),
                      out_dtype=lambda *_: (ms.float32, ms.float32, ms.float32), func_type="aot",
                      bprop=bprop_residual if residual else bprop)


def _plain_conv(lib: Path, fwd_shape, residual: bool):
    import mindspore as ms
    from mindspore import ops

    f32 = lambda *_: ms.float32  # noqa: E731
    data = ops.Custom(f"{lib}:conv_bwd_data", out_shape=lambda dy, w, x, cfg: x, out_dtype=f32, func_type="aot")
    weights = ops.Custom(f"{lib}:conv_bwd_weights", out_shape=lambda dy, x, w, cfg: w, out_dtype=f32,
                         func_type="aot")

    def bprop(x, w, cfg, out, dout):
        return data(dout, w, x, cfg), weights(dout, x, w, cfg), ops.zeros_like(cfg)

    def bprop_residual(x, w, r, cfg, out, dout):
        return data(dout, w, x, cfg), weights(dout, x, w, cfg), dout, ops.zeros_like(cfg)

    return ops.Custom(f"{lib}:conv_fwd", out_shape=fwd_shape, out_dtype=f32, func_type="aot",
                      bprop=bprop_residual if residual else bprop)


def clear_caches() -> None:
    """Forget the library and its primitives (tests: after changing the environment or the cache home),
    together: primitives of one library beside another library's packed weights would disagree."""
    library.cache_clear()
    conv_primitive.cache_clear()


def _loaded() -> ctypes.CDLL | None:
    """The kernel library MindSpore runs (dlopen of one path gives one copy), for its plain C entries."""
    lib = library()
    return None if lib is None else ctypes.CDLL(str(lib))


def onednn_path() -> Path | None:
    """The oneDNN file our kernels call into (as the loader bound them), None without the library."""
    lib = _loaded()
    if lib is None:
        return None
    lib.onednn_library.restype = ctypes.c_char_p
    return Path(lib.onednn_library().decode())


def forget_packed() -> None:
    """Drop every packed inference weight (`config(..., packed=True)`): call after rewriting the
    weights such convolutions read (FoldedResNetV2.refresh does) or when their model goes. A no-op
    without the library."""
    lib = _loaded()
    if lib is not None:
        lib.conv_forget()


def training_winograd_tile(x_shape, w_shape, stride: int, pad: int, same: bool, backward_data: bool = False) -> int:
    """The Winograd tile (4: F(4x4, 3x3), 2: F(2x2, 3x3), 0: oneDNN's direct kernels) the training
    convolution (`standardise=True`) runs for activations shaped `x_shape` (in their layout) and an
    (O, C, kh, kw) weight: its forward (and backward-weights, which follows it), or its
    backward-data. 0 without the library."""
    lib = _loaded()
    if lib is None:
        return 0
    x, w = (ctypes.c_int64 * len(x_shape))(*x_shape), (ctypes.c_int64 * 4)(*w_shape)
    cfg = (ctypes.c_int32 * 4)(stride, pad, int(same), 0)
    return int(lib.conv_ws_winograd_tile(x, len(x_shape), w, cfg, int(backward_data)))


def activation_block() -> int:
    """8 where models should keep activations in oneDNN's blocked nChw8c layout (AVX2 machines: the
    convolutions run ~10 % faster there), 0 for channels-last (AVX-512) or without the library."""
    lib = _loaded()
    return 0 if lib is None else int(lib.onednn_activation_block())


def packed_bytes() -> int:
    """Bytes of packed inference weights held now (0 without the library)."""
    lib = _loaded()
    if lib is None:
        return 0
    lib.conv_packed_bytes.restype = ctypes.c_int64
    return int(lib.conv_packed_bytes())


def config(stride: int, pad: int, same: bool, packed: bool = False):
    """The kernels' geometry input: int32 [stride, pad, same, packed]. `packed` (inference weights,
    fixed until `forget_packed()`): the forward reorders each weight into oneDNN's blocked layout
    once and keeps that copy (a second copy of the weights; ~7 % faster R50x1 inference), or, for
    a 3x3 stride-1 convolution Winograd suits, its Winograd transform (4x or 1.8x the bytes)."""
    import mindspore as ms

    return ms.Tensor([stride, pad, int(same), int(packed)], ms.int32)
