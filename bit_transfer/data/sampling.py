"""Every random choice the data makes: few-shot subsets, holdout splits, the training stream.

All of them are pure functions of (seed, what is being drawn, position), so a run is the same on
every machine, for any number of workers, and after a resume. Two rules make that hold:

- each draw gets its own generator, `PCG64(SeedSequence([seed, purpose, ...]))`, so no draw depends
  on how many numbers an earlier one consumed;
- only `Generator.random()` (53-bit uniform doubles) is used, and orders come from a stable argsort
  of those keys. NumPy does not promise that `permutation`/`choice`/`integers` keep their streams
  across versions (NEP 19); `random()` is a plain function of the bit generator's output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bit_transfer.errors import DataError

# Purposes: distinct SeedSequence words so the draws are independent of each other.
_FEWSHOT, _HOLDOUT, _EPOCH, _REPLACE, _AUGMENT, _SAMPLE = 1, 2, 3, 4, 5, 6


def _uniform(seed: int, *words: int, size) -> np.ndarray:
    ss = np.random.SeedSequence([int(seed), *map(int, words)])
    return np.random.Generator(np.random.PCG64(ss)).random(size)


def _order(seed: int, *words: int, n: int) -> np.ndarray:
    """A seeded permutation of range(n)."""
    return np.argsort(_uniform(seed, *words, size=n), kind="stable")


def class_orders(labels: np.ndarray, seed: int, num_classes: int | None = None) -> list[np.ndarray]:
    """For each class c (0..num_classes-1), its indices in a seeded order; few-shot takes a prefix.

    Per-class generators make K-shot subsets nested: the 1-shot subset of a seed is inside its
    5-shot subset, and adding images of one class does not change the choice for another.
    """
    labels = np.asarray(labels)
    num = num_classes if num_classes is not None else (int(labels.max()) + 1 if len(labels) else 0)
    out = []
    for c in range(num):
        idx = np.flatnonzero(labels == c)
        out.append(idx[_order(seed, _FEWSHOT, c, n=len(idx))])
    return out


def fewshot_indices(
    labels,
    k: int,
    seed: int,
    allow_fewer: bool = False,
    class_names: Sequence[str] | None = None,
    usable=None,
) -> np.ndarray:
    """Sorted indices of exactly `k` examples per class, chosen without replacement for `seed`.

    `usable(i) -> bool`, when given, is asked about candidates in order and rejected ones are
    passed over (how `data.skip_corrupt` keeps exactly K readable images per class).
    """
    if k < 1:
        raise DataError(f"data.examples_per_class must be at least 1, got {k}")
    chosen = []
    num_classes = len(class_names) if class_names is not None else None
    for c, order in enumerate(class_orders(labels, seed, num_classes)):
        if usable is None:
            picked = order[:k]
        else:
            picked = []
            for i in order:
                if len(picked) == k:
                    break
                if usable(int(i)):
                    picked.append(i)
            picked = np.asarray(picked, dtype=np.int64)
        if len(picked) < k and not allow_fewer:
            name = class_names[c] if class_names is not None else str(c)
            what = "readable training images" if usable is not None else "training images"
            raise DataError(
                f"class '{name}' has only {len(picked)} {what}, fewer than "
                f"data.examples_per_class={k}; lower K or set data.allow_fewer: true to take them all"
            )
        chosen.append(picked)
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) sorted, disjoint indices of range(n); eval holds round(fraction * n) of them."""
    if not 0 < fraction < 1:
        raise DataError(f"data.holdout must be a fraction between 0 and 1, got {fraction}")
    n_eval = int(round(fraction * n))
    if n_eval < 1 or n_eval >= n:
        raise DataError(
            f"data.holdout={fraction} of {n} training images leaves an empty train or eval split; "
            "choose a fraction that keeps at least one image on each side"
        )
    order = _order(seed, _HOLDOUT, n=n)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def sample_indices(n: int, m: int, seed: int) -> np.ndarray:
    """min(m, n) distinct indices of range(n), seeded (the images the resolution is measured on)."""
    if m >= n:
        return np.arange(n)
    return np.sort(_order(seed, _SAMPLE, n=n)[:m])


class Stream:
    """The infinite training stream as a pure function of (seed, position).

    Positions 0, 1, 2, ... run through a fresh seeded permutation of the split each epoch, with
    batches running on across epoch boundaries. A split smaller than one global batch is instead
    sampled with replacement, batch by batch, as the official code does for few-shot subsets.
    Each position also gets its random crop offsets and flip, from a generator keyed by its batch.
    """

    def __init__(self, n: int, global_batch: int, seed: int, *, max_offset: int, flip: bool):
        if n < 1:
            raise DataError("the training split is empty; check data.path and data.train_split")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.max_offset, self.flip = max_offset, flip
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = _order(self.seed, _EPOCH, epoch, n=self.n)
        return self._perms[epoch]

    def indices(self, batch: int) -> np.ndarray:
        """The split indices of global micro-batch `batch` (int64, length global_batch)."""
        g = self.global_batch
        if self.n < g:
            u = _uniform(self.seed, _REPLACE, batch, size=g)
            return np.minimum((u * self.n).astype(np.int64), self.n - 1)
        pos = batch * g + np.arange(g, dtype=np.int64)
        epochs, within = np.divmod(pos, self.n)
        out = np.empty(g, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[within[sel]]
        return out

    def augment(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(crop_y, crop_x, flip) int32 arrays for global micro-batch `batch`."""
        u = _uniform(self.seed, _AUGMENT, batch, size=(self.global_batch, 3))
        span = self.max_offset + 1
        y = np.minimum((u[:, 0] * span).astype(np.int32), self.max_offset)
        x = np.minimum((u[:, 1] * span).astype(np.int32), self.max_offset)
        f = (u[:, 2] < 0.5).astype(np.int32) if self.flip else np.zeros(self.global_batch, np.int32)
        return y, x, f
