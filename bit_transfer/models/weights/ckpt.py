"""The `.ckpt` file: named arrays plus a JSON `meta` dict (key `bit_transfer_meta`), written atomically.

The training loop stores model parameters under their model names (`root.conv.weight`, ...),
optimiser state under `optimizer.<...>`, and meta such as
`{"model": model_config(model), "class_names": [...], "step": 123}`.
"""

from __future__ import annotations


import json
import re
import shutil
from pathlib import Path

import numpy as np

from bit_transfer.errors import WeightsError
from bit_transfer.system.device import quiet_mindspore
from bit_transfer.system import files


META_KEY = "bit_transfer_meta"



def save_checkpoint(path, params: dict, meta: dict) -> Path:
    """Write `params` (name -> numpy array / MindSpore Tensor or Parameter) and `meta` atomically.

    MindSpore's writer insists on a `.ckpt` suffix, so it writes into the directory
    `<path>.tmp/`; the finished file is then moved over `path` with os.replace, so a
    crash never leaves a half-written `*.ckpt` behind. A CRC is stored and checked on read.
    """
    import mindspore as ms

    path = Path(path)
    try:
        text = json.dumps(meta)
    except TypeError as e:
        raise WeightsError(f"checkpoint meta for {path} is not JSON-serialisable ({e}); store plain values") from None
    items = []
    for name, value in params.items():
        if not isinstance(value, ms.Tensor):  # Parameter is a Tensor
            value = ms.Tensor(np.asarray(value))
        items.append({"name": name, "data": value})
    tmp_dir = Path(f"{path}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        tmp_dir.mkdir(parents=True)
        tmp = tmp_dir / "checkpoint.ckpt"
        with quiet_mindspore():  # a failed write becomes one line from the caller, not MindSpore's CRITICAL log
            ms.save_checkpoint(items, str(tmp), append_dict={META_KEY: text}, crc_check=True)
        files.publish(tmp, path, mode=0o644)  # MindSpore leaves it read-only, which makes cleanups prompt
    finally:  # also on KeyboardInterrupt: never leave a half-written temporary behind
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path



def read_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """(params as numpy arrays, meta dict); a one-line WeightsError if the file is missing or broken."""
    import mindspore as ms

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} not found; check the path (runs keep them in <run>/checkpoints/)")
    if path.stat().st_size == 0:
        raise WeightsError(f"checkpoint {path} is empty (an interrupted save?); {_use_earlier(path)}")
    try:
        with quiet_mindspore():
            raw = ms.load_checkpoint(str(path), crc_check=True)
    except Exception:
        raise WeightsError(
            f"checkpoint {path} is unreadable: truncated or corrupt (MindSpore cannot parse it or its CRC fails); "
            f"{_use_earlier(path)}"
        ) from None
    meta = {}
    text = raw.pop(META_KEY, None)
    if text is not None:
        try:
            meta = json.loads(str(text))
        except ValueError:
            raise WeightsError(
                f"checkpoint {path} has an unreadable '{META_KEY}' entry (damaged, or not written by bit-transfer); "
                f"{_use_earlier(path)}"
            ) from None
    params = {name: value.asnumpy() for name, value in raw.items() if isinstance(value, ms.Tensor)}
    return params, meta


def step_of(p: Path) -> int:
    numbers = re.findall(r"\d+", p.stem)
    return int(numbers[-1]) if numbers else -1


def _use_earlier(path: Path) -> str:
    """What to do about an unreadable checkpoint: the run's checkpoint before it, when there is one."""
    earlier = [p for p in path.parent.glob("*.ckpt") if p.is_file() and p != path and p.stat().st_size > 0
               and step_of(p) < step_of(path)]
    if earlier:
        return f"use the run's earlier checkpoint {max(earlier, key=step_of)}"
    return "use an earlier checkpoint of the run, or rerun fit to write a new one"
