"""`bit-transfer predict` and `Predictor`: the top-k classes of images, from any model bit-transfer reads.

MODEL: a run directory (its latest checkpoint) or a `.ckpt`, a Hugging Face directory or `hf:org/name`,
an official BiT `.npz` (its own head), or an `.onnx` written by `bit-transfer export --format onnx`
(run by ONNX Runtime). Class names come from the checkpoint's meta, `config.json`'s `id2label` or the
ONNX metadata; a model without them (BiT-M's 21843-class head) answers with class indices.

Images go through the evaluation pipeline (`data.pipeline.eval_batches`: decode in worker threads,
square resize to the model's resolution, [-1, 1]), so a folder in the image-folder layout (its
sub-folders named like the model's classes) gives the numbers `bit-transfer eval` gives, and its
report (metrics.json, per_class.json, confusion.json) is written as eval writes it.

The resolution: `--image-size`, else the one the model records (a run's plan.json crop or its
checkpoint's meta, our Hugging Face export's preprocessor_config.json, the ONNX input shape), else
the rule's crop for `--recipe`'s data, else 128; the summary line says which.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bit_transfer.data.folder import IMAGE_EXTENSIONS, list_images
from bit_transfer.data.split import FileStore, Split, check_rgb, to_rgb
from bit_transfer.errors import DataError, UsageError, WeightsError, storage_error

DEFAULT_SIZE = 128
DEFAULT_BATCH = 32
DEVICES = ("auto", "CPU", "GPU", "Ascend")
TAKES = ("a run directory or its .ckpt, a Hugging Face directory or hf:org/name, an official BiT .npz, "
         "or an .onnx from bit-transfer export")
OUT_SUFFIXES = (".csv", ".jsonl")
GLOB_CHARS = "*?["
API_FIX = "pass strict=False to get None in its place"


# ---------------------------------------------------------------- the model
@dataclass
class LoadedModel:
    """A model ready to predict: images (N, 3, S, S) float32 in [-1, 1] -> logits (N, classes)."""

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

    @property
    def names(self) -> list[str]:
        """Class names, or the indices as strings when the model has none."""
        return self.class_names or [str(i) for i in range(self.num_classes)]


def load_model(spec, *, image_size: int | None = None, batch_size: int | None = None, device: str = "auto",
               fallback_size: Callable[[], tuple[int, str]] | None = None) -> LoadedModel:
    """The model `spec` names (module docstring); one-line errors for a missing or non-BiT model.

    `fallback_size()` -> (size, where from) is asked only when neither `image_size` nor the model
    records a resolution (predict --recipe: the rule's crop for the recipe's data).
    """
    if device not in DEVICES:
        raise UsageError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    path, kind = _model_kind(spec)
    if kind == "onnx":
        return _onnx_model(path, image_size, batch_size, device, fallback_size)
    return _mindspore_model(path, kind, image_size, batch_size, device, fallback_size)


def _model_kind(spec) -> tuple[Path, str]:
    """(local path, kind) for a model argument; a missing or unsupported one is one line."""
    text = str(spec)
    if text.startswith("hf:"):
        from bit_transfer.models.download import resolve_weights

        return resolve_weights(text, "BiT-custom"), "hf"
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
        from bit_transfer.rundir import is_run

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


def _setup_device(device: str) -> str:
    from bit_transfer import runtime

    have = runtime.available_devices()
    if device != "auto" and device not in have:
        raise UsageError(f"--device {device}: this MindSpore sees only {', '.join(have)}; install the MindSpore "
                         f"build for {device} or use --device auto")
    return runtime.setup(device)


def _mindspore_model(path: Path, kind: str, image_size, batch_size, device, fallback_size) -> LoadedModel:
    from bit_transfer import checkpoint
    from bit_transfer.models import create_model_from_weights

    run = ckpt = None
    if kind in ("run", "ckpt"):
        ckpt, run = checkpoint.find_checkpoint(path, command="predict")
        path = ckpt
    _setup_device(device)
    model, report = create_model_from_weights(path)  # architecture, padding and the file's own head
    meta = report.meta or {}
    names = [str(n) for n in meta.get("class_names") or []]
    names = names if len(names) == model.num_classes else None
    size, size_from = _image_size(image_size, lambda: _recorded_size(kind, path, run, meta), fallback_size)
    batch = batch_size or int(meta.get("micro_batch") or DEFAULT_BATCH)
    return LoadedModel(str(path), kind, model.num_classes, names, size, size_from, batch,
                       _mindspore_forward(model), run=run, checkpoint=ckpt)


def _mindspore_forward(model) -> Callable[[np.ndarray, int], np.ndarray]:
    """Compiled inference on the folded model (weight standardisation computed once, as eval runs it),
    one graph per batch size (EvalStep pads a short batch to its size)."""
    from bit_transfer.models.inference import fold
    from bit_transfer.step import EvalStep

    model = fold(model)  # holds the weights; the training model can go

    steps: dict[int, EvalStep] = {}

    def forward(x: np.ndarray, batch: int) -> np.ndarray:
        if batch not in steps:
            steps[batch] = EvalStep(model, batch)
        return steps[batch](x)

    return forward


def _recorded_size(kind: str, path: Path, run: Path | None, meta: dict) -> tuple[int | None, str]:
    """(resolution the model was trained at, where that is written) or (None, "")."""
    if kind in ("run", "ckpt"):
        from bit_transfer.models.export import _run_image_size

        size, _ = _run_image_size(run, meta)
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
    return DEFAULT_SIZE, f"the default; pass --image-size N for the resolution the model was trained at"


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

    def forward(x: np.ndarray, batch: int) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if fixed_batch is None:
            return np.asarray(session.run(None, {name: x})[0], np.float32)
        parts = []
        for i in range(0, len(x), fixed_batch):
            chunk = x[i : i + fixed_batch]
            pad = np.zeros((fixed_batch - len(chunk), *x.shape[1:]), np.float32)
            parts.append(np.asarray(session.run(None, {name: np.concatenate([chunk, pad])})[0])[: len(chunk)])
        return np.concatenate(parts).astype(np.float32)

    return LoadedModel(str(path), "onnx", info["num_classes"], info["class_names"], size, size_from,
                       batch_size or DEFAULT_BATCH, forward)


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
            "static_size": static, "batch": shape[0] if isinstance(shape[0], int) else None}


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


# ---------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """The image files to predict, in order, and their labels when their folders name the classes."""

    paths: list[str]
    folders: list[tuple[str, int, int]] = field(default_factory=list)  # (directory, first, end) of each listed dir
    labels: np.ndarray | None = None  # model class index per path
    labelled_by: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A short name for a report directory: the folder's name, else 'images'."""
        if len(self.folders) == 1:
            return Path(os.path.abspath(self.folders[0][0])).name or "images"
        return "images"


def collect_inputs(items: list[str], stdin=None) -> Inputs:
    """Files, directories (recursive, sorted), glob patterns and `-` (paths on stdin), in order, once each."""
    found = Inputs([])
    seen: set[str] = set()

    def add(paths: list[str]) -> None:
        for p in paths:
            key = os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                found.paths.append(p)

    for item in _expand_stdin(items, stdin):
        text, from_stdin = item
        if os.path.isdir(text):
            folder = str(Path(text))  # the form list_images builds paths from
            start = len(found.paths)
            images = list_images(Path(folder))
            if not images:
                raise DataError(f"no images under {text} (files ending in {', '.join(IMAGE_EXTENSIONS)}); "
                                "give image files or a folder that holds some")
            add(images)
            found.folders.append((folder, start, len(found.paths)))
        elif os.path.isfile(text):
            add([text])
        elif not from_stdin and any(c in text for c in GLOB_CHARS):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataError(f"no file matches {text!r}; check the pattern (quote it so the shell leaves it to "
                                "predict, e.g. 'photos/**/*.jpg')")
            for m in matches:
                add(list_images(Path(m)) if os.path.isdir(m) else [m])
        else:
            where = " (a path read from stdin)" if from_stdin else ""
            raise DataError(f"input {text} not found{where}; give image files, directories, glob patterns, "
                            "or - to read paths from stdin")
    if not found.paths:
        raise DataError("no images to predict: stdin gave no paths; pipe one path per line, e.g. "
                        "find photos -name '*.jpg' | bit-transfer predict MODEL -")
    return found


def _expand_stdin(items: list[str], stdin) -> Iterator[tuple[str, bool]]:
    read = False
    for item in items:
        if item != "-":
            yield item, False
            continue
        if read:
            raise UsageError("- (paths on stdin) is given twice; give it once")
        read = True
        for line in (stdin or sys.stdin):
            line = line.rstrip("\r\n")
            if line.strip():
                yield line, True


def label_folders(inputs: Inputs, class_names: list[str] | None) -> Inputs:
    """Labels from the image-folder layout: when every input is a folder whose sub-folders are all
    named like classes of the model (and it holds no loose images), each image's class is its folder's."""
    if not class_names or not inputs.folders:
        return inputs
    index = {c: i for i, c in enumerate(class_names)}
    covered = sum(end - start for _, start, end in inputs.folders)
    labels = np.full(len(inputs.paths), -1, np.int64)
    for folder, start, end in inputs.folders:
        subs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        loose = [p for p in inputs.paths[start:end] if os.path.dirname(p) == folder]
        unknown = [s for s in subs if s not in index]
        if not subs or loose or unknown:
            if subs and len(unknown) < len(subs):
                why = f"sub-folder(s) {', '.join(unknown[:3])} are not classes of the model" if unknown else \
                    "it holds images outside the class folders"
                inputs.notes.append(f"{folder} is not labelled by its folders: {why}")
            return inputs
        prefix = len(os.path.join(folder, ""))
        for i in range(start, end):
            labels[i] = index[inputs.paths[i][prefix:].split(os.sep, 1)[0]]
    if covered != len(inputs.paths):  # files or patterns besides the folders: no labels for those
        inputs.notes.append("labels ignored: some inputs are not class folders")
        return inputs
    inputs.labels = labels
    names = ", ".join(f for f, _, _ in inputs.folders[:3]) + (" ..." if len(inputs.folders) > 3 else "")
    inputs.labelled_by = f"the class folders of {names}"
    return inputs


def files_split(paths: list[str], name: str = "inputs") -> Split:
    """A Split over image files whose label is each file's position (the pipeline hands it back)."""
    n = len(paths)
    return Split(FileStore(list(paths), name), np.arange(n), np.arange(n), name, skip_corrupt=True)


# ---------------------------------------------------------------- running
def unreadable_reason(split: Split, i: int) -> str:
    """Why image i does not open or decode, in a few words."""
    try:
        im = split.store.open(int(split.rows[i]))
        to_rgb(im)
    except Image.UnidentifiedImageError:
        return "not an image (unknown format)"
    except OSError as e:
        if e.strerror:
            return e.strerror.lower()
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"truncated or corrupt ({text})" if "truncated" in text else text
    except Exception as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return "it failed to decode"


class Unreadable:
    """The unreadable images of a split, named once each as they are found (stderr), or the first one
    raised (`strict`)."""

    def __init__(self, split: Split, strict: bool, say: Callable[[str], None],
                 fix: str = "drop --strict to skip unreadable files"):
        self.split, self.strict, self.say, self.fix = split, strict, say, fix
        self.positions: list[int] = []
        self._known = 0

    def check(self) -> None:
        corrupt = self.split.store.corrupt
        if len(corrupt) == self._known:  # the usual case: nothing new, no work
            return
        self._known = len(corrupt)
        bad = np.flatnonzero(np.isin(self.split.rows, np.array(list(corrupt), np.int64)))
        for i in sorted(set(bad.tolist()) - set(self.positions)):
            where, why = self.split.where(i), unreadable_reason(self.split, i)
            if self.strict:
                raise DataError(f"{where}: {why}; replace or delete it, or {self.fix}")
            self.positions.append(i)
            self.say(f"skipped {where}: {why}")


def stream(model: LoadedModel, split: Split, unreadable: Unreadable, workers: int | None = None
           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions in the split, logits) batch after batch, through the eval pipeline.

    Headers are checked first (a non-image is named before any work), then images that fail to
    decode are named as the pipeline meets them; `split.labels` must be the positions.
    """
    from bit_transfer.data import pipeline

    split.check_headers(workers)
    unreadable.check()
    batch = max(1, min(model.batch_size, len(split)))
    batches = pipeline.eval_batches(split, crop=model.image_size, batch_size=batch, workers=workers)
    try:
        for images, positions in batches:
            unreadable.check()
            yield positions.astype(np.int64), model.forward(images, batch)
    finally:
        batches.close()  # stops the pipeline's threads now, also when a caller stops early
    unreadable.check()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def best_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) of the k best classes per row, best first; ties keep the lower index,
    so the first is the argmax evaluation counts."""
    probs = softmax(logits)
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(probs, idx, axis=1)


# ---------------------------------------------------------------- Python API
@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, best first."""

    source: str  # the path, or "image N" for a PIL image or an array
    names: tuple[str, ...]
    probs: tuple[float, ...]

    @property
    def label(self) -> str:
        return self.names[0]

    @property
    def prob(self) -> float:
        return self.probs[0]

    def __repr__(self) -> str:
        best = ", ".join(f"{n} {100 * p:.1f}%" for n, p in zip(self.names, self.probs))
        return f"Prediction({self.source}: {best})"


class _ItemStore:
    """Paths, PIL images and uint8 arrays (already PIL images here), one per row: a FileStore's duck type."""

    def __init__(self, items: list):
        self.items, self.name = items, "images"
        self.corrupt: set[int] = set()

    def __len__(self):
        return len(self.items)

    def open(self, j: int) -> Image.Image:
        item = self.items[j]
        return item.copy() if isinstance(item, Image.Image) else Image.open(item)  # never the caller's object

    def header_size(self, j: int) -> tuple[int, int]:
        item = self.items[j]
        if isinstance(item, Image.Image):
            return item.size[::-1]
        with Image.open(item) as im:
            return im.size[::-1]

    def unreadable(self, rows) -> list[tuple[int, Exception]]:
        bad = []
        for j in rows:
            try:
                self.header_size(int(j))
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
                bad.append((int(j), e))
        return bad

    def where(self, j: int) -> str:
        item = self.items[j]
        return str(item) if isinstance(item, (str, os.PathLike)) else f"image {j}"


class Predictor:
    """Top-k classes for images in a notebook, preprocessed exactly as `bit-transfer eval` does.

        p = Predictor("runs/flowers-20250101-120000")      # or a .ckpt, HF dir, hf:org/name, .npz, .onnx
        p.predict("daisy.jpg")                             # Prediction(daisy.jpg: daisy 97.1%, ...)
        p.predict([path, pil_image, uint8_array], top_k=3) # a list, one Prediction per image

    An unreadable image raises DataError naming it; with `strict=False` its place holds None.
    """

    def __init__(self, model, *, image_size: int | None = None, batch_size: int | None = None,
                 device: str = "auto", top_k: int = 5, workers: int | None = None):
        self.model = load_model(model, image_size=image_size, batch_size=batch_size, device=device)
        self.top_k, self.workers = top_k, workers

    @property
    def class_names(self) -> list[str]:
        return self.model.names

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def logits(self, images) -> np.ndarray:
        """(N, classes) float32 logits of a list of images; an unreadable one raises DataError."""
        items, _ = _as_items(images)
        split = Split(_ItemStore(items), np.arange(len(items)), np.arange(len(items)), "images", skip_corrupt=True)
        out = np.zeros((len(items), self.model.num_classes), np.float32)
        for pos, logits in stream(self.model, split, Unreadable(split, True, print, API_FIX), self.workers):
            out[pos] = logits
        return out

    def predict(self, images, top_k: int | None = None, strict: bool = True):
        """Prediction for one image (a path, a PIL image, an H×W[×C] uint8 array), or a list of them for
        a list (or an N×H×W×C array)."""
        items, single = _as_items(images)
        k = min(top_k or self.top_k, self.model.num_classes)
        if k < 1:
            raise UsageError(f"top_k must be >= 1, got {top_k}")
        split = Split(_ItemStore(items), np.arange(len(items)), np.arange(len(items)), "images", skip_corrupt=True)
        results: list[Prediction | None] = [None] * len(items)
        names = self.model.names
        for pos, logits in stream(self.model, split, Unreadable(split, strict, lambda s: None, API_FIX), self.workers):
            idx, probs = best_k(logits, k)
            for p, ii, pp in zip(pos, idx, probs):
                results[p] = Prediction(split.where(int(p)), tuple(names[i] for i in ii), tuple(float(x) for x in pp))
        return results[0] if single else results


def _as_items(images) -> tuple[list, bool]:
    """(paths and PIL images, one input image?): arrays become PIL images now, so a bad one is named here."""
    single = isinstance(images, (str, os.PathLike, Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3))
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    items = [images] if single else list(images)
    if not items:
        raise UsageError("no images given; pass a path, a PIL image, a uint8 array, or a list of them")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            what = f"image {i}"
            if item.ndim not in (2, 3):
                raise DataError(f"{what}: expected an H×W or H×W×C uint8 array, got shape {item.shape}")
            item = Image.fromarray(check_rgb(item[..., None] if item.ndim == 2 else item, what))
        elif not isinstance(item, (str, os.PathLike, Image.Image)):
            raise UsageError(f"image {i} is a {type(item).__name__}; give paths, PIL images or uint8 arrays")
        out.append(item)
    return out, single


# ---------------------------------------------------------------- output files
class OutFile:
    """--out: a .csv (path,pred,prob,topk) or .jsonl file, written to a temporary beside it and moved
    into place at the end; an existing file is never replaced without `overwrite`."""

    def __init__(self, path, overwrite: bool = False):
        self.path, self.overwrite = Path(path).expanduser(), overwrite
        self.format = self.path.suffix.lower()
        if self.format not in OUT_SUFFIXES:
            raise UsageError(f"--out {self.path}: give a .csv or .jsonl file (e.g. --out preds.csv)")
        if self.path.is_dir():
            raise UsageError(f"--out {self.path} is a directory; give a .csv or .jsonl file in it "
                             f"(e.g. --out {self.path / ('preds' + self.format)})")
        if self.path.exists() and not overwrite:
            raise UsageError(f"--out {self.path} exists; choose a new file, or add --overwrite to replace it")
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask decides, as for any file
            self.file = os.fdopen(fd, "w", newline="", encoding="utf-8")
        except OSError as e:
            raise storage_error(e, self.path) from None
        if self.format == ".csv":
            import csv

            self.csv = csv.writer(self.file, lineterminator="\n")
            self._guard(self.csv.writerow, ["path", "pred", "prob", "topk"])

    def write(self, path: str, names: list[str], probs: list[float]) -> None:
        if self.format == ".csv":
            topk = ";".join(f"{n}:{p:.6f}" for n, p in zip(names, probs))
            self._guard(self.csv.writerow, [path, names[0], f"{probs[0]:.6f}", topk])
        else:
            row = {"path": path, "pred": names[0], "prob": round(float(probs[0]), 6),
                   "topk": [[n, round(float(p), 6)] for n, p in zip(names, probs)]}
            self._guard(self.file.write, json.dumps(row, ensure_ascii=False) + "\n")

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            self.abort()
            raise storage_error(e, self.path) from None

    def commit(self) -> None:
        """Flush, fsync and move into place; without `overwrite`, a file that appeared meanwhile is kept."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if self.overwrite:
                os.replace(self.tmp, self.path)
            else:
                _link_new(self.tmp, self.path)
        except FileExistsError:
            self.abort()
            raise UsageError(f"--out {self.path} was created while predicting; it is kept: choose a new file, "
                             "or add --overwrite to replace it") from None
        except OSError as e:
            self.abort()
            raise storage_error(e, self.path) from None

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _link_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` only if no file has it (a hard link fails on an existing name)."""
    import errno

    try:
        os.link(tmp, path)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
            raise
        if path.exists():  # a file system without hard links: check, then rename
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


# ---------------------------------------------------------------- the command
def predict_command(args) -> int:
    """`bit-transfer predict MODEL INPUT... | --recipe RECIPE` (cli.py's arguments)."""
    if args.recipe and args.inputs:
        raise UsageError("give INPUT images or --recipe RECIPE, not both")
    if not args.recipe and not args.inputs:
        raise UsageError("predict needs INPUT images (files, directories, glob patterns, or - for paths on stdin) "
                         "or --recipe RECIPE for a recipe's eval split")
    out = OutFile(args.out, args.overwrite) if args.out else None  # refused before any work
    try:
        job = _prepare(args)
        _run(job, args, out)
    except BaseException:
        if out:
            out.abort()
        raise
    return 0


@dataclass
class _Job:
    model: LoadedModel
    split: Split  # labels = positions
    labels: np.ndarray | None  # model class per position, when labelled
    labelled_by: str
    class_names: list[str]
    report: object = None  # RunDir of the labelled case
    workers: int | None = None
    notes: list[str] = field(default_factory=list)


def _prepare(args) -> _Job:
    """The model, the images and their labels, and the report directory: every one-line refusal
    happens here, before a single image is decoded."""
    if args.recipe:
        return _prepare_recipe(args)
    inputs = collect_inputs(args.inputs)  # a missing path fails before the model loads
    model = load_model(args.model, image_size=args.image_size, batch_size=args.batch_size, device=args.device)
    inputs = label_folders(inputs, model.class_names)
    split = files_split(inputs.paths, inputs.folders[0][0] if len(inputs.folders) == 1 else "inputs")
    job = _Job(model, split, inputs.labels, inputs.labelled_by, model.names, workers=args.workers, notes=inputs.notes)
    if job.labels is not None:
        job.report = _claim_report(args.report, model, inputs.name, "runs")
    elif args.report:
        job.notes.append("--report was not written: the images carry no labels (no class folders)")
    return job


def _prepare_recipe(args) -> _Job:
    from bit_transfer import data, planning, recipe as recipes
    from bit_transfer.evalrun import check_class_names

    r = recipes.load(args.recipe)

    def rule_crop() -> tuple[int, str]:
        return planning.make_plan(r, planning.task_info(r)).crop, f"the rule's crop for {r.name}'s data"

    batch = args.batch_size or r.train.eval_batch_size
    model = load_model(args.model, image_size=args.image_size, batch_size=batch, device=args.device,
                       fallback_size=rule_crop)
    dataset = data.load(r.data)
    if model.num_classes != dataset.num_classes:
        raise DataError(f"{model.source} has {model.num_classes} classes but {r.name}'s data has "
                        f"{dataset.num_classes}; predict with a model trained for it")
    check_class_names(Path(model.source), model.class_names, list(dataset.class_names))
    ev = dataset.eval
    split = Split(ev.store, ev.rows, np.arange(len(ev)), ev.name, skip_corrupt=True)
    job = _Job(model, split, ev.labels, f"{r.name}'s eval split", list(dataset.class_names),
               workers=args.workers or r.data.workers)
    job.report = _claim_report(args.report, model, r.name, r.log.dir)
    return job


def _claim_report(report_dir, model: LoadedModel, name: str, parent: str):
    """--report, else `<run>/evals/<checkpoint>-predict-<name>` for a run's checkpoint (a run that is
    not writable, e.g. shared read-only, is not written to), else a new `<parent>/predict-<name>-<time>`;
    claimed like eval's directory (never someone's files)."""
    from bit_transfer.evalrun import _safe
    from bit_transfer.rundir import RunDir, is_run, new_run_path

    if report_dir:
        path = Path(report_dir).expanduser()
    elif model.run is not None and is_run(model.run) and os.access(model.run, os.W_OK):
        path = model.run / "evals" / f"{model.checkpoint.stem}-predict-{_safe(name)}"
    else:
        path = new_run_path(parent, f"predict-{_safe(name)}")
    return RunDir.claim(path, kind="eval", flag="--report")


def _run(job: _Job, args, out: OutFile | None) -> None:
    import shutil

    from tqdm import tqdm

    split, model = job.split, job.model
    k = min(args.top_k, model.num_classes)
    show_table = out is None and not args.quiet
    bar = tqdm(total=len(split), unit="img", file=sys.stderr, dynamic_ncols=True, leave=False,
               disable=True if args.quiet or len(split) <= model.batch_size else None)
    table = Table(split, model.names, k) if show_table else None
    unreadable = Unreadable(split, args.strict, lambda s: bar.write(s, file=sys.stderr))
    done = 0
    start = time.perf_counter()

    def emit(pos: np.ndarray, logits: np.ndarray) -> np.ndarray:
        nonlocal done
        idx, probs = best_k(logits, k)
        for p, ii, pp in zip(pos, idx, probs):
            names, values = [model.names[i] for i in ii], [float(x) for x in pp]
            if out:
                out.write(split.where(int(p)), names, values)
            if table:
                bar.write(table.row(split.where(int(p)), names, values), file=sys.stdout)
        done += len(pos)
        bar.update(len(pos))
        return logits

    try:
        if table:
            bar.write(table.header(), file=sys.stdout)
        batches = stream(model, split, unreadable, job.workers)
        if job.labels is not None:
            from bit_transfer.evaluate import evaluate

            try:
                result = evaluate(lambda z: z, ((emit(p, z), job.labels[p]) for p, z in batches), model.num_classes)
            except ValueError:  # nothing was readable
                result = None
        else:
            for p, z in batches:
                emit(p, z)
            result = None
    except BaseException:
        if job.report is not None and job.report.created:
            shutil.rmtree(job.report.path, ignore_errors=True)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if not done:
        raise DataError(f"none of the {len(split)} images could be read (each named above); nothing to predict")
    if out:
        out.commit()
    _summary(job, args, out, result, done, len(unreadable.positions), seconds)


class Table:
    """The readable stdout table: path, then the top-k classes with their probabilities."""

    def __init__(self, split: Split, names: list[str], k: int):
        widest = max((len(split.where(i)) for i in range(min(len(split), 10000))), default=4)
        self.path_width = min(max(widest, 4), 60)
        self.name_width = min(max(5, *(len(n) for n in names)), 24)
        self.k = k

    def header(self) -> str:
        cols = "  ".join(f"{'top-' + str(i + 1):<{self.name_width}} {'prob':>6}" for i in range(self.k))
        return f"{'path':<{self.path_width}}  {cols}".rstrip()

    def row(self, path: str, names: list[str], probs: list[float]) -> str:
        cols = "  ".join(f"{n:<{self.name_width}} {100 * p:5.1f}%" for n, p in zip(names, probs))
        return f"{path:<{self.path_width}}  {cols}"


def _summary(job: _Job, args, out, result, done: int, skipped: int, seconds: float) -> None:
    model = job.model
    rate = done / max(seconds, 1e-9)
    size = f"{model.image_size}x{model.image_size} px ({model.size_from})"
    skip = f"; {skipped} unreadable file{'s' if skipped != 1 else ''} skipped (named above)" if skipped else ""
    print(f"predicted {done} image{'s' if done != 1 else ''} in {seconds:.1f} s ({rate:.1f} images/s) with "
          f"{model.source} at {size}{skip}")
    for note in job.notes:
        print(f"note: {note}")
    if out:
        print(f"wrote {done} prediction{'s' if done != 1 else ''} to {out.path}")
    if result is not None:
        fields = {"model": model.source, "inputs": job.labelled_by, "crop": model.image_size,
                  "skipped_unreadable": skipped}
        if model.checkpoint is not None:
            fields["checkpoint"] = str(model.checkpoint)
        job.report.write_final(result, job.class_names, fields, report_dir="")
        print(f"top-1 {100 * result.top1:.2f}% top-5 {100 * result.top5:.2f}% loss {result.loss:.4f} on "
              f"{result.count} images labelled by {job.labelled_by}")
        print(f"wrote metrics.json, per_class.json and confusion.json to {job.report.path}")
