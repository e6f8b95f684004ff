"""CIFAR-10/100 "python version" directories (`cifar-10-batches-py`, `cifar-100-python`).

The batches are pickles of plain dicts holding numpy arrays, lists and strings. A pickle can run
arbitrary code, so we unpickle with an allow-list of exactly what those files need (numpy's array
reconstruction) and reject anything else before it is built.
Format: https://www.cs.toronto.edu/~kriz/cifar.html ("Dataset layout").
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from bit_transfer.errors import DataError

LAYOUTS = {  # dir name: (name, train files, test file, meta file)
    "cifar-10-batches-py": ("cifar10", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"),
    "cifar-100-python": ("cifar100", ["train"], "test", "meta"),
}
LABELS = {  # data.label_column -> (labels key in a batch, class-names key in meta)
    "cifar10": {"label": ("labels", "label_names")},
    "cifar100": {
        "label": ("fine_labels", "fine_label_names"),
        "fine_label": ("fine_labels", "fine_label_names"),
        "coarse_label": ("coarse_labels", "coarse_label_names"),
    },
}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} is missing; re-extract the CIFAR archive (tar xzf cifar-*-python.tar.gz)")
    try:
        with open(path, "rb") as f:
            obj = _PlainUnpickler(f, encoding="latin1").load()
    except Exception as e:
        raise DataError(f"{path} is not a plain CIFAR batch ({e}); use the original 'python version' files") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a plain CIFAR batch (a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _layout(d: Path) -> str | None:
    """Which CIFAR layout `d` holds, judged by its files (people rename the folder)."""
    for name, (_, train_files, test_file, meta_file) in LAYOUTS.items():
        if all((d / f).is_file() for f in (train_files[0], test_file, meta_file)):
            return name
    return None


def find_dir(path: str) -> tuple[Path, str]:
    """(directory, layout): `path` itself or its single CIFAR child (the folder the tar extracts to)."""
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
        raise DataError(f"{p} is the archive; extract it (tar xzf {p.name}) and point data.path at the result")
    if p.is_dir() and _layout(p):
        return p, _layout(p)
    found = [(c, _layout(c)) for c in sorted(p.iterdir()) if c.is_dir() and _layout(c)] if p.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise DataError(
        f"{p} is not a CIFAR python-version directory; point data.path at cifar-10-batches-py or cifar-100-python "
        "(from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz or cifar-100-python.tar.gz)"
    )


def _batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path)
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' is not an N×3072 uint8 array; is this a CIFAR python-version batch?")
    if labels is None or len(labels) != len(data):
        raise DataError(f"{path}: '{label_key}' is missing or does not match the {len(data)} images")
    # Rows are 1024 red, 1024 green, 1024 blue values of a 32×32 image, row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


def load_cifar(path: str, label_column: str | None = None):
    """(name, train images, train labels, test images, test labels, class names, directory)."""
    d, layout = find_dir(path)
    name, train_files, test_file, meta_file = LAYOUTS[layout]
    choice = (label_column or "label").removesuffix("s")
    if choice not in LABELS[name]:
        choices = ", ".join(LABELS[name])
        raise DataError(f"data.label_column={label_column!r} is not a {name} label; use one of: {choices}")
    label_key, names_key = LABELS[name][choice]
    parts = [_batch(d / f, label_key) for f in train_files]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _batch(d / test_file, label_key)
    meta = _load_pickle(d / meta_file)
    names = meta.get(names_key)
    if not isinstance(names, list):
        raise DataError(f"{d / meta_file}: no '{names_key}' list of class names")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return name, train_x, train_y, test_x, test_y, class_names, d
