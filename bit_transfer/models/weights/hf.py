"""Hugging Face `BitForImageClassification` layout: parameter names and `config.json`.

Facts from transformers' `models/bit/modeling_bit.py` and `configuration_bit.py`:
- names `bit.embedder.convolution.weight`, `bit.encoder.stages.S.layers.L.{norm1,conv1,...}`,
  `...layers.0.downsample.conv.weight`, `bit.norm.*`, `classifier.1.*` (a Linear, (C, F));
- stage outputs are `make_div(hidden_sizes[i] * width_factor)`, mids `make_div(out / 4)`,
  the stem has `embedding_size` channels and every GroupNorm has `num_groups` groups;
- `global_padding: SAME` pads a conv TF-style ("dynamic") only when its stride is 2 (stride-1
  3x3 convs get the static pad 1) and drops the stem's constant pad 1;
  `embedding_dynamic_padding: true` TF-SAME zero-pads the stem max-pool instead.
  `global_padding: null` + `embedding_dynamic_padding: false` is the official fixed padding.
"""

from __future__ import annotations

import re

from bit_transfer.errors import WeightsError
from bit_transfer.models.resnetv2 import channels_for, gn_groups

# (our-name regex, HF name template) and back; groups are stage, unit, layer.
_TO_HF = [
    (r"root\.conv\.weight", r"bit.embedder.convolution.weight"),
    (r"stages\.(\d+)\.units\.(\d+)\.proj\.weight", r"bit.encoder.stages.\1.layers.\2.downsample.conv.weight"),
    (r"stages\.(\d+)\.units\.(\d+)\.((?:norm[123]|conv[123])\.(?:weight|bias))", r"bit.encoder.stages.\1.layers.\2.\3"),
    (r"norm\.(weight|bias)", r"bit.norm.\1"),
    (r"head\.(weight|bias)", r"classifier.1.\1"),
]
_FROM_HF = [
    (r"bit\.embedder\.convolution\.weight", r"root.conv.weight"),
    (r"bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.downsample\.conv\.weight", r"stages.\1.units.\2.proj.weight"),
    (r"bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.((?:norm[123]|conv[123])\.(?:weight|bias))", r"stages.\1.units.\2.\3"),
    (r"bit\.norm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.1\.(weight|bias)", r"head.\1"),
]


def _rename(name: str, table) -> str | None:
    for pattern, repl in table:
        m = re.fullmatch(pattern, name)
        if m:
            return m.expand(repl)
    return None


def to_hf_name(name: str) -> str:
    hf = _rename(name, _TO_HF)
    if hf is None:
        raise KeyError(name)
    return hf


def from_hf_name(name: str) -> str | None:
    """Our name for an HF key, or None if it is not a BiT classification parameter."""
    return _rename(name, _FROM_HF)


def make_div(value: float, divisor: int = 8) -> int:
    """transformers' channel rounding (modeling_bit.make_div)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def parse_config(config: dict, source: str) -> dict:
    """config.json -> {depths, width, padding, num_classes, class_names} for create_model."""

    def bad(what: str):
        raise WeightsError(f"{source}: {what}; only BiT classification checkpoints (like google/bit-50) are supported")

    if config.get("model_type", "bit") != "bit":
        bad(f"model_type is {config.get('model_type')!r}, not 'bit'")
    if config.get("layer_type", "preactivation") != "preactivation":
        bad(f"layer_type {config.get('layer_type')!r} is the ViT-hybrid backbone, not BiT's pre-activation ResNet")
    if config.get("hidden_act", "relu") != "relu" or config.get("num_channels", 3) != 3:
        bad("hidden_act must be relu and num_channels 3")
    if config.get("output_stride", 32) != 32:
        bad(f"output_stride {config.get('output_stride')} (dilated stages) is not BiT")
    gp = (config.get("global_padding") or "").upper()
    dyn = bool(config.get("embedding_dynamic_padding", False))
    if (gp, dyn) == ("", False):
        padding = "fixed"
    elif (gp, dyn) == ("SAME", True):
        padding = "same"
    else:
        bad(f"padding global_padding={gp or None}, embedding_dynamic_padding={dyn} is not one we reproduce "
            "(null/false = official fixed, SAME/true = google/bit-*)")
    depths = list(config.get("depths", [3, 4, 6, 3]))
    hidden = list(config.get("hidden_sizes", [256, 512, 1024, 2048]))
    wf = config.get("width_factor", 1)
    outs = [make_div(h * wf) for h in hidden]
    mids = [make_div(o * 0.25) for o in outs]
    root = int(config.get("embedding_size", 64))
    width = root / 64
    width = int(width) if width.is_integer() else width
    our_root, our_mids = channels_for(width)
    if len(depths) != 4 or (root, mids, outs) != (our_root, our_mids, [4 * m for m in our_mids]):
        bad(f"embedding_size {root}, hidden_sizes {hidden} x width_factor {wf} do not follow BiT's 64/256/512/1024/2048 x width")
    groups = int(config.get("num_groups", 32))
    if any(gn_groups(c) != groups for c in [root, *mids, *outs]):
        bad(f"num_groups {groups} differs from BiT's rule (32 groups, fewer only for layers narrower than 32)")
    labels = config.get("id2label") or {}
    num_classes = int(config.get("num_labels", len(labels) or 0)) or None
    names = [labels.get(str(i), labels.get(i)) for i in range(len(labels))] if labels else None
    return {"depths": depths, "width": width, "padding": padding, "num_classes": num_classes, "class_names": names}


def build_config(model, class_names=None) -> dict:
    """config.json for `BitForImageClassification` that rebuilds `model` exactly."""
    root, mids = channels_for(model.width)
    outs = [4 * m for m in mids]
    groups = {gn_groups(c) for c in [root, *mids, *outs]}
    if len(groups) != 1 or any(make_div(o) != o or make_div(o * 0.25) != m for o, m in zip(outs, mids)):
        raise WeightsError(
            f"width {model.width} cannot be expressed as a Hugging Face BitConfig (it needs channels that are "
            "multiples of 8 and one GroupNorm group count); export a model with width >= 0.5"
        )
    n = model.num_classes
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(n)]
    if len(names) != n:
        raise WeightsError(f"{len(names)} class names for a {n}-class head; pass exactly one name per class")
    return {
        "architectures": ["BitForImageClassification"],
        "model_type": "bit",
        "num_channels": 3,
        "embedding_size": root,
        "hidden_sizes": outs,
        "depths": list(model.depths),
        "width_factor": 1,
        "layer_type": "preactivation",
        "hidden_act": "relu",
        "num_groups": groups.pop(),
        "global_padding": "SAME" if model.padding == "same" else None,
        "embedding_dynamic_padding": model.padding == "same",
        "output_stride": 32,
        "drop_path_rate": 0.0,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "torch_dtype": "float32",
    }
