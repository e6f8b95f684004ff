"""The one place that chooses the device and configures MindSpore for a run.

Everything else is device-agnostic: models, the train step and the data pipeline run unchanged
on Ascend, GPU or CPU; only `setup` looks at what the machine has.
"""

from __future__ import annotations

import functools
import os
import random
import sys
import weakref

import numpy as np

from bit_transfer.errors import UsageError

AUTO_ORDER = ("Ascend", "GPU", "CPU")


@functools.cache
def available_devices() -> tuple[str, ...]:
    import mindspore as ms

    return tuple(d for d in AUTO_ORDER if d == "CPU" or ms.hal.is_available(d))


def select_device(requested: str = "auto") -> str:
    """`auto` picks Ascend, then GPU, then CPU; an explicit device must be present."""
    have = available_devices()
    if requested == "auto":
        return have[0]
    if requested not in have:
        raise UsageError(
            f"train.device is {requested} but this MindSpore sees only {', '.join(have)}; "
            f"install the MindSpore build for {requested} or set train.device: auto"
        )
    return requested


def slow_cpu_warning(version: str, device: str) -> str | None:
    """MindSpore 2.9/2.10's own CPU convolutions are ~100x slower than 2.7/2.8 (measured on our CI
    machine); ours (bit_transfer/onednn_conv.py) do not depend on the version."""
    major, minor = (int(x) for x in version.split(".")[:2])
    if device == "CPU" and (major, minor) >= (2, 9):
        return (
            f"MindSpore {version} runs its own CPU convolutions ~100x slower than 2.7/2.8 "
            "(8x128x32x32 3x3 conv: 2.3 s vs 15-22 ms, measured) and this model uses them "
            "(bit-transfer's oneDNN kernels off, unavailable or not float32); for CPU training "
            "leave BIT_TRANSFER_CPU_KERNELS unset with g++ installed, or install mindspore==2.8.0"
        )
    return None


_warned_slow = False
_checked = weakref.WeakSet()  # models looked at (the look walks every cell)


def warn_slow_convolutions(model) -> None:
    """Before a compiled step runs `model`: one plain line on stderr, once per process, if the model
    runs MindSpore's own convolutions (a ResNetV2 in NCHW, also inside a mixed-precision wrapper)
    and this MindSpore makes them slow on this device. Not a Python warning (its file:line and source
    line made three lines of it), and not before a step runs, so a command that fails earlier keeps
    its one-line error."""
    global _warned_slow
    if _warned_slow or model in _checked:
        return
    _checked.add(model)
    if not any(getattr(cell, "layout", None) == "nchw" for _, cell in model.cells_and_names()):
        return
    import mindspore as ms

    _warned_slow = True
    msg = slow_cpu_warning(ms.__version__, ms.get_context("device_target"))
    if msg:
        print(f"bit-transfer: warning: {msg}", file=sys.stderr, flush=True)


@functools.cache
def setup(device: str = "auto", *, jit: bool = True) -> str:
    """Point MindSpore at the device once per process; returns the device name.

    The train and eval steps are compiled with `mindspore.jit` where `jit` is on; the context stays
    PyNative so the loop around them (logging, checkpoints) is plain Python.
    """
    import mindspore as ms

    dev = select_device(device)
    try:
        ms.set_device(dev)
    except RuntimeError:
        # MindSpore already ran kernels in this process (a notebook, another library): the
        # device is fixed now. Fine if it is the one we want; otherwise say how to fix it.
        current = ms.get_context("device_target")
        if current != dev:
            raise UsageError(
                f"MindSpore already runs on {current} in this process and cannot switch to {dev}; "
                f"set train.device: {current} or start a new process"
            ) from None
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return dev


def seed_everything(seed: int) -> None:
    """Seed MindSpore's, NumPy's and Python's global generators (weights init, dropout-free ops)."""
    import mindspore as ms

    ms.set_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def assign(param, value) -> None:
    """Write `value` into a Parameter in place, so graphs compiled earlier see it.

    `Parameter.set_data` swaps the tensor object: in MindSpore 2.8 a `mindspore.jit` graph
    compiled before keeps reading the old one (measured), so loading weights or optimizer state
    that way after a compile is silently ignored. `ops.assign` copies into the same storage.
    """
    import mindspore as ms
    from mindspore import ops

    arr = np.asarray(value)
    if tuple(arr.shape) != tuple(param.shape):
        raise ValueError(f"{param.name}: shape {tuple(arr.shape)} does not match {tuple(param.shape)}")
    ops.assign(param, ms.Tensor(np.ascontiguousarray(arr), param.dtype))
