"""Export a fine-tuned model: Hugging Face layout (transformers' BitForImageClassification
loads it), MindIR for MindSpore Lite / serving, or ONNX for ONNX Runtime (models/onnx_export.py); the
Hugging Face and ONNX exports of a run or weights also get a model card, README.md (models/card.py).

`export_from_checkpoint` is what `bit-transfer export MODEL --format hf|mindir|onnx --out DIR` calls; MODEL
is a run directory or a .ckpt, or pretrained weights (a Hugging Face directory, hf:org/name, an official
BiT .npz): bit-transfer as a converter. MindIR and ONNX hold the inference model, weight
standardisation folded (models/inference.py); the Hugging Face layout keeps the raw weights.
The output directory is claimed like a run (`rundir.RunDir`, kind "export"): a new or empty directory,
or an earlier export, which is updated; a directory of someone else's files, or a file, is refused.
Every file is written under a temporary name and renamed into place (an interrupted export keeps the
previous one), with mode 0644 (MindSpore's and safetensors' writers leave theirs owner-only).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bit_transfer.run.checkpoint import check_size, weights_image_size, find_checkpoint, run_image_size
from bit_transfer.errors import WeightsError, storage_error
from bit_transfer.models.weights import hf
from bit_transfer.models.resnetv2 import ResNetV2, model_config
from bit_transfer.system import files

FORMATS = ("hf", "mindir", "onnx")
MODE = 0o644


def export_hf(model: ResNetV2, out_dir, class_names=None, image_size: int | None = None,
              card: dict | None = None) -> Path:
    """config.json + model.safetensors (+ preprocessor_config.json when image_size is known), and with
    `card` (models/card.py's facts) the model card README.md."""
    from safetensors.numpy import save_file

    config = hf.build_config(model, class_names)
    image_size = check_size(image_size, "image_size") if image_size is not None else None
    tensors = {hf.to_hf_name(p.name): np.ascontiguousarray(p.asnumpy()) for p in model.get_parameters()}
    out = _claim(out_dir)
    with _cleanup_on_failure(out):
        needed = sum(t.nbytes for t in tensors.values())
        # transformers wants metadata format "pt"
        _write(out.path / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
               needed)
        _write_json(out.path / "config.json", config)
        if image_size:
            # BiT evaluation: square resize to the crop, then (x - 0.5) / 0.5, i.e. inputs in [-1, 1].
            processor = {
                "image_processor_type": "BitImageProcessor",
                "do_resize": True,
                "size": {"height": image_size, "width": image_size},
                "resample": 2,  # bilinear
                "do_center_crop": False,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "do_convert_rgb": True,
            }
            _write_json(out.path / "preprocessor_config.json", processor)
        else:  # an earlier export's, for another resolution: not this model's
            _remove(out.path / "preprocessor_config.json")
        if card is not None:
            from bit_transfer.models.export import card as cards

            _write_text(out.path / "README.md", cards.markdown(card, "transformers", cards.hf_howto(image_size)))
    return out.path


def export_mindir(model: ResNetV2, out_dir, image_size: int, class_names=None) -> Path:
    """model.mindir with input (batch, 3, image_size, image_size) float32 in [-1, 1], plus model.json."""
    import mindspore as ms

    from bit_transfer.models.inference import FoldedResNetV2, fold

    size = check_size(image_size, "image_size")
    info = {
        "file": "model.mindir",
        "input": {"shape": [1, 3, size, size], "layout": "NCHW", "dtype": "float32",
                  "preprocess": "resize to image_size x image_size, x / 255, then (x - 0.5) / 0.5"},
        "class_names": list(class_names) if class_names else None,
        "model": model_config(model),
    }
    out = _claim(out_dir)
    folded = model if isinstance(model, FoldedResNetV2) else fold(model)  # plain convs: no WS in the graph
    example = ms.Tensor(np.zeros((1, 3, size, size), np.float32))
    needed = sum(p.asnumpy().nbytes for p in model.get_parameters())

    def write(tmp: Path) -> None:
        with folded.builtin_ops():  # MindSpore's ops in the file, not our kernels (libraries on this host)
            # MindSpore appends ".mindir" to the name it is given
            ms.export(folded, example, file_name=str(tmp.with_suffix("")), file_format="MINDIR")

    with _cleanup_on_failure(out):
        _write(out.path / "model.mindir", write, needed, suffix=".mindir")
        _write_json(out.path / "model.json", info)
    return out.path / "model.mindir"


def export_onnx(model: ResNetV2, out_dir, image_size: int, class_names=None, external: bool | None = None,
                card: dict | None = None) -> Path:
    """model.onnx (ONNX Runtime, any platform): dynamic batch and size, WS folded, metadata_props with the
    class names, image_size and preprocessing (models/onnx_export.py). Models over 1 GB of weights keep
    them in model.onnx.data beside it (external=True forces that). Returns the .onnx file."""
    from bit_transfer.models.export import onnx as onnx_export

    from bit_transfer.models.export import card as cards

    size = check_size(image_size, "image_size")
    extra = cards.onnx_metadata(card) if card is not None else None
    proto = onnx_export.build_onnx(model, size, class_names, extra)  # onnx missing: one line, before claiming
    out = _claim(out_dir)
    path = out.path / "model.onnx"
    with _cleanup_on_failure(out):
        written = onnx_export.save_onnx(proto, path, _write, external)
        if len(written) == 1:  # an earlier export's weights file is not this model's
            _remove(path.with_name(path.name + onnx_export.DATA_SUFFIX))
        if card is not None:
            _write_text(out.path / "README.md", cards.markdown(card, "onnx", cards.onnx_howto(size)))
    return path


def export_from_checkpoint(source, fmt: str, out_dir, image_size: int | None = None) -> Path:
    """Rebuild the model a checkpoint (or pretrained weights source) holds, with its head; export it to out_dir.

    source: a run directory (its latest checkpoint), a .ckpt, or pretrained weights: a Hugging Face
    directory, hf:org/name, an official BiT .npz (checkpoint.find_checkpoint(..., weights=True)).
    image_size defaults to the run's plan.json `crop` (the eval resolution), else the checkpoint meta's, and
    for weights to their preprocessor_config.json's size; MindIR and ONNX need one. Returns the directory
    (hf) or the .mindir / .onnx file written.
    """
    from bit_transfer.models.weights.load import create_model_from_weights

    if fmt not in FORMATS:
        raise WeightsError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    ckpt, run = find_checkpoint(source, command="export", weights=True)
    if image_size is not None:
        image_size = check_size(image_size, "--image-size")
    if fmt == "onnx":
        from bit_transfer.models.export.onnx import require

        require("onnx")  # not installed: one line before any work
    out = _claim(out_dir)  # a file, someone's directory or a run: refused before the work
    with _cleanup_on_failure(out):
        model, report = create_model_from_weights(_fetched(ckpt))  # architecture, padding and head from the file
        meta = report.meta
        if run is not None and not meta.get("model"):
            raise WeightsError(f"{ckpt} has no model config in its meta; export takes checkpoints written by "
                               "bit-transfer fit or fewshot (a run directory or its checkpoints/step-*.ckpt)")
        if image_size is None:
            image_size, why = run_image_size(run, meta) if run is not None else weights_image_size(report.source)
            if image_size is None and fmt in ("mindir", "onnx"):
                example = "e.g. 128, the crop it was trained at" if run is not None else \
                    "the resolution the weights were trained or fine-tuned at, e.g. 224"
                raise WeightsError(f"no image size for {ckpt}: {why}; pass --image-size N ({example})")
        names = meta.get("class_names")
        from bit_transfer.models.export import card as cards

        card = cards.facts(run, meta, report.source if run is None else ckpt)
        if fmt == "hf":
            return export_hf(model, out, names, image_size, card=card)
        if fmt == "onnx":
            return export_onnx(model, out, image_size, names, card=card)
        return export_mindir(model, out, image_size, names)


MAIN_FILE = {"hf": "model.safetensors", "mindir": "model.mindir", "onnx": "model.onnx"}


def earlier_export(out_dir, fmt: str) -> Path | None:
    """The file an earlier export of `fmt` left in its own --out directory, which this export replaces
    (said in its output line, as eval and predict say it of their reports); None for a new place."""
    from bit_transfer.run.rundir import marker_kind

    out = Path(out_dir).expanduser()
    path = out / MAIN_FILE.get(fmt, "")
    return path if fmt in MAIN_FILE and path.is_file() and marker_kind(out) == "export" else None


def _fetched(source):
    """hf:org/name, a URL or an official name, fetched here so that a failure names the MODEL argument
    as the thing to change (not a recipe's model.weights); anything else as it is."""
    if not isinstance(source, str):
        return source
    from bit_transfer.models.weights.download import resolve_weights

    return resolve_weights(source, "BiT-custom", given_as="MODEL")



# ---------------------------------------------------------------- writing
def _claim(out_dir):
    from bit_transfer.run.rundir import RunDir

    if isinstance(out_dir, RunDir):
        return out_dir
    return RunDir.claim(out_dir, kind="export", flag="--out")


class _cleanup_on_failure:
    """A failed (or interrupted) export into a directory it created removes the directory: nothing to keep."""

    def __init__(self, out):
        self.out = out

    def __enter__(self):
        return self.out

    def __exit__(self, kind, exc, tb):
        if exc is not None and self.out.created:
            import shutil

            shutil.rmtree(self.out.path, ignore_errors=True)
        return False


def _write(path: Path, write, needed: int | None = None, suffix: str = "") -> None:
    """files.atomic_write with mode 0644; the writers (MindSpore, safetensors) wrap a full or read-only place
    in their own errors, which are one line too."""
    import errno

    from bit_transfer.run.rundir import os_error_in

    try:
        files.atomic_write(path, write, mode=MODE, needed=needed, suffix=suffix)
    except Exception as e:  # noqa: BLE001 - no temporary is left behind (files.atomic_write)
        if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":
            cause = os_error_in(RuntimeError(str(e)), path)  # the writers wrap the OSError in their own error
            if cause.errno in (errno.ENOSPC, errno.EROFS):
                raise storage_error(cause, path, needed) from None
        raise  # not the place: a bug worth its traceback


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only file system refuses even this
        pass


def _write_text(path: Path, text: str) -> None:
    _write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_json(path: Path, obj) -> None:
    from bit_transfer.run import runlog

    try:
        runlog.write_json(path, obj)  # atomic, strict JSON; a StorageError line when the place fails
        os.chmod(path, MODE)
    except OSError as e:
        raise storage_error(e, path) from None
