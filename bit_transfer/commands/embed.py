"""`bit-transfer embed MODEL INPUT... --out FILE`: the pre-logit features of images (what a linear probe
trains on), through eval's preprocessing and the folded inference model, written as .npz, .parquet or .npy.

The features come from `engine.step.feature_step`, the computation of the few-shot linear probe's
cache, so `embed`'s numbers, `Predictor.embed`'s and the cache's are the same.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from bit_transfer.errors import DataError, UsageError, storage_error
from bit_transfer.predict.inputs import Inputs, collect_inputs, files_split
from bit_transfer.predict.model import LoadedModel, check_embeddable, load_model
from bit_transfer.predict.output import _link_new
from bit_transfer.predict.running import Unreadable, stream

EMBED_SUFFIXES = (".npz", ".parquet", ".npy")



class EmbedOut:
    """--out: refused before any work when it exists (unless `overwrite`) or is not .npz/.parquet/.npy;
    written to a temporary beside it and moved into place at the end."""

    def __init__(self, path, overwrite: bool = False):
        self.path, self.overwrite = Path(path).expanduser(), overwrite
        self.format = self.path.suffix.lower()
        if self.format not in EMBED_SUFFIXES:
            raise UsageError(f"--out {self.path}: give a .npz, .parquet or .npy file (e.g. --out features.npz)")
        if self.path.is_dir():
            raise UsageError(f"--out {self.path} is a directory; give a file in it (e.g. --out "
                             f"{self.path / ('features' + self.format)})")
        if self.path.exists() and not overwrite:
            raise UsageError(f"--out {self.path} exists; choose a new file, or add --overwrite to replace it")
        if self.format == ".parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise UsageError("--out .parquet needs pyarrow: pip install pyarrow, or write .npz") from None

    def write(self, features: np.ndarray, paths: list[str], labels: list[str | None]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                self._write(f, features, paths, labels)
                f.flush()
                os.fsync(f.fileno())
            if self.overwrite:
                os.replace(tmp, self.path)
            else:
                _link_new(tmp, self.path)
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            raise UsageError(f"--out {self.path} was created while embedding; it is kept: choose a new file, "
                             "or add --overwrite to replace it") from None
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise storage_error(e, self.path, needed=int(features.nbytes)) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _write(self, f, features, paths, labels) -> None:
        if self.format == ".npy":
            np.save(f, features)
        elif self.format == ".npz":
            arrays = {"features": features, "paths": np.array(paths, dtype=str)}
            if any(label is not None for label in labels):
                arrays["labels"] = np.array([label or "" for label in labels], dtype=str)
            np.savez(f, **arrays)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            dim = features.shape[1]
            column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), dim)
            table = pa.table({"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.string()),
                              "features": column})
            pq.write_table(table, f)


def folder_labels(inputs: Inputs) -> list[str | None]:
    """Per image, its class folder's name when it lies in a sub-folder of a directory INPUT (the
    image-folder layout); None for loose files."""
    labels: list[str | None] = [None] * len(inputs.paths)
    for folder, start, end in inputs.folders:
        prefix = len(os.path.join(folder, ""))
        for i in range(start, end):
            rel = inputs.paths[i][prefix:]
            labels[i] = rel.split(os.sep, 1)[0] if os.sep in rel else None
    return labels


def embed_command(args) -> int:
    """`bit-transfer embed MODEL INPUT... --out FILE` (cli.py's arguments)."""
    out = EmbedOut(args.out, args.overwrite)  # refused before any work
    inputs = collect_inputs(args.inputs)
    model = load_model(args.model, image_size=args.image_size, batch_size=args.batch_size, device=args.device)
    check_embeddable(model)
    split = files_split(inputs.paths, "inputs")
    start = time.perf_counter()
    feats, done = _run(model, split, args)
    seconds = time.perf_counter() - start
    if not done.any():
        raise DataError(f"none of the {len(split)} images could be read (each named above); nothing to embed")
    labels = folder_labels(inputs)
    keep = np.flatnonzero(done)
    out.write(feats[keep], [inputs.paths[i] for i in keep], [labels[i] for i in keep])
    n, skipped = len(keep), len(split) - len(keep)
    skip = f"; {skipped} unreadable file{'s' if skipped != 1 else ''} skipped (named above)" if skipped else ""
    print(f"embedded {n} image{'s' if n != 1 else ''} in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} images/s) "
          f"with {model.source} at {model.image_size}x{model.image_size} px ({model.size_from}){skip}")
    print(f"wrote {n} x {feats.shape[1]} features to {out.path}")
    return 0


def _run(model: LoadedModel, split, args) -> tuple[np.ndarray, np.ndarray]:
    """(features of every position, which positions were read), with a progress bar on stderr."""
    from tqdm import tqdm

    feats = np.zeros((len(split), model.num_features), np.float32)
    done = np.zeros(len(split), bool)
    bar = tqdm(total=len(split), unit="img", file=sys.stderr, dynamic_ncols=True, leave=False,
               disable=True if args.quiet or len(split) <= model.batch_size else None)
    unreadable = Unreadable(split, args.strict, lambda s: bar.write(s, file=sys.stderr))
    try:
        for pos, f in stream(model, split, unreadable, args.workers, features=True):
            feats[pos], done[pos] = f, True
            bar.update(len(pos))
    finally:
        bar.close()
    return feats, done
