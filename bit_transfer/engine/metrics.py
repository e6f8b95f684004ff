"""Evaluation: loss, top-1, top-5, per-class accuracy and the confusion matrix over a split."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    count: int
    images_per_sec: float
    confusion: np.ndarray  # [true, predicted] counts

    @property
    def per_class_accuracy(self) -> np.ndarray:
        totals = self.confusion.sum(axis=1)
        return np.divide(np.diag(self.confusion), totals, out=np.full(len(totals), np.nan), where=totals > 0)

    def scalars(self) -> dict[str, float]:
        return {"val/loss": self.loss, "val/top1": self.top1, "val/top5": self.top5}


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def evaluate(predict, batches, num_classes: int) -> EvalResult:
    """Stream `(images, labels)` batches through `predict` (images -> logits) and accumulate metrics.

    Throughput is timed from the end of the first batch, which carries graph compilation and the
    pipeline's start-up (a 100-image eval read 41 img/s that way for a steady 100); a single batch is
    timed whole.
    """
    loss_sum, top5, n = 0.0, 0, 0  # top-1 is the trace of the confusion matrix
    confusion = np.zeros((num_classes, num_classes), np.int64)
    start = t0 = time.perf_counter()
    n0 = 0
    for x, y in batches:
        logits = predict(x)
        y = np.asarray(y, np.int64)
        loss_sum += float(-log_softmax(logits.astype(np.float64))[np.arange(len(y)), y].sum())
        k = min(5, num_classes)
        topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        pred = logits.argmax(axis=1)
        top5 += int((topk == y[:, None]).any(axis=1).sum())
        np.add.at(confusion, (y, pred), 1)
        n += len(y)
        if not n0:
            t0, n0 = time.perf_counter(), n
    end = time.perf_counter()
    timed, seconds = (n - n0, end - t0) if n > n0 else (n, end - start)
    return from_sums(loss_sum, top5, n, confusion, timed / max(seconds, 1e-9))


def evaluate_split(eval_step, split, crop: int, batch_size: int, num_classes: int, workers=None, world=None):
    """Evaluate a split; with several ranks each takes a shard and the counts are summed."""
    from bit_transfer.system import distributed
    from bit_transfer.data import pipeline

    world = world or distributed.World()
    batches = pipeline.eval_batches(split, crop=crop, batch_size=batch_size, workers=workers, rank=world.rank, world=world.size)
    if world.size == 1:
        return evaluate(eval_step, batches, num_classes)
    try:
        shard = evaluate(eval_step, batches, num_classes)
    except ValueError:  # more ranks than eval images: this rank has none
        shard = None
    return merge(shard, distributed.all_reduce_sum, num_classes)  # throughput: the sum over ranks


def from_sums(loss_sum: float, top5_hits: int, count: int, confusion: np.ndarray, images_per_sec: float) -> EvalResult:
    if count == 0:
        raise ValueError("the eval split is empty")
    return EvalResult(loss_sum / count, float(np.trace(confusion)) / count, top5_hits / count, int(count), images_per_sec, confusion)


def merge(shard: EvalResult | None, all_reduce_sum, num_classes: int | None = None) -> EvalResult:
    """The result over all ranks' shards: sums of counts reduced with `all_reduce_sum` (array -> array)."""
    k = shard.confusion.shape[0] if shard else num_classes
    if shard is None:  # this rank's shard was empty
        local = np.zeros(4 + k * k)
    else:
        c = shard.count
        local = np.concatenate([[shard.loss * c, shard.top5 * c, c, shard.images_per_sec], shard.confusion.ravel()])
    total = all_reduce_sum(local)
    loss_sum, top5_hits, count, ips = total[:4]
    confusion = np.rint(total[4:]).astype(np.int64).reshape(k, k)
    return from_sums(float(loss_sum), int(round(top5_hits)), int(round(count)), confusion, float(ips))



