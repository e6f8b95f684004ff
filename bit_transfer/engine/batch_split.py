"""`train.batch_split: auto`: the largest micro-batch that fits the device, found by trying."""

from __future__ import annotations

import numpy as np

from bit_transfer.engine.step import TrainStep
from bit_transfer.errors import UsageError


def choose_batch_split(batch_size: int, try_micro_batch, world: int = 1, log=print) -> int:
    """`train.batch_split: auto`: the largest micro-batch that runs (try, catch out-of-memory, halve).

    `try_micro_batch(m)` runs one training micro-step at micro-batch m and raises on failure.
    Only divisors of the per-rank batch are tried, so the logical batch stays exact.
    """
    per_rank = batch_size // world
    candidates = [m for m in range(per_rank, 0, -1) if per_rank % m == 0]
    m = candidates[0]
    while True:
        try:
            try_micro_batch(m)
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            smaller = [c for c in candidates if c <= m // 2]
            if not smaller:
                raise UsageError(
                    f"even a micro-batch of {m} does not fit on this device; lower rule.crop or use a smaller model"
                ) from None
            log(f"batch_split auto: micro-batch {m} does not fit ({str(e).splitlines()[0][:80]}), trying {smaller[0]}")
            m = smaller[0]
            continue
        split = per_rank // m
        log(f"batch_split auto: micro-batch {m} fits -> batch_split {split}")
        return split


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return any(s in text for s in ("out of memory", "malloc", "memory not enough", "alloc", "oom"))


def probe(model, micro: int, crop: int, tcfg) -> None:
    """Run one compiled micro-step at this size (for batch_split auto); raises when it does not fit."""
    probe = TrainStep(model, momentum=0.0, weight_decay=0.0, batch_split=2, precision=tcfg.precision, jit=tcfg.jit)
    probe.gradients_only(np.zeros((micro, 3, crop, crop), np.uint8), np.zeros((micro,), np.int32))
