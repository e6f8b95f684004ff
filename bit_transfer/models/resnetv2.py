"""BiT ResNet-v2 (pre-activation, GroupNorm + Weight Standardisation) in MindSpore.

Follows the authors' `bit_pytorch/models.py` (google-research/big_transfer) layer for layer;
see docs/models.md for the parameter names, the padding modes and the narrow-width rule.

Parameter names (stable: checkpoints and optimiser state use them):
    root.conv.weight                                  7x7/2 stem conv, OIHW
    stages.{s}.units.{u}.norm1.{weight,bias}          GroupNorm before the unit (pre-activation)
    stages.{s}.units.{u}.conv1.weight                 1x1
    stages.{s}.units.{u}.norm2.{weight,bias}
    stages.{s}.units.{u}.conv2.weight                 3x3, carries the stride
    stages.{s}.units.{u}.norm3.{weight,bias}
    stages.{s}.units.{u}.conv3.weight                 1x1
    stages.{s}.units.0.proj.weight                    1x1 projection shortcut (first unit only)
    norm.{weight,bias}                                final GroupNorm (pre-logits)
    head.{weight,bias}                                classifier, weight (num_classes, num_features)
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from bit_transfer.errors import UsageError
from bit_transfer import cpu_kernels, onednn_conv
from bit_transfer.archs import ARCHS, CUSTOM, MODELS, canonical_name, list_models  # noqa: F401 (re-exported)

WS_EPS = 1e-10  # official bit_pytorch StdConv2d; transformers/timm use 1e-8 (immaterial)
GN_EPS = 1e-5
MAX_GROUPS = 32
PADDINGS = ("fixed", "same")
FREEZE_PARTS = ("none", "stem", "stage1", "stage2", "stage3", "stage4", "backbone")  # = recipe.FREEZE
STAGE_STRIDES = (1, 2, 2, 2)


def frozen_prefixes(part: str) -> tuple[str, ...]:
    """Parameter-name prefixes `train.freeze: part` leaves untrained (stem = root.*, stageN = stages.N-1.*)."""
    if part == "backbone":
        return ("root.", "stages.", "norm.")
    depth = FREEZE_PARTS.index(part)
    return (("root.",) if depth else ()) + tuple(f"stages.{i}." for i in range(depth - 1))


def gn_groups(channels: int) -> int:
    """GroupNorm groups for a layer: gcd(32, channels).

    Every layer of a width >= 1 BiT model has a multiple of 64 channels, so this is exactly
    32 groups there (the published architecture). Narrow test models (width < 1) get the
    largest group count <= 32 that divides the channels, e.g. 16 channels -> 16 groups.
    """
    return math.gcd(MAX_GROUPS, channels)


def channels_for(width: float) -> tuple[int, list[int]]:
    """(root channels, mid channels per stage) for a width factor; outputs are 4x mid."""
    root = int(round(64 * width))
    mids = [int(round(64 * 2**i * width)) for i in range(4)]
    if root < 1:
        raise UsageError(f"model width {width} is too small: 64 x width must be at least 1 channel; use width >= 1/64")
    return root, mids


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dim.

    Same arithmetic as transformers' `DynamicPad2d` (models/bit/modeling_bit.py): total pad
    max((ceil(size/stride) - 1) * stride + kernel - size, 0), the odd pixel goes after.
    """
    total = max((size + stride - 1) // stride * stride - stride + kernel - size, 0)
    return total // 2, total - total // 2


def _he_normal(shape) -> np.ndarray:
    """He-normal (fan_out, ReLU) init as in transformers/timm, drawn in float32.

    Several times faster than MindSpore's float64 initialisers, which matters for R152x4
    (936 M parameters). Seeded from NumPy's global RNG, so mindspore.set_seed makes it repeatable.
    """
    rng = np.random.default_rng(np.random.randint(2**31))
    fan_out = shape[0] * shape[2] * shape[3]
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= math.sqrt(2.0 / fan_out)
    return w


def kernel_group_norm(kernel, x, groups: int, gamma, beta, eps):
    """GroupNorm through the compiled CPU kernel (bit_transfer/cpu_kernels.py): same maths as
    `ops.group_norm`, ~5x faster forward+backward there. Computes in float32, returns x's dtype."""
    n, c = x.shape[0], x.shape[1]
    y = kernel(x.astype(ms.float32).reshape(n * groups, c // groups, -1), gamma.astype(ms.float32),
               beta.astype(ms.float32), eps)[0]
    return y.reshape(x.shape).astype(x.dtype)


def zero_pad(x, top: int, bottom: int, left: int, right: int):
    """Zero-pad H and W of an NCHW tensor by concatenating zero blocks.

    Not the functional `ops.pad`: in MindSpore 2.8 on CPU, a compiled backward through
    `ops.pad` followed by the stem's max-pool deadlocks on the 5th call for maps under 14 px
    (reproduced in tests/test_models.py::test_small_inputs_train_repeatedly_under_jit). Not the
    `ops.Pad` primitive either: its CPU kernel took 28 ms of a ~950 ms R50x1 training step for the
    stem's 1-pixel pad (batch 8, 128 px); concat and its slice backward take ~1/4 of that.
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


def channels_last_available() -> bool:
    """Whether models built now run channels-last on oneDNN (CPU, float32; onednn_conv.library())."""
    return (onednn_conv.library() is not None and cpu_kernels.group_norm_primitive(groups=MAX_GROUPS) is not None
            and cpu_kernels.max_pool_primitive(3, 2, 1, False) is not None)


# Activation layouts: MindSpore's ops (every device, fp16), or oneDNN's convolutions with our
# kernels around them, channels-last or blocked in 8 channels (AVX2; onednn_conv.activation_block).
LAYOUTS = ("nchw", "nhwc", "nchw8c")


def in_eights(channels) -> bool:
    """Whether nchw8c can hold these channel counts (blocks of 8, no padded channels)."""
    return all(c % 8 == 0 for c in channels)


def best_layout(channels) -> str:
    """The fastest layout available here for a model with these channel counts, unless
    BIT_TRANSFER_LAYOUT names one (nchw, nhwc; nchw8c where the channels come in 8s)."""
    if not channels_last_available():
        return "nchw"
    chosen = os.environ.get("BIT_TRANSFER_LAYOUT", "")
    if chosen not in LAYOUTS:
        chosen = "nchw8c" if onednn_conv.activation_block() == 8 else "nhwc"
    return "nhwc" if chosen == "nchw8c" and not in_eights(channels) else chosen


class ConvLayer(nn.Cell):
    """What StdConv2d and the inference layer (models/inference.py) share: the geometry and the
    convolution op, oneDNN's (bit_transfer/onednn_conv.py, float32 on CPU, padding inside the
    kernel) where it is available, else `ops.conv2d` after our own padding."""

    packed = False  # inference layers: oneDNN keeps a blocked copy of the fixed weight
    standardise = False  # StdConv2d: its oneDNN ops standardise the weight inside the kernels

    def __init__(self, kernel: int, stride: int, padding: str):
        super().__init__()
        self.kernel, self.stride, self.dynamic, self.pad = conv_geometry(kernel, stride, padding)
        self.nhwc = False  # ResNetV2.set_layout; a layer on its own takes NCHW
        self.conv_op = onednn_conv.conv_primitive(stride, self.pad, self.dynamic, False, self.standardise)
        if self.conv_op is not None:  # a constant, not a Parameter: names and checkpoints unchanged
            self.conv_add_op = onednn_conv.conv_primitive(stride, self.pad, self.dynamic, True, self.standardise)
            self.conv_cfg = onednn_conv.config(stride, self.pad, self.dynamic, self.packed)

    def convolve(self, x, w, residual=None):
        """conv(x, w), plus `residual` when given (a bottleneck's last conv adds its shortcut).
        Channels-last, a standardising layer calls its ops itself (they take eps, give statistics)."""
        if self.nhwc:  # oneDNN, channels-last (only set where conv_op exists)
            if residual is None:
                return self.conv_op(x, w, self.conv_cfg)
            return self.conv_add_op(x, w, residual, self.conv_cfg)
        y = padded_conv(x, w, self.kernel, self.stride, self.dynamic, self.pad)
        return y if residual is None else y + residual


class StdConv2d(ConvLayer):
    """Weight-standardised conv, no bias: w <- (w - mean) / sqrt(var + 1e-10) per output channel.

    Standardising inside the graph keeps the stored weight the raw one, as in every official
    checkpoint (and as the optimiser sees it).
    `padding="fixed"` pads kernel//2 on every side (official); `"same"` pads TF-SAME from the
    input size when the stride is 2 (transformers' `global_padding: SAME`).
    """

    standardise = True

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: str = "fixed"):
        super().__init__(kernel, stride, padding)
        self.weight = Parameter(Tensor.from_numpy(_he_normal((cout, cin, kernel, kernel))))
        self.ws_kernel = cpu_kernels.weight_standardisation_primitive()
        if self.ws_kernel is not None:  # a constant, not a Parameter: names and checkpoints unchanged
            self.ws_eps = Tensor([WS_EPS], ms.float32)

    def construct(self, x, residual=None):
        if self.nhwc:  # the standardised weight goes straight into oneDNN's blocked layouts
            if residual is None:
                return self.conv_op(x, self.weight, self.ws_eps, self.conv_cfg)[0]
            return self.conv_add_op(x, self.weight, residual, self.ws_eps, self.conv_cfg)[0]
        # Per-output-channel standardisation is a one-group GroupNorm of the (O, 1, I*kh*kw)
        # view: fused kernels make the training step faster and use ~2x less memory than a
        # mean/var/rsqrt composite (benchmarks/model_speed.py --ws composite). The compiled CPU
        # kernel works on the (O, I, kh, kw) weight in place (the reshapes copied ~2 % of a step).
        w = self.standardised_weight(x.dtype == ms.float32)  # float32 kernels; amp models: the op
        return self.convolve(x, w, residual)

    def standardised_weight(self, kernel: bool = True):
        """The standardised weight the layer convolves with; models/inference.py folds it once from here,
        so inference uses the very values the training graph computes."""
        w = self.weight
        if self.ws_kernel is not None and kernel:
            return self.ws_kernel(w, self.ws_eps)[0]
        return ops.group_norm(w.reshape(w.shape[0], 1, -1), 1, None, None, WS_EPS).reshape(w.shape)


def padded_conv(x, w, kernel: int, stride: int, dynamic: bool, pad: int):
    """The convolution of a BiT layer with its padding: TF-SAME zero pad from the input size when
    `dynamic` (padding "same", stride 2), else `pad` on every side. Shared by the training layer
    (StdConv2d) and the inference layer with folded weights (models/inference.py)."""
    if dynamic:
        top, bottom = _same_pad(x.shape[2], kernel, stride)
        left, right = _same_pad(x.shape[3], kernel, stride)
        if top + bottom + left + right > 0:
            x = zero_pad(x, top, bottom, left, right)
    if w.dtype != x.dtype:  # fp16 (amp O2): convolve in x's dtype; standardise in float32
        w = w.astype(x.dtype)
    return ops.conv2d(x, w, None, stride, "pad", pad)


class GroupNormAct(nn.Cell):
    """GroupNorm (eps 1e-5), optionally followed by ReLU.

    Uses a fused kernel: on CPU `ops.group_norm` made the R50x1 training step ~1.75x faster with
    ~3.5x less memory than a reshape/mean/var composite (benchmarks/model_speed.py --gn composite),
    and the compiled kernel of bit_transfer/cpu_kernels.py (used where it builds) is faster again.
    """

    def __init__(self, channels: int, act: bool = True):
        super().__init__()
        self.groups = gn_groups(channels)
        self.act = act
        self.weight = Parameter(Tensor(np.ones(channels, np.float32)))
        self.bias = Parameter(Tensor(np.zeros(channels, np.float32)))
        self.gn_kernel = cpu_kernels.group_norm_primitive(relu=act)  # ReLU fused into the kernel
        self.gn_kernel_nhwc = cpu_kernels.group_norm_primitive(relu=act, groups=self.groups)
        self.nhwc = False  # ResNetV2.set_layout: the oneDNN layouts (float32, compiled kernels only)
        if self.gn_kernel is not None:
            self.eps = Tensor([GN_EPS], ms.float32)

    def construct(self, x):
        if self.nhwc:  # the kernel's (N, CB, HW, L): channels-last (N, H, W, C) or blocked (N, C/8, H, W, 8)
            blocks = (x.shape[0], x.shape[1], x.shape[2] * x.shape[3], x.shape[4]) if x.ndim == 5 else \
                (x.shape[0], 1, x.shape[1] * x.shape[2], x.shape[3])
            y = self.gn_kernel_nhwc(x.reshape(blocks), self.weight, self.bias, self.eps)[0]
            return y.reshape(x.shape)
        # The compiled kernels are float32 kernels and serve float32 models: under fp16 (amp O2) on
        # CPU they trained nothing (zero features; tests/test_train.py::test_fp16_trains...), so
        # half-precision models use MindSpore's op, as on accelerators.
        if self.gn_kernel is not None and x.dtype == ms.float32:
            return kernel_group_norm(self.gn_kernel, x, self.groups, self.weight, self.bias, self.eps)
        # In float32 under fp16/bf16: GroupNorm's type inference refuses a half-precision input with
        # float32 weights, and its statistics want the range.
        x = ops.group_norm(x.astype(ms.float32), self.groups, self.weight, self.bias, GN_EPS).astype(x.dtype)
        return ops.relu(x) if self.act else x


class PreActBottleneck(nn.Cell):
    """Pre-activation bottleneck: x' = relu(gn1(x)); out = conv3(conv2(conv1(x'))) + shortcut.

    The shortcut is proj(x') (1x1, strided) when the stride or the channels change, else x.
    The stride sits on the 3x3 conv, as in the official code.
    """

    def __init__(self, cin: int, cout: int, cmid: int, stride: int, padding: str, conv=StdConv2d):
        super().__init__()
        self.norm1 = GroupNormAct(cin)
        self.conv1 = conv(cin, cmid, 1, padding=padding)
        self.norm2 = GroupNormAct(cmid)
        self.conv2 = conv(cmid, cmid, 3, stride, padding)
        self.norm3 = GroupNormAct(cmid)
        self.conv3 = conv(cmid, cout, 1, padding=padding)
        self.has_proj = stride != 1 or cin != cout
        if self.has_proj:
            self.proj = conv(cin, cout, 1, stride, padding)

    def construct(self, x):
        out = self.norm1(x)
        shortcut = self.proj(out) if self.has_proj else x
        out = self.conv1(out)
        out = self.conv2(self.norm2(out))
        return self.conv3(self.norm3(out), shortcut)  # conv3(...) + shortcut, the add inside the conv


class Stage(nn.Cell):
    def __init__(self, cin: int, cout: int, cmid: int, depth: int, stride: int, padding: str, conv=StdConv2d):
        super().__init__()
        units = [PreActBottleneck(cin, cout, cmid, stride, padding, conv)]
        units += [PreActBottleneck(cout, cout, cmid, 1, padding, conv) for _ in range(depth - 1)]
        self.units = nn.CellList(units)

    stop_grad = False  # ResNetV2.freeze_to: the frozen part ends here

    def construct(self, x):
        for unit in self.units:
            x = unit(x)
        return ops.stop_gradient(x) if self.stop_grad else x


class Root(nn.Cell):
    """7x7/2 WS conv, then max-pool 3x3/2.

    fixed (official): conv pad 3, zero-pad 1, pool without padding ("subtly not the same" as
    a padded max-pool, the official comment says: the pre-activation stem output can be negative).
    same (transformers, global_padding SAME + embedding_dynamic_padding): TF-SAME pad for the
    conv, and TF-SAME zero pad for the pool.
    """

    def __init__(self, cout: int, padding: str, conv=StdConv2d):
        super().__init__()
        self.dynamic = padding == "same"
        self.conv = conv(3, cout, 7, 2, padding)
        self.pool = ops.MaxPool(kernel_size=3, strides=2, pad_mode="VALID")
        self.nhwc = False  # ResNetV2.set_layout: oneDNN's conv and our zero-padded pool, channels-last
        self.block = 0  # ResNetV2.set_layout: 8 to hand on oneDNN's blocked nChw8c
        pad = 0 if self.dynamic else 1
        self.pool_nhwc = cpu_kernels.max_pool_primitive(3, 2, pad, self.dynamic)
        if self.pool_nhwc is not None:
            self.pool_cfg = Tensor([3, 2, pad, int(self.dynamic)], ms.int32)

    stop_grad = False  # ResNetV2.freeze_to: the frozen part ends here

    def construct(self, x):
        y = self._stem(x)
        return ops.stop_gradient(y) if self.stop_grad else y

    def _stem(self, x):
        if self.nhwc:  # NCHW images in, channels-last (or blocked) out
            y = self.pool_nhwc(self.conv(x.transpose(0, 2, 3, 1)), self.pool_cfg)[0]
            if self.block:  # (N, H, W, C) -> (N, C/8, H, W, 8); after the pool, on 4x fewer pixels
                n, h, w, c = y.shape
                y = y.reshape(n, h, w, c // self.block, self.block).transpose(0, 3, 1, 2, 4)
            return y
        x = self.conv(x)
        if self.dynamic:
            top, bottom = _same_pad(x.shape[2], 3, 2)
            left, right = _same_pad(x.shape[3], 3, 2)
            if top + bottom + left + right > 0:
                x = zero_pad(x, top, bottom, left, right)
        else:
            x = zero_pad(x, 1, 1, 1, 1)
        return self.pool(x)


class ResNetV2(nn.Cell):
    """BiT ResNet-v2: NCHW float32 in [-1, 1] -> logits (N, num_classes).

    `forward_features` gives the pre-logits (after the final GroupNorm, ReLU and global
    average pool) for linear probes and few-shot; `head` is a Dense layer, which is the
    official 1x1 head conv applied to the 1x1 pooled map. `conv` builds every convolution: StdConv2d
    (training: weight standardisation in the graph) or models/inference.py's FoldedConv2d (inference).
    """

    stop_features = False  # freeze_to("backbone"): no backward through the features

    def __init__(self, depths, width: float, num_classes: int, padding: str = "fixed", name: str = "BiT-custom",
                 conv=StdConv2d):
        super().__init__()
        if padding not in PADDINGS:
            raise UsageError(f"unknown padding {padding!r}; use one of {', '.join(PADDINGS)}")
        if len(depths) != 4 or min(depths) < 1:
            raise UsageError(f"model depths must be 4 positive stage depths like [3, 4, 6, 3], got {list(depths)}")
        self.model_name = name
        self.depths = [int(d) for d in depths]
        self.width = width
        self.padding = padding
        root, mids = channels_for(width)
        self.root = Root(root, padding, conv)
        stages, cin = [], root
        for depth, cmid, stride in zip(self.depths, mids, STAGE_STRIDES):
            stages.append(Stage(cin, 4 * cmid, cmid, depth, stride, padding, conv))
            cin = 4 * cmid
        self.stages = nn.CellList(stages)
        self.norm = GroupNormAct(cin)
        self.num_features = cin
        self.num_classes = 0
        self.reset_head(num_classes)
        self.channels = [root, *mids, *(4 * m for m in mids)]
        self.nhwc, self.block, self.layout = False, 0, "nchw"
        self.set_layout("auto")

    def set_layout(self, layout: str = "auto") -> None:
        """The activations' layout from the stem's convolution to the pooling (LAYOUTS): "nhwc"
        channels-last or "nchw8c" blocked (oneDNN convolutions with our GroupNorm and max-pool kernels
        around them: bit_transfer/onednn_conv.py, cpu_kernels.py), or "nchw" (MindSpore's ops, every
        device); "auto": the fastest here (`best_layout`). Inputs (NCHW images) and outputs are the
        same either way. Set before compiling; `step.cast_model` sets NCHW for fp16. A oneDNN layout
        where oneDNN is missing falls back to NCHW."""
        if layout not in (*LAYOUTS, "auto"):
            raise ValueError(f"layout {layout!r}: one of {', '.join(LAYOUTS)} or auto")
        if layout == "auto" or (layout != "nchw" and not channels_last_available()):
            layout = best_layout(self.channels)
        if layout == "nchw8c" and not in_eights(self.channels):
            raise ValueError(f"layout nchw8c needs multiples of 8 channels, not {self.channels}")
        for _, cell in self.cells_and_names():
            if hasattr(cell, "nhwc"):
                cell.nhwc = layout != "nchw"
            if hasattr(cell, "block"):
                cell.block = 8 if layout == "nchw8c" else 0
        self.layout = layout

    @contextlib.contextmanager
    def builtin_ops(self):
        """MindSpore's own ops only (NCHW convolutions, `ops.group_norm`), e.g. for a MindIR file that
        leaves this host: a compiled kernel is a Custom aot op naming a .so under this machine's kernel
        cache, which MindSpore Lite or another machine cannot load. Restores the kernels afterwards."""
        kept = [(c, a, getattr(c, a)) for _, c in self.cells_and_names() for a in ("gn_kernel", "ws_kernel")
                if hasattr(c, a)]
        layout = self.layout
        self.set_layout("nchw")
        for c, a, _ in kept:
            setattr(c, a, None)
        try:
            yield self
        finally:
            for c, a, k in kept:
                setattr(c, a, k)
            self.set_layout(layout)

    def reset_head(self, num_classes: int) -> None:
        """Zero-initialised head (weight and bias), as BiT-HyperRule fine-tuning prescribes.

        Same size: zeroed in place, so graphs compiled before see it. A new size makes a new
        Dense cell: do that before compiling (a compiled graph keeps the cell it was built with).
        """
        if int(num_classes) < 1:
            raise UsageError(f"num_classes must be a positive integer, got {num_classes}")
        if int(num_classes) == self.num_classes:
            for p in self.head.get_parameters():
                ops.assign(p, ops.zeros(p.shape, p.dtype))
            return
        self.num_classes = int(num_classes)
        self.head = nn.Dense(self.num_features, self.num_classes, weight_init="zeros", bias_init="zeros")

    def freeze_backbone(self, frozen: bool = True) -> None:
        """requires_grad=False on every non-head parameter (linear probe); pass only
        `model.trainable_params()` to the optimiser."""
        self.freeze_to("backbone" if frozen else "none")

    def freeze_to(self, part: str) -> None:
        """`train.freeze`: requires_grad=False on the stem up to and including `part` (FREEZE_PARTS), and
        the backward pass cut where the frozen part ends (stop_gradient: nothing below is computed).
        Set before compiling; pass only `model.trainable_params()` to the optimiser."""
        if part not in FREEZE_PARTS:
            raise UsageError(f"freeze {part!r}: one of {', '.join(FREEZE_PARTS)}")
        frozen = frozen_prefixes(part)
        for p in self.get_parameters():
            p.requires_grad = not p.name.startswith(frozen)
        depth = FREEZE_PARTS.index(part)  # 0 none, 1 stem, 2..5 stage1..stage4, 6 backbone
        self.root.stop_grad = depth == 1
        for i, stage in enumerate(self.stages):
            stage.stop_grad = depth == i + 2
        self.stop_features = depth == len(FREEZE_PARTS) - 1

    def forward_features(self, x):
        x = self.root(x)  # NCHW in; self.layout out
        for stage in self.stages:
            x = stage(x)
        x = self.norm(x)
        if self.block:  # (N, C/8, H, W, 8) -> (N, C/8, 8) -> (N, C): channel c/8 * 8 + c%8
            x = x.mean(axis=(2, 3)).reshape(x.shape[0], -1)
        else:
            x = x.mean(axis=(1, 2) if self.nhwc else (2, 3))
        return ops.stop_gradient(x) if self.stop_features else x

    def construct(self, x):
        return self.head(self.forward_features(x))


# Registry: name -> (depths, width) lives in bit_transfer/archs.py (MindSpore-free, for recipe checks).
def create_model(name: str, num_classes: int, *, depths=None, width=None, padding: str = "fixed") -> ResNetV2:
    """Build a BiT model with a zero-initialised head; depths/width override the registry entry."""
    name = canonical_name(name)
    reg_depths, reg_width = MODELS.get(name, (None, None))
    depths = list(depths) if depths is not None else reg_depths
    width = width if width is not None else reg_width
    if depths is None or width is None:
        raise UsageError("model 'custom' needs both model.depths (e.g. [1, 1, 1, 1]) and model.width (e.g. 0.25)")
    if not isinstance(width, (int, float)) or width <= 0:
        raise UsageError(f"model width must be a positive number, got {width!r}")
    width = int(width) if float(width).is_integer() else float(width)
    return ResNetV2(depths, width, num_classes, padding, name)


def model_config(model: ResNetV2) -> dict:
    """Keys name, num_classes, depths, width, padding: `create_model(**model_config(m))` rebuilds m."""
    return {
        "name": model.model_name,
        "num_classes": model.num_classes,
        "depths": list(model.depths),
        "width": model.width,
        "padding": model.padding,
    }
