"""Activation layouts: MindSpore's own ops in NCHW (every device, every precision), or oneDNN's
convolutions with our kernels around them, channels-last ("nhwc") or blocked in 8 channels ("nchw8c",
faster on AVX2). Inputs (NCHW images) and outputs (features, logits) are the same in every layout."""

from __future__ import annotations

from bit_transfer import settings
from bit_transfer.kernels import onednn, ops as kernel_ops

LAYOUTS = ("nchw", "nhwc", "nchw8c")
MAX_GROUPS = 32  # GroupNorm's groups in every BiT layer of width >= 1


def channels_last_available() -> bool:
    """Whether models built now run channels-last on oneDNN (CPU, float32, the libraries built)."""
    return (onednn.library() is not None and kernel_ops.group_norm_primitive(groups=MAX_GROUPS) is not None
            and kernel_ops.max_pool_primitive(3, 2, 1, False) is not None)


def in_eights(channels) -> bool:
    """Whether nchw8c can hold these channel counts (blocks of 8, no padded channels)."""
    return all(c % 8 == 0 for c in channels)


def best_layout(channels) -> str:
    """The fastest layout available here for a model with these channel counts, unless
    BIT_TRANSFER_LAYOUT names one (nchw, nhwc; nchw8c where the channels come in 8s)."""
    if not channels_last_available():
        return "nchw"
    chosen = settings.layout()
    if chosen not in LAYOUTS:
        chosen = "nchw8c" if onednn.activation_block() == 8 else "nhwc"
    return "nhwc" if chosen == "nchw8c" and not in_eights(channels) else chosen


def resolve(layout: str, channels) -> str:
    """The layout a model with these channels gets for `layout` ("auto": the fastest here; a oneDNN
    layout where oneDNN is missing: NCHW)."""
    if layout not in (*LAYOUTS, "auto"):
        raise ValueError(f"layout {layout!r}: one of {', '.join(LAYOUTS)} or auto")
    if layout == "auto" or (layout != "nchw" and not channels_last_available()):
        layout = best_layout(channels)
    if layout == "nchw8c" and not in_eights(channels):
        raise ValueError(f"layout nchw8c needs multiples of 8 channels, not {channels}")
    return layout
