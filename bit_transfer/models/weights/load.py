"""Read pretrained weights (official .npz, Hugging Face, our .ckpt) into a ResNetV2.

Every reader returns tensors under *our* parameter names in our layout (conv OIHW, head
(num_classes, num_features)), so checking and assigning is one code path for all formats.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bit_transfer.errors import WeightsError
from bit_transfer.models.weights import hf
from bit_transfer.models.resnetv2 import MODELS, ResNetV2, create_model

HEAD = ("head.weight", "head.bias")
HEAD_MODES = ("zero", "keep")


@dataclass
class WeightsFile:
    """Tensors of one weights file under our names, plus what the file says about the model."""

    source: str
    format: str  # npz | hf | safetensors | ckpt
    tensors: dict
    padding: str | None = None  # padding the weights need, when the file says
    config: dict = field(default_factory=dict)  # depths/width/num_classes/class_names from config or meta
    meta: dict = field(default_factory=dict)  # our checkpoint's meta


@dataclass
class LoadReport:
    """What `load_weights` did: loaded names, the head decision, and notes worth showing."""

    source: str
    format: str
    head: str
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (name, file shape, model shape)
    notes: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def problems(self) -> list[str]:
        """One line per problem."""
        return (
            [f"missing {n}: the model has it, the file does not" for n in self.missing]
            + [f"unexpected {n}: the file has it, the model does not" for n in self.unexpected]
            + [f"shape mismatch {n}: file {tuple(a)} vs model {tuple(b)}" for n, a, b in self.mismatched]
        )

    def __str__(self) -> str:
        head = "zero-initialised head" if self.head == "zero" else "checkpoint head kept"
        notes = "".join(f"; note: {n}" for n in self.notes)
        return f"loaded {len(self.loaded)} tensors from {self.source} ({self.format}), {head}{notes}"


# ---------------------------------------------------------------- official .npz (HWIO kernels)
_NPZ = [
    (r"resnet/root_block/standardized_conv2d/kernel", "root.conv.weight"),
    (r"resnet/block(\d+)/unit(\d+)/a/proj/standardized_conv2d/kernel", "stages.{0}.units.{1}.proj.weight"),
    (r"resnet/block(\d+)/unit(\d+)/([abc])/standardized_conv2d/kernel", "stages.{0}.units.{1}.conv{2}.weight"),
    (r"resnet/block(\d+)/unit(\d+)/([abc])/group_norm/gamma", "stages.{0}.units.{1}.norm{2}.weight"),
    (r"resnet/block(\d+)/unit(\d+)/([abc])/group_norm/beta", "stages.{0}.units.{1}.norm{2}.bias"),
    (r"resnet/group_norm/gamma", "norm.weight"),
    (r"resnet/group_norm/beta", "norm.bias"),
    (r"resnet/head/conv2d/kernel", "head.weight"),
    (r"resnet/head/conv2d/bias", "head.bias"),
]


def npz_name(key: str) -> str | None:
    """Our name for an official key: blockB/unitUU are 1-based, a/b/c are conv/norm 1/2/3."""
    for pattern, template in _NPZ:
        m = re.fullmatch(pattern, key)
        if m:
            groups = [int(g) - 1 if g.isdigit() else "abc".index(g) + 1 for g in m.groups()]
            return template.format(*groups)
    return None


def npz_array(name: str, a: np.ndarray) -> np.ndarray:
    """Official layout -> ours: HWIO -> OIHW; head kernel (1, 1, F, C) -> (C, F); vectors flat."""
    if name == "head.weight":
        return a.reshape(a.shape[-2], a.shape[-1]).T
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1)
    return a.reshape(-1)


def read_npz(path: Path) -> WeightsFile:
    tensors, unknown = {}, {}
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in f.files:
                name = npz_name(key)
                if name is None:
                    unknown[key] = f[key]
                else:
                    tensors[name] = npz_array(name, f[key])
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise WeightsError(
            f"{path} is not a readable .npz (truncated or corrupt: {str(e).splitlines()[0] or type(e).__name__}); "
            "delete it and download it again"
        ) from None
    tensors.update(unknown)  # reported as unexpected by name
    return WeightsFile(str(path), "npz", tensors, padding="fixed")


# ---------------------------------------------------------------- Hugging Face / safetensors
def read_safetensors(path: Path, config_path: Path | None = None) -> WeightsFile:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise WeightsError(
            f"{path} is not a readable float .safetensors file ({str(e).splitlines()[0]}); "
            "if truncated, delete it and download it again"
        ) from None
    is_hf = any(k.startswith(("bit.", "classifier.")) for k in raw)
    tensors = {(hf.from_hf_name(k) or k) if is_hf else k: v for k, v in raw.items()}
    wf = WeightsFile(str(path), "hf" if is_hf else "safetensors", tensors)
    config_path = config_path or path.with_name("config.json")
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except ValueError:
            raise WeightsError(f"{config_path} is not valid JSON; download it again") from None
        wf.config = hf.parse_config(config, str(config_path))
        wf.padding = wf.config["padding"]
        if wf.config["class_names"]:
            wf.meta = {"class_names": wf.config["class_names"]}  # reported, e.g. for evaluation
    return wf


def read_hf_dir(path: Path) -> WeightsFile:
    st, config = path / "model.safetensors", path / "config.json"
    if not st.is_file():
        what = "pytorch_model.bin (a pickle we do not load)" if (path / "pytorch_model.bin").exists() else "no weights"
        raise WeightsError(
            f"{path} has {what}; it needs model.safetensors next to config.json "
            "(in transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    if not config.is_file():
        raise WeightsError(f"{path} has model.safetensors but no config.json; copy the checkpoint's config.json there")
    return read_safetensors(st, config)


def read_ckpt(path: Path) -> WeightsFile:
    from bit_transfer.models.weights.ckpt import read_checkpoint

    params, meta = read_checkpoint(path)
    tensors = {k: v for k, v in params.items() if not k.startswith("optimizer.")}
    wf = WeightsFile(str(path), "ckpt", tensors, meta=meta)
    model = meta.get("model") or {}
    wf.padding = model.get("padding")
    wf.config = {k: model[k] for k in ("depths", "width", "num_classes", "name") if k in model}
    if meta.get("class_names"):
        wf.config["class_names"] = list(meta["class_names"])
    return wf


def read_weights(path) -> WeightsFile:
    """Read any supported weights file or Hugging Face directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        return read_hf_dir(path)
    if not path.is_file():
        raise WeightsError(f"weights {path} not found; check model.weights (a path, 'auto', 'hf:org/name' or a URL)")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return read_npz(path)
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix == ".ckpt":
        return read_ckpt(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK"):
        return read_npz(path)
    raise WeightsError(
        f"{path}: unknown weights format; use an official BiT .npz, a Hugging Face dir/.safetensors, or a .ckpt"
    )


# ---------------------------------------------------------------- checking and assigning
def infer_arch(tensors: dict) -> tuple[list[int] | None, float | None, int | None]:
    """(depths, width, head classes) a weights file was made for, from its tensor names and shapes."""
    depths = [0, 0, 0, 0]
    for name in tensors:
        m = re.fullmatch(r"stages\.(\d)\.units\.(\d+)\.conv1\.weight", name)
        if m and int(m[1]) < 4:
            depths[int(m[1])] = max(depths[int(m[1])], int(m[2]) + 1)
    root = tensors.get("root.conv.weight")
    width = None
    if root is not None and root.ndim == 4:
        width = root.shape[0] / 64
        width = int(width) if width.is_integer() else width
    head = tensors.get("head.weight")
    classes = int(head.shape[0]) if head is not None and head.ndim == 2 else None
    return (depths if min(depths) > 0 else None), width, classes


def arch_name(depths, width) -> str:
    """'R50x1' for a registry architecture, else 'depths [..], width w'."""
    for name, (d, w) in MODELS.items():
        if list(d) == list(depths) and w == width:
            return name.split("-", 2)[2]
    return f"depths {list(depths)}, width {width}"


def _describe(model: ResNetV2) -> str:
    return f"{model.model_name} ({arch_name(model.depths, model.width)})"


def check(model: ResNetV2, wf: WeightsFile, head: str) -> LoadReport:
    """Compare a weights file with a model; raise one WeightsError line if they do not fit."""
    if head not in HEAD_MODES:
        raise WeightsError(f"head must be 'zero' (fine-tuning) or 'keep' (use the file's head), got {head!r}")
    report = LoadReport(wf.source, wf.format, head, meta=wf.meta)
    params = {p.name: p for p in model.get_parameters()}
    for name, value in wf.tensors.items():
        if name not in params:
            report.unexpected.append(name)
        elif tuple(value.shape) != tuple(params[name].shape):
            if name not in HEAD:
                report.mismatched.append((name, tuple(value.shape), tuple(params[name].shape)))
        else:
            report.loaded.append(name)
    report.missing = [n for n in params if n not in wf.tensors and n not in HEAD]

    if wf.padding and wf.padding != model.padding:
        if wf.format == "npz":
            report.notes.append("official weights were trained with fixed padding; this model uses 'same'")
        else:
            raise WeightsError(
                f"{wf.source} was made for padding '{wf.padding}' but the model uses '{model.padding}'; "
                f"create it with create_model(..., padding='{wf.padding}') or use create_model_from_weights"
            )

    problems = report.problems()
    if problems:
        counts = (f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, "
                  f"{len(report.mismatched)} shape mismatches")
        depths, width, _ = infer_arch(wf.tensors)
        if depths and width and (depths != model.depths or width != model.width):
            arch = arch_name(depths, width)
            build = f"an {arch} model" if arch[0] == "R" else f"the model with depths={depths}, width={width}"
            msg = (f"{wf.source} holds {arch} but the model is {_describe(model)}; "
                   f"create {build} or use weights made for {model.model_name} ({counts})")
        else:
            more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
            msg = (f"{wf.source} does not fit {_describe(model)}: {'; '.join(problems[:2])}{more}; "
                   "check it is the right file, or download it again")
        err = WeightsError(msg)
        err.report = report
        raise err

    file_head = [wf.tensors.get(n) for n in HEAD]
    if head == "keep":
        if any(t is None for t in file_head):
            raise WeightsError(f"{wf.source} has no classifier head; load it with head='zero' to train a new one")
        if tuple(file_head[0].shape) != (model.num_classes, model.num_features):
            raise WeightsError(
                f"{wf.source} has a {file_head[0].shape[0]}-class head, the model {model.num_classes}; "
                f"use head='zero' to fine-tune a new head, or create the model with num_classes={file_head[0].shape[0]}"
            )
        report.loaded += [n for n in HEAD if n not in report.loaded]
    else:
        report.loaded = [n for n in report.loaded if n not in HEAD]
    return report


def assign(model: ResNetV2, wf: WeightsFile, report: LoadReport) -> None:
    from bit_transfer.system import device

    params = {p.name: p for p in model.get_parameters()}
    for name in report.loaded:  # in place: graphs compiled earlier must see the loaded values
        device.assign(params[name], wf.tensors[name].astype(np.float32))
    if report.head == "zero":
        model.reset_head(model.num_classes)  # same size: zeroed in place


def load_weights(model: ResNetV2, path, head: str = "zero") -> LoadReport:
    """Load weights into `model`: a local file/dir, 'auto', 'hf:org/name' or an http(s) URL.

    head="zero" (default, fine-tuning) zero-initialises the model's head whatever the file has;
    head="keep" uses the file's head and requires its shape to match the model's.
    """
    return _load(model, read_weights(_local(path, model.model_name)), head)


def _load(model: ResNetV2, wf: WeightsFile, head: str) -> LoadReport:
    """Check that `wf` fits `model` (one line when not), then assign it: every route ends here."""
    report = check(model, wf, head)
    assign(model, wf, report)
    return report


def create_model_with_weights(name: str, num_classes: int, weights: str, *, depths=None, width=None,
                              head: str = "zero"):
    """The recipe's architecture with `weights` ('auto', a path, hf:org/name, a URL) loaded, its padding
    the file's (google/bit-* Hugging Face checkpoints need TF "SAME"); one read of the file.
    Returns (model, LoadReport, the local path)."""
    from bit_transfer.models.weights.download import resolve_weights

    path = resolve_weights(weights, name)
    wf = read_weights(path)
    model = create_model(name, num_classes, depths=depths, width=width, padding=wf.padding or "fixed")
    return model, _load(model, wf, head), path


def _local(spec, model_name: str) -> Path:
    from bit_transfer.models.weights.download import is_remote, resolve_weights

    if isinstance(spec, str) and is_remote(spec):
        return resolve_weights(spec, model_name)
    return Path(spec)


def weights_padding(path) -> str:
    """Padding ('fixed' or 'same') a local weights file needs; pass it to create_model.

    Only Hugging Face checkpoints whose config.json says `global_padding: SAME` (google/bit-*)
    need 'same'; official .npz files are 'fixed'; our .ckpt files record theirs.
    """
    path = Path(path).expanduser()
    config = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if path.suffix.lower() != ".npz" and config.is_file():
        try:
            return hf.parse_config(json.loads(config.read_text()), str(config))["padding"]
        except ValueError:
            raise WeightsError(f"{config} is not valid JSON; download it again") from None
    if path.suffix.lower() == ".ckpt":
        return read_ckpt(path).padding or "fixed"
    return "fixed"


def create_model_from_weights(path, num_classes: int | None = None, head: str | None = None, name: str | None = None):
    """Build the model a weights file was made for (architecture, padding, head), then load it.

    num_classes=None keeps the file's head (e.g. evaluate on the classes it was trained for);
    otherwise a new zero head unless head="keep". Returns (model, LoadReport).
    """
    wf = read_weights(_local(path, name or "BiT-custom"))
    depths, width, file_classes = infer_arch(wf.tensors)
    depths = wf.config.get("depths") or depths
    width = wf.config.get("width") or width
    if not depths or not width:
        raise WeightsError(f"{wf.source} has no BiT root conv and stages; it is not a BiT checkpoint")
    classes = num_classes or file_classes or wf.config.get("num_classes")
    if classes is None:
        raise WeightsError(f"{wf.source} has no classifier head; pass num_classes")
    head = head or ("keep" if num_classes is None else "zero")
    name = _guess_name(name, wf)
    if name in MODELS and MODELS[name] != (list(depths), width):
        name = "BiT-custom"
    model = create_model(name, classes, depths=depths, width=width, padding=wf.padding or "fixed")
    return model, _load(model, wf, head)


def _guess_name(name, wf: WeightsFile) -> str:
    """A registry name when the file says so (meta or file name like BiT-M-R50x1.npz), else custom."""
    if name:
        return name
    for cand in filter(None, [wf.config.get("name"), Path(wf.source).name]):
        for registered in sorted(MODELS, key=len, reverse=True):  # R101x1 before R10...
            if str(cand).lower().startswith(registered.lower()):
                return registered
    return "BiT-custom"
