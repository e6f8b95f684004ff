"""Our checkpoints: a MindSpore `.ckpt` holding named arrays plus a JSON `meta` dict.

The training loop stores model parameters under their model names (`root.conv.weight`, ...),
optimiser state under `optimizer.<...>`, and meta such as
`{"model": model_config(model), "class_names": [...], "step": 123}` (key `bit_transfer_meta`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from bit_transfer.errors import WeightsError

META_KEY = "bit_transfer_meta"


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
        os.chmod(tmp, 0o644)  # MindSpore leaves it read-only, which makes cleanups prompt
        with open(tmp, "rb") as f:  # on disk before it gets its name: a power cut keeps the old one
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:  # also on KeyboardInterrupt: never leave a half-written temporary behind
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def training_meta(*, step: int, batch_split: int, micro_batch: int, world: int, seed: int, model, class_names,
                  recipe: str, plan_steps: int, **extra) -> dict:
    """The meta of a training checkpoint (fit and the linear probe): what resume, eval and export read."""
    from bit_transfer.models import model_config

    return {
        "step": step,
        "batch_split": batch_split,
        "micro_batch": micro_batch,
        "data_position": step * batch_split,  # global micro-batches consumed
        "world": world,
        "seed": seed,
        "model": model_config(model),
        "class_names": list(class_names),
        "recipe": recipe,
        "plan_steps": plan_steps,
        **extra,
    }


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


def _step_of(p: Path) -> int:
    numbers = re.findall(r"\d+", p.stem)
    return int(numbers[-1]) if numbers else -1


def _use_earlier(path: Path) -> str:
    """What to do about an unreadable checkpoint: the run's checkpoint before it, when there is one."""
    earlier = [p for p in path.parent.glob("*.ckpt") if p.is_file() and p != path and p.stat().st_size > 0
               and _step_of(p) < _step_of(path)]
    if earlier:
        return f"use the run's earlier checkpoint {max(earlier, key=_step_of)}"
    return "use an earlier checkpoint of the run, or rerun fit to write a new one"


ACCEPTED = "a run directory (runs/<name>-<time>) or its checkpoints/step-*.ckpt, written by bit-transfer fit or fewshot"
_KINDS = {".yaml": "a YAML file", ".yml": "a YAML file", ".json": "a JSON file",
          ".npz": "a .npz weights file", ".safetensors": "a safetensors weights file", ".bin": "a .bin weights file",
          ".mindir": "a MindIR export", ".corrupt": "a checkpoint fit set aside as corrupt"}


WEIGHTS_ACCEPTED = ("; or pretrained weights: a Hugging Face directory (config.json + model.safetensors), "
                    "hf:org/name or an official BiT .npz")


def weights_source(path) -> str | Path | None:
    """What `path` names if it is pretrained weights rather than a run or checkpoint (else None): a Hugging Face
    directory (config.json, no checkpoints/), `hf:org/name`, an http(s) URL, an official BiT name like
    BiT-M-R50x1 (when no such file exists), a .npz or .safetensors file. models.create_model_from_weights
    reads every one."""
    text = str(path).strip()
    if text.startswith(("hf:", "http://", "https://")):
        return text
    p = Path(text).expanduser()
    if p.is_dir():
        return p if (p / "config.json").is_file() and not (p / "checkpoints").is_dir() else None
    if p.is_file():
        return p if p.suffix.lower() in (".npz", ".safetensors") else None
    from bit_transfer.models.download import OFFICIAL_NAME

    return text if not p.exists() and OFFICIAL_NAME.fullmatch(text) else None


def find_checkpoint(path, command: str = "", weights: bool = False) -> tuple[Path | str, Path | None]:
    """(checkpoint, run dir) for a .ckpt file or a run dir (latest checkpoints/*.ckpt by step).

    `command` ("export", "eval --checkpoint") names who is asking in the one-line errors. weights=True
    (export) also takes pretrained weights (`weights_source`): returned as (source, None).
    """
    if weights and (source := weights_source(path)) is not None:
        return source, None
    takes = f"{command} takes" if command else "pass"
    accepted = ACCEPTED + (WEIGHTS_ACCEPTED if weights else "")
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".ckpt":
            kind = _KINDS.get(path.suffix.lower(), f"a '{path.suffix}' file" if path.suffix else "a file")
            raise WeightsError(f"{path} is {kind}, not a checkpoint; {takes} {accepted}")
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return path, run
    if not path.exists():
        raise WeightsError(f"{path} not found; {takes} {accepted}")
    if not path.is_dir():
        raise WeightsError(f"{path} is not a file or directory; {takes} {accepted}")
    ckpts = [p for p in (path / "checkpoints").glob("*.ckpt") if p.is_file()] or [
        p for p in path.glob("*.ckpt") if p.is_file()]
    if not ckpts:
        raise WeightsError(f"{path} has no checkpoints/*.ckpt (train first with bit-transfer fit); "
                           f"{takes} {accepted}")
    return max(ckpts, key=lambda p: (_step_of(p), p.stat().st_mtime)), path
