"""The Python API: `Predictor(MODEL).predict(images)` -> `Prediction`s, for paths, PIL images and uint8
arrays, preprocessed exactly as `bit-transfer eval` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bit_transfer.data.split import Split, check_rgb
from bit_transfer.errors import DataError, UsageError
from bit_transfer.system.filekinds import special_kind
from bit_transfer.predict.model import load_model
from bit_transfer.predict.running import Unreadable, best_k, stream

API_FIX = "pass strict=False to get None in its place"


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


def _regular(path):
    """`path`, unless it is a FIFO, device or socket: Pillow would wait on a FIFO forever."""
    kind = special_kind(path)
    if kind is not None:
        raise ValueError(f"{kind}, not an image file")
    return path


class _ItemStore:
    """Paths, PIL images and uint8 arrays (already PIL images here), one per row: a FileStore's duck type."""

    def __init__(self, items: list):
        self.items, self.name = items, "images"
        self.corrupt: set[int] = set()

    def __len__(self):
        return len(self.items)

    def open(self, j: int) -> Image.Image:
        item = self.items[j]
        return item.copy() if isinstance(item, Image.Image) else Image.open(_regular(item))  # never the caller's object

    def header_size(self, j: int) -> tuple[int, int]:
        item = self.items[j]
        if isinstance(item, Image.Image):
            return item.size[::-1]
        with Image.open(_regular(item)) as im:
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
        p.embed(["a.jpg", "b.jpg"])                        # (2, D) float32 pre-logit features

    An unreadable image raises DataError naming it; with `strict=False` its place holds None.
    """

    def __init__(self, model, *, image_size: int | None = None, batch_size: int | None = None,
                 device: str = "auto", top_k: int = 5, workers: int | None = None):
        self.model = load_model(model, image_size=image_size, batch_size=batch_size, device=device,
                                device_option="device=")
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

    def embed(self, images, strict: bool = True) -> np.ndarray:
        """(N, D) float32 pre-logit features of a list of images (one image: (D,)), the numbers
        `bit-transfer embed` writes; with `strict=False` an unreadable image's row is NaN."""
        from bit_transfer.predict.model import check_embeddable

        check_embeddable(self.model)
        items, single = _as_items(images)
        split = Split(_ItemStore(items), np.arange(len(items)), np.arange(len(items)), "images", skip_corrupt=True)
        out = np.full((len(items), self.model.num_features), np.nan, np.float32)
        unreadable = Unreadable(split, strict, lambda s: None, API_FIX)
        for pos, feats in stream(self.model, split, unreadable, self.workers, features=True):
            out[pos] = feats
        return out[0] if single else out

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
