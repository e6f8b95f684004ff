"""Linear probes: a zero-initialised head trained on the cached pre-logit features of a frozen backbone.

`fewshot --mode linear` runs one per (shots, seed). The run directory gets what `fit` writes
(recipe.yaml, plan.json, metrics, the eval report and a checkpoint of the whole model: backbone +
trained head), through the same `RunDir`, so `bit-transfer eval` and `export` accept it.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np

from bit_transfer.hyperrule import planning
from bit_transfer.run.rundir import RunDir


def fit_linear(recipe, run_dir: Path, model, dataset, info, plan, cache, *, label: str, quiet: bool = True,
               log=print) -> dict:
    """Train the head with the plan's SGD schedule on cached features; evaluate; checkpoint.

    Batches of min(plan batch, subset size) features are drawn by `sampling.Stream` from
    train.seed (seeded epochs; a subset no larger than the batch is the whole batch every step).
    An unfinished probe restarts from scratch: it takes seconds.
    """
    from bit_transfer.commands.fewshot.features import split_about
    from bit_transfer.engine.metrics import evaluate
    from bit_transfer.engine.step import EvalStep, TrainStep

    t0 = time.time()
    tcfg = recipe.train
    run = RunDir.claim(run_dir, kind="fit", name=recipe.name)
    run.restart()
    x, y = cache.features(dataset.name, dataset.train, split_about(dataset, "train"))
    ex, ey = cache.features(dataset.name, dataset.eval, split_about(dataset, "eval"))
    batch = min(plan.batch_size, len(x))
    if plan.mixup_alpha > 0:
        log(f"note: MixUp (alpha {plan.mixup_alpha:g}) is not applied to cached features; use --mode finetune for it")
    run.write_yaml("recipe.yaml", recipe.to_dict())
    run.write_json("plan.json", _plan_json(info, plan, batch, cache.backbone))
    model.reset_head(dataset.num_classes)
    step_fn = TrainStep(model.head, momentum=plan.momentum, weight_decay=plan.weight_decay, batch_split=1,
                        jit=tcfg.jit, mix=False)
    metrics = run.metrics_log(recipe.log.tensorboard)
    try:
        metrics.text("plan", "\n".join(plan.explain()))
        seconds = train_head(step_fn, x, y.astype(np.int32), plan, batch, tcfg.seed, metrics, recipe.log.every,
                             label=label, log=None if quiet else log)
        eval_batch = max(1, min(1024, len(ex)))
        batches = ((ex[i : i + eval_batch], ey[i : i + eval_batch]) for i in range(0, len(ex), eval_batch))
        result = evaluate(EvalStep(model.head, eval_batch, jit=tcfg.jit), batches, dataset.num_classes)
        metrics.log(plan.steps, result.scalars())
        final = _save_and_finish(run, recipe, model, step_fn, dataset, plan, batch, result, seconds, t0)
        metrics.hparams(
            {k: v for k, v in plan.to_dict().items() if k != "decisions"} | {"model": recipe.model.name, "mode": "linear"},
            {"top1": result.top1, "top5": result.top5, "loss": result.loss},
        )
    finally:
        metrics.close()
    log(f"{label}: top-1 {100 * result.top1:.2f}% top-5 {100 * result.top5:.2f}% ({final['seconds']:.1f} s) -> {run}")
    return final


def _plan_json(info, plan, batch: int, backbone: str) -> dict:
    out = planning.plan_json(info, plan, planning.batch_layout(plan.batch_size, 1))
    out["linear_probe"] = {
        "features": "cached pre-logits, eval transform (resize to crop), fp32",
        "batch": batch,
        "mixup_applied": False,
        "backbone": backbone,
    }
    return out


def train_head(step_fn, x, y, plan, batch: int, seed: int, metrics, every: int, *, label: str, log=None) -> float:
    """The plan's steps on feature batches; returns the seconds spent. A non-finite loss stops the run."""
    from bit_transfer.data.sampling import Stream
    from bit_transfer.commands.fit import TrainingDiverged

    stream = Stream(len(x), batch, seed, max_offset=0, flip=False)
    t = time.perf_counter()
    for step in range(plan.steps):
        idx = stream.indices(step)
        lr = plan.lr(step)
        loss, applied, _ = step_fn([(x[idx], y[idx], None)], lr, 1.0).read()
        if not math.isfinite(loss) or not applied:
            raise TrainingDiverged(f"{label}: loss became {loss:g} at step {step + 1} (lr {lr:g}); lower rule.base_lr")
        done = step + 1
        if done % every == 0 or done == plan.steps:
            metrics.log(done, {"train/loss": loss, "train/lr": lr})
            if log:
                log(f"  step {done}/{plan.steps} loss {loss:.4f} lr {lr:.2e}")
    return time.perf_counter() - t


def _save_and_finish(run: RunDir, recipe, model, step_fn, dataset, plan, batch, result, seconds, t0) -> dict:
    """The full model's checkpoint and metrics.json, through the same builders as `fit`."""
    from bit_transfer.run import checkpoint

    params = {p.name: p for p in model.get_parameters()}
    params.update(step_fn.optimizer.state())
    meta = checkpoint.training_meta(step=plan.steps, batch_split=1, micro_batch=batch, world=1, seed=recipe.train.seed,
                                    model=model, class_names=dataset.class_names, recipe=recipe.name,
                                    plan_steps=plan.steps, linear_probe=True)
    ckpt = run.save_checkpoint(plan.steps, params, meta, keep=recipe.train.keep_checkpoints)
    fields = {
        "steps": plan.steps, "planned_steps": plan.steps, "completed": True, "stopped_by_signal": False,
        "stopped_early": False, "diverged": False,
        "images_per_sec": None,  # the backbone never ran in this run: features came from the cache
        "head_steps_per_sec": plan.steps / max(seconds, 1e-9), "seconds": time.time() - t0,
        "device": _device_name(), "world": 1, "checkpoint": str(ckpt), "mode": "linear",
    }
    return run.write_final(result, dataset.class_names, fields)


def feature_batch(recipe, plan) -> int:
    """The images per backbone pass: what `fit` evaluates with (eval_batch_size, else the micro-batch)."""
    t = recipe.train
    if t.eval_batch_size:
        return t.eval_batch_size
    return plan.batch_size // t.batch_split if isinstance(t.batch_split, int) else 32


def positions(split, rows: np.ndarray) -> np.ndarray:
    """Positions in `split` of the given store rows (rows of a split are distinct)."""
    order = np.argsort(split.rows, kind="stable")
    at = order[np.searchsorted(split.rows, rows, sorter=order)]
    assert np.array_equal(split.rows[at], rows)
    return at


@contextlib.contextmanager
def expected_recompiles():
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


def _device_name() -> str:
    import mindspore as ms

    return ms.get_context("device_target")
