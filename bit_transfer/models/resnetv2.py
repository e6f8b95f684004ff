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

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from bit_transfer.data.pixels import unit_range
from bit_transfer.errors import UsageError
from bit_transfer.kernels import layers as kernels
from bit_transfer.kernels import layout as layouts
from bit_transfer.kernels.layers import GN_EPS, WS_EPS  # noqa: F401 (the model's constants, re-exported)
from bit_transfer.models.archs import ARCHS, CUSTOM, MODELS, canonical_name, list_models  # noqa: F401 (re-exported)

MAX_GROUPS = layouts.MAX_GROUPS
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


class StdConv2d(kernels.Conv):
    """Weight-standardised conv, no bias: w <- (w - mean) / sqrt(var + 1e-10) per output channel.

    Standardising inside the graph keeps the stored weight the raw one, as in every official
    checkpoint (and as the optimiser sees it).
    `padding="fixed"` pads kernel//2 on every side (official); `"same"` pads TF-SAME from the
    input size when the stride is 2 (transformers' `global_padding: SAME`).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: str = "fixed"):
        super().__init__(kernel, stride, padding, standardise=True)
        self.weight = Parameter(Tensor.from_numpy(_he_normal((cout, cin, kernel, kernel))))


class GroupNormAct(kernels.GroupNormAct):
    """GroupNorm (eps 1e-5, gcd(32, channels) groups), optionally followed by ReLU."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(gn_groups(channels), act)
        self.weight = Parameter(Tensor(np.ones(channels, np.float32)))
        self.bias = Parameter(Tensor(np.zeros(channels, np.float32)))


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
        self.images_in = kernels.ImagesIn()
        self.conv = conv(3, cout, 7, 2, padding)
        self.pool = kernels.StemPool(padding)

    stop_grad = False  # ResNetV2.freeze_to: the frozen part ends here

    def construct(self, x):
        if x.dtype == ms.uint8:  # pixels as the pipelines give them (a constant when compiled)
            x = unit_range(x)
        y = self.pool(self.conv(self.images_in(x)))
        return ops.stop_gradient(y) if self.stop_grad else y


class ResNetV2(nn.Cell):
    """BiT ResNet-v2: NCHW float32 in [-1, 1] (or uint8 pixels 0..255) -> logits (N, num_classes).

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
        self.pool = kernels.GlobalPool()
        self.num_features = cin
        self.num_classes = 0
        self.reset_head(num_classes)
        self.channels = [root, *mids, *(4 * m for m in mids)]
        self.nhwc, self.block, self.layout = False, 0, "nchw"
        self.set_layout("auto")

    def set_layout(self, layout: str = "auto") -> None:
        """The activations' layout from the stem to the pooling (kernels/layout.py): "nhwc" or "nchw8c"
        (oneDNN with our kernels, CPU float32) or "nchw" (MindSpore's ops, every device); "auto": the
        fastest here. Set before compiling; `step.cast_model` sets NCHW for fp16."""
        layout = layouts.resolve(layout, self.channels)
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
        """NCHW images -> pre-logits (N, num_features): after the final GroupNorm+ReLU, global average pool."""
        x = self.root(x)
        for stage in self.stages:
            x = stage(x)
        x = self.pool(self.norm(x))
        return ops.stop_gradient(x) if self.stop_features else x

    def construct(self, x):
        return self.head(self.forward_features(x))


# Registry: name -> (depths, width) lives in bit_transfer/models/archs.py (MindSpore-free, for recipe checks).
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
