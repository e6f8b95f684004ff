"""The BiT-HyperRule input pipeline, on `mindspore.dataset`.

Train: resize to (precrop, precrop) -> random crop (crop, crop) -> random horizontal flip -> CHW
uint8 (the official PyTorch transform; the square resize does not keep the aspect ratio). Eval:
resize to (crop, crop) -> CHW uint8. With `random_crop=False` training resizes straight to
(crop, crop), as the paper does for the VTAB tasks where crops change the label. The [-1, 1]
scaling (`pixels.unit_range`) and MixUp run on the device, inside the compiled step: uint8 is a
quarter of float32's bytes to move there.

Determinism: which image, its crop offsets and its flip are drawn up front by `sampling.Stream`
from (seed, position) and flow through the pipeline as data; the workers only decode and slice.
So batches do not depend on the number of workers or on thread scheduling (`map` keeps row order),
a resume at `start` skips straight to its position without decoding, and nothing touches
`mindspore.dataset.config.set_seed`, which would also reseed Python's and NumPy's global RNGs.

Workers are threads, not processes: PIL releases the GIL while it decodes and resizes, threads
measured faster here (benchmarks/data_pipeline.py), and the `map` docs list forked workers as
unsupported when the training network runs in the same process. Row order through a parallel
`map` is kept (tests/data/test_pipeline.py checks 1 vs 2 workers give identical batches).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

import mindspore.dataset as msd
import numpy as np

from bit_transfer.data.sampling import Stream
from bit_transfer.data.split import Split
from bit_transfer.errors import DataError
from bit_transfer.system import distributed

PREFETCH = 2  # micro-batches read ahead of the step (`prefetch`)
# Worker threads (False) or forked processes (True) for the decode step. Threads won on this machine
# (benchmarks/data_pipeline.py --processes) and are the only choice the `map` docstring in
# mindspore/dataset/engine/datasets.py lists as supported next to training in the same process.
PYTHON_MULTIPROCESSING = False


def num_workers(workers: int | None = None) -> int:
    """`workers`, or by default this process's share of the CPUs it may run on: its CPUs divided by
    the ranks on this machine (`distributed.local_ranks`). MindSpore refuses more threads than CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(workers or cpus // distributed.local_ranks(), cpus))


class _Rows:
    """The pipeline's source: one (index, crop_y, crop_x, flip) row per image, batch after batch."""

    def __init__(self, row_batches):
        self.row_batches = row_batches  # a callable returning an iterator of int64 (k, 4) arrays

    def __iter__(self):
        for rows in self.row_batches():
            yield from ((row,) for row in rows)


def _reader(split: Split, size: int, crop: int, substitute: bool):
    """The per-image work, run by the pipeline's worker threads: decode, resize, crop, flip, to CHW.

    Returns (image, used index); used = -1 when the image cannot be read and may not be replaced.
    With `split.skip_corrupt` and `substitute`, an unreadable image is replaced by the next readable
    one in the split, which depends only on the data, so the stream stays deterministic.
    """
    n = len(split)
    blank = np.zeros((3, crop, crop), np.uint8)

    def read(row):
        i, y, x, flip = (int(v) for v in row)
        for step in range(n if substitute and split.skip_corrupt else 1):
            j = (i + step) % n
            if int(split.rows[j]) in split.store.corrupt:
                continue
            try:
                a = split.pixels(j, size)
            except DataError:
                continue
            a = a[y : y + crop, x : x + crop]
            if flip:
                a = a[:, ::-1]
            return np.ascontiguousarray(a.transpose(2, 0, 1)), np.int64(j)  # CHW, as the model takes it
        return blank, np.int64(-1)

    return read


def _pipeline(split: Split, row_batches, *, size: int, crop: int, batch: int, workers, substitute: bool):
    w = num_workers(workers)
    ds = msd.GeneratorDataset(_Rows(row_batches), column_names=["row"], shuffle=False, num_parallel_workers=1)
    ds = ds.map(
        _reader(split, size, crop, substitute),
        input_columns=["row"],
        output_columns=["image", "used"],
        num_parallel_workers=w,
        python_multiprocessing=PYTHON_MULTIPROCESSING,
    )
    ds = ds.batch(batch, drop_remainder=False)
    return ds.create_tuple_iterator(output_numpy=True, num_epochs=1)


def _fail(split: Split, i: int):
    """Raise the DataError for image i (decoding it again here gives the exact reason)."""
    if split.skip_corrupt:
        raise DataError(f"no readable image left in {split.name} (last tried {split.where(i)})")
    split.image(i)  # raises, naming the file or row
    raise DataError(f"cannot read image {split.where(i)}; replace or delete it, or --set data.skip_corrupt=true")


def train_batches(
    split: Split,
    *,
    precrop: int,
    crop: int,
    micro_batch: int,
    seed: int,
    random_crop: bool = True,
    random_flip: bool = True,
    workers: int | None = None,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (images uint8 (micro_batch, 3, crop, crop), labels int32) batches.

    Global micro-batch b holds micro_batch * world images; rank r gets rows [r*mb, (r+1)*mb).
    `start` = global micro-batches already consumed (resume). A pure function of (seed, b).
    """
    if not 0 <= rank < world or micro_batch < 1 or start < 0:
        raise ValueError(f"bad stream position: rank {rank} of {world}, micro_batch {micro_batch}, start {start}")
    if precrop < crop:
        raise DataError(f"precrop {precrop} is smaller than crop {crop}; set rule.precrop >= rule.crop")
    size = precrop if random_crop else crop
    stream = Stream(len(split), micro_batch * world, seed, max_offset=size - crop, flip=random_flip)
    mine = slice(rank * micro_batch, (rank + 1) * micro_batch)

    def batch_rows(b):
        y, x, f = stream.augment(b)
        return np.stack([stream.indices(b), y, x, f], axis=1)[mine]

    def row_batches():
        b = start
        while True:
            yield batch_rows(b)
            b += 1

    it = _pipeline(split, row_batches, size=size, crop=crop, batch=micro_batch, workers=workers, substitute=True)
    b = start
    try:
        for images, used in it:
            if (used < 0).any():  # by default the first unreadable image stops the run
                _fail(split, int(batch_rows(b)[int(np.argmax(used < 0)), 0]))
            yield images, split.labels[used].astype(np.int32)
            b += 1
    finally:
        it.stop()


def eval_batches(
    split: Split,
    *,
    crop: int,
    batch_size: int,
    workers: int | None = None,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The whole split in order (rank r: the r-th of `world` contiguous shards), resized to crop, as
    (images uint8 (n, 3, crop, crop), labels int32) batches.

    With `skip_corrupt`, unreadable images are left out (and counted), so a batch may be short.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    shard = np.array_split(np.arange(len(split), dtype=np.int64), world)[rank]
    if len(shard) == 0:
        return
    rows = np.zeros((len(shard), 4), np.int64)
    rows[:, 0] = shard

    def row_batches():
        yield rows

    it = _pipeline(split, row_batches, size=crop, crop=crop, batch=batch_size, workers=workers, substitute=False)
    done = 0
    try:
        for images, used in it:
            ok = used >= 0
            if not ok.all():
                bad = shard[done : done + len(used)][~ok]
                if not split.skip_corrupt:
                    _fail(split, int(bad[0]))
                images, used = images[ok], used[ok]
            done += len(ok)
            if len(used):
                yield images, split.labels[used].astype(np.int32)
    finally:
        it.stop()


def prefetch(batches: Iterator, depth: int = PREFETCH) -> Iterator:
    """`batches`, read ahead by a thread into a queue of `depth`: the next micro-batch is ready while
    the device runs the current step (the loop's `data_wait` is then only what the workers cannot
    keep up with). Order is unchanged; an error is raised where it occurred in the stream; closing
    the returned iterator stops the thread, which closes `batches`."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in batches:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # handed to the consumer, raised at its position in the stream
            put((end, e))
        finally:
            close = getattr(batches, "close", None)
            if close:
                close()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()  # it ends after the batch it is reading, closing `batches` in its own thread
