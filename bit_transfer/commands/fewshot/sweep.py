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
image's pre-logit features once (`bit_transfer.commands.fewshot.features`, cached across runs and sweeps) and
trains only the head on them: seconds per run instead of minutes.
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bit_transfer.hyperrule import planning
from bit_transfer.errors import RecipeError, UsageError
from bit_transfer.config.recipe import Recipe
from bit_transfer.run.rundir import RunDir, describe_diff, recipe_diff
from bit_transfer.run.signals import StopFlag

MODES = ("finetune", "linear")


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
    return RunDir(run_dir, kind="fit", writer=False).finished()


# ----------------------------------------------------------------------------- the sweep directory
def claim_sweep_dir(sweep_dir, base: Recipe) -> tuple[RunDir, bool]:
    """Create the sweep directory, or check an existing one is a sweep of this recipe.

    Returns (the directory, resuming). Shots and seeds may differ between reruns (a grid can grow);
    anything else in the recipe may not, or the summary would mix different experiments.
    """
    sweep = RunDir.claim(sweep_dir, kind="fewshot", parent=base.log.dir, name=f"{base.name}-fewshot")
    marker = sweep / "sweep.yaml"
    if marker.is_file():
        import yaml

        saved = yaml.safe_load(marker.read_text()) or {}
        diff = recipe_diff(saved, base.to_dict())
        if diff:
            raise UsageError(
                f"{sweep} is a sweep of a different recipe: {describe_diff(saved, base.to_dict(), diff)}; rerun with "
                "the same recipe, --set and --mode to resume it, or choose another --run-dir"
            )
        return sweep, True
    sweep.write_yaml("sweep.yaml", base.to_dict())
    return sweep, False


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


def run_plan(run: Run, info: planning.DataInfo, subset_size: int):
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
    stopped_by_signal: bool = False


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
    """Run (or resume) the shots x seeds grid, then write the summary of the grid's runs.

    A signal stops the sweep after the current run's checkpoint (a fine-tune run evaluates first);
    the result says `complete=False` and a rerun on the same directory continues.
    """
    from bit_transfer.commands.fewshot.summary import write_summary

    if not shots or not seeds:
        raise UsageError("a sweep needs at least one shots value and one seed")
    base = recipe.with_overrides([f"train.mode={mode}"]) if mode else recipe
    quiet = base.log.quiet if quiet is None else quiet
    if base.data.size is not None:
        raise RecipeError("data.size is set; drop it so the rule sees each few-shot subset's size")
    with StopFlag() as stop:
        stop.check("starting", "nothing was written; rerun the same command")  # a signal before this listened
        pools = Pools(base)  # the data is checked before anything is written
        check_shots(pools.get(seeds[0]), shots, base.data.allow_fewer)
        sweep_run, resuming = claim_sweep_dir(sweep_dir, base)
        runs = [Run(k, s, sweep_run / f"shots{k}-seed{s}", run_recipe(base, k, s)) for k in shots for s in seeds]
        info = planning.task_info(runs[0].recipe)  # image size (measured once, cached), num classes
        _announce(base, runs, pools, info, sweep_run, resuming, shots, seeds, log)
        try:
            if base.train.mode == "linear":
                result = _sweep_linear(base, runs, pools, info, sweep_run.path, quiet, feature_root, log, stop)
            else:
                result = _sweep_finetune(runs, sweep_run.path, quiet, log, stop)
        finally:
            sweep_run.release()
    if stop and result.complete:
        stop.pass_on()  # it came as the last run ended: the CLI says so once the summary is written
    if not result.complete:
        log(f"sweep stopped before its last run; resume it with --run-dir {sweep_run}")
        return result
    paths = write_summary(sweep_run.path, base, shots, seeds, result.rows, feature_seconds=result.feature_seconds,
                          log=log)
    log("")
    log(paths["md"].read_text().rstrip())
    log(f"\nsummary: {', '.join(str(p) for p in paths.values())}\ncurves: tensorboard --logdir {sweep_run}")
    return result


def _announce(base, runs, pools, info, sweep_run, resuming, shots, seeds, log) -> None:
    """Where the sweep lives, and what the rule gives each shots value."""
    done = sum(finished(r.run_dir) is not None for r in runs)
    state = f"resuming: {done} of {len(runs)} runs finished" if resuming else f"resume with --run-dir {sweep_run}"
    log(f"sweep directory: {sweep_run} ({state})")
    for k in shots:
        first = next(r for r in runs if r.shots == k)
        n = len(pools.subset(first).train)
        _, plan = run_plan(first, info, n)
        batch = min(plan.batch_size, n) if base.train.mode == "linear" else plan.batch_size
        log(f"shots {k}: {n} training images -> {plan.steps} steps at {plan.crop} px, MixUp {plan.mixup_alpha:g}, "
            f"batch {batch}")
    log(f"{len(runs)} runs ({base.train.mode}): shots {','.join(map(str, shots))} x seeds {','.join(map(str, seeds))}")


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


def _sweep_finetune(runs: list[Run], sweep_dir: Path, quiet: bool, log, stop: StopFlag) -> SweepResult:
    from bit_transfer.commands import fit as train

    rows = []
    for i, run in enumerate(runs, 1):
        m = finished(run.run_dir)
        if m is None:
            stop.check(f"starting run {i} of {len(runs)}", f"rerun the sweep with --run-dir {sweep_dir} to continue")
            log(f"[{i}/{len(runs)}] {run.label}: fine-tuning in {run.run_dir}")
            m = train.fit(run.recipe, run_dir=run.run_dir, quiet=quiet)
            if not m.get("completed"):
                return SweepResult(sweep_dir, rows, complete=False, stopped_by_signal=m.get("stopped_by_signal"))
            if m.get("signal") and not m.get("reported"):  # during its final evaluation: stop at the next run
                stop.request(signal.Signals[m["signal"]])
        else:
            log(f"[{i}/{len(runs)}] {run.label}: finished earlier, top-1 {100 * m['top1']:.2f}%")
        rows.append(_row(run, m))
    return SweepResult(sweep_dir, rows, complete=True)


# ----------------------------------------------------------------------------- linear probes
def _sweep_linear(base, runs, pools, info, sweep_dir, quiet, feature_root, log, stop: StopFlag) -> SweepResult:
    from bit_transfer.commands.fewshot import probe as linear_probe

    todo = [r for r in runs if finished(r.run_dir) is None]
    model = cache = None
    if todo:
        subsets = {r: pools.subset(r) for r in todo}
        planned = {r: run_plan(r, info, len(subsets[r].train)) for r in todo}
        model, cache = _feature_pass(base, todo, pools, subsets, planned, feature_root, log, stop)
    hint = f"rerun the sweep with --run-dir {sweep_dir} to continue"
    rows = []
    for i, run in enumerate(runs, 1):
        if run in todo:
            stop.check(f"starting linear probe {i} of {len(runs)}", hint)
            log(f"[{i}/{len(runs)}] {run.label}: linear probe on {len(subsets[run].train)} images in {run.run_dir}")
            with linear_probe.expected_recompiles():
                m = linear_probe.fit_linear(run.recipe, run.run_dir, model, subsets[run], *planned[run], cache,
                                            label=run.label, quiet=quiet, log=log)
        else:
            m = finished(run.run_dir)
            log(f"[{i}/{len(runs)}] {run.label}: finished earlier, top-1 {100 * m['top1']:.2f}%")
        rows.append(_row(run, m))
    return SweepResult(sweep_dir, rows, complete=True, feature_seconds=cache.seconds if cache else 0.0)


def _feature_pass(base, todo, pools, subsets, planned, feature_root, log, stop: StopFlag):
    """The frozen backbone and its feature cache, filled for every image a pending run needs:
    one pass per pool over the union of the subsets' images, then over its eval split."""
    from bit_transfer.commands.fewshot import features
    from bit_transfer.commands.fewshot import probe as linear_probe
    from bit_transfer.system import device as runtime
    from bit_transfer.commands import fit as train

    device = runtime.setup(base.train.device, jit=base.train.jit, device_id=base.train.device_id)
    stop.rearm()  # MindSpore's context start installed its own SIGINT handler
    runtime.seed_everything(base.train.seed)  # the init `fit` would give a `weights: none` backbone
    model = train.build_model(base.model, pools.get(todo[0].seed).num_classes, log=log)
    model.set_train(False)
    plan = planned[todo[0]][1]
    cache = features.FeatureCache(model, plan.crop, root=feature_root, batch_size=linear_probe.feature_batch(base, plan),
                                  workers=base.data.workers, jit=base.train.jit, log=log)
    log(f"device {device}; backbone {cache.backbone[:12]}; features cached in {cache.root}")
    hint = "the features computed so far are cached; rerun the same command to continue"
    for key in dict.fromkeys(pools.key(r.seed) for r in todo):
        mine = [r for r in todo if pools.key(r.seed) == key]
        pool = pools.get(mine[0].seed)
        rows = np.unique(np.concatenate([subsets[r].train.rows for r in mine]))
        cache.features(pool.name, pool.train.subset(linear_probe.positions(pool.train, rows)),
                       features.split_about(pool, "train"))
        stop.check("computing features", hint)
        cache.features(pool.name, pool.eval, features.split_about(pool, "eval"))
        stop.check("computing features", hint)
    return model, cache
