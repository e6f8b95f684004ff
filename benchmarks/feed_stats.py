"""What one training step asks of the host: bytes sent to the step per image, and reads of device values.

Runs a short one-rank `fit` in this process on generated data and counts, between its second and last
step (the first compiles), every numpy array turned into a MindSpore Tensor (bytes to the device)
and every `Tensor.asnumpy` (the host waiting for the device). The counts depend on the code, not on
the machine: run it on two checkouts to compare them.

    python benchmarks/feed_stats.py --crop 128 --batch-split 1 2 --log-every 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def measure(crop: int, batch_split: int, log_every: int, steps: int, micro: int) -> dict:
    import mindspore as ms

    from bit_transfer.commands import fit as fit_module
    from datagen import pattern_task, tiny_recipe

    counts = {"steps": 0, "bytes": 0, "reads": 0, "live": False}
    real_init, real_read = ms.Tensor.__init__, ms.Tensor.asnumpy
    real_tick = fit_module.Throughput.tick

    def init(self, input_data=None, *args, **kwargs):
        if counts["live"] and isinstance(input_data, np.ndarray):
            counts["bytes"] += input_data.nbytes
        real_init(self, input_data, *args, **kwargs)

    def read(self):
        counts["reads"] += counts["live"]
        return real_read(self)

    def tick(self):  # after each step: count from the end of the first (compiled) one
        real_tick(self)
        counts["steps"] += counts["live"]
        counts["live"] = True

    ms.Tensor.__init__, ms.Tensor.asnumpy, fit_module.Throughput.tick = init, read, tick
    with tempfile.TemporaryDirectory() as tmp:
        task = pattern_task(Path(tmp) / "data", n_train=micro * batch_split, n_test=4)
        recipe = tiny_recipe(task, Path(tmp) / "runs", rule__steps=steps, rule__precrop=crop + crop // 8,
                             rule__crop=crop, rule__mixup_alpha=0.1, train__batch_size=micro * batch_split,
                             train__batch_split=batch_split, log__every=log_every, train__eval_every=None)
        real_save = fit_module.save

        def save(*args, **kwargs):  # the final checkpoint and evaluation are not steps
            counts["live"] = False
            return real_save(*args, **kwargs)

        fit_module.save = save
        fit_module.fit(recipe, run_dir=Path(tmp) / "run", quiet=True)
    n = counts["steps"]
    return {"crop": crop, "batch_split": batch_split, "micro_batch": micro, "log_every": log_every,
            "steps_counted": n, "bytes_per_image": counts["bytes"] / (n * micro * batch_split),
            "reads_per_step": counts["reads"] / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch-split", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=21)
    args = ap.parse_args()
    for split in args.batch_split:
        print(json.dumps(measure(args.crop, split, args.log_every, args.steps, args.micro_batch)), flush=True)


if __name__ == "__main__":
    main()
