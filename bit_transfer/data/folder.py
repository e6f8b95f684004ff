"""Local image folders (`data.source: imagefolder`), with torchvision's `ImageFolder` rules:
the class of an image is the first folder under its split (`train/<class>/**/<image>`), classes
are sorted by name, files are recognised by extension, anything else is ignored.

We walk the tree with `os.scandir` rather than `datasets`' imagefolder builder: on 20 000 files the
builder took 3.4 s the first time and 1.5 s on every later load (it resolves and stats each file
through fsspec, ~75 µs/file: minutes for ImageNet), the walk 0.05 s. MindSpore's
`ImageFolderDataset` cannot list files or labels without reading every file, and `plan` must not
import MindSpore.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from bit_transfer.data.split import FileStore, Split
from bit_transfer.errors import DataError
from bit_transfer.system.filekinds import special_kind

# torchvision.datasets.folder.IMG_EXTENSIONS, plus GIF and JFIF.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif", ".jfif")
EVAL_FOLDERS = ("test", "validation", "val", "valid")


def list_images(top: Path, skipped: list[tuple[str, str]] | None = None) -> list[str]:
    """Image files under `top`, recursively (following links, once per real folder), sorted.

    A FIFO, device or socket with an image's name is left out (opening a FIFO waits forever for a
    writer) and added to `skipped` as (path, what it is) for the caller to name.
    """
    found, seen, stack = [], set(), [str(top)]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(d) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    stack.append(e.path)
                elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    kind = None if e.is_file() else special_kind(e.path)
                    if kind is None:  # a regular file, or a dangling link (named unreadable later)
                        found.append(e.path)
                    elif skipped is not None:
                        skipped.append((e.path, kind))
    if skipped is not None:
        skipped.sort()
    return sorted(found)


_named: set[str] = set()  # non-regular files already named by this process (plan measures, then loads)


def _say_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, kind in skipped:
        if path not in _named:
            _named.add(path)
            print(f"bit-transfer: skipped {path}: {kind}, not an image file", file=sys.stderr)


def _splits(root: Path, cfg) -> tuple[Path, Path | None]:
    """(train dir, eval dir or None): `root/train` + `root/test|validation|val|valid`, or `root` itself."""
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
    names = [cfg.eval_split] if cfg.eval_split is not None else list(EVAL_FOLDERS)
    for name in names:
        if (root / name).is_dir():
            return train, root / name
    raise DataError(
        f"{root} has {cfg.train_split}/ but no {' or '.join(n + '/' for n in names)} folder; "
        "add one or set data.holdout: 0.1"
    )


def _classes_of(paths: list[str], split_root: Path) -> list[str]:
    prefix = len(str(split_root)) + 1
    out = []
    for p in paths:
        cls, sep, _ = p[prefix:].partition(os.sep)
        if not sep:
            raise DataError(f"image {p} is not inside a class folder; move it to {split_root}/<class>/{cls}")
        out.append(cls)
    return out


def _split(folder: Path, index: dict | None, skip_corrupt: bool, train: Path | None = None) -> tuple[Split, list[str]]:
    skipped: list[tuple[str, str]] = []
    paths = list_images(folder, skipped)
    _say_skipped(skipped)
    if not paths:
        raise DataError(f"no images under {folder}; expected {folder}/<class>/<image> ({', '.join(IMAGE_EXTENSIONS)})")
    classes = _classes_of(paths, folder)
    names = sorted(set(classes)) if index is None else list(index)
    index = index or {c: i for i, c in enumerate(names)}
    unknown = sorted(set(classes) - set(index))
    empty = [c for c in unknown if train is not None and (train / c).is_dir()]
    if empty:  # the training folder has them, but no image in them: not a class it knows
        shown = ", ".join(str(train / c) for c in empty[:3]) + (" ..." if len(empty) > 3 else "")
        one = len(empty) == 1
        raise DataError(
            f"training class folder{'' if one else 's'} {shown} {'holds' if one else 'hold'} no images (files "
            f"ending in {', '.join(IMAGE_EXTENSIONS)}) but {folder} has images of "
            f"{'that class' if one else 'those classes'}; add training images to {'it' if one else 'them'}, "
            "or remove the class from both"
        )
    if unknown:
        raise DataError(
            f"{folder} has class folder(s) {', '.join(unknown[:5])} that the training folder does not; "
            "the eval classes must be training classes"
        )
    labels = np.array([index[c] for c in classes], dtype=np.int64)
    return Split(FileStore(paths, str(folder)), np.arange(len(paths)), labels, str(folder), skip_corrupt), names


def load_imagefolder(cfg) -> tuple[Split, Split | None, list[str], str]:
    """(train, eval or None when data.holdout will carve it, class names, stable id)."""
    if not cfg.path:
        raise DataError("data.source is imagefolder but data.path is not set; point it at your image folder")
    root = Path(cfg.path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a directory; point it at a folder of class subfolders")
    train_dir, eval_dir = _splits(root, cfg)
    train, class_names = _split(train_dir, None, cfg.skip_corrupt)
    index = {c: i for i, c in enumerate(class_names)}
    eval_ = _split(eval_dir, index, cfg.skip_corrupt, train_dir)[0] if eval_dir is not None else None
    return train, eval_, class_names, f"imagefolder:{root}"
