"""Recipes: YAML -> a typed, validated `Recipe` with documented defaults.

A recipe has five sections: `data`, `model`, `train`, `rule` (overrides of the BiT-HyperRule;
null means "the rule decides") and `log`. Every key is declared once below with its converter
and a one-line doc; `docs/recipes.md` is generated from these declarations (`reference_markdown`).
Bad input raises `RecipeError` with one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bit_transfer.config.converters import (MAX_BATCH, MAX_RESOLUTION, MAX_STEPS, Bool, Float, ImageSize, Int,
                                             IntList, Nullable, OneOf, Str, key)
from bit_transfer.errors import RecipeError, UsageError
from bit_transfer.models.archs import MODELS, canonical_name
from bit_transfer.system.filekinds import special_kind



AUTO = Str(["auto"])
STEPS = Int(1, MAX_STEPS, "more steps than any run can mean")
PIXELS = Int(1, MAX_RESOLUTION, "more pixels than any BiT resolution can mean")
BATCH = Int(1, MAX_BATCH, "a larger batch than any run can mean")
DEVICES = ["auto", "CPU", "GPU", "Ascend"]


# ---------------------------------------------------------------- sections
@dataclass
class DataConfig:
    source: str = key("hf", Str(["hf", "imagefolder", "cifar", "demo"]), "where the images come from")
    name: str | None = key(None, Nullable(Str()), "Hugging Face dataset id (source hf), e.g. cifar10")
    path: str | None = key(None, Nullable(Str()), "local directory (imagefolder, cifar; or a saved HF dataset)")
    train_split: str = key("train", Str(), "training split name")
    eval_split: str | None = key(None, Nullable(Str()), "eval split; null: the dataset's test, then validation split")
    image_column: str | None = key(None, Nullable(Str()), "image column (hf); null: detected (img, image, ...)")
    label_column: str | None = key(None, Nullable(Str()), "label column (hf); null: detected (label, fine_label, ...)")
    holdout: float | None = key(
        None, Nullable(Float(0, 1, lo_open=True, hi_open=True)), "carve this seeded fraction of train as the eval split"
    )
    examples_per_class: int | None = key(None, Nullable(Int(1)), "few-shot: exactly K training images per class")
    seed: int = key(0, Int(0), "seed of the few-shot subset and the holdout split")
    allow_fewer: bool = key(False, Bool(), "few-shot: take all images of a class that has fewer than K")
    skip_corrupt: bool = key(False, Bool(), "skip and count unreadable images instead of failing")
    random_crop: bool = key(True, Bool(), "train augmentation: random crop (else resize straight to crop)")
    random_flip: bool = key(True, Bool(), "train augmentation: random horizontal flip")
    workers: int | None = key(None, Nullable(Int(1)), "decoding workers; null: the CPUs per rank on this machine")
    size: int | None = key(None, Nullable(Int(1)), "training-set size for the rule; null: counted from the data")
    image_size: tuple[int, int] | None = key(
        None, Nullable(ImageSize()), "image resolution for the rule, HxW; null: measured from the data"
    )
    cache_dir: str | None = key(None, Nullable(Str()), "measurement cache; null: $BIT_TRANSFER_HOME/data-cache")


@dataclass
class ModelConfig:
    name: str = key("BiT-M-R50x1", Str(), "BiT-S-/BiT-M- R50x1, R50x3, R101x1, R101x3, R152x2, R152x4, or custom")
    weights: str = key("auto", Str(), "auto (official download), a local path, hf:org/name, a URL, or none")
    depths: list[int] | None = key(None, Nullable(IntList(4, lo=1)), "units per stage (custom/tiny models)")
    width: float | None = key(None, Nullable(Float(0, lo_open=True)), "width factor (custom/tiny models)")
    head: str = key("zero", Str(["zero", "keep"]), "zero: new zero-initialised head; keep: the checkpoint's head")


FREEZE = ("none", "stem", "stage1", "stage2", "stage3", "stage4", "backbone")


def frozen_part(t) -> str:
    """What `train.freeze` (or its alias `train.mode: linear`, = backbone) leaves untrained."""
    return "backbone" if t.mode == "linear" else t.freeze


@dataclass
class TrainConfig:
    batch_size: int | None = key(None, Nullable(BATCH), "logical batch; null: the rule's 512")
    batch_split: int | str = key(1, OneOf(Int(1), AUTO), "micro-batches per logical batch, or auto (largest that fits)")
    device: str = key("auto", Str(DEVICES, fold_case=True), "auto picks Ascend, then GPU, then CPU")
    device_id: int | None = key(None, Nullable(Int(0)), "which card a one-process run uses; null: MindSpore's default")
    precision: str = key("fp32", Str(["fp32", "fp16", "bf16"]), "compute precision of the train step (docs/accelerators.md: which device runs which)")
    mode: str = key("finetune", Str(["finetune", "linear"]), "finetune: all weights; linear: frozen backbone")
    freeze: str = key("none", Str(list(FREEZE)), "not trained: the stem up to and including this part; "
                      "backbone: all but the head (= mode linear)")
    momentum: float | None = key(None, Nullable(Float(0, 1, hi_open=True)), "SGD momentum; null: the paper's 0.9")
    weight_decay: float | None = key(None, Nullable(Float(0)), "weight decay; null: the paper's 0")
    seed: int = key(0, Int(0), "seed of initialisation, data order, augmentation and MixUp")
    eval_every: int | None = key(None, Nullable(Int(1)), "evaluate every N steps (and at the end); null: at the end")
    checkpoint_every: int | None = key(None, Nullable(Int(1)), "checkpoint every N steps; null: at eval points")
    keep_checkpoints: int = key(2, Int(1), "how many recent checkpoints to keep")
    eval_batch_size: int | None = key(None, Nullable(Int(1)), "eval batch; null: the micro-batch size")
    jit: bool = key(True, Bool(), "compile the train step (graph mode); false: PyNative, for debugging")


@dataclass
class RuleConfig:
    precrop: int | None = key(None, Nullable(PIXELS), "resize before the random crop; null: 160 or 512")
    crop: int | None = key(None, Nullable(PIXELS), "training/eval resolution; null: 128 or 480")
    steps: int | None = key(None, Nullable(STEPS), "optimizer steps; null: 500, 10 000 or 20 000")
    schedule: list[int] | None = key(None, Nullable(IntList(item=STEPS)), "lr boundaries (warmup end ... last = steps)")
    mixup_alpha: float | None = key(None, Nullable(Float(0)), "MixUp alpha; null: 0 below 20 000 images, else 0.1")
    base_lr: float | None = key(None, Nullable(Float(0, lo_open=True)), "peak learning rate; null: 0.003")
    batch_scaling: str = key("none", Str(["none", "linear"]), "linear: lr x B/512, steps x 512/B for batch B")


@dataclass
class LogConfig:
    dir: str = key("runs", Str(), "parent directory of run directories")
    every: int = key(10, Int(1), "log train metrics every N steps")
    tensorboard: bool = key(True, Bool(), "write TensorBoard event files (tensorboardX)")
    quiet: bool = key(False, Bool(), "no progress bar (CI, log files)")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "rule": RuleConfig,
    "log": LogConfig,
}


@dataclass
class Recipe:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    path: str | None = None  # the file it came from, if any

    def to_dict(self) -> dict:
        """Plain data (what `recipe.yaml` in a run directory holds); loads back with `from_dict`."""
        out: dict[str, Any] = {"name": self.name}
        for s in SECTIONS:
            sec = dataclasses.asdict(getattr(self, s))
            if sec.get("image_size") is not None:
                sec["image_size"] = "x".join(map(str, sec["image_size"]))
            out[s] = sec
        return out

    def with_overrides(self, sets: list[str]) -> "Recipe":
        return from_dict(apply_sets(self.to_dict(), sets), path=self.path)


# ---------------------------------------------------------------- loading
TOP_KEYS = ["name", *SECTIONS]
# Names users bring from other trainers -> the recipe key that means the same.
ALIASES = {
    "lr": "rule.base_lr",
    "learning_rate": "rule.base_lr",
    "epochs": "rule.steps",
    "iterations": "rule.steps",
    "batch": "train.batch_size",
    "mixup": "rule.mixup_alpha",
    "wd": "train.weight_decay",
    "arch": "model.name",
    "resolution": "rule.crop",
}


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _key_hint(dotted: str) -> str:
    """Did-you-mean for an unknown key: the same key in another section, a known alias, a near spelling."""
    keys = _all_keys()
    leaf = dotted.rpartition(".")[2]
    same = [k for k in keys if k.rpartition(".")[2] == leaf]
    if same:
        return f" (did you mean '{difflib.get_close_matches(dotted, same, n=1, cutoff=0)[0]}'?)"
    if leaf.lower() in ALIASES:
        return f" (did you mean '{ALIASES[leaf.lower()]}'?)"
    return _did_you_mean(dotted, keys)


def _where(path) -> str:
    return f"{path}: " if path else ""


def _blamer(path, origins: dict | None):
    """`where(*keys)`: the error prefix naming who gave those keys, the `--set` flag or the file."""

    def where(*keys) -> str:
        for k in keys:
            if origins and k in origins:
                return f"--set {origins[k]}: "
        return _where(path)

    return where


def from_dict(raw: dict, path: str | None = None, name: str | None = None, origins: dict | None = None) -> Recipe:
    """Validate a plain dict (parsed YAML) into a `Recipe`; raise `RecipeError` naming the bad key.

    `origins` maps keys set by `--set` to the flag's text, so that errors blame the flag, not the file.
    """
    where = _blamer(path, origins)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where()}a recipe is a mapping of sections (data, model, train, rule, log), got {type(raw).__name__}")
    for k in raw:
        if k not in TOP_KEYS:
            hint = _did_you_mean(str(k), TOP_KEYS + _all_keys())
            raise RecipeError(f"{where(k)}unknown key '{k}'{hint}; sections are {', '.join(TOP_KEYS)}")
    sections = {s: _section(s, cls, raw.get(s), where) for s, cls in SECTIONS.items()}
    rname = raw.get("name", name or (Path(path).stem if path else "recipe"))
    if not isinstance(rname, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", rname):
        raise RecipeError(f"{where('name')}bad value for 'name': use letters, digits, '.', '_', '+' or '-', got {rname!r}")
    recipe = Recipe(name=rname, path=str(path) if path else None, **sections)
    _cross_check(recipe, where)
    return recipe


def _section(s: str, cls: type, given, where):
    """One section's dataclass from its mapping, each value through its key's converter."""
    given = given or {}
    if not isinstance(given, dict):
        raise RecipeError(f"{where(s)}'{s}' must be a mapping of keys, got {given!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for k, v in given.items():
        if k not in fields:
            hint = _key_hint(f"{s}.{k}")
            raise RecipeError(f"{where(f'{s}.{k}')}unknown key '{s}.{k}'{hint}; see docs/recipes.md for the keys of '{s}'")
        try:
            values[k] = fields[k].metadata["conv"](v)
        except ValueError as e:
            doc = fields[k].metadata["doc"]
            raise RecipeError(f"{where(f'{s}.{k}')}bad value for '{s}.{k}': {e} ({doc})") from None
    return cls(**values)


def _cross_check(r: Recipe, where) -> None:
    """Constraints between keys, each with its fix; `where(*keys)` names who set them."""
    d = r.data
    if d.source == "hf" and not (d.name or d.path):
        raise RecipeError(
            f"{where('data.source', 'data.name', 'data.path')}data.source is hf but neither data.name nor data.path "
            "is set; add e.g. 'name: cifar10'"
        )
    if d.source in ("imagefolder", "cifar") and not d.path:
        raise RecipeError(
            f"{where('data.source', 'data.path')}data.source is {d.source} but data.path is not set; "
            "point it at the dataset directory"
        )
    _check_model(r.model, where)
    rule, t = r.rule, r.train
    if rule.precrop and rule.crop and rule.crop > rule.precrop:
        raise RecipeError(
            f"{where('rule.crop', 'rule.precrop')}rule.crop ({rule.crop}) is larger than rule.precrop "
            f"({rule.precrop}); lower rule.crop"
        )
    if rule.schedule is not None:
        if len(rule.schedule) < 2 or rule.schedule != sorted(rule.schedule):
            raise RecipeError(f"{where('rule.schedule')}rule.schedule must be at least 2 increasing steps, got {rule.schedule}")
        if rule.steps is not None and rule.steps != rule.schedule[-1]:
            raise RecipeError(
                f"{where('rule.steps', 'rule.schedule')}rule.steps ({rule.steps}) differs from the last "
                f"rule.schedule boundary ({rule.schedule[-1]}); drop one"
            )
    if t.mode == "linear" and t.freeze not in ("none", "backbone"):
        raise RecipeError(
            f"{where('train.mode', 'train.freeze')}train.mode linear freezes the whole backbone, but train.freeze is "
            f"{t.freeze}; drop one of them (train.freeze: backbone is the same as train.mode: linear)"
        )
    if isinstance(t.batch_split, int) and t.batch_size is not None and t.batch_size % t.batch_split:
        raise RecipeError(
            f"{where('train.batch_size', 'train.batch_split')}train.batch_size {t.batch_size} is not divisible by "
            f"train.batch_split {t.batch_split}; pick a divisor"
        )


def _check_model(m: ModelConfig, where) -> None:
    """model.name must be a registry name or custom (which needs depths and width): caught at plan time."""
    try:
        name = canonical_name(m.name)
    except UsageError as e:
        raise RecipeError(f"{where('model.name')}bad value for 'model.name': {e}") from None
    if name == "BiT-custom" and (m.depths is None or m.width is None):
        raise RecipeError(
            f"{where('model.name', 'model.depths', 'model.width')}model.name custom needs both model.depths "
            "(e.g. [1, 1, 1, 1]) and model.width (e.g. 0.25)"
        )
    if name in MODELS:  # a named BiT is its own architecture: other depths or width would build another model
        depths, width = MODELS[name]
        given = [f"model.{k} {v}" for k, v, own in (("depths", m.depths, depths), ("width", m.width, width))
                 if v is not None and v != own]
        if given:
            raise RecipeError(
                f"{where('model.name', 'model.depths', 'model.width')}model.name {name} is the architecture "
                f"depths {depths}, width {width}, but the recipe also sets {' and '.join(given)}; drop them "
                "(--set model.depths=null --set model.width=null) or use model.name: custom"
            )


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping."""


def _refuse_duplicates(node, prefix: str = "", seen=None) -> None:
    """Raise DuplicateKeyError for a key repeated in one mapping (PyYAML silently keeps the last)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicates(item, prefix, seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                continue
            name, line = prefix + k.value, k.start_mark.line + 1
            if k.value in first:
                fix = f"merge the two '{name}' sections" if isinstance(v, yaml.MappingNode) else "keep one of them"
                raise DuplicateKeyError(f"duplicate key '{name}' at line {line} (first at line {first[k.value]}); {fix}")
            first[k.value] = line
            _refuse_duplicates(v, name + ".", seen)


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, e.g. two `train:` sections or `steps:` twice in `rule:`."""

    def construct_document(self, node):
        _refuse_duplicates(node)
        return super().construct_document(node)


def load(path: str | Path, sets: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `--set key=value` overrides, validate."""
    p = Path(path)
    _check_recipe_path(p)
    try:
        raw = yaml.load(_read_text(p), Loader=StrictLoader)
    except DuplicateKeyError as e:
        raise RecipeError(f"{p}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise RecipeError(f"{p}: not valid YAML{at}: {getattr(e, 'problem', None) or e}; fix the syntax") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {p}: {e.strerror}") from None
    if raw is not None and not isinstance(raw, dict):
        raise RecipeError(f"{p}: a recipe is a mapping of sections (data, model, train, rule, log)")
    origins: dict[str, str] = {}
    raw = apply_sets(raw or {}, sets or [], origins)
    return from_dict(raw, path=str(p), origins=origins)


MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred bytes; a larger file is not one


def _check_recipe_path(p: Path) -> None:
    """A missing path, a directory and a device, FIFO or socket each get their own line, before any read."""
    import stat

    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        hint = "" if p.suffix else " (recipes are .yaml files, e.g. recipes/cifar10.yaml)"
        raise RecipeError(f"recipe file not found: {p}{hint}") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {p}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        inside = sorted(p.glob("*.yaml"))[:1]
        example = f" (e.g. {inside[0]})" if inside else ""
        raise RecipeError(f"recipe {p} is a directory; give a recipe file{example}")
    if not stat.S_ISREG(mode):
        kind = special_kind(p) or "not a regular file"
        raise RecipeError(f"recipe {p} is {kind}, not a file; give a .yaml recipe file (e.g. recipes/cifar10.yaml)")


def _read_text(p: Path) -> str:
    """The recipe's text; a file over MAX_RECIPE_BYTES is refused after reading no more than that."""
    with open(p, "rb") as f:
        data = f.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {p} is larger than {MAX_RECIPE_BYTES >> 20} MB, too large for a recipe; "
                          "give the .yaml recipe file (e.g. recipes/cifar10.yaml)")
    return data.decode("utf-8")


def apply_sets(raw: dict, sets: list[str], origins: dict | None = None) -> dict:
    """Apply `section.key=value` overrides; values parse as YAML (`8` int, `null`, `[1,1,1,1]`).

    `origins`, if given, receives {key: the --set text} so that later errors can blame the flag.
    """
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for s in sets:
        k, eq, v = s.partition("=")
        k = k.strip()
        if not eq or not k:
            raise RecipeError(f"--set expects section.key=value, got {s!r} (e.g. --set train.batch_split=8)")
        try:
            value = yaml.load(v, Loader=StrictLoader) if v.strip() else None
        except yaml.YAMLError:
            value = v
        if origins is not None:
            origins[k] = s.strip()
        if k == "name":
            raw["name"] = value
            continue
        section, dot, leaf = k.partition(".")
        if not dot or section not in SECTIONS:
            raise RecipeError(f"--set {s.strip()}: unknown key '{k}'{_key_hint(k)}; use section.key=value")
        sec = raw.get(section)
        raw[section] = dict(sec) if isinstance(sec, dict) else {}
        raw[section][leaf] = value
    return raw


def reference_markdown() -> str:
    """The key reference (docs/recipes.md), generated from the declarations above."""
    lines = [
        "# Recipe keys",
        "",
        "Generated from `bit_transfer/config/recipe.py` (`python -m bit_transfer.config.recipe > docs/recipes.md`).",
        "Every key is optional; `null` in `rule` means the BiT-HyperRule decides.",
        "",
    ]
    for s, cls in SECTIONS.items():
        lines += [f"## `{s}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
            lines.append(f"| `{s}.{f.name}` | {f.metadata['conv'].describe} | `{default}` | {f.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
