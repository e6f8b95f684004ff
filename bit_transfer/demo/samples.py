"""A few held-out demo digits as PNG files, in class folders: what `make demo` predicts at its end.

    python -m bit_transfer.demo.samples OUT_DIR [--count 8]

The images are the first `count` of the demo recipe's seeded held-out split (never trained on),
at their native 8x8 pixels, so `bit-transfer predict` sees exactly what `eval` saw. OUT_DIR is
claimed like every output (`RunDir`): a folder holding other files is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bit_transfer.errors import UsageError

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"


def write_samples(out_dir, count: int = 8, recipe_path=DEMO_RECIPE) -> list[Path]:
    """OUT_DIR/<digit>/heldout-NNN.png for the first `count` held-out images."""
    from bit_transfer import data
    from bit_transfer.config import recipe as recipes
    from bit_transfer.run.rundir import RunDir

    dataset = data.load(recipes.load(recipe_path).data)
    out = RunDir.claim(out_dir, kind="samples", flag="OUT_DIR")
    written = []
    for i in range(min(count, len(dataset.eval))):
        path = out.path / dataset.class_names[int(dataset.eval.labels[i])] / f"heldout-{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.eval.image(i).convert("RGB").save(path)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bit_transfer.demo.samples", description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--count", type=int, default=8)
    args = p.parse_args(argv)
    try:
        paths = write_samples(args.out_dir, args.count)
    except UsageError as e:
        print(f"samples: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} held-out digits to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
