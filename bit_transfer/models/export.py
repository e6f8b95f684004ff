"""Export a fine-tuned model: Hugging Face layout (transformers' BitForImageClassification
loads it) or MindIR for MindSpore Lite / serving.

`export_from_checkpoint` is what `bit-transfer export RUN_OR_CKPT --format hf|mindir --out DIR` calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bit_transfer.checkpoint import find_checkpoint
from bit_transfer.errors import WeightsError
from bit_transfer.models import hf
from bit_transfer.models.resnetv2 import ResNetV2, create_model, model_config

FORMATS = ("hf", "mindir")


def export_hf(model: ResNetV2, out_dir, class_names=None, image_size: int | None = None) -> Path:
    """config.json + model.safetensors (+ preprocessor_config.json when image_size is known)."""
    from safetensors.numpy import save_file

    config = hf.build_config(model, class_names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {hf.to_hf_name(p.name): np.ascontiguousarray(p.asnumpy()) for p in model.get_parameters()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})  # transformers wants "pt"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if image_size:
        # BiT evaluation: square resize to the crop, then (x - 0.5) / 0.5, i.e. inputs in [-1, 1].
        processor = {
            "image_processor_type": "BitImageProcessor",
            "do_resize": True,
            "size": {"height": int(image_size), "width": int(image_size)},
            "resample": 2,  # bilinear
            "do_center_crop": False,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "do_convert_rgb": True,
        }
        (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out


def export_mindir(model: ResNetV2, out_dir, image_size: int, class_names=None) -> Path:
    """model.mindir with input (batch, 3, image_size, image_size) float32 in [-1, 1], plus model.json."""
    import mindspore as ms

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.set_train(False)
    example = ms.Tensor(np.zeros((1, 3, int(image_size), int(image_size)), np.float32))
    ms.export(model, example, file_name=str(out / "model"), file_format="MINDIR")
    info = {
        "file": "model.mindir",
        "input": {"shape": [1, 3, int(image_size), int(image_size)], "layout": "NCHW", "dtype": "float32",
                  "preprocess": "resize to image_size x image_size, x / 255, then (x - 0.5) / 0.5"},
        "class_names": list(class_names) if class_names else None,
        "model": model_config(model),
    }
    (out / "model.json").write_text(json.dumps(info, indent=2) + "\n")
    return out / "model.mindir"


def export_from_checkpoint(path_or_run_dir, fmt: str, out_dir, image_size: int | None = None) -> Path:
    """Rebuild the model from a checkpoint's meta, load it with its head, export to out_dir.

    image_size defaults to the run's plan.json `crop` (the eval resolution); MindIR needs one.
    Returns the directory (hf) or the .mindir file written.
    """
    from bit_transfer.models.weights import WeightsFile, assign, check
    from bit_transfer.checkpoint import read_checkpoint

    if fmt not in FORMATS:
        raise WeightsError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    ckpt, run = find_checkpoint(path_or_run_dir)
    params, meta = read_checkpoint(ckpt)
    cfg = meta.get("model")
    if not cfg:
        raise WeightsError(f"{ckpt} has no model config in its meta; export checkpoints written by bit-transfer")
    model = create_model(**cfg)
    tensors = {k: v for k, v in params.items() if not k.startswith("optimizer.")}
    wf = WeightsFile(str(ckpt), "ckpt", tensors, padding=cfg.get("padding"), meta=meta)
    assign(model, wf, check(model, wf, "keep"))
    if image_size is None:
        plan = run / "plan.json"
        if plan.is_file():
            image_size = json.loads(plan.read_text()).get("crop")
        image_size = image_size or meta.get("crop")
    names = meta.get("class_names")
    if fmt == "hf":
        return export_hf(model, out_dir, names, image_size)
    if not image_size:
        raise WeightsError(f"no eval resolution for {ckpt}: {run / 'plan.json'} is missing; pass image_size (e.g. 128)")
    return export_mindir(model, out_dir, int(image_size), names)
