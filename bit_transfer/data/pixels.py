"""BiT's input scaling, in one place: uint8 pixels 0..255 -> float32 in [-1, 1] as (x - 127.5) / 127.5.

The official transform is ToTensor then Normalize((0.5,)*3, (0.5,)*3) (bit_pytorch/train.py), i.e.
(x/255 - 0.5)/0.5 = (x - 127.5)/127.5, which maps 0 and 255 exactly onto -1 and 1. The pipelines
hand uint8 images on (a quarter of float32's bytes to the device); the model and the training step
scale them on the device with `unit_range`, and ONNX Runtime's input gets `unit_range_np`.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np

CENTER = 127.5  # = the half-range: (x - CENTER) / CENTER


def unit_range(x):
    """MindSpore: uint8 (or float 0..255) pixels -> float32 in [-1, 1]; usable inside compiled graphs."""
    return (x.astype(ms.float32) - CENTER) / CENTER


def unit_range_np(x: np.ndarray) -> np.ndarray:
    """NumPy: uint8 pixels -> float32 in [-1, 1]; float input is taken as already scaled."""
    if x.dtype != np.uint8:
        return np.ascontiguousarray(x, np.float32)
    return (x.astype(np.float32) - np.float32(CENTER)) / np.float32(CENTER)
