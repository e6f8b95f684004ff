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
