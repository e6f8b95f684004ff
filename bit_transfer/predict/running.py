"""Running a model over a split: `stream` (positions, logits) batch by batch through the eval pipeline,
naming unreadable images as they are met (`Unreadable`), and the top-k classes of logits (`best_k`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from bit_transfer.data.split import Split, error_reason, to_rgb
from bit_transfer.errors import DataError
from bit_transfer.predict.model import LoadedModel


def unreadable_reason(split: Split, i: int) -> str:
    """Why image i does not open or decode, in a few words."""
    try:
        im = split.store.open(int(split.rows[i]))
        to_rgb(im)
    except Image.UnidentifiedImageError:
        return "not an image (unknown format)"
    except OSError as e:
        if e.strerror:
            return e.strerror.lower()
        text = error_reason(e)
        return f"truncated or corrupt ({text})" if "truncated" in text else text
    except Exception as e:
        return error_reason(e)
    return "it failed to decode"


class Unreadable:
    """The unreadable images of a split, named once each as they are found (stderr), or the first one
    raised (`strict`)."""

    def __init__(self, split: Split, strict: bool, say: Callable[[str], None],
                 fix: str = "drop --strict to skip unreadable files"):
        self.split, self.strict, self.say, self.fix = split, strict, say, fix
        self.positions: list[int] = []
        self._known = 0

    def check(self) -> None:
        corrupt = self.split.store.corrupt
        if len(corrupt) == self._known:  # the usual case: nothing new, no work
            return
        self._known = len(corrupt)
        bad = np.flatnonzero(np.isin(self.split.rows, np.array(list(corrupt), np.int64)))
        for i in sorted(set(bad.tolist()) - set(self.positions)):
            where, why = self.split.where(i), unreadable_reason(self.split, i)
            if self.strict:
                raise DataError(f"{where}: {why}; replace or delete it, or {self.fix}")
            self.positions.append(i)
            self.say(f"skipped {where}: {why}")


def stream(model: LoadedModel, split: Split, unreadable: Unreadable, workers: int | None = None,
           features: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions in the split, logits) batch after batch, through the eval pipeline; with `features`
    the pre-logit features instead of the logits (`embed`).

    Headers are checked first (a non-image is named before any work), then images that fail to
    decode are named as the pipeline meets them; `split.labels` must be the positions.
    """
    from bit_transfer.data import pipeline

    run = model.features if features else model.forward

    split.check_headers(workers)
    unreadable.check()
    batch = max(1, min(model.batch_size, len(split)))
    batches = pipeline.eval_batches(split, crop=model.image_size, batch_size=batch, workers=workers)
    try:
        for images, positions in batches:
            unreadable.check()
            yield positions.astype(np.int64), run(images, batch)
    finally:
        batches.close()  # stops the pipeline's threads now, also when a caller stops early
    unreadable.check()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def best_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) of the k best classes per row, best first; ties keep the lower index,
    so the first is the argmax evaluation counts."""
    probs = softmax(logits)
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(probs, idx, axis=1)
