"""Few-shot sweep summaries: per-run rows -> mean ± sample std per shots, as csv/json/md, a plot and
TensorBoard scalars (`<sweep>/summary.*`, `<sweep>/summary/`)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from bit_transfer.run import runlog

STD_NOTE = "std is the sample standard deviation over seeds (ddof=1); n is the number of seeds"


def summarise(rows: list[dict], shots: list[int] | None = None) -> list[dict]:
    """Per shots: n, mean and sample std (ddof=1; None for a single seed) of top-1 and top-5."""
    out = []
    for k in shots or sorted({r["shots"] for r in rows}):
        mine = [r for r in rows if r["shots"] == k]
        if not mine:
            continue
        entry = {"shots": k, "n": len(mine)}
        for metric in ("top1", "top5"):
            v = np.array([r[metric] for r in mine], np.float64)
            entry[f"{metric}_mean"] = float(v.mean())
            entry[f"{metric}_std"] = float(v.std(ddof=1)) if len(v) > 1 else None
        out.append(entry)
    return out


def _pm(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def summary_markdown(title: str, by_shots: list[dict]) -> str:
    lines = [
        f"# {title}",
        "",
        "| shots | n | top-1 % (mean ± std) | top-5 % (mean ± std) |",
        "|---:|---:|---:|---:|",
    ]
    for e in by_shots:
        lines.append(f"| {e['shots']} | {e['n']} | {_pm(e['top1_mean'], e['top1_std'])} | "
                     f"{_pm(e['top5_mean'], e['top5_std'])} |")
    lines += ["", f"{STD_NOTE}; a single seed has no std. Per-run numbers: summary.csv."]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path, base, shots, seeds, rows: list[dict], *, feature_seconds: float = 0.0,
                  log=print) -> dict[str, Path]:
    """summary.csv / .json / .md, summary.png (with matplotlib) and TensorBoard scalars by shots."""
    by_shots = summarise(rows, shots)
    mode = base.train.mode
    paths = {k: sweep_dir / f"summary.{k}" for k in ("csv", "json", "md")}
    fields = ["shots", "seed", "top1", "top5", "steps", "seconds", "run"]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    runlog.write_atomic(paths["csv"], text.getvalue())
    runlog.write_json(paths["json"], {
        "recipe": base.name,
        "mode": mode,
        "model": base.model.name,
        "shots": list(shots),
        "seeds": list(seeds),
        "std": STD_NOTE,
        "by_shots": by_shots,
        "runs": rows,
        "feature_seconds": feature_seconds,
    })
    title = f"Few-shot {base.name}: {base.model.name}, {mode}"
    runlog.write_atomic(paths["md"], summary_markdown(title, by_shots))
    png = plot_summary(by_shots, rows, sweep_dir / "summary.png", title)
    if png:
        paths["png"] = png
    else:
        log("matplotlib is not installed, so no summary.png (pip install 'bit-transfer[plot]')")
    if base.log.tensorboard:
        write_tensorboard(sweep_dir / "summary", by_shots)
    return paths


def write_tensorboard(logdir: Path, by_shots: list[dict]) -> None:
    """Sweep-level curves with the shots as the step; rewritten (not appended) on every rerun."""
    # MindSpore's generated *_pb2 modules need protobuf's pure-Python backend, which MindSpore
    # selects at import; when tensorboardX loads protobuf first, a later `import mindspore` fails.
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    from tensorboardX import SummaryWriter

    if logdir.is_dir():
        for old in logdir.glob("events.out.tfevents.*"):
            old.unlink()
    with SummaryWriter(logdir=str(logdir)) as w:
        for e in by_shots:
            w.add_scalar("fewshot/top1", e["top1_mean"], e["shots"])
            w.add_scalar("fewshot/top5", e["top5_mean"], e["shots"])
            if e["top1_std"] is not None:
                w.add_scalar("fewshot/top1_std", e["top1_std"], e["shots"])


def plot_summary(by_shots: list[dict], rows: list[dict], path: Path, title: str) -> Path | None:
    """Top-1 vs shots (log axis): each run as a dot, mean ± std as error bars. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ks = [e["shots"] for e in by_shots]
    means = [100 * e["top1_mean"] for e in by_shots]
    stds = [100 * e["top1_std"] if e["top1_std"] is not None else 0.0 for e in by_shots]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.scatter([r["shots"] for r in rows], [100 * r["top1"] for r in rows], s=14, alpha=0.4, color="gray",
               label="runs (seeds)")
    ax.errorbar(ks, means, yerr=stds, fmt="o-", capsize=4, label="mean ± std")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("images per class (shots)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


