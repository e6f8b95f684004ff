"""Hugging Face datasets (`data.source: hf`).

`load_dataset(name)` for the hub (it honours HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE /
HF_DATASETS_OFFLINE), `load_from_disk` or `load_dataset(dir)` for local copies (a `save_to_disk`
dir, or a dir of parquet/arrow files). Images are read undecoded (`Image(decode=False)`) and
decoded one by one by the pipeline.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from bit_transfer.system import hub
from bit_transfer.data.split import HFStore, Split
from bit_transfer.errors import DataError

IMAGE_COLUMNS = ("image", "img", "images", "pixel_values", "jpg", "jpeg", "png", "picture", "photo")
LABEL_COLUMNS = ("label", "labels", "fine_label", "fine_labels", "class", "category", "target", "cls")
EVAL_SPLITS = ("test", "validation", "val", "valid")


def _hf_import():
    import datasets

    return datasets


@contextlib.contextmanager
def _quiet_progress():
    """No progress bars while a local copy is converted (hub downloads keep theirs)."""
    datasets = _hf_import()
    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
        datasets.logging.set_verbosity(verbosity)


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def open_hf(cfg) -> dict:
    """The splits of `data.path` (a `save_to_disk` dir, or a dir of parquet/arrow/image files) or
    of hub dataset `data.name`, as {split name: datasets.Dataset}."""
    datasets = _hf_import()
    if cfg.path:
        p = Path(cfg.path).expanduser()
        if not p.exists():
            raise DataError(f"data.path {p} does not exist; point it at a saved Hugging Face dataset or a data dir")
        try:
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                loaded = datasets.load_from_disk(str(p))
            else:
                with _quiet_progress():
                    loaded = datasets.load_dataset(str(p))
        except Exception as e:
            raise DataError(f"cannot load the Hugging Face dataset at {p}: {_first_line(e)}") from None
    elif cfg.name:
        offline = hub.offline()  # no network: load from the cache at once instead of ~25 s of retries
        try:
            loaded = datasets.load_dataset(cfg.name)
        except ConnectionError:
            raise DataError(_not_cached(cfg.name, offline)) from None
        except Exception as e:
            raise DataError(f"cannot load Hugging Face dataset '{cfg.name}': {_first_line(e)}") from None
    else:
        raise DataError("data.source is hf but neither data.name (a hub id) nor data.path (a local copy) is set")
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _not_cached(name: str, offline: bool) -> str:
    """What to download where, for a hub dataset that is neither cached nor downloadable here."""
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    why = hub.why_offline() if offline else "the hub cannot be reached"
    return (
        f"Hugging Face dataset '{name}' is not cached under {home} and {why}; download it once where there is "
        f"network (python -c \"import datasets; datasets.load_dataset('{name}')\", HF_ENDPOINT selects a mirror) "
        f"and copy that machine's {home} here, or set data.path to a local copy"
    )


def _pick(columns: dict, wanted: str | None, preferred: tuple, is_kind, what: str, key: str, where: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{key}={wanted!r} is not a column of {where}; columns: {', '.join(columns)}")
        return wanted
    for name in preferred:
        if name in columns:
            return name
    typed = [c for c, f in columns.items() if is_kind(f)]
    if len(typed) == 1:
        return typed[0]
    raise DataError(f"cannot tell which column of {where} holds the {what}; set {key} to one of: {', '.join(columns)}")


def _eval_split_name(cfg, available, where: str) -> str | None:
    if cfg.holdout is not None:
        return None
    if cfg.eval_split is not None:
        if cfg.eval_split not in available:
            raise DataError(
                f"data.eval_split={cfg.eval_split!r} is not a split of {where}; splits: {', '.join(available)}"
            )
        return cfg.eval_split
    for name in EVAL_SPLITS:
        if name in available:
            return name
    raise DataError(
        f"{where} has no test or validation split (splits: {', '.join(available)}); "
        "set data.holdout: 0.1 to carve a seeded eval split from train, or name one in data.eval_split"
    )


def load_hf(cfg) -> tuple[Split, Split | None, list[str], str]:
    """(train, eval or None when data.holdout will carve it, class names, stable id)."""
    datasets = _hf_import()
    splits = open_hf(cfg)
    where = cfg.name or str(cfg.path)
    if cfg.train_split not in splits:
        raise DataError(
            f"data.train_split={cfg.train_split!r} is not a split of {where}; splits: {', '.join(splits)}"
        )
    eval_name = _eval_split_name(cfg, splits, where)
    train_ds = splits[cfg.train_split]
    columns = dict(train_ds.features)
    image_col = _pick(
        columns, cfg.image_column, IMAGE_COLUMNS, lambda f: isinstance(f, datasets.Image), "images",
        "data.image_column", where,
    )
    label_col = _pick(
        columns, cfg.label_column, LABEL_COLUMNS, lambda f: isinstance(f, datasets.ClassLabel), "labels",
        "data.label_column", where,
    )
    used = {"train": train_ds} if eval_name is None else {"train": train_ds, "eval": splits[eval_name]}
    # A slice reads the column in one go; `ds[col]` would iterate row by row (datasets >= 4).
    raw = {k: np.asarray(ds.with_format("numpy", columns=[label_col])[:][label_col]) for k, ds in used.items()}
    feature = columns[label_col]
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
        labels = {k: v.astype(np.int64) for k, v in raw.items()}
    else:
        class_names, labels = _labels_from_values(raw)
    for k, v in labels.items():
        if len(v) and (v.min() < 0 or v.max() >= len(class_names)):
            split_name = cfg.train_split if k == "train" else eval_name
            raise DataError(
                f"split {split_name!r} of {where} has labels outside 0..{len(class_names) - 1} (e.g. -1 for "
                "unlabelled rows); choose another data.eval_split or set data.holdout"
            )
    ident = f"hf:{cfg.name or Path(cfg.path).expanduser().resolve()}"

    def make(key, split_name):
        ds = used[key]
        if isinstance(ds.features[image_col], datasets.Image):
            ds = ds.cast_column(image_col, datasets.Image(decode=False))
        store = HFStore(ds, image_col, f"{where} split {split_name}")
        return Split(store, np.arange(len(ds)), labels[key], f"{where}:{split_name}", cfg.skip_corrupt)

    return (
        make("train", cfg.train_split),
        make("eval", eval_name) if eval_name else None,
        class_names,
        ident,
    )


def _labels_from_values(raw: dict) -> tuple[list[str], dict]:
    """Class names and 0-based labels from a plain (non-ClassLabel) label column."""
    values = np.concatenate(list(raw.values()))
    if np.issubdtype(values.dtype, np.integer) and (len(values) == 0 or values.min() >= 0):
        n = int(values.max()) + 1 if len(values) else 0
        return [str(i) for i in range(n)], {k: v.astype(np.int64) for k, v in raw.items()}
    names = sorted({str(v) for v in values})
    lookup = {n: i for i, n in enumerate(names)}
    return names, {k: np.array([lookup[str(x)] for x in v], dtype=np.int64) for k, v in raw.items()}
