"""Hugging Face datasets (`data.source: hf`) and local image folders (`data.source: imagefolder`).

Both go through the `datasets` library: `load_dataset(name)` for the hub (it honours HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), `load_from_disk` / `load_dataset(dir)` for local
copies, and its `imagefolder` builder to list (and cache the list of) the files of an image folder.
Images are read undecoded (`Image(decode=False)`) and decoded one by one by the pipeline.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from bit_transfer.data.split import FileStore, HFStore, Split
from bit_transfer.errors import DataError

IMAGE_COLUMNS = ("image", "img", "images", "pixel_values", "jpg", "jpeg", "png", "picture", "photo")
LABEL_COLUMNS = ("label", "labels", "fine_label", "fine_labels", "class", "category", "target", "cls")
EVAL_SPLITS = ("test", "validation", "val", "valid")


def _hf_import():
    import datasets

    return datasets


@contextlib.contextmanager
def _quiet_progress():
    """No progress bars while we list local files (hub downloads keep theirs)."""
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
        try:
            loaded = datasets.load_dataset(cfg.name)
        except ConnectionError:
            home = os.environ.get("HF_HOME", "~/.cache/huggingface")
            raise DataError(
                f"Hugging Face dataset '{cfg.name}' is not cached under {home} and the hub cannot be reached; "
                f"download it once where there is network (python -c \"import datasets; "
                f"datasets.load_dataset('{cfg.name}')\", HF_ENDPOINT selects a mirror) or set data.path to a local copy"
            ) from None
        except Exception as e:
            raise DataError(f"cannot load Hugging Face dataset '{cfg.name}': {_first_line(e)}") from None
    else:
        raise DataError("data.source is hf but neither data.name (a hub id) nor data.path (a local copy) is set")
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


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
    raw = {k: np.asarray(ds.with_format("numpy", columns=[label_col])[label_col]) for k, ds in used.items()}
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


def _folder_splits(root: Path, cfg) -> tuple[Path, Path | None]:
    """(train dir, eval dir or None): `root/train` + `root/test|val|...`, or `root` itself."""
    train = root / cfg.train_split
    if not train.is_dir():
        if cfg.eval_split is not None:
            raise DataError(f"{root} has no {cfg.train_split}/ folder next to data.eval_split {cfg.eval_split!r}")
        if cfg.holdout is None:
            raise DataError(
                f"{root} has no {cfg.train_split}/ and test/ or val/ folders; set data.holdout: 0.1 to carve "
                "a seeded eval split from it, or split it into train/<class>/ and val/<class>/"
            )
        return root, None
    if cfg.holdout is not None:
        return train, None
    names = [cfg.eval_split] if cfg.eval_split is not None else list(EVAL_SPLITS)
    for name in names:
        if (root / name).is_dir():
            return train, root / name
    raise DataError(
        f"{root} has {cfg.train_split}/ but no {' or '.join(n + '/' for n in names)} folder; "
        "add one or set data.holdout: 0.1"
    )


def _list_images(folder: Path, cache_dir: Path) -> list[str]:
    """Image files under `folder` (recursively, by extension), sorted, via the imagefolder builder."""
    datasets = _hf_import()
    try:
        with _quiet_progress():
            ds = datasets.load_dataset(
                "imagefolder",
                data_files={"train": str(folder / "**")},
                drop_labels=True,
                drop_metadata=True,
                split="train",
                cache_dir=str(cache_dir),
            )
    except Exception as e:
        raise DataError(f"cannot list the images under {folder}: {_first_line(e)}") from None
    ds = ds.cast_column("image", datasets.Image(decode=False))
    paths = [cell["path"] for cell in ds.with_format("arrow")["image"].to_pylist()]
    return sorted(paths)


def load_imagefolder(cfg, cache_dir: Path) -> tuple[Split, Split | None, list[str], str]:
    """`data.path` holds class folders, torchvision-style: the class of an image is the first
    folder under its split's root (`train/<class>/**/<image>`)."""
    if not cfg.path:
        raise DataError("data.source is imagefolder but data.path is not set; point it at your image folder")
    root = Path(cfg.path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a directory; point it at a folder of class subfolders")
    train_dir, eval_dir = _folder_splits(root, cfg)
    listing_cache = cache_dir / "imagefolder-listings"
    train_paths = _list_images(train_dir, listing_cache)
    if not train_paths:
        raise DataError(f"no images under {train_dir}; expected {train_dir}/<class>/<image>.jpg|png|...")
    train_classes = _classes_of(train_paths, train_dir)
    class_names = sorted(set(train_classes))
    index = {c: i for i, c in enumerate(class_names)}
    train = _folder_split(train_paths, train_classes, index, str(train_dir), cfg.skip_corrupt)
    eval_ = None
    if eval_dir is not None:
        eval_paths = _list_images(eval_dir, listing_cache)
        eval_classes = _classes_of(eval_paths, eval_dir)
        unknown = sorted(set(eval_classes) - set(index))
        if unknown:
            raise DataError(
                f"{eval_dir} has class folder(s) {', '.join(unknown[:5])} that {train_dir} does not; "
                "the eval classes must be training classes"
            )
        eval_ = _folder_split(eval_paths, eval_classes, index, str(eval_dir), cfg.skip_corrupt)
    return train, eval_, class_names, f"imagefolder:{root}"


def _classes_of(paths: list[str], split_root: Path) -> list[str]:
    out = []
    for p in paths:
        rel = Path(p).relative_to(split_root)
        if len(rel.parts) < 2:
            raise DataError(
                f"image {p} is not inside a class folder; move it to {split_root}/<class>/{rel.name}"
            )
        out.append(rel.parts[0])
    return out


def _folder_split(paths, classes, index, name, skip_corrupt) -> Split:
    labels = np.array([index[c] for c in classes], dtype=np.int64)
    return Split(FileStore(paths, name), np.arange(len(paths)), labels, name, skip_corrupt)
