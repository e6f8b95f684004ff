"""The kernels' facade for models: cells that run a BiT layer's maths on the fastest path this host has.

Each cell picks, once, between oneDNN's convolutions with our kernels in a oneDNN layout (CPU,
float32), our NCHW kernels (CPU, float32) and MindSpore's own ops (every device and precision); the
model (models/resnetv2.py) only says what it computes. `nhwc` (and the stem's `block`) are set by
`ResNetV2.set_layout` before compiling. `Conv` and `GroupNormAct` are the base classes of the model's
layers, which own the Parameters (`weight`, `bias`): parameter names stay the model's, and under mixed
precision (amp O2 casts a cell's inputs) the float32 weights are read, not passed in and cast.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from bit_transfer.kernels import onednn, ops as kernel_ops

WS_EPS = 1e-10  # official bit_pytorch StdConv2d; transformers/timm use 1e-8 (immaterial)
GN_EPS = 1e-5


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dim.

    Same arithmetic as transformers' `DynamicPad2d` (models/bit/modeling_bit.py): total pad
    max((ceil(size/stride) - 1) * stride + kernel - size, 0), the odd pixel goes after.
    """
    total = max((size + stride - 1) // stride * stride - stride + kernel - size, 0)
    return total // 2, total - total // 2


def zero_pad(x, top: int, bottom: int, left: int, right: int):
    """Zero-pad H and W of an NCHW tensor by concatenating zero blocks.

    Not `ops.pad`: on MindSpore 2.8's CPU a compiled backward through it followed by the stem's
    max-pool deadlocks for small maps (tests/models/test_models.py), and `ops.Pad` is ~4x slower
    (docs/performance.md).
    """
    n, c, h, w = x.shape
    if top or bottom:
        parts = [ops.zeros((n, c, top, w), x.dtype)] if top else []
        parts += [x] + ([ops.zeros((n, c, bottom, w), x.dtype)] if bottom else [])
        x = ops.concat(parts, 2)
        h = h + top + bottom
    if left or right:
        parts = [ops.zeros((n, c, h, left), x.dtype)] if left else []
        parts += [x] + ([ops.zeros((n, c, h, right), x.dtype)] if right else [])
        x = ops.concat(parts, 3)
    return x


def conv_geometry(kernel: int, stride: int, padding: str) -> tuple[int, int, bool, int]:
    """(kernel, stride, dynamic, pad): TF-SAME pads a strided conv from the input size at run time
    (`dynamic`); everything else pads kernel//2 on every side, as the official code."""
    dynamic = padding == "same" and stride > 1
    return kernel, stride, dynamic, 0 if dynamic else kernel // 2


def padded_conv(x, w, kernel: int, stride: int, dynamic: bool, pad: int):
    """MindSpore's convolution with BiT's padding: TF-SAME from the input size when `dynamic`
    (padding "same", stride 2), else `pad` on every side."""
    if dynamic:
        top, bottom = same_pad(x.shape[2], kernel, stride)
        left, right = same_pad(x.shape[3], kernel, stride)
        if top + bottom + left + right > 0:
            x = zero_pad(x, top, bottom, left, right)
    if w.dtype != x.dtype:  # fp16 (amp O2): convolve in x's dtype; standardise in float32
        w = w.astype(x.dtype)
    return ops.conv2d(x, w, None, stride, "pad", pad)


class Conv(nn.Cell):
    """conv(x, self.weight) (+ residual) with BiT's padding; with `standardise`, of the standardised
    weight (w - mean) / sqrt(var + 1e-10) per output channel, computed in the graph (training).
    `packed` (inference, a fixed weight): oneDNN keeps a blocked copy of it between calls. Subclasses
    set `self.weight` (O, I, kh, kw)."""

    def __init__(self, kernel: int, stride: int, padding: str, standardise: bool, packed: bool = False):
        super().__init__()
        self.kernel, self.stride, self.dynamic, self.pad = conv_geometry(kernel, stride, padding)
        self.standardise = standardise
        self.nhwc = False  # ResNetV2.set_layout; a layer on its own takes NCHW
        self.conv_op = onednn.conv_primitive(stride, self.pad, self.dynamic, False, standardise)
        if self.conv_op is not None:  # constants, not Parameters: names and checkpoints unchanged
            self.conv_add_op = onednn.conv_primitive(stride, self.pad, self.dynamic, True, standardise)
            self.conv_cfg = onednn.config(stride, self.pad, self.dynamic, packed)
        self.ws_kernel = kernel_ops.weight_standardisation_primitive() if standardise else None
        self.ws_eps = Tensor([WS_EPS], ms.float32)

    def construct(self, x, residual=None):
        # self.weight is read where it is used, never through a local: under amp O2 (cell flag fp16)
        # MindSpore 2.8 then handed GroupNorm a float16 copy of float32 parameters (tests/commands).
        if self.nhwc:  # oneDNN (only set where conv_op exists); a standardising op takes eps
            if self.standardise:
                if residual is None:
                    return self.conv_op(x, self.weight, self.ws_eps, self.conv_cfg)[0]
                return self.conv_add_op(x, self.weight, residual, self.ws_eps, self.conv_cfg)[0]
            if residual is None:
                return self.conv_op(x, self.weight, self.conv_cfg)
            return self.conv_add_op(x, self.weight, residual, self.conv_cfg)
        # float32 kernels; amp models: the op
        w = self.standardised_weight(x.dtype == ms.float32) if self.standardise else self.weight
        y = padded_conv(x, w, self.kernel, self.stride, self.dynamic, self.pad)
        return y if residual is None else y + residual

    def standardised_weight(self, kernel: bool = True):
        """The standardised weight: a one-group GroupNorm of the (O, 1, I*kh*kw) view (fused, ~2x less
        memory than a mean/var composite), or our kernel on the weight in place. models/inference.py
        folds it once from here, so inference uses the very values the training graph computes."""
        if self.ws_kernel is not None and kernel:
            return self.ws_kernel(self.weight, self.ws_eps)[0]
        shape = self.weight.shape
        return ops.group_norm(self.weight.reshape(shape[0], 1, -1), 1, None, None, WS_EPS).reshape(shape)


def kernel_group_norm(kernel, x, groups: int, gamma, beta, eps):
    """GroupNorm through our NCHW kernel: same maths as `ops.group_norm`. Computes in float32,
    returns x's dtype."""
    n, c = x.shape[0], x.shape[1]
    y = kernel(x.astype(ms.float32).reshape(n * groups, c // groups, -1), gamma.astype(ms.float32),
               beta.astype(ms.float32), eps)[0]
    return y.reshape(x.shape).astype(x.dtype)


class GroupNormAct(nn.Cell):
    """GroupNorm (eps 1e-5) of `groups` groups, then ReLU if `act`; subclasses set `self.weight` and
    `self.bias` (gamma and beta)."""

    def __init__(self, groups: int, act: bool):
        super().__init__()
        self.groups, self.act = groups, act
        self.gn_kernel = kernel_ops.group_norm_primitive(relu=act)  # ReLU fused into the kernel
        self.gn_kernel_nhwc = kernel_ops.group_norm_primitive(relu=act, groups=groups)
        self.nhwc = False  # ResNetV2.set_layout: the oneDNN layouts (float32, compiled kernels only)
        self.eps = Tensor([GN_EPS], ms.float32)

    def construct(self, x):
        if self.nhwc:  # the kernel's (N, CB, HW, L): channels-last (N, H, W, C) or blocked (N, C/8, H, W, 8)
            blocks = (x.shape[0], x.shape[1], x.shape[2] * x.shape[3], x.shape[4]) if x.ndim == 5 else \
                (x.shape[0], 1, x.shape[1] * x.shape[2], x.shape[3])
            return self.gn_kernel_nhwc(x.reshape(blocks), self.weight, self.bias, self.eps)[0].reshape(x.shape)
        # Our kernels serve float32 models only (under fp16 on CPU they trained nothing); half-precision
        # models use MindSpore's op, as on accelerators.
        if self.gn_kernel is not None and x.dtype == ms.float32:
            return kernel_group_norm(self.gn_kernel, x, self.groups, self.weight, self.bias, self.eps)
        # In float32 under fp16/bf16: GroupNorm's type inference refuses a half-precision input with
        # float32 weights, and its statistics want the range.
        x = ops.group_norm(x.astype(ms.float32), self.groups, self.weight, self.bias, GN_EPS).astype(x.dtype)
        return ops.relu(x) if self.act else x


class ImagesIn(nn.Cell):
    """NCHW images into the model's layout (channels-last for oneDNN)."""

    def __init__(self):
        super().__init__()
        self.nhwc = False

    def construct(self, x):
        return x.transpose(0, 2, 3, 1) if self.nhwc else x


class StemPool(nn.Cell):
    """The stem's max-pool 3x3/2 on zero-padded input: "fixed" pads 1 (official), "same" TF-SAME. In
    the oneDNN layouts our channels-last kernel, then (nchw8c) the blocks of 8 channels."""

    def __init__(self, padding: str):
        super().__init__()
        self.dynamic = padding == "same"
        self.pool = ops.MaxPool(kernel_size=3, strides=2, pad_mode="VALID")
        self.nhwc = False
        self.block = 0  # ResNetV2.set_layout: 8 to hand on oneDNN's blocked nChw8c
        pad = 0 if self.dynamic else 1
        self.pool_nhwc = kernel_ops.max_pool_primitive(3, 2, pad, self.dynamic)
        self.pool_cfg = Tensor([3, 2, pad, int(self.dynamic)], ms.int32)

    def construct(self, x):
        if self.nhwc:
            y = self.pool_nhwc(x, self.pool_cfg)[0]
            if self.block:  # (N, H, W, C) -> (N, C/8, H, W, 8); after the pool, on 4x fewer pixels
                n, h, w, c = y.shape
                y = y.reshape(n, h, w, c // self.block, self.block).transpose(0, 3, 1, 2, 4)
            return y
        if self.dynamic:
            top, bottom = same_pad(x.shape[2], 3, 2)
            left, right = same_pad(x.shape[3], 3, 2)
            if top + bottom + left + right > 0:
                x = zero_pad(x, top, bottom, left, right)
        else:
            x = zero_pad(x, 1, 1, 1, 1)
        return self.pool(x)


class GlobalPool(nn.Cell):
    """Global average pool of the last activations into (N, C), from any layout."""

    def __init__(self):
        super().__init__()
        self.nhwc = False
        self.block = 0

    def construct(self, x):
        if self.block:  # (N, C/8, H, W, 8) -> (N, C/8, 8) -> (N, C): channel c/8 * 8 + c%8
            return x.mean(axis=(2, 3)).reshape(x.shape[0], -1)
        return x.mean(axis=(1, 2) if self.nhwc else (2, 3))
