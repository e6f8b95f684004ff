"""Our CPU kernels as MindSpore primitives (`ops.Custom`, func_type "aot"): GroupNorm (optionally with
the following ReLU fused in), weight standardisation, the stem's zero-padded max-pool on channels-last
activations, each with its backward, and the all-finite gradient check (csrc/cpu_kernels.cc).

Same maths as MindSpore's ops, faster on CPU and keeping the fused op's memory: the backward passes
read only the per-row mean and 1/std (docs/performance.md has the measurements). Float32 only. Each
`*_primitive()` returns None where MindSpore's ops must be used: another device, no compiler, a failed
build (one plain line on stderr says why, once), or BIT_TRANSFER_CPU_KERNELS=0.
"""

from __future__ import annotations

import functools
from pathlib import Path

from bit_transfer import settings
from bit_transfer.kernels import build as kernel_build


def _gn_name(relu: bool, nhwc: bool) -> str:
    """The GroupNorm kernel's name in SOURCE (its entry points add _fwd / _bwd) and in _ops()."""
    return ("gn_relu" if relu else "gn") + ("_nhwc" if nhwc else "")


@functools.cache
def _library() -> Path | None:
    """The built kernel library, or None where MindSpore's ops must be used (one line on stderr when it
    cannot be built)."""
    if not settings.cpu_kernels():
        return None
    from bit_transfer.system import device as runtime

    if runtime.available_devices() != ("CPU",):
        return None
    kernel_build.wait_for_build("cpu_kernels")
    error = None
    try:
        lib = kernel_build.build()
    except RuntimeError as e:
        lib, error = None, e
    if lib is None:
        why = str(error) if error else "no C++ compiler (g++) found"
        kernel_build.notice(f"compiled CPU kernels unavailable ({why}); GroupNorm uses MindSpore's built-in op, "
                            f"about 2x slower training on CPU; {kernel_build.fallback_fix(error, 'BIT_TRANSFER_CPU_KERNELS=0')}")
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
