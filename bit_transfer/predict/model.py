"""The model predict runs: `load_model(MODEL)` -> `LoadedModel` (images -> logits) for a run directory or
its `.ckpt`, a Hugging Face directory or `hf:org/name`, an official BiT `.npz` (all by MindSpore), or an
`.onnx` from `bit-transfer export --format onnx` (by ONNX Runtime); and the resolution it runs at
(`--image-size`, else what the model records, else the caller's fallback, else 128).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bit_transfer.errors import UsageError, WeightsError

DEFAULT_SIZE = 128
DEFAULT_BATCH = 32
DEVICES = ("auto", "CPU", "GPU", "Ascend")
TAKES = ("a run directory or its .ckpt, a Hugging Face directory or hf:org/name, an official BiT .npz, "
         "or an .onnx from bit-transfer export")


@dataclass
class LoadedModel:
    """A model ready to predict: images (N, 3, S, S) uint8 pixels (or float32 in [-1, 1]) -> logits (N, classes)."""

    source: str  # what runs: the checkpoint, directory or file
    kind: str  # run | ckpt | hf | npz | onnx
    num_classes: int
    class_names: list[str] | None
    image_size: int
    size_from: str  # where image_size came from, for the summary line
    batch_size: int
    forward: Callable[[np.ndarray, int], np.ndarray]  # (images, batch size) -> logits
    run: Path | None = None  # the run a checkpoint belongs to
    checkpoint: Path | None = None
    features: Callable[[np.ndarray, int], np.ndarray] | None = None  # (images, batch) -> pre-logits (N, D)
    num_features: int | None = None
    arch: tuple[list[int], float] | None = None  # (depths, width), for the memory a batch needs

    @property
    def names(self) -> list[str]:
        """Class names, or the indices as strings when the model has none."""
        return self.class_names or [str(i) for i in range(self.num_classes)]


def load_model(spec, *, image_size: int | None = None, batch_size: int | None = None, device: str = "auto",
               fallback_size: Callable[[], tuple[int, str]] | None = None, device_option: str = "--device") -> LoadedModel:
    """The model `spec` names (module docstring); one-line errors for a missing or non-BiT model.

    `fallback_size()` -> (size, where from) is asked only when neither `image_size` nor the model
    records a resolution (predict --recipe: the rule's crop for the recipe's data). `device_option`:
    how the caller's user chose `device`, for the error that it cannot be had (`--device`, `device=`).
    """
    if device not in DEVICES:
        raise UsageError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    path, kind = _model_kind(spec)
    if kind == "onnx":
        return _onnx_model(path, image_size, batch_size, device, fallback_size)
    return _mindspore_model(path, kind, image_size, batch_size, device, fallback_size, device_option)


def _model_kind(spec) -> tuple[Path, str]:
    """(local path, kind) for a model argument; a missing or unsupported one is one line."""
    text = str(spec)
    if text.startswith("hf:"):
        from bit_transfer.models.weights.download import resolve_weights

        return resolve_weights(text, "BiT-custom", given_as="MODEL"), "hf"
    path = Path(text).expanduser()
    if not path.exists():
        raise WeightsError(f"model {path} not found; predict takes {TAKES}")
    if path.is_dir():
        if (path / "checkpoints").is_dir() or any(path.glob("*.ckpt")):
            return path, "run"
        if (path / "model.onnx").is_file():  # the directory export --format onnx wrote
            return path / "model.onnx", "onnx"
        if (path / "config.json").is_file() or (path / "model.safetensors").is_file():
            return path, "hf"
        if (path / "model.mindir").is_file():
            raise WeightsError(f"{path} is a MindIR export, which predict does not run; predict takes {TAKES}")
        from bit_transfer.run.rundir import is_run

        if is_run(path):  # a run without checkpoints yet: find_checkpoint says so
            return path, "run"
        raise WeightsError(f"{path} holds neither checkpoints/*.ckpt (a run) nor config.json and "
                           f"model.safetensors (a Hugging Face model); predict takes {TAKES}")
    suffix = path.suffix.lower()
    kinds = {".ckpt": "ckpt", ".npz": "npz", ".onnx": "onnx", ".safetensors": "hf"}
    if suffix not in kinds:
        what = f"a '{suffix}' file" if suffix else "a file without a suffix"
        raise WeightsError(f"{path} is {what}, not a model; predict takes {TAKES}")
    return path, kinds[suffix]


def _mindspore_model(path: Path, kind: str, image_size, batch_size, device, fallback_size,
                     device_option: str) -> LoadedModel:
    from bit_transfer.run import checkpoint
    from bit_transfer.models import create_model_from_weights
    from bit_transfer.system import device as runtime

    run = ckpt = None
    if kind in ("run", "ckpt"):
        ckpt, run = checkpoint.find_checkpoint(path, command="predict")
        path = ckpt
    runtime.setup(device, option=device_option)
    model, report = create_model_from_weights(path)  # architecture, padding and the file's own head
    meta = report.meta or {}
    names = [str(n) for n in meta.get("class_names") or []]
    names = names if len(names) == model.num_classes else None
    size, size_from = _image_size(image_size, lambda: _recorded_size(kind, path, run, meta), fallback_size)
    batch = batch_size or int(meta.get("micro_batch") or DEFAULT_BATCH)
    forward, features = _mindspore_forward(model)
    return LoadedModel(str(path), kind, model.num_classes, names, size, size_from, batch,
                       forward, run=run, checkpoint=ckpt, features=features, num_features=model.num_features,
                       arch=(list(model.depths), model.width))


def _mindspore_forward(model) -> tuple[Callable, Callable]:
    """Compiled inference on the folded model (weight standardisation computed once, as eval runs it):
    (logits, pre-logit features) functions, one graph per batch size (EvalStep pads a short batch to its
    size); the features are those of the linear probe's cache (engine.step.feature_step)."""
    import mindspore as ms

    from bit_transfer.system import compile_cache
    from bit_transfer.engine.step import feature_step
    from bit_transfer.models.inference import fold
    from bit_transfer.engine.step import EvalStep

    model = fold(model)  # holds the weights; the training model can go
    cache = compile_cache.enabled(ms.get_context("device_target"), True, 1)  # the first graph, silently

    steps: dict[tuple[bool, int], EvalStep] = {}

    def forward(x: np.ndarray, batch: int) -> np.ndarray:
        if (False, batch) not in steps:
            steps[False, batch] = EvalStep(model, batch, compile_cache=cache)
        return steps[False, batch](x)

    def features(x: np.ndarray, batch: int) -> np.ndarray:
        if (True, batch) not in steps:
            steps[True, batch] = feature_step(model, batch, compile_cache=cache)
        return steps[True, batch](x)

    return forward, features


def _recorded_size(kind: str, path: Path, run: Path | None, meta: dict) -> tuple[int | None, str]:
    """(resolution the model was trained at, where that is written) or (None, "")."""
    if kind in ("run", "ckpt"):
        from bit_transfer.run.checkpoint import run_image_size

        size, _ = run_image_size(run, meta)
        if size is not None:
            plan = run / "plan.json"
            return size, "the run's plan.json crop" if plan.is_file() else "the checkpoint's meta"
        return None, ""
    if kind == "hf":
        config = (path if path.is_dir() else path.parent) / "preprocessor_config.json"
        try:
            size = json.loads(config.read_text()).get("size") or {}
        except (OSError, ValueError, AttributeError):
            return None, ""
        h, w = (size.get("height"), size.get("width")) if isinstance(size, dict) else (None, None)
        if isinstance(h, int) and h == w and h > 0:
            return h, "preprocessor_config.json"
    return None, ""


def _image_size(given, recorded: Callable[[], tuple[int | None, str]], fallback_size) -> tuple[int, str]:
    """--image-size, else what the model records, else `fallback_size()`, else 128: (size, where from)."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 1:
            raise UsageError(f"image size must be a whole number of pixels >= 1 (e.g. 128), got {given!r}")
        try:
            size, where = recorded()
        except UsageError:  # an unreadable plan.json does not matter when the size is given
            size, where = None, ""
        trained = f"; the model records {size} ({where})" if size and size != given else ""
        return int(given), f"--image-size{trained}"
    size, where = recorded()
    if size:
        return size, where
    if fallback_size is not None:
        return fallback_size()
    return DEFAULT_SIZE, "the default; pass --image-size N for the resolution the model was trained at"


# ---------------------------------------------------------------- ONNX
def _onnx_model(path: Path, image_size, batch_size, device, fallback_size) -> LoadedModel:
    # MindSpore (the decoding pipeline) first: its protobuf modules need the backend that
    # bit_transfer/__init__ selects, which is fixed by whoever loads protobuf first (onnx does)
    from bit_transfer.data import pipeline  # noqa: F401

    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError(f"{path} is an ONNX model, which needs ONNX Runtime: pip install 'bit-transfer[deploy]'") from None
    providers = ["CPUExecutionProvider"]
    if device in ("GPU", "Ascend"):
        wanted = {"GPU": "CUDAExecutionProvider", "Ascend": "CANNExecutionProvider"}[device]
        if wanted not in ort.get_available_providers():
            raise UsageError(f"--device {device}: this ONNX Runtime has no {wanted}; use --device CPU or auto")
        providers.insert(0, wanted)
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # ONNX Runtime raises its own Fail/InvalidGraph/... classes
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path} is not a readable ONNX model ({reason}); export it again with "
                           "bit-transfer export --format onnx") from None
    info = onnx_info(session, path)
    size, size_from = _image_size(image_size, lambda: (info["image_size"], info["size_from"]), fallback_size)
    if info["static_size"] and size != info["static_size"]:
        raise UsageError(f"{path} takes {info['static_size']}x{info['static_size']} images (fixed in the graph); "
                         f"drop --image-size or export it again at {size}")
    name = session.get_inputs()[0].name
    fixed_batch = info["batch"]
    from bit_transfer.data.pixels import unit_range_np

    def forward(x: np.ndarray, batch: int) -> np.ndarray:
        x = unit_range_np(x)  # the pipeline's uint8 pixels -> the exported graph's [-1, 1] input
        if fixed_batch is None:
            return np.asarray(session.run(None, {name: x})[0], np.float32)
        parts = []
        for i in range(0, len(x), fixed_batch):
            chunk = x[i : i + fixed_batch]
            pad = np.zeros((fixed_batch - len(chunk), *x.shape[1:]), np.float32)
            parts.append(np.asarray(session.run(None, {name: np.concatenate([chunk, pad])})[0])[: len(chunk)])
        return np.concatenate(parts).astype(np.float32)

    return LoadedModel(str(path), "onnx", info["num_classes"], info["class_names"], size, size_from,
                       batch_size or DEFAULT_BATCH, forward, arch=info["arch"])


def onnx_info(session, path: Path) -> dict:
    """What an ONNX model says about itself: class names, image size, classes, a fixed batch."""
    meta = dict(session.get_modelmeta().custom_metadata_map or {})
    if "bit_transfer_version" not in meta and "model" not in meta:  # models/onnx_export.py writes both
        raise WeightsError(f"{path} was not exported by bit-transfer (its metadata names no BiT model); predict runs "
                           "the .onnx that bit-transfer export --format onnx writes")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    if len(shape) != 4 or shape[1] != 3 or len(outputs) != 1 or len(outputs[0].shape) != 2:
        got = ", ".join(f"{i.name} {list(i.shape)}" for i in inputs)
        raise WeightsError(f"{path} is not an image classifier with one (N, 3, H, W) input and (N, classes) output "
                           f"(inputs: {got}); predict takes {TAKES}")
    names = _meta_json(meta, path, "class_names")
    classes = outputs[0].shape[1]
    if not isinstance(classes, int):  # a symbolic output size: the metadata's count
        classes = _meta_int(meta, path, "num_classes") or (len(names) if isinstance(names, list) else None)
    if classes is None:
        raise WeightsError(f"{path} does not say how many classes it has (no fixed output size, no class_names "
                           "metadata); export it again with bit-transfer export --format onnx")
    static = shape[2] if isinstance(shape[2], int) and shape[2] == shape[3] else None
    recorded = _meta_int(meta, path, "image_size")
    size, where = (static, "the ONNX model's input shape") if static else (
        (recorded, "the ONNX model's metadata") if recorded else (None, ""))
    names = [str(n) for n in names] if isinstance(names, list) and len(names) == classes else None
    return {"class_names": names, "num_classes": int(classes), "image_size": size, "size_from": where,
            "static_size": static, "batch": shape[0] if isinstance(shape[0], int) else None,
            "arch": _meta_arch(meta)}


def _meta_arch(meta: dict) -> tuple[list[int], float] | None:
    """(depths, width) from the 'model' metadata export writes, else None (no memory estimate)."""
    try:
        model = json.loads(meta.get("model") or "null")
        depths, width = [int(d) for d in model["depths"]], float(model["width"])
    except (ValueError, TypeError, KeyError):
        return None
    return (depths, width) if len(depths) == 4 and width > 0 else None


def _meta_json(meta: dict, path: Path, key: str):
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except ValueError:
        raise WeightsError(f"{path}: its '{key}' metadata is not valid JSON; export it again") from None


def _meta_int(meta: dict, path: Path, key: str) -> int | None:
    value = _meta_json(meta, path, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WeightsError(f"{path}: its '{key}' metadata is {value!r}, not a whole number >= 1; export it again")
    return value


def check_embeddable(model: LoadedModel) -> None:
    if model.features is None:
        raise UsageError(f"{model.source} is an ONNX model, which computes logits only; embed takes a run "
                         "directory or its .ckpt, a Hugging Face directory or hf:org/name, or an official BiT .npz")
