"""Start-up of `bit-transfer fit`: seconds from launching the command to its first logged step.

    .venv/bin/python benchmarks/startup.py                    # R50x1, micro-batch 8, 3 rounds
    .venv/bin/python benchmarks/startup.py --batch 8 --split 4 --rounds 2

Runs the real command on a generated 32x32 PNG folder (random init, the rule's 128 px crop) in a
temporary BIT_TRANSFER_HOME, so nothing of yours is read or written. The first run builds the CPU
kernels; after it, each round runs, interleaved:
  - `empty cache`: kernels built, no compiled step saved (what a new configuration costs);
  - `cache off`: BIT_TRANSFER_COMPILE_CACHE=0, every run compiles (bit-transfer before the cache);
  - `cache hit`: the compiled step loaded from the cache (a second run of a configuration).
Also the median train images/s of each run's later steps: a loaded step must run as fast.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import make_folder  # noqa: E402

BIN = Path(sys.executable).with_name("bit-transfer")
RATE = re.compile(r"^step (\d+)/\d+ .* ([\d.]+) img/s")


def run_fit(recipe: Path, run_dir: Path, home: Path, cache: bool) -> tuple[float, float, str]:
    """(seconds to the first step line, median img/s of steps 4 on, the compile-cache line)."""
    env = dict(os.environ, BIT_TRANSFER_HOME=str(home), BIT_TRANSFER_COMPILE_CACHE="1" if cache else "0",
               PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    p = subprocess.Popen([str(BIN), "fit", str(recipe), "--run-dir", str(run_dir)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first, rates, note = None, [], "-"
    for line in p.stdout:
        m = RATE.match(line)
        if m and first is None:
            first = time.perf_counter() - t0
        if m and int(m.group(1)) >= 4:
            rates.append(float(m.group(2)))
        if "compiled step" in line or "compile cache" in line:
            note = line.split(" ", 3)[2]  # saved / loaded / off
    if p.wait() != 0 or first is None:
        raise SystemExit(f"fit failed (exit {p.returncode}) for {run_dir}")
    return first, statistics.median(rates), note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="BiT-M-R50x1")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch")
    ap.add_argument("--split", type=int, default=1, help="micro-batches per step (train.batch_split)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bt-startup-"))
    try:
        root = make_folder(tmp / "data", 400, (32, 32), "png")
        recipe = tmp / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({
            "data": {"source": "imagefolder", "path": str(root / "train"), "holdout": 0.1},
            "model": {"name": args.model, "weights": "none"},
            "train": {"batch_size": args.batch * args.split, "batch_split": args.split},
            "rule": {"steps": args.steps},
            "log": {"every": 1, "tensorboard": False},
        }))
        home, n = tmp / "home", 0
        first, _, _ = run_fit(recipe, tmp / "run-first", home, cache=True)
        print(f"first run, empty home (builds the kernels): {first:.1f} s to step 1", flush=True)
        results: dict[str, list[tuple[float, float]]] = {"empty cache": [], "cache off": [], "cache hit": []}
        for r in range(args.rounds):
            for kind in results:
                if kind == "empty cache":
                    shutil.rmtree(home / "compile-cache", ignore_errors=True)
                n += 1
                t, rate, note = run_fit(recipe, tmp / f"run{n}", home, cache=kind != "cache off")
                results[kind].append((t, rate))
                print(f"round {r + 1} {kind:11s}: {t:5.1f} s to step 1, then {rate:5.1f} img/s  ({note})", flush=True)
        print(f"\n{args.model}, micro-batch {args.batch} x {args.split}: median over {args.rounds} rounds")
        for kind, rows in results.items():
            print(f"  {kind:11s}: {statistics.median(t for t, _ in rows):5.1f} s to step 1, "
                  f"{statistics.median(x for _, x in rows):5.1f} img/s after")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
