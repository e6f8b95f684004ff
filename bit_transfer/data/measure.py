"""What the rule needs from the data: the training-set size and the image resolution.

Both are measured from the data unless the recipe states them, and cached per dataset so that
`bit-transfer plan` answers at once the second time (a local dataset is keyed by a fingerprint of its
whole tree, see `fingerprint`, so edited data is measured again). The resolution is the median height and
median width of a seeded sample of up to 1 000 training images, read from file headers only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bit_transfer.data.sampling import fewshot_indices, sample_indices
from bit_transfer.data.sources import DEMO_FILE, cache_root, load
from bit_transfer.errors import DataError
from bit_transfer.errors import StorageError
from bit_transfer.system import files

SAMPLE_SIZE = 1000
_CACHE_VERSION = 1


@dataclass
class DataInfo:
    dataset_size: int
    image_size: tuple[int, int]  # (H, W)
    num_classes: int | None = None
    class_names: list[str] | None = None
    source_of: dict[str, str] = field(default_factory=dict)


def _n(x: int) -> str:
    return f"{x:,}".replace(",", " ")


def describe(cfg) -> DataInfo:
    """Size and resolution for the rule: recipe values win; otherwise measured (and cached)."""
    if cfg.size is not None and cfg.image_size is not None:
        return DataInfo(
            int(cfg.size),
            tuple(cfg.image_size),
            source_of={"dataset_size": "recipe: data.size", "image_size": "recipe: data.image_size"},
        )
    path = cache_root(cfg) / "measurements" / f"{cache_key(cfg)}.json"
    m, cached = _read(path), True
    if m is None:
        m, cached = measure(cfg), False
        _write(path, m)
    tag = " (cached)" if cached else ""
    source_of = {}
    if cfg.size is not None:
        size = int(cfg.size)
        source_of["dataset_size"] = "recipe: data.size"
    else:
        size = m["dataset_size"]
        few = f", {cfg.examples_per_class} per class" if cfg.examples_per_class else ""
        source_of["dataset_size"] = f"measured: {_n(size)} training images{few}{tag}"
    if cfg.image_size is not None:
        image_size = tuple(cfg.image_size)
        source_of["image_size"] = "recipe: data.image_size"
    else:
        image_size = tuple(m["image_size"])
        of = f"all {_n(m['sampled'])}" if m["sampled"] == m["train_images"] else f"{_n(m['sampled'])} sampled"
        source_of["image_size"] = f"measured: median {image_size[0]}x{image_size[1]} of {of} images{tag}"
    return DataInfo(size, image_size, len(m["class_names"]), m["class_names"], source_of)


def measure(cfg) -> dict:
    """Load (lazily) and measure: train size after few-shot, median H and W of a seeded sample."""
    ds = load(cfg, fewshot=False)
    train = ds.train
    if cfg.examples_per_class is not None:
        size = len(fewshot_indices(train.labels, cfg.examples_per_class, cfg.seed, cfg.allow_fewer, ds.class_names))
    else:
        size = len(train)
    sizes = []
    for i in sample_indices(len(train), SAMPLE_SIZE, seed=0):
        try:
            sizes.append(train.header_size(int(i)))
        except DataError:
            if not train.skip_corrupt:
                raise
    if not sizes:
        raise DataError(f"none of the sampled training images of {ds.name} could be read")
    hw = np.median(np.asarray(sizes, dtype=np.float64), axis=0)
    return {
        "dataset_size": int(size),
        "image_size": [int(round(hw[0])), int(round(hw[1]))],
        "sampled": len(sizes),
        "train_images": len(train),
        "class_names": list(ds.class_names),
    }


def fingerprint(path: Path) -> str:
    """A digest of a local dataset's whole tree: every file's relative path, size and mtime_ns, and
    the file count. Images replaced in place change it, at any depth; no file is read (one stat per
    file: ~seconds for ImageNet's 1.3 M files). Hashed one folder at a time, so memory stays small.
    Hidden entries are left out, as the image-folder reader does; linked folders are followed once."""
    try:
        if not path.is_dir():
            st = path.stat()
            return f"file {st.st_size} {st.st_mtime_ns}"
    except OSError:
        return "missing"
    h, count, seen, stack = hashlib.blake2b(digest_size=16), 0, set(), [(str(path), "")]
    while stack:
        folder, rel = stack.pop()
        real = os.path.realpath(folder)
        if real not in seen:
            seen.add(real)
            lines = _folder_lines(folder, rel, stack)
            count += len(lines)
            h.update("".join(lines).encode(errors="surrogateescape"))
    return f"{count} files {h.hexdigest()}"


def _folder_lines(folder: str, rel: str, subfolders: list) -> list[str]:
    """'path\\0size\\0mtime_ns' per file of `folder`, sorted by name; its subfolders go on `subfolders`."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:  # unreadable: the loader says so; here it only has to change the digest
        return [f"{rel}\0unreadable\n"]
    lines = []
    for e in entries:
        if e.is_dir():
            subfolders.append((e.path, f"{rel}{e.name}/"))
            continue
        try:
            st = e.stat()
            lines.append(f"{rel}{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n")
        except OSError:  # a dangling link
            lines.append(f"{rel}{e.name}\0missing\n")
    return lines


def cache_key(cfg) -> str:
    """Everything the measurement depends on: source, name, path (and its contents' fingerprint),
    splits, columns, holdout and few-shot settings."""
    if cfg.source == "demo":
        where = fingerprint(DEMO_FILE)
    elif cfg.path:
        where = fingerprint(Path(cfg.path).expanduser().resolve())
    else:
        where = None  # a hub dataset: its name is the key (delete the cache to re-measure)
    fields = (
        "source", "name", "path", "train_split", "eval_split", "image_column", "label_column", "holdout",
        "examples_per_class", "seed", "allow_fewer", "skip_corrupt",
    )
    key = {f: getattr(cfg, f, None) for f in fields}
    key.update(version=_CACHE_VERSION, stamp=where, sample=SAMPLE_SIZE)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, m: dict) -> None:
    """Best effort: an unwritable cache only makes the next `plan` slower."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(m)), mode=None)
    except (OSError, StorageError):
        pass
