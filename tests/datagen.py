"""Small datasets on disk for tests: image folders, CIFAR pickles, Hugging Face datasets, arrays;
learnable tasks for end-to-end training with the tiny recipe that trains on them, and what reads a run back.

Every generated image of the data tests encodes its class and its orientation: red = class_red(class),
green grows left to right and blue top to bottom. Tests can therefore check that labels travel with
their images, and that crops and flips land where they should, without any external data.
The learnable tasks (pattern_task, colour_cifar) are made for a tiny BiT to learn instead.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from bit_transfer.config import recipe as recipes

DATA_DEFAULTS = dict(
    source="hf", name=None, path=None, train_split="train", eval_split=None, image_column=None,
    label_column=None, holdout=None, examples_per_class=None, seed=0, allow_fewer=False,
    skip_corrupt=False, random_crop=True, random_flip=True, workers=None, size=None, image_size=None,
    cache_dir=None,
)


def data_cfg(**overrides) -> SimpleNamespace:
    """A recipe `data` section (duck-typed like recipe.DataConfig) with the documented defaults."""
    unknown = set(overrides) - set(DATA_DEFAULTS)
    assert not unknown, f"not a data key: {unknown}"
    return SimpleNamespace(**{**DATA_DEFAULTS, **overrides})


def class_red(c: int) -> int:
    return (37 * c + 20) % 256


def pattern(label: int, h: int = 32, w: int = 32, variant: int = 0) -> np.ndarray:
    """H×W×3 uint8: red = class, green = column ramp, blue = row ramp offset by `variant`
    (so images of one class still differ)."""
    a = np.empty((h, w, 3), np.uint8)
    a[..., 0] = class_red(label)
    a[..., 1] = np.linspace(0, 255, w).round().astype(np.uint8)[None, :]
    a[..., 2] = (np.linspace(0, 127, h).round().astype(np.uint8) + (29 * variant) % 128)[:, None]
    return a


def label_of(image: np.ndarray, num_classes: int) -> int:
    """The class whose red value is closest to the image's mean red (H×W×3, or 3×H×W from the pipeline)."""
    if image.shape[0] == 3:  # pipeline output
        red = image[0].mean()
    else:
        red = image[..., 0].mean()
    return int(np.argmin([abs(class_red(c) - red) for c in range(num_classes)]))


def save_image(path: Path, label: int, size=(32, 32), mode: str = "RGB", variant: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(pattern(label, *size, variant=variant))
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path


def image_folder(
    root: Path,
    counts: dict[str, int] | None = None,
    splits=("train", "val"),
    eval_count: int = 2,
    size=(32, 32),
    ext: str = "png",
) -> Path:
    """root/<split>/<class>/<i>.<ext>; `splits=None` writes root/<class>/... (no split folders).
    `size` may be a callable (class index, image index) -> (H, W)."""
    counts = counts or {"cat": 5, "dog": 4, "emu": 3}
    layout = [(root, counts)] if splits is None else []
    if splits is not None:
        layout.append((root / splits[0], counts))
        layout += [(root / s, {c: eval_count for c in counts}) for s in splits[1:]]
    for base, per_class in layout:
        for c, name in enumerate(sorted(per_class)):
            for i in range(per_class[name]):
                hw = size(c, i) if callable(size) else size
                save_image(base / name / f"{i:03d}.{ext}", c, hw, variant=i)
    return root


def corrupt(path: Path, how: str = "garbage") -> Path:
    """Make `path` unreadable: random bytes, or a truncated copy of a real PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "garbage":
        path.write_bytes(b"this is not an image" * 10)
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


def cifar_dir(root: Path, variant: str = "cifar10", per_batch: int = 6, n_test: int = 10, num_classes=None) -> Path:
    """A miniature `cifar-10-batches-py` / `cifar-100-python` with the real files' keys and layout."""
    num_classes = num_classes or (10 if variant == "cifar10" else 100)

    def batch(n, offset):
        labels = [(offset + i) % num_classes for i in range(n)]
        data = np.stack([pattern(y).transpose(2, 0, 1).reshape(-1) for y in labels])  # planes R, G, B
        return data, labels

    def dump(path, obj):
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    if variant == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for b in range(1, 6):
            data, labels = batch(per_batch, b * per_batch)
            dump(d / f"data_batch_{b}", {b"batch_label": b"training batch", b"labels": labels, b"data": data})
        data, labels = batch(n_test, 0)
        dump(d / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data})
        dump(d / "batches.meta", {b"label_names": [f"class{c}".encode() for c in range(num_classes)]})
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        for split, n, off in (("train", 5 * per_batch, 1), ("test", n_test, 0)):
            data, labels = batch(n, off)
            dump(d / split, {"fine_labels": labels, "coarse_labels": [y // 5 for y in labels], "data": data})
        dump(d / "meta", {
            "fine_label_names": [f"fine{c}" for c in range(num_classes)],
            "coarse_label_names": [f"coarse{c}" for c in range(num_classes // 5)],
        })
    return d


def hf_dataset(
    root: Path,
    fmt: str = "save_to_disk",
    image_column: str = "img",
    label_column: str = "label",
    class_names=("airplane", "bird", "cat"),
    n_train: int = 12,
    n_test: int = 6,
    size=(32, 32),
    string_labels: bool = False,
    test_labels=None,
) -> Path:
    """A DatasetDict(train, test) saved with `save_to_disk`, or as parquet files under root/data/."""
    import datasets

    def split(n, offset, labels=None):
        labels = labels if labels is not None else [(offset + i) % len(class_names) for i in range(n)]
        images = [Image.fromarray(pattern(max(y, 0), *size)) for y in labels]
        if string_labels:
            feats = datasets.Features({image_column: datasets.Image(), label_column: datasets.Value("string")})
            labels = [class_names[y] for y in labels]
        else:
            feats = datasets.Features(
                {image_column: datasets.Image(), label_column: datasets.ClassLabel(names=list(class_names))}
            )
        return datasets.Dataset.from_dict({image_column: images, label_column: labels}, features=feats)

    dd = datasets.DatasetDict(train=split(n_train, 1), test=split(n_test, 0, test_labels))
    if fmt == "save_to_disk":
        dd.save_to_disk(str(root))
    else:
        (root / "data").mkdir(parents=True)
        for name, ds in dd.items():
            ds.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return root


def arrays(n: int = 30, num_classes: int = 3, size=(8, 8), channels: int | None = 3):
    """(images, labels): N×H×W×C uint8 (or N×H×W when channels is None) with class patterns."""
    labels = np.arange(n) % num_classes
    images = np.stack([pattern(int(y), *size) for y in labels])
    if channels is None:
        images = images[..., 0]
    elif channels == 1:
        images = images[..., :1]
    elif channels == 4:
        images = np.concatenate([images, np.full((*images.shape[:3], 1), 255, np.uint8)], axis=-1)
    return images, labels


# ---------------------------------------------------------------- learnable tasks for end-to-end training
PATTERN_NAMES = ["horizontal", "vertical", "checker", "flat"]


def learnable_pattern(label: int, rng) -> np.ndarray:
    """A 32x32 RGB image whose class is its pattern.

    Orientation and structure survive what the BiT pipeline does (random crops, flips, the 1.25x
    scale change between training and eval resolution) and GroupNorm, which removes mean colour.
    """
    yy, xx = np.mgrid[0:32, 0:32]
    phase = rng.integers(0, 12)
    base = [(yy + phase) // 6 % 2, (xx + phase) // 6 % 2, ((yy + phase) // 6 + (xx + phase) // 6) % 2, 0 * yy][label]
    img = base[..., None] * 160 + 40 + rng.integers(-30, 30, (32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def cifar10_python(path: Path, train_batches: list[dict], test_batch: dict, names: list[bytes]) -> Path:
    """Write data_batch_1..5, test_batch and batches.meta of a CIFAR-10 "python version" into `path`."""
    for i, batch in enumerate(train_batches, 1):
        with open(path / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f)
    with open(path / "test_batch", "wb") as f:
        pickle.dump(test_batch, f)
    with open(path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    return path


def cifar_batch(images: np.ndarray, labels: np.ndarray) -> dict:
    """N×32×32×3 uint8 images as a CIFAR batch: rows of planes R, G, B."""
    return {b"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1), b"labels": labels.tolist()}


def pattern_task(path: Path, n_train=24, n_test=8, seed=0) -> Path:
    """A CIFAR-10 "python version" directory of 4 learnable pattern classes (PATTERN_NAMES)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)

    def batch(n_per_class):
        labels = np.repeat(np.arange(len(PATTERN_NAMES)), n_per_class)
        rng.shuffle(labels)
        return cifar_batch(np.stack([learnable_pattern(int(k), rng) for k in labels]), labels)

    train = [batch(max(1, n_train // 5)) for _ in range(5)]
    return cifar10_python(path, train, batch(n_test), [n.encode() for n in PATTERN_NAMES])


COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40]], np.uint8)


def colour_cifar(path: Path, seed: int = 0, per_class: int = 8, eval_per_class: int = 8) -> Path:
    """A CIFAR-10 "python version" directory whose class is the image's colour (red, green, blue,
    yellow) plus noise: `per_class` training and `eval_per_class` test images per class."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)

    def batch(labels):
        labels = rng.permutation(labels)
        img = COLOURS[labels][:, None, None, :].astype(np.int16) + rng.integers(-60, 60, (len(labels), 32, 32, 3))
        return cifar_batch(np.clip(img, 0, 255).astype(np.uint8), labels)

    train = np.repeat(np.arange(4), per_class)
    parts = [batch(part) for part in np.array_split(rng.permutation(train), 5)]
    test = batch(np.repeat(np.arange(4), eval_per_class))
    return cifar10_python(path, parts, test, [b"red", b"green", b"blue", b"yellow"])


def tiny_recipe(data_dir: Path, runs: Path, **sets) -> recipes.Recipe:
    """A 1/8-width BiT from scratch on CIFAR-layout data, 20 steps, logging every step.

    `section__key=value` sets a key; `section__key=None` leaves it unset (the recipe's default: for
    rule.steps and rule.base_lr, what the HyperRule decides)."""
    from bit_transfer.config import recipe as recipes

    raw = {
        "name": "tiny",
        "data": {"source": "cifar", "path": str(data_dir), "workers": 1},
        "model": {"name": "custom", "depths": [1, 1, 1, 1], "width": 0.125, "weights": "none"},
        "train": {"batch_size": 16, "batch_split": 1, "seed": 0},
        "rule": {"precrop": 20, "crop": 16, "steps": 20, "base_lr": 0.05},
        "log": {"dir": str(runs), "every": 1, "quiet": True},
    }
    for k, v in sets.items():
        section, key = k.split("__")
        if v is None:
            raw.get(section, {}).pop(key, None)
        else:
            raw.setdefault(section, {})[key] = v
    return recipes.from_dict(raw)


# ---------------------------------------------------------------- reading a run back
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_params(run_dir: Path) -> dict[str, np.ndarray]:
    """The model parameters (no optimizer state) of a run's latest checkpoint."""
    from bit_transfer.models.weights.ckpt import read_checkpoint

    ckpt = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[-1]
    params, _ = read_checkpoint(ckpt)
    return {k: v for k, v in params.items() if not k.startswith("optimizer.")}


# Equal maths in another summation order (micro-batches of 4 vs 8, two ranks vs one) leaves
# float32 rounding differences that these tiny from-scratch models grow to 3-6e-5 within a few
# steps on a busy machine (measured); a real error (a missing 1/batch_split or 1/ranks, other
# data) moves weights by 1e-2 and more.
EQUAL_MATHS_ATOL = 5e-4


def assert_params_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < atol, worst


def official_arrays(depths=(1, 2, 1, 1), width=0.25, classes=5, seed=0):
    """A random .npz in the authors' layout, written from the documented key scheme (HWIO kernels)."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    root = int(64 * width)
    arrays = {"resnet/root_block/standardized_conv2d/kernel": r(7, 7, 3, root)}
    cin = root
    for b, depth in enumerate(depths, 1):
        mid = int(64 * 2 ** (b - 1) * width)
        out = 4 * mid
        for u in range(1, depth + 1):
            p = f"resnet/block{b}/unit{u:02d}/"
            c = cin if u == 1 else out
            arrays[p + "a/standardized_conv2d/kernel"] = r(1, 1, c, mid)
            arrays[p + "b/standardized_conv2d/kernel"] = r(3, 3, mid, mid)
            arrays[p + "c/standardized_conv2d/kernel"] = r(1, 1, mid, out)
            for layer, channels in zip("abc", (c, mid, mid)):
                arrays[p + f"{layer}/group_norm/gamma"] = r(channels)
                arrays[p + f"{layer}/group_norm/beta"] = r(channels)
            if u == 1:
                arrays[p + "a/proj/standardized_conv2d/kernel"] = r(1, 1, c, out)
        cin = out
    arrays["resnet/group_norm/gamma"] = r(cin)
    arrays["resnet/group_norm/beta"] = r(cin)
    arrays["resnet/head/conv2d/kernel"] = r(1, 1, cin, classes)
    arrays["resnet/head/conv2d/bias"] = r(classes)
    return arrays


def tiny_folder_recipe(root: Path, data: Path, crop: int) -> Path:
    """root/r.yaml: a 3-step fit of a width-0.5 custom model (Hugging Face can express it) on class folders."""
    import yaml

    recipe = {
        "name": "tiny",
        "data": {"source": "imagefolder", "path": str(data), "workers": 1},
        "model": {"name": "custom", "depths": [1, 1, 1, 1], "width": 0.5, "weights": "none"},
        "train": {"batch_size": 8, "batch_split": 1, "seed": 0},
        "rule": {"precrop": 20, "crop": crop, "steps": 3, "base_lr": 0.05},
        "log": {"dir": str(root / "runs"), "every": 1, "quiet": True, "tensorboard": False},
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    return root / "r.yaml"
