"""MixUp (Zhang et al. 2018), as BiT uses it: one λ ~ Beta(α, α) per optimizer step, each image blended
with a partner from the same micro-batch, the loss blended with the same λ.

The host draws λ and the partners from (seed, step) (`draw`), so a resumed run continues exactly; the
compiled step blends the images on the device (`mixup`), after scaling its uint8 pixels to [-1, 1].
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from bit_transfer.data.pixels import unit_range


def draw(stream, split: int, alpha: float, seed: int, step: int):
    """The step's micro-batches as (uint8 images, labels, MixUp partners), and λ; α = 0: λ = 1, no partners."""
    rng = np.random.default_rng([seed, step, 1])  # MixUp randomness of this step
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    batches = []
    for _ in range(split):
        x, y = next(stream)
        perm = rng.permutation(len(x)) if alpha > 0 else np.arange(len(x))
        batches.append((x, y, perm.astype(np.int32)))
    return batches, lam


def mixup_loss(logits, ya, yb, lam):
    """lam*CE(y_a) + (1-lam)*CE(y_b); with lam = 1 it is plain cross-entropy."""
    logits = logits.astype(ms.float32)
    return lam * ops.cross_entropy(logits, ya) + (1.0 - lam) * ops.cross_entropy(logits, yb)


def mixup(x, ya, perm, lam):
    """The batch as the step trains on it: uint8 pixels scaled to [-1, 1] (`pixels.unit_range`; other
    inputs, such as the linear probe's features, pass as they are), then each image blended with its
    partner `perm[i]`: lam*x + (1-lam)*x[perm]. λ and `perm` come from (seed, step) on the host."""
    if x.dtype == ms.uint8:
        x = unit_range(x)
    return lam * x + (1.0 - lam) * ops.gather(x, perm, 0), ops.gather(ya, perm, 0)
