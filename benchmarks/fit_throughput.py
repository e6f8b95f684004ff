"""End-to-end training throughput of `bit-transfer fit`: data pipeline, MixUp, step, logging.

    .venv/bin/python benchmarks/fit_throughput.py                  # R50x1, 32x32 PNG folder, rule's 160/128 px
    .venv/bin/python benchmarks/fit_throughput.py --batch 32 --steps 30
    .venv/bin/python benchmarks/fit_throughput.py --batch 8 --split 4 --steps 20   # micro-batching: whole-process peak RSS

Writes a CIFAR-like image folder (32x32 PNGs, 10 classes) to a temporary directory and runs the
real `fit` on it (random init: no weights download), logging every `--every` steps. Reports the
median of the logged train images/s after the first window (which holds the compile), to set
beside `train_step.py`'s step-only number: the difference is what the input pipeline costs.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import make_folder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="BiT-M-R50x1")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch")
    ap.add_argument("--split", type=int, default=1, help="micro-batches per optimizer step (train.batch_split)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args()

    from bit_transfer.config import recipe
    from bit_transfer.commands.fit import fit

    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp) / "data", args.images, (32, 32), "png")
        rec = recipe.from_dict({
            "data": {"source": "imagefolder", "path": str(root / "train"), "holdout": 0.1},
            "model": {"name": args.model, "weights": "none"},
            "train": {"batch_size": args.batch * args.split, "batch_split": args.split},
            "rule": {"steps": args.steps},
            "log": {"every": args.every, "dir": str(Path(tmp) / "runs"), "tensorboard": False, "quiet": True},
        })
        run_dir = Path(tmp) / "runs" / "fit"
        fit(rec, run_dir=run_dir, quiet=True)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/images_per_sec"] for r in rows if "train/images_per_sec" in r][1:]
    print(f"fit {args.model} batch {args.batch} x {args.split}, {args.steps} steps, 32x32 PNG -> 128 px: "
          f"train {np.median(rates):.1f} img/s (median of {len(rates)} windows of {args.every} steps after the first), "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
