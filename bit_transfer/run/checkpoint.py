"""A run's checkpoints: the meta training writes, finding the checkpoint a path names, the image size
a run or weights were trained at. The file format is models/weights/ckpt.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bit_transfer.errors import UsageError, WeightsError
from bit_transfer.models.weights.ckpt import step_of


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
    from bit_transfer.models.weights.download import OFFICIAL_NAME

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
    return max(ckpts, key=lambda p: (step_of(p), p.stat().st_mtime)), path


# ---------------------------------------------------------------- image size
def check_size(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{what} must be a whole number of pixels >= 1 (e.g. 128), got {value!r}")
    return int(value)


def run_image_size(run: Path, meta: dict) -> tuple[int | None, str]:
    """(the run's eval crop from plan.json or the checkpoint meta, or None and why there is none)."""
    plan = run / "plan.json"
    if plan.is_file():
        try:
            crop = json.loads(plan.read_text()).get("crop")
        except (OSError, ValueError, AttributeError):
            raise WeightsError(f"{plan} is not a readable plan (not valid JSON); pass --image-size N "
                               "(e.g. 128, the crop it was trained at)") from None
        if crop is not None:
            if isinstance(crop, bool) or not isinstance(crop, int) or crop < 1:
                raise WeightsError(f"{plan} has crop {crop!r}, not a whole number of pixels >= 1; "
                                   "pass --image-size N (e.g. 128)")
            return crop, ""
        why = f"{plan} has no 'crop'"
    else:
        why = f"there is no {plan}"
    crop = meta.get("crop")
    if crop is not None:
        return check_size(crop, f"the 'crop' in the checkpoint meta of {run}"), ""
    return None, f"{why} and the checkpoint's meta records none"


def weights_image_size(source) -> tuple[int | None, str]:
    """The size in the preprocessor_config.json beside weights read from `source` (a local file or Hugging
    Face directory; crop_size when it crops), or None and why."""
    where = Path(source)
    if where.suffix.lower() == ".npz" or not where.exists():
        return None, "official .npz weights record no training resolution"
    config = (where if where.is_dir() else where.parent) / "preprocessor_config.json"
    if not config.is_file():
        return None, f"there is no {config}"
    try:
        pre = json.loads(config.read_text())
        size = pre.get("crop_size") if pre.get("do_center_crop") else pre.get("size")
        size = size if isinstance(size, dict) else {"height": size, "width": size}
        h, w = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
    except (OSError, ValueError, AttributeError):
        return None, f"{config} is not a readable preprocessor config"
    if isinstance(h, int) and not isinstance(h, bool) and h == w and h > 0:
        return h, ""
    return None, f"{config} gives no square size"
