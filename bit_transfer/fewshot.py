"""`bit-transfer fewshot`: few-shot sweeps over shots x seeds, summary tables and plots.

BiT's headline is transfer from 1-10 images per class, reported as mean ± std over seeds. For
every (shots K, seed S) a sweep runs the recipe on the seeded, class-balanced K-per-class subset
(`data.examples_per_class=K`, `data.seed=S`) and evaluates on the full eval split. The HyperRule
sees the subset's size, so few-shot runs get 500 steps and no MixUp, as in the paper.

    <sweep>/sweep.yaml              the sweep's recipe (mode included); a rerun must match it
    <sweep>/shots{K}-seed{S}/       one run directory each, as `fit` writes it
    <sweep>/summary.{csv,json,md}   per run, and per shots: mean ± sample std over seeds
    <sweep>/summary.png             top-1 vs shots with error bars (needs matplotlib)
    <sweep>/summary/                TensorBoard: fewshot/top1 (and std, top-5) by shots

Rerunning on the same directory skips finished runs and resumes an interrupted one.
`--mode finetune` runs `train.fit` per run; `--mode linear` freezes the backbone, computes each
image's pre-logit features once (`bit_transfer.features`, cached across runs and sweeps) and
trains only the head on them: seconds per run instead of minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bit_transfer import planning, runlog
from bit_transfer.errors import RecipeError, UsageError
from bit_transfer.recipe import Recipe

MODES = ("finetune", "linear")
STD_NOTE = "std is the sample standard deviation over seeds (ddof=1); n is the number of seeds"


# ----------------------------------------------------------------------------- the grid
def parse_ints(text: str, option: str, minimum: int) -> list[int]:
    """'1,2,5,10' or '0-4' (an inclusive range) -> sorted distinct ints; one-line UsageError else."""
    example = "1,2,5,10" if minimum > 0 else "0,1,2 or 0-4"
    values: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m[1]), int(m[2])
            if lo > hi:
                raise UsageError(f"{option} {text!r}: range {part!r} runs backwards; write it as {hi}-{lo}")
            values.update(range(lo, hi + 1))
        elif re.fullmatch(r"[+-]?\d+", part):
            values.add(int(part))
        else:
            raise UsageError(f"{option} {text!r}: {part!r} is not an integer; give a list like {example}")
    low = min(values)
    if low < minimum:
        raise UsageError(f"{option} {text!r}: {low} is below {minimum}; give a list like {example}")
    return sorted(values)


@dataclass(frozen=True)
class Run:
    shots: int
    seed: int
    run_dir: Path
    recipe: Recipe = field(compare=False)  # derived from the others

    @property
    def label(self) -> str:
        return f"shots {self.shots} seed {self.seed}"


def run_recipe(base: Recipe, shots: int, seed: int) -> Recipe:
    return base.with_overrides([f"data.examples_per_class={shots}", f"data.seed={seed}"])


def finished(run_dir: Path) -> dict | None:
    """The final metrics of a completed run, or None (missing, interrupted, unreadable)."""
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("completed") else None


# ----------------------------------------------------------------------------- the sweep directory
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def claim_sweep_dir(sweep_dir: Path, base: Recipe) -> bool:
    """Create the sweep directory, or check an existing one is a sweep of this recipe.

    Returns True when resuming. Shots and seeds may differ between reruns (a grid can grow);
    anything else in the recipe may not, or the summary would mix different experiments.
    """
    marker = sweep_dir / "sweep.yaml"
    if marker.is_file():
        import yaml

        saved = yaml.safe_load(marker.read_text()) or {}
        if saved != base.to_dict():
            a, b = _flat(saved), _flat(base.to_dict())
            diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            shown = ", ".join(f"{k} ({a.get(k)!r} there, {b.get(k)!r} now)" for k in diff[:3])
            raise UsageError(
                f"{sweep_dir} is a sweep of a different recipe: {shown}; rerun with the same recipe, --set and "
                "--mode to resume it, or choose another --run-dir"
            )
        return True
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise UsageError(f"{sweep_dir} exists but is not a few-shot sweep (no sweep.yaml); choose another --run-dir")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runlog.write_yaml(marker, base.to_dict())
    return False


# ----------------------------------------------------------------------------- data and plans
class Pools:
    """The dataset before few-shot subsetting, loaded once per distinct pool.

    It depends on `data.seed` only through `data.holdout` (the seed also draws the holdout split),
    so without a holdout every seed shares one pool, and with one each seed has its own.
    """

    def __init__(self, base: Recipe):
        self.base = base
        self._pools: dict = {}

    def key(self, seed: int):
        return seed if self.base.data.holdout is not None else None

    def get(self, seed: int):
        from bit_transfer import data

        k = self.key(seed)
        if k not in self._pools:
            cfg = dataclasses.replace(self.base.data, seed=seed, examples_per_class=None)
            self._pools[k] = data.load(cfg, fewshot=False)
        return self._pools[k]

    def subset(self, run: Run):
        """The run's dataset exactly as `data.load(run.recipe.data)` builds it for `fit`."""
        return self.get(run.seed).fewshot(run.shots, run.seed, run.recipe.data.allow_fewer)


def check_shots(pool, shots: list[int], allow_fewer: bool) -> None:
    """Fail before the first run when the largest K exceeds the smallest class."""
    counts = np.bincount(pool.train.labels, minlength=pool.num_classes)
    c = int(np.argmin(counts))
    if max(shots) > counts[c] and not allow_fewer:
        raise UsageError(
            f"--shots {max(shots)}: class '{pool.class_names[c]}' of {pool.name} has only {counts[c]} training "
            f"images; use shots <= {counts[c]} or --set data.allow_fewer=true"
        )


def run_plan(run: Run, info: planning.TaskInfo, subset_size: int):
    """(task info, plan) of a run: the rule applied to the subset's size, as `fit` computes it."""
    info = dataclasses.replace(info, dataset_size=subset_size)
    return info, planning.make_plan(run.recipe, info)


# ----------------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict]
    complete: bool
    feature_seconds: float = 0.0


def sweep(
    recipe: Recipe,
    shots: list[int],
    seeds: list[int],
    *,
    mode: str | None = None,
    sweep_dir: str | Path | None = None,
    quiet: bool | None = None,
    feature_root: str | Path | None = None,
    log=print,
) -> SweepResult:
    """Run (or resume) the shots x seeds grid, then write the summary of the grid's runs."""
    if not shots or not seeds:
        raise UsageError("a sweep needs at least one shots value and one seed")
    base = recipe.with_overrides([f"train.mode={mode}"]) if mode else recipe
    mode = base.train.mode
    quiet = base.log.quiet if quiet is None else quiet
    if base.data.size is not None:
        raise RecipeError("data.size is set; drop it so the rule sees each few-shot subset's size")

    sweep_dir = Path(sweep_dir) if sweep_dir else runlog.new_run_dir(base.log.dir, f"{base.name}-fewshot")
    runs = [Run(k, s, sweep_dir / f"shots{k}-seed{s}", run_recipe(base, k, s)) for k in shots for s in seeds]
    pools = Pools(base)  # the data is checked before anything is written
    check_shots(pools.get(seeds[0]), shots, base.data.allow_fewer)
    info = planning.task_info(runs[0].recipe)  # image size (measured once, cached), num classes

    resuming = claim_sweep_dir(sweep_dir, base)
    done = sum(finished(r.run_dir) is not None for r in runs)
    state = f"resuming: {done} of {len(runs)} runs finished" if resuming else f"resume with --run-dir {sweep_dir}"
    log(f"sweep directory: {sweep_dir} ({state})")
    for k in shots:
        first = next(r for r in runs if r.shots == k)
        n = len(pools.subset(first).train)
        _, plan = run_plan(first, info, n)
        log(f"shots {k}: {n} training images -> {plan.steps} steps at {plan.crop} px, MixUp {plan.mixup_alpha:g}, "
            f"batch {min(plan.batch_size, n) if mode == 'linear' else plan.batch_size}")

    log(f"{len(runs)} runs ({mode}): shots {','.join(map(str, shots))} x seeds {','.join(map(str, seeds))}")
    try:
        if mode == "linear":
            result = _sweep_linear(base, runs, pools, info, sweep_dir, quiet, feature_root, log)
        else:
            result = _sweep_finetune(runs, sweep_dir, quiet, log)
    except KeyboardInterrupt:
        log(f"interrupted; resume the sweep with --run-dir {sweep_dir}")
        raise
    if not result.complete:
        log(f"sweep stopped before its last run; resume it with --run-dir {sweep_dir}")
        return result
    paths = write_summary(sweep_dir, base, shots, seeds, result.rows, feature_seconds=result.feature_seconds, log=log)
    log("")
    log(paths["md"].read_text().rstrip())
    log(f"\nsummary: {', '.join(str(p) for p in paths.values())}\ncurves: tensorboard --logdir {sweep_dir}")
    return result


def _row(run: Run, m: dict) -> dict:
    return {
        "shots": run.shots,
        "seed": run.seed,
        "top1": float(m["top1"]),
        "top5": float(m["top5"]),
        "steps": int(m["steps"]),
        "seconds": float(m["seconds"]),
        "run": run.run_dir.name,
    }


def _sweep_finetune(runs: list[Run], sweep_dir: Path, quiet: bool, log) -> SweepResult:
    from bit_transfer import train

    rows = []
    for i, run in enumerate(runs, 1):
        m = finished(run.run_dir)
        if m is None:
            log(f"[{i}/{len(runs)}] {run.label}: fine-tuning in {run.run_dir}")
            m = train.fit(run.recipe, run_dir=run.run_dir, quiet=quiet)
            if not m.get("completed"):
                return SweepResult(sweep_dir, rows, complete=False)
        else:
            log(f"[{i}/{len(runs)}] {run.label}: finished earlier, top-1 {100 * m['top1']:.2f}%")
        rows.append(_row(run, m))
    return SweepResult(sweep_dir, rows, complete=True)


# ----------------------------------------------------------------------------- linear probes
def _feature_batch(recipe: Recipe, plan) -> int:
    """The images per backbone pass: what `fit` evaluates with (eval_batch_size, else the micro-batch)."""
    t = recipe.train
    if t.eval_batch_size:
        return t.eval_batch_size
    return plan.batch_size // t.batch_split if isinstance(t.batch_split, int) else 32


def _sweep_linear(base, runs, pools, info, sweep_dir, quiet, feature_root, log) -> SweepResult:
    from bit_transfer import features, runtime, train

    todo = [r for r in runs if finished(r.run_dir) is None]
    planned, cache = {}, None
    if todo:
        device = runtime.setup(base.train.device, jit=base.train.jit)
        runtime.seed_everything(base.train.seed)  # the init `fit` would give a `weights: none` backbone
        pool0 = pools.get(todo[0].seed)
        model = train.build_model(base.model, pool0.num_classes, log=log)
        model.set_train(False)
        subsets = {r: pools.subset(r) for r in todo}
        planned = {r: run_plan(r, info, len(subsets[r].train)) for r in todo}
        plans = {r: p for r, (_, p) in planned.items()}
        crop = plans[todo[0]].crop
        cache = features.FeatureCache(
            model, crop, root=feature_root, batch_size=_feature_batch(base, plans[todo[0]]),
            workers=base.data.workers, jit=base.train.jit, log=log,
        )
        log(f"device {device}; backbone {cache.backbone[:12]}; features cached in {cache.root}")
        # One pass per pool over the union of the subsets' images, then over its eval split.
        for key in dict.fromkeys(pools.key(r.seed) for r in todo):
            mine = [r for r in todo if pools.key(r.seed) == key]
            pool = pools.get(mine[0].seed)
            rows = np.unique(np.concatenate([subsets[r].train.rows for r in mine]))
            cache.features(pool.name, pool.train.subset(_positions(pool.train, rows)))
            cache.features(pool.name, pool.eval)
    rows = []
    for i, run in enumerate(runs, 1):
        if run in planned:
            log(f"[{i}/{len(runs)}] {run.label}: linear probe on {len(subsets[run].train)} images in {run.run_dir}")
            with _expected_recompiles():
                m = fit_linear(run, model, subsets[run], *planned[run], cache, quiet=quiet, log=log)
        else:
            m = finished(run.run_dir)
            log(f"[{i}/{len(runs)}] {run.label}: finished earlier, top-1 {100 * m['top1']:.2f}%")
        rows.append(_row(run, m))
    return SweepResult(sweep_dir, rows, complete=True, feature_seconds=cache.seconds if cache else 0.0)


@contextlib.contextmanager
def _expected_recompiles():
    """Drop MindSpore's "has been compiled again" warning: each run compiles a fresh head step on
    purpose (a compiled step does not see weights reset from outside, so steps are not reused)."""
    import logging

    from mindspore import log as ms_log

    class Drop(logging.Filter):
        def filter(self, record):
            return "has been compiled again" not in record.getMessage()

    logger, f = ms_log._get_logger(), Drop()  # private, but the only handle on MindSpore's logger
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


def _positions(split, rows: np.ndarray) -> np.ndarray:
    """Positions in `split` of the given store rows (rows of a split are distinct)."""
    order = np.argsort(split.rows, kind="stable")
    at = order[np.searchsorted(split.rows, rows, sorter=order)]
    assert np.array_equal(split.rows[at], rows)
    return at


def fit_linear(run: Run, model, dataset, info, plan, cache, *, quiet: bool = True, log=print) -> dict:
    """Train a zero-initialised head on cached features with the plan's SGD schedule.

    Batches of min(plan batch, subset size) features are drawn by `sampling.Stream` from
    train.seed (seeded epochs; a subset no larger than the batch is the whole batch every step).
    The run directory gets what `fit` writes, including a checkpoint of the full model
    (backbone + trained head), so `bit-transfer eval` and `fit --resume` accept it.
    """
    from bit_transfer import checkpoint
    from bit_transfer.data.sampling import Stream
    from bit_transfer.evaluate import evaluate, save_report
    from bit_transfer.models import model_config
    from bit_transfer.step import EvalStep, TrainStep
    from bit_transfer.train import CKPT_DIR, TrainingDiverged

    t0 = time.time()
    recipe, tcfg, run_dir = run.recipe, run.recipe.train, run.run_dir
    if run_dir.exists():  # an unfinished linear run restarts: it takes seconds
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    x, y = cache.features(dataset.name, dataset.train)
    ex, ey = cache.features(dataset.name, dataset.eval)
    y = y.astype(np.int32)
    n, num_classes = len(x), dataset.num_classes
    batch = min(plan.batch_size, n)
    if plan.mixup_alpha > 0:
        log(f"note: MixUp (alpha {plan.mixup_alpha:g}) is not applied to cached features; use --mode finetune for it")

    layout = planning.batch_layout(plan.batch_size, 1)
    runlog.write_yaml(run_dir / "recipe.yaml", recipe.to_dict())
    plan_info = planning.plan_json(info, plan, layout)
    plan_info["linear_probe"] = {
        "features": "cached pre-logits, eval transform (resize to crop), fp32",
        "batch": batch,
        "mixup_applied": False,
        "backbone": cache.backbone,
    }
    runlog.write_json(run_dir / "plan.json", plan_info)

    model.reset_head(num_classes)
    step_fn = TrainStep(model.head, momentum=plan.momentum, weight_decay=plan.weight_decay, batch_split=1,
                        jit=tcfg.jit)
    stream = Stream(n, batch, tcfg.seed, max_offset=0, flip=False)
    metrics = runlog.MetricsLog(run_dir, tensorboard=recipe.log.tensorboard)
    metrics.text("plan", "\n".join(plan.explain()))
    t_train = time.perf_counter()
    for step in range(plan.steps):
        idx = stream.indices(step)
        lr = plan.lr(step)
        loss, applied = step_fn([(x[idx], y[idx], y[idx])], lr, 1.0)
        if not math.isfinite(loss) or not applied:
            metrics.close()
            raise TrainingDiverged(f"{run.label}: loss became {loss} at step {step} (lr {lr:g}); lower rule.base_lr")
        done = step + 1
        if done % recipe.log.every == 0 or done == plan.steps:
            metrics.log(done, {"train/loss": loss, "train/lr": lr})
            if not quiet:
                log(f"  step {done}/{plan.steps} loss {loss:.4f} lr {lr:.2e}")
    train_seconds = time.perf_counter() - t_train

    eval_batch = max(1, min(1024, len(ex)))
    eval_step = EvalStep(model.head, eval_batch, jit=tcfg.jit)
    batches = ((ex[i : i + eval_batch], ey[i : i + eval_batch]) for i in range(0, len(ex), eval_batch))
    result = evaluate(eval_step, batches, num_classes)
    metrics.log(plan.steps, result.scalars())
    save_report(result, list(dataset.class_names), run_dir / "eval")

    params = {p.name: p for p in model.get_parameters()}
    params.update(step_fn.optimizer.state())
    ckpt = run_dir / CKPT_DIR / f"step-{plan.steps:06d}.ckpt"
    ckpt.parent.mkdir()
    checkpoint.save_checkpoint(ckpt, params, {
        "step": plan.steps,
        "batch_split": 1,
        "micro_batch": batch,
        "data_position": plan.steps,
        "seed": tcfg.seed,
        "model": model_config(model),
        "class_names": list(dataset.class_names),
        "recipe": recipe.name,
        "plan_steps": plan.steps,
        "linear_probe": True,
    })
    final = {
        "top1": result.top1,
        "top5": result.top5,
        "loss": result.loss,
        "steps": plan.steps,
        "planned_steps": plan.steps,
        "completed": True,
        "stopped_by_signal": False,
        "stopped_early": False,
        "images_per_sec": None,  # the backbone never ran in this run: features came from the cache
        "head_steps_per_sec": plan.steps / max(train_seconds, 1e-9),
        "eval_images": result.count,
        "eval_images_per_sec": None,
        "seconds": time.time() - t0,
        "device": _device_name(),
        "checkpoint": str(ckpt),
        "mode": "linear",
    }
    runlog.write_json(run_dir / "metrics.json", final)
    metrics.hparams(
        {k: v for k, v in plan.to_dict().items() if k != "decisions"} | {"model": recipe.model.name, "mode": "linear"},
        {"top1": result.top1, "top5": result.top5, "loss": result.loss},
    )
    metrics.close()
    log(f"{run.label}: top-1 {100 * result.top1:.2f}% top-5 {100 * result.top5:.2f}% "
        f"({final['seconds']:.1f} s) -> {run_dir}")
    return final


def _device_name() -> str:
    import mindspore as ms

    return ms.get_context("device_target")


# ----------------------------------------------------------------------------- summary
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


def write_summary(sweep_dir: Path, base: Recipe, shots, seeds, rows: list[dict], *, feature_seconds: float = 0.0,
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


# ----------------------------------------------------------------------------- CLI
def add_fewshot_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fewshot",
        help="few-shot sweep: a run per (shots, seed), mean ± std table, plot (resumable)",
        description="Run the recipe on K images per class for every K in --shots and subset seed in --seeds, "
                    "evaluate each on the full eval split, and summarise mean ± std over seeds.",
    )
    from bit_transfer.cli import add_recipe_args

    add_recipe_args(p)
    p.add_argument("--shots", required=True, help="images per class, e.g. 1,2,5,10")
    p.add_argument("--seeds", default="0,1,2", help="few-shot subset seeds, e.g. 0,1,2 or 0-4 (default 0,1,2)")
    p.add_argument("--mode", choices=MODES,
                   help="finetune: train all weights; linear: frozen backbone, head on cached features "
                        "(default: the recipe's train.mode)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="sweep directory (default runs/<recipe>-fewshot-<timestamp>); an existing one resumes")
    p.add_argument("--feature-cache", metavar="DIR",
                   help="linear mode: feature cache (default $BIT_TRANSFER_HOME/features, "
                        "else ~/.cache/bit-transfer/features)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; a line per log step")
    p.set_defaults(func=cmd_fewshot)
    return p


def cmd_fewshot(args) -> int:
    from bit_transfer import recipe as recipes

    shots = parse_ints(args.shots, "--shots", minimum=1)
    seeds = parse_ints(args.seeds, "--seeds", minimum=0)
    r = recipes.load(args.recipe, args.sets)
    result = sweep(r, shots, seeds, mode=args.mode, sweep_dir=args.run_dir, quiet=args.quiet or None,
                   feature_root=args.feature_cache)
    return 0 if result.complete else 130

