"""Splits: labelled images that are decoded only when asked for.

A `Split` is a view (`rows`) onto a store that knows how to open one image: an in-memory uint8
array (CIFAR, numpy, the demo), a list of files (image folders), or a Hugging Face dataset whose
image column is read undecoded. Every image leaves here as RGB, so grayscale, RGBA and palette
images need no special case downstream; an unreadable one raises `DataError` naming its file or row.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from bit_transfer.errors import DataError

HEADER_CHUNK = 256  # rows per header-check task


class ArrayStore:
    """Images already in memory: an N×H×W×3 uint8 array."""

    def __init__(self, images: np.ndarray, name: str):
        self.images, self.name = images, name
        self.corrupt: set[int] = set()

    def __len__(self):
        return len(self.images)

    def open(self, j: int) -> Image.Image:
        return Image.fromarray(self.images[j])

    def header_size(self, j: int) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def unreadable(self, rows) -> list[tuple[int, Exception]]:
        return []  # pixels already in memory: nothing can fail to open

    def where(self, j: int) -> str:
        return f"row {j} of {self.name}"


class FileStore:
    """One image file per row (image folders)."""

    def __init__(self, paths: list[str], name: str):
        self.paths, self.name = paths, name
        self.corrupt: set[int] = set()

    def __len__(self):
        return len(self.paths)

    def open(self, j: int) -> Image.Image:
        return Image.open(self.paths[j])

    def header_size(self, j: int) -> tuple[int, int]:
        with Image.open(self.paths[j]) as im:  # PIL reads only the header until pixels are asked for
            return im.size[::-1]

    def unreadable(self, rows) -> list[tuple[int, Exception]]:
        """(row, error) for each of `rows` whose header PIL cannot parse."""
        return _failures(rows, lambda j: self.header_size(j))

    def where(self, j: int) -> str:
        return self.paths[j]


class HFStore:
    """Rows of a `datasets.Dataset`; the image column is cast to `Image(decode=False)`, so a row
    read gives the encoded bytes (or a path) and we decode only what the pipeline asks for."""

    def __init__(self, hf_dataset, column: str, name: str):
        self.ds, self.column, self.name = hf_dataset.select_columns([column]), column, name
        self.corrupt: set[int] = set()

    def __len__(self):
        return len(self.ds)

    def open(self, j: int) -> Image.Image:
        return self._image(self.ds[int(j)][self.column], j)

    def _image(self, value, j: int) -> Image.Image:
        if isinstance(value, dict):  # an Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return Image.open(io.BytesIO(value["bytes"]))
            if value.get("path"):
                return Image.open(value["path"])
            raise ValueError("the image cell is empty")
        a = np.asarray(value)  # an array feature; nested lists arrive as int64
        if a.dtype.kind in "iu" and a.size and 0 <= a.min() and a.max() <= 255:
            a = a.astype(np.uint8)
        return Image.fromarray(check_rgb(a[..., None] if a.ndim == 2 else a, self.where(j)))

    def header_size(self, j: int) -> tuple[int, int]:
        im = self.open(j)
        return im.size[::-1]

    def unreadable(self, rows) -> list[tuple[int, Exception]]:
        """(row, error) for each of `rows` whose cell does not open; the cells are read in one go."""
        rows = [int(j) for j in rows]
        cell = dict(zip(rows, self.ds[rows][self.column]))
        return _failures(rows, lambda j: self._image(cell[j], j).close())

    def where(self, j: int) -> str:
        return f"row {j} of {self.name}"


def _failures(rows, check) -> list[tuple[int, Exception]]:
    """(row, error) of each row that `check` raises on, in order."""
    bad = []
    for j in rows:
        try:
            check(int(j))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
            bad.append((int(j), e))
    return bad


def _corrupt_rows(store) -> np.ndarray:
    """`store.corrupt` as an array; list() copies the set in one step under the GIL, so a stream's
    worker threads adding to it meanwhile cannot break the iteration."""
    return np.array(list(store.corrupt), dtype=np.int64)


def check_rgb(a: np.ndarray, what: str) -> np.ndarray:
    """uint8 images with 1, 3 or 4 channels last, as 3 channels (gray repeated, alpha dropped)."""
    if a.dtype != np.uint8:
        raise DataError(
            f"{what}: images must be uint8 in 0..255, got {a.dtype}; convert with "
            "(x * 255).round().astype(np.uint8) if they are floats in [0, 1]"
        )
    if a.shape[-1] not in (1, 3, 4):
        raise DataError(f"{what}: expected 1, 3 or 4 channels last, got shape {a.shape}")
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3]) if a.shape[-1] == 4 else a


def error_reason(e: Exception) -> str:
    """An error's first line without its closing period (Pillow's decompression-bomb message ends in
    one), to be followed by '; fix' in a one-line message."""
    text = str(e).splitlines()[0].strip() if str(e).strip() else type(e).__name__
    return text.rstrip(".") or type(e).__name__


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as RGB, the way torchvision's loader (`convert("RGB")`) does it, except wide gray
    images (`wide_to_8bit`), which that conversion clips. Training, eval, predict and measurement all
    decode through here."""
    if im.mode == "RGB":
        im.load()
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # what PIL asks for, instead of warning on P -> RGB
    if im.mode.startswith(("I", "F")):
        return Image.fromarray(wide_to_8bit(im), "L").convert("RGB")
    return im.convert("RGB")


def wide_to_8bit(im: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float gray image as uint8, scaled, never clipped (docs/data.md).

    16-bit unsigned (I;16, I;16B, ...): its type's range, 0..65535 -> 0..255 (x / 257, rounded), so
    a 16-bit image of the same scene as an 8-bit one gives the same pixels. 32-bit integer (I) and
    float (F) images have no range their values are meant in (counts, Hounsfield units, depths): the
    image's own min..max is stretched to 0..255; a constant image is black, NaN and inf are its min.
    """
    mode = im.mode
    if mode.startswith("I;16") and "S" not in mode[4:]:
        a = np.asarray(im).astype(np.uint32)
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    a = np.asarray(im, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    a = np.where(finite, a, lo)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


@dataclass(eq=False)
class Split:
    """`len`, `.labels`, `.image(i)`; `.pixels(i, size)` is the pipeline's decode + resize."""

    store: object
    rows: np.ndarray  # int64 rows of `store`
    labels: np.ndarray  # int64, one per row
    name: str
    skip_corrupt: bool = False

    def __post_init__(self):
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.rows) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.rows)} images but {len(self.labels)} labels")

    def __len__(self):
        return len(self.rows)

    def subset(self, idx) -> Split:
        idx = np.asarray(idx, dtype=np.int64)
        return Split(self.store, self.rows[idx], self.labels[idx], self.name, self.skip_corrupt)

    def where(self, i: int) -> str:
        return self.store.where(int(self.rows[i]))

    def header_size(self, i: int) -> tuple[int, int]:
        """(H, W) from the file header, without decoding the pixels."""
        try:
            return self.store.header_size(int(self.rows[i]))
        except DataError:
            raise
        except Exception as e:
            raise self._error(i, e) from None

    def image(self, i: int) -> Image.Image:
        """Image i, decoded and converted to RGB."""
        return self._decode(i, None)

    def pixels(self, i: int, size: int) -> np.ndarray:
        """Image i as a (size, size, 3) uint8 array: RGB, resized square, aspect not kept.

        PIL's bilinear resize (antialiased when shrinking) is what the official PyTorch code's
        `transforms.Resize((size, size))` runs on PIL images. Large JPEGs are first decoded at a
        reduced DCT scale that stays at least `size` on both sides (`Image.draft`): ~3x faster for a
        4000x3000 photo at 512 px; the box `draft` returns keeps the geometry exact.
        """
        return np.asarray(self._decode(i, size))

    def check_headers(self, workers: int | None = None) -> int:
        """Open every image's header (no pixel decoding) and return how many fail. Unreadable images
        are added to `store.corrupt`, which the stream, evaluation and feature cache then skip;
        without `skip_corrupt` the first one (in split order) raises its one-line DataError instead.

        Catches what is not an image at all (garbage, empty, HTML error pages, wrong extension), not
        a file truncated after a valid header: that still fails when decoded, as before. Chunks of
        rows go to `workers` threads (default min(4, CPUs): header reads hold the GIL): on 2 cores, 2000 small
        PNGs took 16-18 us each with a warm page cache (1-2 threads; 8 threads up to 34 us, the GIL),
        and with their pages dropped 90-117 us with 1 thread, 72-75 us with 2-4.
        """
        todo = np.flatnonzero(~np.isin(self.rows, _corrupt_rows(self.store)))
        chunks = [todo[k : k + HEADER_CHUNK] for k in range(0, len(todo), HEADER_CHUNK)]
        found = 0
        pool = ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1))
        try:
            for bad in pool.map(lambda c: self.store.unreadable(self.rows[c]), chunks):
                for j, e in bad:
                    self.store.corrupt.add(j)
                    if not self.skip_corrupt:
                        raise (e if isinstance(e, DataError) else self._error_at(j, e)) from None
                found += len(bad)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return found

    def readable(self, i: int) -> bool:
        """True if image i decodes; failures are recorded in `store.corrupt`."""
        try:
            self._decode(i, None)
            return True
        except DataError:
            return False

    def _decode(self, i: int, size: int | None) -> Image.Image:
        j = int(self.rows[i])
        try:
            im = self.store.open(j)
            box = None
            if size is not None and getattr(im, "format", None) == "JPEG":
                drafted = im.draft(None, (size, size))
                box = drafted[1] if drafted else None
            im = to_rgb(im)
            if size is not None:
                im = im.resize((size, size), Image.BILINEAR, box=box)
            return im
        except DataError:
            self.store.corrupt.add(j)
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
            self.store.corrupt.add(j)
            raise self._error(i, e) from None

    def _error(self, i: int, e: Exception) -> DataError:
        return self._error_at(int(self.rows[i]), e)

    def _error_at(self, j: int, e: Exception) -> DataError:
        reason = error_reason(e)
        return DataError(
            f"cannot read image {self.store.where(j)} ({reason}); replace or delete it, or skip unreadable "
            "images with data.skip_corrupt: true (--set data.skip_corrupt=true)"
        )


@dataclass(eq=False)
class Dataset:
    """A train split (few-shot subset and holdout already applied), an eval split, class names."""

    train: Split
    eval: Split
    class_names: list[str]
    name: str
    notes: list[str] = field(default_factory=list)  # how the splits were made, for the run log

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def skipped_corrupt(self) -> int:
        """Unreadable images found so far (at load for few-shot subsets, else as the stream meets them)."""
        stores = {id(s.store): s.store for s in (self.train, self.eval)}
        return sum(len(s.corrupt) for s in stores.values())

    def corrupt_counts(self) -> dict[str, int]:
        """Unreadable images met so far, per split: {"train": n, "eval": m}. Train includes those a
        few-shot subset passed over; when eval is a holdout of train (one store), its rows count as eval."""
        evaluated = int(np.isin(self.eval.rows, _corrupt_rows(self.eval.store)).sum())
        train = len(self.train.store.corrupt) - (evaluated if self.train.store is self.eval.store else 0)
        return {"train": train, "eval": evaluated}

    def check_readable(self, workers: int | None = None) -> dict[str, int]:
        """Check the headers of every train and eval image before training (`Split.check_headers`),
        so a bad eval image fails now, not at the final evaluation; returns `corrupt_counts()`.

        Raises DataError (one line: the first unreadable file and the fix) unless `skip_corrupt`.
        Every image is checked, local files and Hugging Face rows alike: measured 16 us per small PNG
        (warm cache: ~20-25 s for ImageNet's 1.33 M), 12 us per Hugging Face row (cells read in chunks of
        256 from the memory-mapped arrow files; one `ds[j]` per row was 28 us), i.e. ~10 s per million
        rows on top of reading them once from disk. In-memory arrays (CIFAR, numpy) need no check.
        """
        for split in (self.train, self.eval):
            split.check_headers(workers)
        return self.corrupt_counts()

    def corrupt_report(self) -> str | None:
        """One line for the run log, or None when every image read so far was fine."""
        stores = {id(s.store): s.store for s in (self.train, self.eval)}
        bad = [s.where(j) for s in stores.values() for j in sorted(s.corrupt)]
        if not bad:
            return None
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return f"skipped {len(bad)} unreadable image(s): {shown}"

    def fewshot(self, k: int, seed: int = 0, allow_fewer: bool = False) -> Dataset:
        """This dataset with a class-balanced K-per-class training subset (see `fewshot_indices`)."""
        from bit_transfer.data.sampling import fewshot_indices

        usable = self.train.readable if self.train.skip_corrupt else None
        idx = fewshot_indices(self.train.labels, k, seed, allow_fewer, self.class_names, usable=usable)
        note = f"few-shot: {len(idx)} training images ({k} per class, seed {seed})"
        return Dataset(self.train.subset(idx), self.eval, self.class_names, self.name, [*self.notes, note])
