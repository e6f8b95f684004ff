"""From a recipe's `data` section (or numpy arrays) to a `Dataset`: open the source, carve the
holdout, take the few-shot subset. Nothing is decoded here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from bit_transfer import settings
from bit_transfer.data.sampling import holdout_indices
from bit_transfer.data.split import ArrayStore, Dataset, Split, check_rgb
from bit_transfer.errors import DataError

DEMO_FILE = Path(__file__).resolve().parent.parent / "demo" / "digits.npz"
DEMO_HOLDOUT = 0.2


def cache_root(cfg) -> Path:
    """data.cache_dir, else $BIT_TRANSFER_HOME/data-cache, else ~/.cache/bit-transfer/data-cache."""
    if getattr(cfg, "cache_dir", None):
        return Path(cfg.cache_dir).expanduser()
    return settings.home() / "data-cache"


def load(cfg, fewshot: bool = True) -> Dataset:
    """The dataset a recipe's `data` section describes, holdout and few-shot subset applied."""
    ds = _open(cfg)
    if cfg.examples_per_class is not None and fewshot:
        ds = ds.fewshot(cfg.examples_per_class, cfg.seed, cfg.allow_fewer)
    return ds


def _open(cfg) -> Dataset:
    if cfg.source == "demo":
        return _finish(load_demo(cfg.holdout, cfg.seed), cfg, holdout_done=True)
    if cfg.source == "cifar":
        if not cfg.path:
            raise DataError(
                "data.source is cifar but data.path is not set; point it at cifar-10-batches-py or cifar-100-python"
            )
        from bit_transfer.data.cifar import load_cifar

        name, tx, ty, vx, vy, class_names, d = load_cifar(cfg.path, cfg.label_column)
        train = Split(ArrayStore(tx, f"{name} train"), np.arange(len(tx)), ty, f"{name}:train")
        eval_ = Split(ArrayStore(vx, f"{name} test"), np.arange(len(vx)), vy, f"{name}:test")
        ds = Dataset(train, None if cfg.holdout is not None else eval_, class_names, f"cifar:{d}")
        return _finish(ds, cfg)
    if cfg.source == "hf":
        from bit_transfer.data.hf import load_hf

        train, eval_, class_names, ident = load_hf(cfg)
        return _finish(Dataset(train, eval_, class_names, ident), cfg)
    if cfg.source == "imagefolder":
        from bit_transfer.data.folder import load_imagefolder

        train, eval_, class_names, ident = load_imagefolder(cfg)
        return _finish(Dataset(train, eval_, class_names, ident), cfg)
    raise DataError(f"data.source={cfg.source!r} is not one of: hf, imagefolder, cifar, demo")


def _finish(ds: Dataset, cfg, holdout_done: bool = False) -> Dataset:
    if len(ds.class_names) < 2:
        raise DataError(f"{ds.name} has {len(ds.class_names)} class(es); classification needs at least two")
    if cfg.holdout is not None and not holdout_done:
        ds = carve_holdout(ds, cfg.holdout, cfg.seed)
    for split in (ds.train, ds.eval):
        split.skip_corrupt = bool(cfg.skip_corrupt)
    return ds


def carve_holdout(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """Replace the eval split by a seeded `fraction` of train (BiT's CIFAR runs: train[98%:])."""
    tr, ev = holdout_indices(len(ds.train), fraction, seed)
    note = f"eval: seeded {fraction:.0%} holdout of train ({len(ev)} images, seed {seed})"
    return Dataset(ds.train.subset(tr), ds.train.subset(ev), ds.class_names, ds.name, [*ds.notes, note])


def _rgb_batch(images, what: str) -> np.ndarray:
    """N×H×W or N×H×W×{1,3,4} uint8 as N×H×W×3 (gray repeated, alpha dropped)."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise DataError(f"{what}: expected N×H×W or N×H×W×C images, got shape {a.shape}")
    return check_rgb(a, what)


def _labels(labels, n: int, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what}: expected {n} integer labels, got shape {y.shape} of {y.dtype}")
    return y.astype(np.int64)


def from_arrays(
    images, labels, class_names=None, eval_images=None, eval_labels=None, holdout=None, seed=0, *, name=None
) -> Dataset:
    """A dataset from numpy arrays (notebooks): uint8 images N×H×W[×C] (C = 1, 3 or 4) and labels.

    Eval: `eval_images`/`eval_labels` if given, else a seeded `holdout` of train (default 20 %).
    """
    x = _rgb_batch(images, "images")
    y = _labels(labels, len(x), "labels")
    if (eval_images is None) != (eval_labels is None):
        raise DataError("give both eval_images and eval_labels, or neither")
    if eval_images is not None:
        ex = _rgb_batch(eval_images, "eval_images")
        ey = _labels(eval_labels, len(ex), "eval_labels")
    else:
        ex, ey = x[:0], y[:0]
    top = int(max(y.max(initial=-1), ey.max(initial=-1))) + 1
    if class_names is None:
        class_names = [str(i) for i in range(top)]
    class_names = [str(c) for c in class_names]
    if min(y.min(initial=0), ey.min(initial=0)) < 0 or top > len(class_names):
        raise DataError(f"labels must lie in 0..{len(class_names) - 1} for {len(class_names)} class names")
    ident = name or "arrays:" + _digest(x, y, ex, ey)
    train = Split(ArrayStore(x, "train images"), np.arange(len(x)), y, f"{ident}:train")
    if eval_images is not None and holdout is None:
        eval_ = Split(ArrayStore(ex, "eval images"), np.arange(len(ex)), ey, f"{ident}:eval")
        return Dataset(train, eval_, class_names, ident)
    return carve_holdout(Dataset(train, None, class_names, ident), holdout or DEMO_HOLDOUT, seed)


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def load_demo(holdout=None, seed=0, path: Path = DEMO_FILE) -> Dataset:
    """The digits shipped in the package (8×8 gray, 10 classes); eval = a seeded 20 % holdout."""
    if not path.is_file():
        raise DataError(f"the demo data {path} is missing; reinstall bit-transfer")
    with np.load(path, allow_pickle=False) as z:
        images, labels, names = z["images"], z["labels"], [str(c) for c in z["class_names"]]
    return from_arrays(images, labels, names, holdout=holdout or DEMO_HOLDOUT, seed=seed, name="demo:digits")
