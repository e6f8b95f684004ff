"""Decode + augment throughput of the input pipeline, in images/s, on this machine.

Two cases from the HyperRule's two resolutions:
  small: 32×32 PNG files (CIFAR-like)        -> precrop 160, crop 128
  large: 500×375 JPEG files (ImageNet-like)  -> precrop 512, crop 480
for each worker count, with worker threads (the default) and, with --processes, forked workers.

    .venv/bin/python benchmarks/data_pipeline.py [--images 600] [--processes]

Compare with the train step: on this 2-core CPU, BiT-R50x1 trains at ~26 img/s at 128 px (micro-batch 8,
benchmarks/README.md), so the pipeline needs a small fraction of one core to keep up;
fit_throughput.py measures the two together.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bit_transfer import data
from bit_transfer.data import pipeline
from bit_transfer.config.recipe import DataConfig


def photo_like(rng, h, w) -> Image.Image:
    """Smooth colour fields plus grain: compresses and decodes like a photo, unlike pure noise."""
    base = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.int16)
    return Image.fromarray((im + rng.integers(-12, 13, im.shape)).clip(0, 255).astype(np.uint8))


def make_folder(root: Path, n: int, size: tuple[int, int], ext: str, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n + classes):
        d = root / ("train" if i < n else "val") / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        photo_like(rng, *size).save(d / f"{i:05d}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    return root


def measure(split, precrop, crop, micro_batch, workers, seconds=6.0) -> float:
    it = pipeline.train_batches(split, precrop=precrop, crop=crop, micro_batch=micro_batch, seed=0, workers=workers)
    for _ in itertools.islice(it, 2):  # warm up: threads started, queues filled
        pass
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        images, _ = next(it)
        n += len(images)
    rate = n / (time.perf_counter() - t0)
    it.close()
    return rate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="files per case (they cycle; the OS caches them)")
    ap.add_argument("--seconds", type=float, default=6.0, help="measuring time per setting")
    ap.add_argument("--processes", action="store_true", help="also measure forked worker processes")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    worker_counts = sorted({1, min(2, cpus), pipeline.num_workers(None)})
    modes = [False, True] if args.processes else [False]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("BIT_TRANSFER_HOME", str(Path(tmp) / "home"))
        cases = [
            ("32x32 PNG -> 128 px", make_folder(Path(tmp) / "png", args.images, (32, 32), "png"), 160, 128, 32),
            ("500x375 JPEG -> 480 px", make_folder(Path(tmp) / "jpg", args.images, (375, 500), "jpg"), 512, 480, 16),
        ]
        print(f"{cpus} CPUs; decode + resize + crop + flip + [-1, 1] CHW, micro-batches from train_batches")
        for title, root, precrop, crop, mb in cases:
            split = data.load(DataConfig(source="imagefolder", path=str(root))).train
            for multiprocessing in modes:
                pipeline.PYTHON_MULTIPROCESSING = multiprocessing
                kind = "processes" if multiprocessing else "threads"
                for w in worker_counts:
                    rate = measure(split, precrop, crop, mb, w, args.seconds)
                    print(f"{title:<24} {kind:<9} workers={w}: {rate:8.0f} img/s", flush=True)
        pipeline.PYTHON_MULTIPROCESSING = False


if __name__ == "__main__":
    main()
