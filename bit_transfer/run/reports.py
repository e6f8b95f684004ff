"""An evaluation's report on disk: per-class accuracy, the confusion matrix (JSON, and a PNG with matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def save_report(result, class_names: list[str], out_dir: Path) -> list[Path]:
    """per_class.json + confusion.json of `result` (an engine.metrics.EvalResult), and confusion.png when
    matplotlib is installed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_class = {
        name: (None if np.isnan(acc) else float(acc)) for name, acc in zip(class_names, result.per_class_accuracy)
    }
    written = [out_dir / "per_class.json", out_dir / "confusion.json"]
    written[0].write_text(json.dumps(per_class, indent=1))
    written[1].write_text(json.dumps({"class_names": class_names, "matrix": result.confusion.tolist()}))
    png = plot_confusion(result.confusion, class_names, out_dir / "confusion.png")
    if png:
        written.append(png)
    return written


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    k = len(class_names)
    size = min(4 + 0.25 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 50:
        ax.set_xticks(range(k), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
