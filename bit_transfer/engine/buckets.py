"""Data parallel's gradient reduction: few, large AllReduce launches inside the compiled step."""

from __future__ import annotations

import numpy as np
from mindspore import nn, ops

BUCKET_BYTES = 25 << 20  # of gradients per AllReduce (GradientBuckets)


class GradientBuckets(nn.Cell):
    """Data parallel: the mean over ranks of every gradient, in a few collectives, inside the compiled step.

    The gradients are flattened and concatenated, in parameter order, into buckets of about
    `bucket_bytes` (PyTorch DDP's default is 25 MB), with one AllReduce each; the step's loss and
    stop flag ride at the end of the first bucket, so an optimizer step launches no other collective;
    so does each rank's finite flag, checked on its own gradients before the sum: on Ascend in
    saturation mode `ms.amp.all_finite` reads the device's own float-status registers, which know
    nothing of the other ranks' overflows, so a check after the sum could let ranks disagree.
    Explicit buckets give every backend the same graph, which the CPU suite runs (MindSpore's own
    fusion by the `fusion` attribute is a pass of its Ascend/GPU backends). Concat, AllReduce and
    StridedSlice (what `ops.split` with a list of sizes compiles to: mindspore/ops/function/
    array_func.py `_split_sub_tensors`) are listed for Ascend, GPU and CPU in MindSpore's API docs.
    """

    def __init__(self, params, ranks: int, bucket_bytes: int):
        super().__init__(auto_prefix=False)
        self.ranks = float(ranks)
        self.shapes = tuple(tuple(p.shape) for p in params)
        sizes = [int(np.prod(p.shape)) for p in params]
        self.bounds = bucket_bounds([n * 4 for n in sizes], bucket_bytes)  # float32 gradients
        self.sections = tuple(tuple(sizes[a:b]) + ((3,) if k == 0 else ())
                              for k, (a, b) in enumerate(self.bounds))
        self.all_reduce = ops.AllReduce()

    def construct(self, grads, loss, stop, finite):
        """The mean gradients, the mean loss, the stop flag (> 0: some rank asked) and whether every
        rank's own gradients were finite (so all ranks apply, or skip, the same update)."""
        out = ()
        stats = None
        for k in range(len(self.bounds)):
            a, b = self.bounds[k]
            parts = tuple([grads[i].reshape(-1) for i in range(a, b)])
            if k == 0:
                parts = parts + (ops.stack([loss, stop, finite.astype(loss.dtype)]).astype(grads[0].dtype),)
            pieces = ops.split(self.all_reduce(ops.concat(parts)) / self.ranks, self.sections[k])
            if k == 0:
                stats = pieces[b - a]
            out = out + tuple([pieces[j].reshape(self.shapes[a + j]) for j in range(b - a)])
        return out, stats[0], stats[1], stats[2] > 1.0 - 0.5 / self.ranks


def bucket_bounds(nbytes: list[int], cap: int) -> tuple[tuple[int, int], ...]:
    """Consecutive [a, b) ranges of tensors of about `cap` bytes each (a tensor larger than `cap` alone)."""
    bounds, a, total = [], 0, 0
    for i, n in enumerate(nbytes):
        if i > a and total + n > cap:
            bounds.append((a, i))
            a, total = i, 0
        total += n
    if nbytes:
        bounds.append((a, len(nbytes)))
    return tuple(bounds)
