"""ONNX export of a BiT model, and running an exported file with ONNX Runtime.

The graph is written node by node with the `onnx` package from the model's structure and its
weights (weight standardisation folded, models/inference.py), not by MindSpore's exporter: that one
has no GroupNorm conversion ("Exporting GroupNorm operator is not yet supported" in 2.8), cannot
export the compiled CPU kernels, and traces one input shape, while the TF-"SAME" padding of
`google/bit-*` checkpoints depends on the input size.

The file (opset 17, IR version 8: ONNX Runtime >= 1.13 on every platform) has
- input `images`: float32 [batch, 3, height, width], NCHW, values in [-1, 1]; batch, height and width
  are free (symbolic);
- one output, `logits` [batch, num_classes];
- `metadata_props`: class_names (JSON list, or null), image_size (the training resolution),
  preprocessing (JSON), padding, model (JSON config), num_classes, bit_transfer_version, inputs, outputs.

Numerics, layer by layer (bit_pytorch / transformers' modeling_bit):
- conv: the standardised weight as a constant; fixed padding pads kernel // 2 on every side; "same"
  pads stride-2 convs TF-style from the input size at run time (`same_pad` in kernels/layers.py: total
  max((ceil(n / s) - 1) * s + k - n, 0), the odd pixel after, zeros: transformers' DynamicPad2d);
  Conv's `auto_pad` is not used (deprecated in the ONNX spec);
- GroupNorm (eps 1e-5): Reshape to (N, groups, -1) -> InstanceNormalization (no affine) -> Reshape
  back -> per-channel Mul/Add. Not `GroupNormalization`: ONNX Runtime's kernel (opset 21) computes
  the variance as E[x^2] - E[x]^2 in float32, 1e-3 off for activations with a mean of 30 and 0.09 at
  300 (measured, ORT 1.32); InstanceNormalization stays within float32 rounding of a float64
  reference there (1e-5, 1e-4);
- stem pool: zero pad (fixed: 1 on every side; same: TF-SAME from the size) then MaxPool 3x3/2
  without padding: the stem output can be negative, and MaxPool's own padding would be -inf;
- head: global average pool, Flatten, Gemm (transB).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bit_transfer.errors import UsageError
from bit_transfer.models.resnetv2 import GN_EPS, ResNetV2, model_config

OPSET = 17
IR_VERSION = 8
INPUT, LOGITS = "images", "logits"
# Protobuf files stop at 2 GB: larger models (R152x4, R101x3 ...) keep their weights in a side file.
EXTERNAL_DATA_BYTES = 1 << 30
DATA_SUFFIX = ".data"
INSTALL = "pip install 'bit-transfer[deploy]'"


class MissingDependency(UsageError):
    """onnx or onnxruntime is not installed."""


def require(module: str):
    """Import onnx or onnxruntime, or one line saying how to install them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"ONNX {'export' if module == 'onnx' else 'inference'} needs the {module} "
                                f"package: {INSTALL}") from None


def preprocessing(image_size: int) -> dict:
    """What an image goes through before the network: the eval transform of training (data/pipeline.py)."""
    return {
        "description": (f"RGB; resize (bilinear, aspect not kept) to {image_size} x {image_size}; x / 255; "
                        "(x - 0.5) / 0.5, i.e. values in [-1, 1]; HWC -> CHW; float32; batch as NCHW"),
        "resize": [image_size, image_size],
        "resample": "bilinear",
        "rescale_factor": 1 / 255,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "color": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
    }


def metadata(model: ResNetV2, image_size: int, class_names=None) -> dict[str, str]:
    """The `metadata_props` of an exported file (all values are strings; JSON where structured)."""
    from bit_transfer.settings import VERSION as __version__

    if class_names is not None and len(class_names) != model.num_classes:
        raise UsageError(f"{len(class_names)} class names for a {model.num_classes}-class head; "
                         "pass exactly one name per class")
    return {
        "class_names": json.dumps(list(map(str, class_names)) if class_names else None),
        "num_classes": str(model.num_classes),
        "image_size": str(int(image_size)),
        "preprocessing": json.dumps(preprocessing(int(image_size))),
        "padding": model.padding,
        "model": json.dumps(model_config(model)),
        "bit_transfer_version": __version__,
        "inputs": f"{INPUT}: float32 [batch, 3, height, width] (NCHW) in [-1, 1]; any batch and size",
        "outputs": f"{LOGITS}: float32 [batch, num_classes]",
    }


def build_onnx(model: ResNetV2, image_size: int, class_names=None, extra: dict[str, str] | None = None):
    """The onnx.ModelProto of `model` (a training or a folded ResNetV2), weights inline; `extra`: more
    metadata_props (the model card's facts, models/card.py)."""
    onnx = require("onnx")
    from bit_transfer.models.inference import inference_arrays

    g = _Graph(onnx, inference_arrays(model))
    same = model.padding == "same"
    x = g.root(same)
    for s, stage in enumerate(model.stages):
        for u, unit in enumerate(stage.units):
            x = g.unit(x, f"stages.{s}.units.{u}", unit, same)
    x = g.group_norm(x, "norm", model.norm.groups, relu=True)
    pooled = g.node("GlobalAveragePool", [x], "pool")
    features = g.node("Flatten", [pooled], "features", axis=1)
    g.node("Gemm", [features, g.const("head.weight"), g.const("head.bias")], LOGITS, transB=1)

    helper, TP = onnx.helper, onnx.TensorProto
    graph = helper.make_graph(
        g.nodes, "bit",
        [helper.make_tensor_value_info(INPUT, TP.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info(LOGITS, TP.FLOAT, ["batch", model.num_classes])],
        g.initializers,
    )
    from bit_transfer.settings import VERSION as __version__

    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bit-transfer",
                              producer_version=__version__,
                              doc_string=f"BiT {model.model_name}: images NCHW float32 in [-1, 1] -> logits")
    proto.ir_version = IR_VERSION
    helper.set_model_props(proto, metadata(model, image_size, class_names) | (extra or {}))
    return proto


class _Graph:
    """Nodes and initializers of the graph being written, with BiT's building blocks."""

    def __init__(self, onnx, arrays: dict):
        self.onnx, self.arrays = onnx, arrays
        self.nodes, self.initializers, self._consts = [], [], {}

    def const(self, name: str, value=None) -> str:
        """An initializer: a model weight by name, or `value` (an array) under `name`."""
        if name not in self._consts:
            a = self.arrays[name] if value is None else np.asarray(value)
            self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(a), name))
            self._consts[name] = name
        return name

    def node(self, op: str, inputs, name: str, out: str | None = None, **attrs) -> str:
        out = out or name
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    # ------------------------------------------------------------------ layers
    def conv(self, x: str, name: str, kernel: int, stride: int, same: bool) -> str:
        """A BiT conv (weights already standardised): fixed pads kernel // 2; same + stride 2 pads TF-SAME."""
        if same and stride > 1:
            if kernel > 1:  # a 1x1 conv never needs a SAME pad: (ceil(n/s) - 1) * s + 1 - n <= 0
                x = self.same_pad(x, f"{name}.pad", kernel, stride)
            pads = [0, 0, 0, 0]
        else:
            pads = [kernel // 2] * 4
        return self.node("Conv", [x, self.const(f"{name}.weight")], name, kernel_shape=[kernel, kernel],
                         strides=[stride, stride], pads=pads)

    def same_pad(self, x: str, name: str, kernel: int, stride: int) -> str:
        """Zero-pad H and W TF-SAME for (kernel, stride) from x's run-time size (DynamicPad2d)."""
        i64 = np.int64
        hw = self.node("Slice", [self.node("Shape", [x], f"{name}.shape"), self.const("i64.2", np.array([2], i64)),
                                 self.const("i64.4", np.array([4], i64))], f"{name}.hw")
        s = self.const(f"i64.{stride}", np.array([stride], i64))
        out = self.node("Div", [self.node("Add", [hw, self.const(f"i64.{stride - 1}", np.array([stride - 1], i64))],
                                          f"{name}.hw_plus"), s], f"{name}.out")  # ceil(n / s), n > 0
        span = self.node("Add", [self.node("Mul", [self.node("Sub", [out, self.const("i64.1", np.array([1], i64))],
                                                             f"{name}.out_1"), s], f"{name}.span0"),
                                 self.const(f"i64.{kernel}", np.array([kernel], i64))], f"{name}.span")
        total = self.node("Max", [self.node("Sub", [span, hw], f"{name}.need"), self.const("i64.0", np.array([0], i64))],
                          f"{name}.total")
        before = self.node("Div", [total, self.const("i64.2", np.array([2], i64))], f"{name}.before")
        after = self.node("Sub", [total, before], f"{name}.after")
        zeros = self.const("i64.0,0", np.zeros(2, i64))
        pads = self.node("Concat", [zeros, before, zeros, after], f"{name}.pads", axis=0)
        return self.node("Pad", [x, pads, self.const("f32.0", np.array(0, np.float32))], name, mode="constant")

    def group_norm(self, x: str, name: str, groups: int, relu: bool) -> str:
        """GroupNorm(groups, eps 1e-5) with affine, then ReLU: Reshape + InstanceNormalization + Mul/Add."""
        c = len(self.arrays[f"{name}.weight"])
        grouped = self.node("Reshape", [x, self.const(f"shape.groups{groups}", np.array([0, groups, -1], np.int64))],
                            f"{name}.grouped")
        normed = self.node("InstanceNormalization", [grouped, self.const(f"ones{groups}", np.ones(groups, np.float32)),
                                                     self.const(f"zeros{groups}", np.zeros(groups, np.float32))],
                           f"{name}.normed", epsilon=GN_EPS)
        y = self.node("Reshape", [normed, self.node("Shape", [x], f"{name}.shape")], f"{name}.ungrouped")
        y = self.node("Mul", [y, self.const(f"{name}.scale", self.arrays[f"{name}.weight"].reshape(c, 1, 1))],
                      f"{name}.mul")
        y = self.node("Add", [y, self.const(f"{name}.shift", self.arrays[f"{name}.bias"].reshape(c, 1, 1))],
                      f"{name}.add")
        return self.node("Relu", [y], f"{name}.relu") if relu else y

    def root(self, same: bool) -> str:
        """7x7/2 conv, zero pad, MaxPool 3x3/2 (models/resnetv2.py Root)."""
        x = self.conv(INPUT, "root.conv", 7, 2, same)
        if same:
            x = self.same_pad(x, "root.pool.pad", 3, 2)
        else:
            x = self.node("Pad", [x, self.const("pads.1", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
                                  self.const("f32.0", np.array(0, np.float32))], "root.pool.pad", mode="constant")
        return self.node("MaxPool", [x], "root.pool", kernel_shape=[3, 3], strides=[2, 2])

    def unit(self, x: str, name: str, unit, same: bool) -> str:
        """Pre-activation bottleneck (models/resnetv2.py PreActBottleneck)."""
        stride = unit.conv2.stride
        out = self.group_norm(x, f"{name}.norm1", unit.norm1.groups, relu=True)
        shortcut = self.conv(out, f"{name}.proj", 1, stride, same) if unit.has_proj else x
        y = self.conv(out, f"{name}.conv1", 1, 1, same)
        y = self.conv(self.group_norm(y, f"{name}.norm2", unit.norm2.groups, relu=True), f"{name}.conv2", 3, stride,
                      same)
        y = self.conv(self.group_norm(y, f"{name}.norm3", unit.norm3.groups, relu=True), f"{name}.conv3", 1, 1, same)
        return self.node("Add", [y, shortcut], f"{name}.add")


def save_onnx(proto, path: Path, write, external: bool | None = None) -> list[Path]:
    """Write `proto` to `path` with `write(path, fn)` (export.py's atomic 0644 writer); models over
    EXTERNAL_DATA_BYTES (or external=True) keep their weights in `<path>.data` next to it, written first.
    Returns the files written."""
    onnx = require("onnx")
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if external is None:
        external = size > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + DATA_SUFFIX)
    if not external:
        write(path, lambda tmp: tmp.write_bytes(proto.SerializeToString()), size)
        return [path]
    from onnx.external_data_helper import set_external_data

    def write_data(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for t in proto.graph.initializer:
                if len(t.raw_data) < 1024:
                    continue
                offset = f.tell()
                f.write(t.raw_data)
                set_external_data(t, data.name, offset=offset, length=len(t.raw_data))
                t.data_location = onnx.TensorProto.EXTERNAL
                t.ClearField("raw_data")

    write(data, write_data, size)
    write(path, lambda tmp: tmp.write_bytes(proto.SerializeToString()), None)
    return [data, path]


# ---------------------------------------------------------------------- running an exported file
class OnnxModel:
    """An exported `.onnx` file in ONNX Runtime (CPU), with what its metadata says.

        m = OnnxModel("export/model.onnx")
        logits = m(x)              # x: float32 (N, 3, H, W) in [-1, 1] -> (N, num_classes)
        m.class_names, m.image_size, m.preprocessing, m.metadata
    """

    def __init__(self, path, providers=None):
        ort = require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"{self.path} not found; pass the model.onnx that bit-transfer export --format onnx wrote")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # a truncated or foreign file: ONNX Runtime's own errors are many lines
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"{self.path} is not a readable ONNX model ({first[:200]}); export it again") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        names = json.loads(self.metadata.get("class_names", "null"))
        self.class_names = list(names) if names else None
        self.image_size = int(self.metadata["image_size"]) if self.metadata.get("image_size") else None
        self.preprocessing = json.loads(self.metadata["preprocessing"]) if "preprocessing" in self.metadata else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise UsageError(f"ONNX input must be float32 (N, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        return self.session.run([LOGITS], {INPUT: x})[0]


def load_onnx(path, providers=None) -> OnnxModel:
    """Open an exported .onnx for inference (see OnnxModel)."""
    return OnnxModel(path, providers)

