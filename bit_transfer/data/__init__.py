"""Image-classification data for BiT fine-tuning: sources, measurement, few-shot subsets.

    load(cfg)        -> Dataset (.train, .eval Splits; holdout and few-shot applied; lazy)
      .check_readable() -> {"train": n, "eval": m}: every image's header checked before training
      .corrupt_counts() -> {"train": n, "eval": m}: unreadable images met so far (skip_corrupt)
    from_arrays(...) -> Dataset from numpy arrays (notebooks)
    describe(cfg)    -> DataInfo: training-set size and image resolution for the rule (cached)
    fewshot_indices  -> the seeded, class-balanced K-per-class subset

The MindSpore input pipeline lives in `bit_transfer.data.pipeline`; nothing here imports
MindSpore, so `bit-transfer plan` starts fast.
"""

from bit_transfer.data.measure import DataInfo, describe
from bit_transfer.data.sampling import fewshot_indices, holdout_indices
from bit_transfer.data.sources import from_arrays, load
from bit_transfer.data.split import Dataset, Split

__all__ = [
    "DataInfo",
    "Dataset",
    "Split",
    "describe",
    "fewshot_indices",
    "from_arrays",
    "holdout_indices",
    "load",
]
