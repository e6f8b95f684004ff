"""The one place that chooses the device and configures MindSpore for a run.

Everything else is device-agnostic: models, the train step and the data pipeline run unchanged
on Ascend, GPU or CPU; only `setup` looks at what the machine has. `PRECISIONS_BY_DEVICE` says
which compute precisions each device runs with the operators our models use (docs/accelerators.md).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import random
import sys
import weakref
from pathlib import Path

import numpy as np

from bit_transfer.errors import UsageError

AUTO_ORDER = ("Ascend", "GPU", "CPU")

# Which precisions each device trains in with the operators our models use (Conv2D, MaxPool, GroupNorm,
# ReLU, MatMul, the loss), checked against MindSpore's own kernel registrations and lists:
# - GPU: Conv2D registers float32 and float16 only (mindspore/ccsrc/plugin/device/gpu/kernel/nn/convolution/
#   conv2d_forward_gpu_kernel.cc, GetFuncList), so bf16 fails at compile time.
# - Ascend: MindSpore's bf16 list (mindspore-ai/docs, docs/mindspore/source_zh_cn/api_python/bfloat16_support.md,
#   r2.10) names MatMul, Add, ReduceMean, Softmax ... but not Conv2D, MaxPool, GroupNorm or ReLU.
# - CPU: MindSpore's CPU backend has no bf16 kernels for Conv2D, MatMul, ReLU; fp16 runs (amp O2, our
#   tests train it), on MindSpore's operators in NCHW.
PRECISIONS_BY_DEVICE = {
    "CPU": ("fp32", "fp16"),
    "GPU": ("fp32", "fp16"),
    "Ascend": ("fp32", "fp16"),
}
_WHY_NOT = {
    ("CPU", "bf16"): "MindSpore's CPU backend has no bf16 kernels (Conv2D, MatMul, ReLU)",
    ("GPU", "bf16"): "MindSpore's GPU Conv2D kernel registers float32 and float16 only",
    ("Ascend", "bf16"): "Conv2D, MaxPool and GroupNorm are not on MindSpore's Ascend bf16 list",
}
# Device nodes that say an accelerator is plugged in even when MindSpore cannot use it.
DEVICE_NODES = {"GPU": "nvidia[0-9]*", "Ascend": "davinci[0-9]*"}


def check_precision(precision: str, device: str) -> None:
    """One line (exit 2) for a precision the device cannot train in, before anything compiles.

    `device` may be "auto": then the device auto would pick decides, which is only looked up
    (importing MindSpore) when the precision is not supported everywhere.
    """
    if all(precision in p for p in PRECISIONS_BY_DEVICE.values()):
        return
    if device == "auto":
        device = select_device("auto")
    if precision not in PRECISIONS_BY_DEVICE[device]:
        why = _WHY_NOT.get((device, precision), f"{device} does not run {precision}")
        ok = " or ".join(PRECISIONS_BY_DEVICE[device])
        raise UsageError(f"train.precision: {precision} cannot train on {device}: {why}; use {ok} "
                         "(docs/accelerators.md has the table)")


def _device_module(device: str):
    """`mindspore.device_context.<gpu|ascend>`, the current API for device availability and counts
    (mindspore/python/mindspore/device_context/gpu/device.py and ascend/device.py: `is_available()`,
    `device_count()`; MindSpore 2.5+); `mindspore.hal.is_available` is deprecated there in its favour
    (mindspore/python/mindspore/hal/device.py)."""
    import importlib

    return importlib.import_module(f"mindspore.device_context.{device.lower()}")


@functools.cache
def device_count(device: str) -> int:
    """How many `device`s this MindSpore can use (0 where its plugin did not load); CPU counts 1."""
    if device == "CPU":
        return 1
    with quiet_mindspore():  # is_available() logs a WARNING when the plugin is missing: we say it ourselves
        try:
            mod = _device_module(device)
            return int(mod.device_count()) if mod.is_available() else 0
        except (ImportError, AttributeError):  # pragma: no cover - a MindSpore before device_context
            import mindspore as ms

            return 1 if ms.hal.is_available(device) else 0
        except RuntimeError:  # the plugin loaded but the driver reports no device
            return 0


@functools.cache
def available_devices() -> tuple[str, ...]:
    return tuple(d for d in AUTO_ORDER if device_count(d) > 0)


def plugin_load_error(device: str) -> str:
    """MindSpore's own record of why `device`'s plugin did not load at import (e.g. libcudart.so.11.0 or
    libge_runner.so missing), one line; "" when it has none. `MSContext.load_plugin_error()` is what
    device_context/gpu/device.py `is_available()` logs; it holds every plugin's lines, so keep `device`'s."""
    try:
        from mindspore._c_expression import MSContext

        text = MSContext.get_instance().load_plugin_error()
    except Exception:  # pragma: no cover - a MindSpore without it
        return ""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return "; ".join(ln for ln in lines if f"_{device.lower()}" in ln.lower() or f"{device.lower()}." in ln.lower())


def gpu_plugins() -> list[str]:
    """The CUDA versions the installed MindSpore has GPU plugins for (mindspore/lib/plugin/gpu<ver>/)."""
    import importlib.util

    spec = importlib.util.find_spec("mindspore")
    root = Path(spec.origin).parent / "lib" / "plugin" if spec and spec.origin else None
    if root is None or not root.is_dir():
        return []
    return sorted(p.name[3:] for p in root.glob("gpu[0-9]*") if p.is_dir())


def device_nodes(roots=("/dev",)) -> dict[str, list[str]]:
    """{device: [node paths]} of the accelerators plugged in (/dev/nvidia0, /dev/davinci0), found whether
    or not MindSpore can use them. `roots` is a parameter so that tests can point it at a directory."""
    found = {}
    for device, pattern in DEVICE_NODES.items():
        nodes = sorted(n for root in roots for n in glob.glob(os.path.join(root, pattern)))
        if nodes:
            found[device] = nodes
    return found


def what_to_install(device: str) -> str:
    """What makes `device` usable for this MindSpore: the CUDA its GPU plugins need, or CANN."""
    import mindspore as ms

    if device == "GPU":
        cudas = gpu_plugins()
        need = f"CUDA {' or '.join(cudas)} (the GPU plugins this MindSpore {ms.__version__} ships)" if cudas else \
            f"a MindSpore {ms.__version__} build with GPU plugins"
        return f"install {need} and its cuDNN, with the libraries on LD_LIBRARY_PATH (see mindspore.cn/install)"
    return (f"install the CANN toolkit that MindSpore {ms.__version__} supports and source its set_env.sh "
            "(see mindspore.cn/install)")


def unused_accelerator(device: str, roots=("/dev",)) -> str | None:
    """One line when `device` (what auto chose) is CPU while an accelerator's device nodes exist: MindSpore
    could not load its plugin, say why (its own load error) and what to install. None otherwise."""
    if device != "CPU":
        return None
    nodes = device_nodes(roots)
    if not nodes:
        return None
    accel, paths = next(iter(nodes.items()))
    why = plugin_load_error(accel) or no_plugin_reason(accel)
    return (f"{paths[0]} exists but MindSpore trains on CPU: it could not load its {accel} plugin ({why}); "
            f"{what_to_install(accel)}")


def no_plugin_reason(device: str) -> str:
    """Why a device is missing when MindSpore recorded no load error for it."""
    if device == "GPU":
        return "no CUDA runtime that one of its GPU plugins needs was found"
    return "no Ascend plugin loaded"


def select_device(requested: str = "auto", option: str = "train.device") -> str:
    """`auto` picks Ascend, then GPU, then CPU; an explicit device must be present, else one line saying why,
    naming the `option` the user set it with (`train.device`, a command's `--device`, an API's `device=`)."""
    have = available_devices()
    if requested == "auto":
        return have[0]
    if requested not in have:
        why = plugin_load_error(requested) or no_plugin_reason(requested)
        why = f"its {requested} plugin did not load ({why})"
        raise UsageError(f"{_is(option, requested)} but MindSpore cannot use it: {why}; "
                         f"{what_to_install(requested)}, or {_use(option, 'auto')}")
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


def _is(option: str, value) -> str:
    """How the user gave `value`: `--device GPU` (a flag), `device='GPU'` (a keyword), `train.device is GPU`."""
    if option.startswith("--"):
        return f"{option} {value}"
    return f"{option}{value!r}" if option.endswith("=") else f"{option} is {value}"


def _use(option: str, value) -> str:
    if option.startswith("--"):
        return f"use {option} {value}"
    return f"use {option}{value!r}" if option.endswith("=") else f"set {option}: {value}"


@functools.cache
def setup(device: str = "auto", *, jit: bool = True, device_id: int | None = None,
          option: str = "train.device") -> str:
    """Point MindSpore at the device once per process; returns the device name.

    The train and eval steps are compiled with `mindspore.jit` where `jit` is on; the context stays
    PyNative so the loop around them (logging, checkpoints) is plain Python. `device_id` picks the card
    of a one-process run (`ms.set_device(target, device_id)`, mindspore/python/mindspore/device_manager.py).
    """
    import mindspore as ms

    dev = select_device(device, option)
    if device == "auto" and (msg := unused_accelerator(dev)):
        print(f"bit-transfer: warning: {msg}", file=sys.stderr, flush=True)
    _check_device_id(dev, device_id)
    try:
        ms.set_device(dev, device_id)
    except RuntimeError:
        # MindSpore already ran kernels in this process (a notebook, another library): the
        # device is fixed now. Fine if it is the one we want; otherwise say how to fix it.
        current = ms.get_context("device_target")
        if current != dev:
            raise UsageError(
                f"MindSpore already runs on {current} in this process and cannot switch to {dev}; "
                f"{_use(option, current)} or start a new process"
            ) from None
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return dev


def _check_device_id(device: str, device_id: int | None) -> None:
    if device_id is None or device == "CPU" and device_id == 0:
        return
    count = device_count(device)
    if device_id >= count:
        raise UsageError(f"train.device_id is {device_id} but MindSpore sees {count} {device} device(s) "
                         f"(ids 0..{count - 1}); pick one of those or remove train.device_id")


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
    ops.assign(param, ms.Tensor(np.ascontiguousarray(arr).reshape(arr.shape), param.dtype))  # 0-d stays 0-d


@contextlib.contextmanager
def quiet_mindspore():
    """Silence MindSpore's own ERROR log lines while we turn its failure into one WeightsError."""
    try:
        from mindspore import log

        logger = log._get_logger()  # private, but the only handle on MindSpore's logger
    except Exception:  # pragma: no cover - a MindSpore without it just stays noisy
        yield
        return
    level = logger.level
    logger.setLevel(100)
    try:
        yield
    finally:
        logger.setLevel(level)
