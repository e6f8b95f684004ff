"""`train.batch_split: auto`: the largest micro-batch that fits the device, found by trying."""

from __future__ import annotations

import numpy as np

from bit_transfer.engine.step import TrainStep
from bit_transfer.errors import UsageError
