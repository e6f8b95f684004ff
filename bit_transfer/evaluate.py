"""Evaluation: loss, top-1, top-5, per-class accuracy and the confusion matrix over a split."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

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
    from bit_transfer import distributed
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


def save_report(result: EvalResult, class_names: list[str], out_dir: Path) -> list[Path]:
    """per_class.json + confusion.json, and confusion.png when matplotlib is installed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_class = {
        name: (None if np.isnan(acc) else float(acc)) for name, acc in zip(class_names, result.per_class_accuracy)
    }
    written = [out_dir / "per_class.json", out_dir / "confusion.json"]
    written[0].write_text(json.dumps(per_class, indent=1))
    written[1].write_text(json.dumps({"class_names": class_names, "matrix": result.confusion.tolist()}))
    png = plot_confusion(result.confusion, class_names, out_dir / "confusion.png")
    if png:
        written.append(png)
    return written


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    k = len(class_names)
    size = min(4 + 0.25 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 50:
        ax.set_xticks(range(k), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
