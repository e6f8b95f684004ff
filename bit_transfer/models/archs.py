"""BiT model names -> architectures (depths, width), without MindSpore.

The table lives here rather than in `models/resnetv2.py` so that recipes can check `model.name`
while `bit-transfer plan` still never imports MindSpore (importing anything under
`bit_transfer.models` imports it). `models.resnetv2` re-exports these names.
"""

from __future__ import annotations

import difflib

from bit_transfer.errors import UsageError

# BiT-S (ILSVRC-2012) and BiT-M (ImageNet-21k) share architectures.
ARCHS = {
    "R50x1": ([3, 4, 6, 3], 1),
    "R50x3": ([3, 4, 6, 3], 3),
    "R101x1": ([3, 4, 23, 3], 1),
    "R101x3": ([3, 4, 23, 3], 3),
    "R152x2": ([3, 8, 36, 3], 2),
    "R152x4": ([3, 8, 36, 3], 4),
}
MODELS = {f"BiT-{s}-{a}": arch for s in ("S", "M") for a, arch in ARCHS.items()}
CUSTOM = "BiT-custom"


def list_models() -> list[str]:
    """Registry names accepted by `create_model` (plus "custom" with explicit depths and width)."""
    return list(MODELS)


def canonical_name(name: str) -> str:
    """Case-insensitive registry lookup; "custom" and "BiT-custom" map to BiT-custom.

    An unknown name raises UsageError with the closest known name and the full list.
    """
    lookup = {n.lower(): n for n in MODELS}
    lookup.update({"custom": CUSTOM, CUSTOM.lower(): CUSTOM})
    key = str(name).lower()
    if key in lookup:
        return lookup[key]
    close = difflib.get_close_matches(key, list(lookup), n=1, cutoff=0.6)
    hint = f" (did you mean '{lookup[close[0]]}'?)" if close else ""
    raise UsageError(
        f"unknown model {name!r}{hint}; use one of {', '.join(MODELS)} or 'custom' with model.depths and model.width"
    )


def parameter_counts(depths, width: float, num_classes: int | None) -> dict[str, int]:
    """Parameters per part (stem, stage1..stage4, norm, head) of a ResNetV2, counted without building it
    (`bit-transfer plan` prints what `train.freeze` leaves trainable; tests check it against the model)."""
    root = int(round(64 * width))
    mids = [int(round(64 * 2**i * width)) for i in range(4)]
    counts, cin = {"stem": 49 * 3 * root}, root
    for s, (depth, m) in enumerate(zip(depths, mids)):
        cout, n = 4 * m, 0
        for u in range(depth):
            c = cin if u == 0 else cout
            n += 2 * c + c * m + 2 * m + 9 * m * m + 2 * m + m * cout  # norm1 conv1 norm2 conv2 norm3 conv3
            if u == 0 and (s > 0 or c != cout):  # the projection shortcut: stride 2 or new channels
                n += c * cout
        counts[f"stage{s + 1}"], cin = n, cout
    counts["norm"] = 2 * cin
    counts["head"] = (cin + 1) * num_classes if num_classes else 0
    return counts


def frozen_parts(freeze: str) -> list[str]:
    """The parts (parameter_counts' keys) that `train.freeze: freeze` leaves untrained."""
    order = ["stem", "stage1", "stage2", "stage3", "stage4"]
    if freeze == "none":
        return []
    if freeze == "backbone":
        return [*order, "norm"]
    return order[: order.index(freeze) + 1]
