"""Pre-logit features of a frozen backbone, computed once per image and cached on disk.

A linear probe trains only the head, so each image's features never change: computing them once
turns a run of minutes into seconds, and the runs of a few-shot sweep share them (the subsets of
different shots and seeds overlap, and every run evaluates on the same eval split).

Features are those of the eval transform (resize to crop, no augmentation) in fp32: augmented
images would give new features at every step and could not be cached. This is the standard
linear-probe protocol, and the reason a cached linear probe does not apply MixUp.

Layout: `<root>/<key>/meta.json` and append-only `part-*.npz` files (rows, checks, readable,
features); `.lock` is held (`runlock`) by the one process computing an entry's missing features.
The key hashes what features depend on: the backbone (its config, the bytes of every non-head
parameter and the code that runs it, so new weights, another init seed, another padding or an
edited model is another key), the crop, the dataset's name, the split's name and its store size. Inside an entry, images are
indexed by their store row (so seeds, shots and a holdout carved from train all share it) and
carry a check of their label and origin (file path or row): a changed dataset listing is
recomputed instead of served stale. Parts are written atomically; an interrupted computation
keeps the parts it finished. Delete a key directory (or the root) to drop the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bit_transfer import settings
from bit_transfer.run import lock as runlock, runlog
from bit_transfer.errors import PLACE_OPTION, UsageError, storage_error
from bit_transfer.system import files

VERSION = 1
PART_FIELDS = ("rows", "checks", "readable", "features")
LOCK = ".lock"  # in an entry: held by the process computing its features
CHUNK_IMAGES = 2048  # a part is written after this many images: the unit an interruption can lose

# Images run through the backbone in this process, by split name: what the cache saved is observable.
COMPUTED: Counter = Counter()


def default_root() -> Path:
    """$BIT_TRANSFER_HOME/features, else ~/.cache/bit-transfer/features (next to the data cache)."""
    return settings.home() / "features"


def backbone_id(model) -> str:
    """A digest of everything the features depend on in the model, the head excluded: its config,
    its parameters, and the code that runs it (the model's source file and the folded inference
    model's, the MindSpore version)."""
    import inspect

    import mindspore as ms

    from bit_transfer.models import inference, model_config

    h = hashlib.blake2b(digest_size=16)
    cfg = {k: v for k, v in model_config(model).items() if k != "num_classes"}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    h.update(Path(inspect.getfile(type(model))).read_bytes())
    h.update(Path(inspect.getfile(inference)).read_bytes())
    h.update(ms.__version__.encode())
    for p in sorted(model.get_parameters(), key=lambda p: p.name):
        if p.name.startswith("head."):
            continue
        a = np.ascontiguousarray(p.asnumpy())
        h.update(f"{p.name}:{a.dtype}:{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


def row_checks(split) -> np.ndarray:
    """Per image, a 63-bit hash of (label, where it comes from): detects a reshuffled listing."""
    out = np.empty(len(split), np.int64)
    for i in range(len(split)):
        d = hashlib.blake2b(f"{split.labels[i]}|{split.where(i)}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(d, "little") >> 1
    return out


class FeatureCache:
    """`features(dataset_name, split)` -> (features, labels) of the split's readable images.

    Missing images are run through `forward_features` of the model folded for inference (weight
    standardisation computed once, models/inference.py; compiled once, batches padded to
    `batch_size` so every batch reuses the graph) and appended to the cache. Padding also keeps an
    image's features independent of which images share its batch (GroupNorm is per sample): measured
    bit-identical with other neighbours, permuted or zero-padded, under AVX-512 and AVX2 oneDNN
    kernels; another batch size can round differently (~1e-6 of features of size ~2).
    """

    def __init__(self, model, crop: int, *, root: str | Path | None = None, batch_size: int = 32,
                 workers: int | None = None, jit: bool = True, log=print):
        self.model, self.crop, self.batch_size, self.workers, self.jit = model, crop, batch_size, workers, jit
        self.root = Path(root) if root else default_root()
        self.log = log
        self.backbone = backbone_id(model)
        self._entries: dict[Path, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._forward = None
        self.seconds = 0.0  # spent computing features

    # ------------------------------------------------------------------ public
    def features(self, dataset_name: str, split, about: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(float32 (n, F), int64 (n,)) in split order; unreadable images (skip_corrupt) left out.
        `about` names the images in the log (`split_about`), else the split's name does."""
        entry = self.entry_dir(dataset_name, split)
        checks = row_checks(split)
        missing = np.flatnonzero(~self._cached(entry, split, checks))
        if len(missing):
            lock = self._lock(entry)  # one process fills an entry at a time
            try:
                self._entries.pop(entry, None)  # what a process that held it before us added
                missing = np.flatnonzero(~self._cached(entry, split, checks))
                if len(missing):
                    self._compute(entry, split, missing, checks, about or f"{split.name} images")
            finally:
                if lock:
                    lock.close()
            assert self._cached(entry, split, checks).all()
        rows, _, readable, feats = self._load(entry)
        at = np.searchsorted(rows, split.rows)
        ok = readable[at]
        return feats[at][ok], split.labels[ok]

    def entry_dir(self, dataset_name: str, split) -> Path:
        key = {
            "version": VERSION,
            "backbone": self.backbone,
            "crop": int(self.crop),
            "dataset": dataset_name,
            "split": split.name,
            "store_size": len(split.store),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        entry = self.root / digest
        if not (entry / "meta.json").is_file():
            from bit_transfer.models import model_config

            try:
                entry.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # --feature-cache a file, read-only, full
                raise storage_error(e, entry, flag="--feature-cache") from None
            about = dict(key, model={k: v for k, v in model_config(self.model).items() if k != "num_classes"})
            token = PLACE_OPTION.set("--feature-cache")  # a failed write names the option that moves the cache
            try:
                runlog.write_atomic(entry / "meta.json", json.dumps(about, indent=1) + "\n")
            finally:
                PLACE_OPTION.reset(token)
        return entry

    def _lock(self, entry: Path):
        """The entry's lock (its `.lock` file, never replaced), or one line naming the process filling it."""
        path = entry / LOCK
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o666))
            return runlock.hold(path)
        except runlock.Held as e:
            raise UsageError(f"the feature cache {entry} is being filled by another bit-transfer process ({e.who}); "
                             "wait for it to end, or give another --feature-cache") from None
        except OSError as e:
            raise storage_error(e, path, flag="--feature-cache") from None

    # ------------------------------------------------------------------ storage
    def _cached(self, entry: Path, split, checks: np.ndarray) -> np.ndarray:
        """Per image of the split: is it in the entry, with the same label and origin?"""
        rows, known_checks, _, _ = self._load(entry)
        if not len(rows):
            return np.zeros(len(split), bool)
        at = np.minimum(np.searchsorted(rows, split.rows), len(rows) - 1)
        return (rows[at] == split.rows) & (known_checks[at] == checks)

    def _load(self, entry: Path):
        """(rows sorted, checks, readable, features) of all parts; the newest part wins for a row."""
        if entry in self._entries:
            return self._entries[entry]
        parts = []
        for path in sorted(entry.glob("part-*.npz")):  # names sort by creation time
            try:
                with np.load(path, allow_pickle=False) as z:
                    parts.append([z[k] for k in PART_FIELDS])
            except (OSError, ValueError, KeyError):  # an unreadable part is recomputed on demand
                continue
        if not parts:
            loaded = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros((0, 0), np.float32))
        else:
            rows, checks, readable, feats = (np.concatenate(column) for column in zip(*parts))
            order = np.argsort(rows, kind="stable")  # equal rows keep part order: the newest is last
            rows = rows[order]
            last = np.append(rows[1:] != rows[:-1], True)
            keep = order[last]
            loaded = (rows[last], checks[keep], readable[keep], feats[keep])
        self._entries[entry] = loaded
        return loaded

    def _save_part(self, entry: Path, rows, checks, readable, feats) -> None:
        name = f"part-{time.time_ns():020d}-{os.getpid()}.npz"

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **dict(zip(PART_FIELDS, (rows, checks, readable, feats))))

        # a full disk: the parts written before are kept, this one is not
        files.atomic_write(entry / name, write, mode=None, needed=int(feats.nbytes), flag="--feature-cache")
        self._entries.pop(entry, None)

    # ------------------------------------------------------------------ computing
    def _compute(self, entry: Path, split, positions: np.ndarray, checks: np.ndarray, about: str) -> None:
        from bit_transfer.data import pipeline

        t0 = time.perf_counter()
        self.log(f"features: {len(positions)} {about} through the backbone at {self.crop} px "
                 f"(cache {entry})")
        chunk = max(self.batch_size, CHUNK_IMAGES // self.batch_size * self.batch_size)
        for start in range(0, len(positions), chunk):
            pos = positions[start : start + chunk]
            sub = split.subset(pos)
            got, labels = [], []
            for x, y in pipeline.eval_batches(sub, crop=self.crop, batch_size=self.batch_size, workers=self.workers):
                got.append(self._run(x))
                labels.append(y)
            # with skip_corrupt, eval_batches leaves unreadable images out; they are in store.corrupt
            readable = np.array([int(r) not in split.store.corrupt for r in sub.rows], bool)
            n_got = sum(len(g) for g in got)
            in_order = n_got == 0 or np.array_equal(np.concatenate(labels), sub.labels[readable])
            if n_got != int(readable.sum()) or not in_order:
                raise RuntimeError(f"feature pass over {split.name}: {n_got} images for {int(readable.sum())} readable")
            feats = np.zeros((len(pos), self.model.num_features), np.float32)
            if n_got:
                feats[readable] = np.concatenate(got)
            self._save_part(entry, sub.rows, checks[pos], readable, feats)
            COMPUTED[split.name] += len(pos)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.log(f"features: done in {seconds:.1f} s ({len(positions) / max(seconds, 1e-9):.1f} images/s)")

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._forward is None:
            from bit_transfer.engine.step import feature_step
            from bit_transfer.models.inference import fold

            self._forward = feature_step(fold(self.model), self.batch_size, jit=self.jit)  # frozen: folded once
        return self._forward(x)


def split_about(dataset, which: str) -> str:
    """How the log names a dataset's train or eval images: a holdout eval split is rows of the training
    split (its name ends in ':train'), so it is called what it is."""
    split = getattr(dataset, which)
    if which == "eval" and split.store is dataset.train.store:
        return f"eval images (a seeded holdout of {split.name})"
    return f"{'training' if which == 'train' else 'eval'} images of {split.name}"
