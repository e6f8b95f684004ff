"""`bit-transfer fit`: fine-tune a BiT with the HyperRule, evaluate, checkpoint, resume.

Read it top to bottom: `fit` claims the run directory (`rundir.RunDir` owns every file), `prepare`
sets up the data, the plan and the model, `train_loop` runs the optimizer steps (one step =
`batch_split` micro-batches) with logging, evaluation and checkpoints, and `finish` writes the last
checkpoint, evaluates and writes metrics.json. Everything random derives from (train.seed, step):
data order, augmentation and MixUp, so a resumed run continues exactly where the stopped one ended.
A signal at any moment leaves a whole checkpoint (`signals.StopFlag`); rerunning the command resumes.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from bit_transfer import data, models
from bit_transfer.run import checkpoint
from bit_transfer.system import compile_cache
from bit_transfer.system import distributed
from bit_transfer.kernels import onednn as onednn_conv
from bit_transfer.hyperrule import planning
from bit_transfer.config import recipe as recipes
from bit_transfer.run import runlog
from bit_transfer.run.runlog import Throughput
from bit_transfer.system import device as runtime
from bit_transfer.data import pipeline
from bit_transfer.errors import Interrupted, RunError, UsageError, WeightsError
from bit_transfer.engine.metrics import evaluate_split
from bit_transfer.models.weights.load import create_model_with_weights
from bit_transfer.run.rundir import RunDir
from bit_transfer.run.signals import StopFlag
from bit_transfer.engine import mixup
from bit_transfer.engine.batch_split import choose_batch_split, probe
from bit_transfer.engine.step import EvalStep, TrainStep, cast_model, read_steps

if TYPE_CHECKING:  # annotations only
    from mindspore import nn

    from bit_transfer.engine.metrics import EvalResult
    from bit_transfer.hyperrule import rule as hyperrule

RESUME_HINT = "rerun the same command to continue"
DIVERGED_FACTOR = 10.0  # a final loss this many times the first one is flagged as divergence


class TrainingDiverged(RunError):
    """The loss or the gradients became NaN/Inf; the last good checkpoint is kept."""


@dataclass
class Session:
    """What the loop needs, built once by `prepare`."""
    recipe: recipes.Recipe
    run: RunDir
    world: distributed.World
    device: str
    dataset: data.Dataset
    info: planning.DataInfo
    plan: hyperrule.Plan
    layout: planning.BatchLayout
    net: models.ResNetV2  # the model (its Parameters are what checkpoints hold)
    model: nn.Cell  # `net`, or its fp16 wrapper
    step_fn: TrainStep
    eval_step: EvalStep
    metrics: runlog.MetricsLog | runlog.NullLog
    say: Callable[..., None]
    step: int = 0
    evaluated_at: int | None = None
    saved_at: int | None = None
    last_eval: EvalResult | None = None
    losses: list = field(default_factory=list)  # (step, loss) at log points, for the divergence flag
    stopped: str | None = None  # what ended the loop early: a signal's name or --stop-after
    progress: runlog.Progress | None = None
    timer: Throughput | None = None
    pending: list = field(default_factory=list)  # (step, lr, StepOutput) not read from the device yet
    last_loss: float = math.nan  # of the last step read
    skips: int = 0  # fp16 overflows in a row
    stop_agreed: bool = False  # several ranks: a step's reduced stop flag was set


# ----------------------------------------------------------------------------- fit
def fit(recipe: recipes.Recipe, *, run_dir=None, quiet: bool | None = None, stop_after: int | None = None,
        resume: bool = False) -> dict:
    """Fine-tune the recipe's model with its plan; returns the final metrics (also in metrics.json).

    `stop_after` ends the run after that many steps as if interrupted; `resume` (`--resume DIR`)
    requires `run_dir` to be an existing run. A finished run is reported, not rerun.
    """
    t_start = time.time()
    with StopFlag() as stop:  # from the first moment: data loading and compiling are covered too
        untouched = f"nothing was written; {RESUME_HINT}"
        stop.check("starting", untouched)  # a signal that came before (the CLI notes them from its start)
        device = runtime.setup(recipe.train.device, jit=recipe.train.jit, device_id=recipe.train.device_id)
        runtime.check_precision(recipe.train.precision, device)  # before anything compiles
        world = distributed.world()
        stop.rearm()  # MindSpore's context start installed its own SIGINT handler
        stop.check("starting MindSpore", untouched)
        _check_ranks(recipe, run_dir, world)
        launched = distributed.under_launcher()  # `fit --devices`: the launcher holds the run's lock
        run = RunDir.claim(run_dir, kind="fit", parent=recipe.log.dir, name=recipe.name, writer=world.is_main,
                           must_exist=resume, lock=not launched)
        if launched:
            run.wait_for_lock()  # rank 0 takes the run over if the launcher dies
        try:
            final = _fit_run(recipe, run, world, device, stop, stop_after, quiet, t_start)
        finally:
            run.release()
        if stop and (final.get("reported") or not final.get("stopped_by_signal")):
            stop.pass_on()  # it came after metrics.json was written: the CLI still says so
        return final


def _fit_run(recipe, run: RunDir, world, device: str, stop: StopFlag, stop_after, quiet, t_start: float) -> dict:
    """The claimed run: reported if finished, else prepared, trained and finished."""
    say = print if world.is_main else _silent
    done = _finished_or_changed(run, recipe, say)
    if done:
        return done
    try:
        s = prepare(recipe, run, world, device, stop, say)
        try:
            train_loop(s, stop, stop_after, quiet)
            return finish(s, stop, t_start)
        finally:
            s.metrics.close()
    except BaseException:
        run.discard_if_unused()  # a run that failed before its first checkpoint leaves nothing
        raise


def _check_ranks(recipe, run_dir, world) -> None:
    if world.size > 1 and not run_dir:
        raise UsageError("under msrun pass --run-dir DIR so that every rank uses the same run directory")
    if world.size > 1 and recipe.train.batch_split == "auto":
        raise UsageError(f"train.batch_split: auto probes one device; with {world.size} ranks set a number")


def _finished_or_changed(run: RunDir, recipe, say) -> dict | None:
    """A finished run's metrics (nothing is rewritten); else check and record what a resume changes."""
    changed = run.check_recipe(recipe.to_dict(), same_plan=lambda saved: planning.same_plan(saved, recipe))
    done = run.finished()
    if done:
        say(f"{run} is finished: top-1 {_pct(done.get('top1'))} after {done.get('steps')} steps; nothing to do "
            "(start a new run with another --run-dir)", flush=True)
        return {**done, "reported": True}  # what an earlier process recorded, not this one's stop
    if changed:
        say(f"resuming with changed settings: {', '.join(changed)}", flush=True)
        run.write_yaml("recipe.yaml", recipe.to_dict())
    return None


def _silent(*args, **kwargs) -> None:
    pass


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


# ----------------------------------------------------------------------------- set-up
def prepare(recipe, run: RunDir, world, device: str, stop: StopFlag, say) -> Session:
    """Data (both splits checked), plan, model, steps and the checkpoint to resume from."""
    tcfg = recipe.train
    latest = run.latest_checkpoint(log=say)
    say(f"run directory: {run}" + (" (resuming)" if latest else ""), flush=True)
    runtime.seed_everything(tcfg.seed)
    if device == "CPU":  # compile the CPU kernels while the data is checked
        onednn_conv.prebuild()
    dataset, info, plan = load_task(recipe, world, device, say)
    stop.check("loading the data", f"nothing was trained; {RESUME_HINT}")
    net = build_model(recipe.model, dataset.num_classes, log=say)
    frozen = recipes.frozen_part(tcfg)
    if frozen != "none":  # no gradient, optimizer state or weight decay for it (train.freeze)
        net.freeze_to(frozen)
        say(f"train.freeze {frozen}: {describe_trainable(net)}", flush=True)
    model = cast_model(net, tcfg.precision)  # fp16: a wrapper around `net`, same Parameters
    meta = latest[2] if latest else {}
    distributed.check_same_step(int(meta["step"]) if latest else None)  # one collective, before any compile
    batch_split = int(meta.get("batch_split") or 0) or _batch_split(tcfg, plan, model, say)
    # batch_split is kept from the checkpoint on resume: the global micro-batch (batch / batch_split)
    # and so the data stream stay the same whatever the number of ranks now.
    layout = planning.batch_layout(plan.batch_size, batch_split, world=world.size)
    step_fn = _train_step(model, plan, tcfg, batch_split, world.size,
                          compile_cache.enabled(device, tcfg.jit, world.size), say)
    # Periodic evaluation runs the training model: a folded copy (models/inference.py, 1.2x faster
    # inference) would hold a second copy of the conv weights for the whole run (+0.1 GB for R50x1,
    # +3.7 GB for R152x4 on an accelerator). `eval`/`predict`, which drop the training model, fold.
    eval_step = EvalStep(model, tcfg.eval_batch_size or layout.micro_batch, jit=tcfg.jit)
    s = Session(recipe, run, world, device, dataset, info, plan, layout, net, model, step_fn, eval_step, None, say)
    if latest:
        _restore(model, step_fn, latest[1], latest[0])
        step_fn.load_scale_state(meta)
        s.step = s.saved_at = int(meta["step"])
        say(f"resumed from {latest[0].name} at step {s.step}", flush=True)
    else:
        run.write_yaml("recipe.yaml", recipe.to_dict())
        run.write_json("plan.json", planning.plan_json(info, plan, layout))
    say(f"batch {layout.describe()}", flush=True)
    stop.check("building the model", f"nothing was trained in this process; {RESUME_HINT}")
    s.metrics = run.metrics_log(recipe.log.tensorboard, resume_step=s.step)
    if not latest:
        s.metrics.text("plan", "\n".join(plan.explain()))
    return s


def load_task(recipe, world, device: str, say):
    """The dataset (train and eval images checked before any training), what the rule sees, the plan."""
    dataset = data.load(recipe.data)
    _check_images(dataset, recipe.data.workers, say)
    info = planning.task_info(recipe)
    plan = planning.make_plan(recipe, info)
    ranks = f" x {world.size} ranks" if world.size > 1 else ""
    say(f"device {device}{ranks}; {len(dataset.train)} training / "
        f"{len(dataset.eval)} eval images, {dataset.num_classes} classes; {plan.steps} steps at {plan.crop}px "
        f"(precrop {plan.precrop}), MixUp {plan.mixup_alpha}", flush=True)
    return dataset, info, plan


def _check_images(dataset, workers, say) -> None:
    """Read every image header of both splits now, not at the final evaluation hours later."""
    skipped = dataset.check_readable(workers)
    if any(skipped.values()):
        say("skipping unreadable images (data.skip_corrupt): "
            + ", ".join(f"{n} in {split}" for split, n in skipped.items() if n), flush=True)


def build_model(model_cfg, num_classes: int, *, log=print):
    """The recipe's architecture with its weights loaded; 'none' trains from scratch."""
    if model_cfg.weights.lower() == "none":
        log("weights: none (training from scratch; the head is zero-initialised)")
        return models.create_model(model_cfg.name, num_classes, depths=model_cfg.depths, width=model_cfg.width)
    model, report, path = create_model_with_weights(model_cfg.name, num_classes, model_cfg.weights,
                                                    depths=model_cfg.depths, width=model_cfg.width,
                                                    head=model_cfg.head)
    log(f"weights: {path} ({report})")
    return model


def describe_trainable(net) -> str:
    """'1,234 of 23,500,000 parameters trainable' for a (partly) frozen model."""
    total = sum(int(np.prod(p.shape)) for p in net.get_parameters())
    trained = sum(int(np.prod(p.shape)) for p in net.trainable_params())
    return f"{trained:,} of {total:,} parameters trainable"


def _train_step(model, plan, tcfg, batch_split: int, ranks: int, cache: bool, say):
    return TrainStep(model, momentum=plan.momentum, weight_decay=plan.weight_decay, batch_split=batch_split,
                     precision=tcfg.precision, jit=tcfg.jit, ranks=ranks, mix=plan.mixup_alpha > 0,
                     compile_cache=cache, log=say)


def _restore(model, step_fn, params: dict, path: Path) -> None:
    """Model weights and optimizer momentum from a training checkpoint."""
    missing = [p.name for p in model.get_parameters() if p.name not in params]
    if missing:
        raise WeightsError(f"{path} lacks {len(missing)} model tensors (e.g. {missing[0]}); it is not from this run")
    for p in model.get_parameters():
        runtime.assign(p, params[p.name])
    try:
        step_fn.optimizer.load_state(params)
    except KeyError as e:
        raise WeightsError(f"{path} lacks the optimizer state {e}; it is not a training checkpoint of this run") from None


# ----------------------------------------------------------------------------- the loop
def train_loop(s: Session, stop: StopFlag, stop_after: int | None, quiet: bool | None) -> None:
    """Optimizer steps until the plan's last one, a signal, or `stop_after`.

    A step's results stay on the device (`StepOutput`) until the loop needs them: at log points,
    before an evaluation or a checkpoint, and with several ranks one step late, for the stop flag
    the ranks reduce inside the step (no collective of its own, no wait for the step just launched).
    """
    recipe, plan, tcfg = s.recipe, s.plan, s.recipe.train
    quiet = (recipe.log.quiet if quiet is None else quiet) or not s.world.is_main
    stream = pipeline.prefetch(_train_stream(s))  # the next micro-batches are read while a step runs
    s.progress = runlog.Progress(plan.steps, s.step, quiet)
    timer = s.timer = Throughput(plan.batch_size, s.step)
    s.model.set_train(True)
    try:
        while s.step < plan.steps:
            lr = plan.lr(s.step)
            t_data = time.perf_counter()
            batches, lam = mixup.draw(stream, s.layout.batch_split, plan.mixup_alpha, tcfg.seed, s.step)
            if s.device == "CPU" or not s.pending:  # Ascend/GPU run steps queued: only after a read
                timer.waited(time.perf_counter() - t_data)  # is a wait for data surely the device's too
            out = s.step_fn(batches, lr, lam, stop=bool(stop))
            stop.rearm()  # MindSpore turns Ctrl-C into SIGTERM once it has run a graph
            s.step += 1
            s.pending.append((s.step, lr, out))
            logged = s.step % recipe.log.every == 0 or s.step == plan.steps
            read_results(s, keep=0 if logged else 1 if s.world.size > 1 else None)
            timer.tick()
            if logged:
                _log_step(s, timer)
            else:
                s.progress.update(s.step, s.last_loss, lr, timer.ips)
            if _should_stop(s, stop, stop_after):
                break
            if _due(tcfg.eval_every, s.step, plan.steps):
                run_eval(s, stop)
                s.model.set_train(True)
            if _due(tcfg.checkpoint_every or tcfg.eval_every, s.step, plan.steps):
                save(s, stop)
    finally:
        s.progress.close()
        stream.close()


def _train_stream(s: Session):
    d, plan, split = s.recipe.data, s.plan, s.layout.batch_split
    return pipeline.train_batches(
        s.dataset.train, precrop=plan.precrop, crop=plan.crop, micro_batch=s.layout.micro_batch,
        seed=s.recipe.train.seed, random_crop=d.random_crop, random_flip=d.random_flip, workers=d.workers,
        start=s.step * split, rank=s.world.rank, world=s.world.size,
    )


def read_results(s: Session, keep: int | None) -> None:
    """Read the results of all pending steps but the last `keep` (None: read nothing): the loss, whether
    the update was applied, the stop flag the ranks agreed on; then check for divergence."""
    if keep is None or len(s.pending) <= keep:
        return
    due, s.pending = s.pending[: len(s.pending) - keep], s.pending[len(s.pending) - keep :]
    for (step, lr, _), (loss, applied, stop) in zip(due, read_steps([out for _, _, out in due])):
        s.last_loss, s.stop_agreed = loss, s.stop_agreed or stop
        s.skips = _check_update(s, step, loss, applied, lr)


def _check_update(s: Session, step: int, loss: float, applied: bool, lr: float) -> int:
    """Stop on a non-finite loss or gradients; fp16 overflows skip the update as PyTorch's GradScaler does
    (the step halved its loss scale), up to 10 in a row. Returns the overflows in a row so far."""
    if math.isfinite(loss) and applied:
        return 0
    if s.recipe.train.precision == "fp16" and s.skips + 1 < 10:
        return s.skips + 1
    what = f"the loss became {loss:g}" if not math.isfinite(loss) else f"the gradients became NaN/Inf (loss {loss:g})"
    raise TrainingDiverged(
        f"{what} at step {step} (lr {lr:g}); the update was not applied and {s.run.kept_checkpoint()}; "
        "lower rule.base_lr or check the data"
    )


def _log_step(s: Session, timer: Throughput) -> None:
    ips, wait = timer.window()
    loss, lr = s.last_loss, s.plan.lr(s.step - 1)
    s.metrics.log(s.step, {"train/loss": loss, "train/lr": lr, "train/images_per_sec": ips, "train/data_wait": wait})
    s.losses.append((s.step, loss))
    s.progress.update(s.step, loss, lr, ips, timer.eta(s.step, s.plan.steps), force_line=True)


def _should_stop(s: Session, stop: StopFlag, stop_after: int | None) -> bool:
    """A signal here (one rank), or one the ranks agreed on in a step (several), or `stop_after`."""
    if s.world.size == 1:
        stopping = bool(stop)
    else:  # a signal reaches the ranks at different steps: they stop together, at a step they all read
        if stop_after is not None and s.plan.steps > s.step >= stop_after:
            read_results(s, keep=0)  # a signal agreed in the steps not read yet is named as such
        if s.stop_agreed and not stop:
            stop.request(signal.SIGTERM)
        stopping = s.stop_agreed
    if not stopping and not (stop_after is not None and s.plan.steps > s.step >= stop_after):
        return False
    read_results(s, keep=0)
    s.stopped = stop.name if stopping else f"--stop-after {stop_after}"
    hint = " (checkpoint, then evaluation; signal again to skip the evaluation)" if stopping else ""
    s.progress.write(f"{s.stopped}: stopping after step {s.step}{hint}")
    return True


def _due(every: int | None, step: int, total: int) -> bool:
    return bool(every) and step % every == 0 and step < total


# ----------------------------------------------------------------------------- evaluation, checkpoints
def run_eval(s: Session, stop: StopFlag):
    """Evaluate the eval split, log it; a second signal abandons it (the checkpoint is already whole)."""
    read_results(s, keep=0)  # a divergence is raised before evaluating what it left
    said = bool(stop)  # a stop already said (by `_should_stop`, or just below)
    if stop and not stop.hard and not s.stopped:
        s.progress.write(f"{stop.name}: finishing the evaluation at step {s.step}; signal again to skip it")

    def predict(x):
        nonlocal said
        if stop.hard:
            raise Interrupted(f"{stop.name} during the evaluation at step {s.step}; {_resume_line(s)}")
        if stop and not said:  # a signal during the evaluation: acknowledged at the next batch
            said = True
            s.progress.write(f"{stop.name}: finishing the evaluation at step {s.step}; signal again to skip it")
        out = s.eval_step(x)
        stop.rearm()
        return out

    d = s.recipe.data
    result = evaluate_split(predict, s.dataset.eval, s.plan.crop, s.eval_step.batch_size, s.dataset.num_classes,
                            d.workers, s.world)
    s.metrics.log(s.step, result.scalars())
    s.evaluated_at, s.last_eval = s.step, result
    s.progress.write(
        f"step {s.step}: val loss {result.loss:.4f} top-1 {100 * result.top1:.2f}% top-5 {100 * result.top5:.2f}% "
        f"({result.count} images, {result.images_per_sec:.1f} img/s)"
    )
    return result


def _resume_line(s: Session) -> str:
    ckpts = s.run.checkpoints()
    where = f"checkpoint {ckpts[-1].name} is complete; " if ckpts else ""
    return f"{where}{RESUME_HINT}"


def save(s: Session, stop: StopFlag) -> Path:
    """Checkpoint the model and optimizer (rank 0 writes); never written when the weights are not finite."""
    read_results(s, keep=0)  # a divergence in a step not read yet is raised first
    # The Parameters themselves, checked and written one at a time: numpy copies of all of them at
    # once raised the whole fit's peak RSS by 0.16 GB at R50x1 (1.77 -> 1.92 GB, measured).
    params = {p.name: p for p in s.model.get_parameters()}
    bad = next((k for k, p in params.items() if not np.isfinite(p.asnumpy()).all()), None)
    if bad:  # finite loss and gradients can still overflow the weights (a huge lr)
        raise TrainingDiverged(
            f"weights became non-finite at step {s.step} (e.g. {bad}); {s.run.kept_checkpoint()}; "
            "lower rule.base_lr or check the data"
        )
    params.update(s.step_fn.optimizer.state())
    meta = checkpoint.training_meta(
        step=s.step, batch_split=s.layout.batch_split, micro_batch=s.layout.micro_batch, world=s.world.size,
        seed=s.recipe.train.seed, model=s.net, class_names=s.dataset.class_names, recipe=s.recipe.name,
        plan_steps=s.plan.steps, **s.step_fn.scale_state(),
    )
    with stop.critical():
        path = s.run.save_checkpoint(s.step, params, meta, keep=s.recipe.train.keep_checkpoints)
    s.saved_at = s.step
    return path


def finish(s: Session, stop: StopFlag, t_start: float) -> dict:
    """The last checkpoint, the final evaluation and metrics.json; the one summary line."""
    if s.saved_at != s.step:
        save(s, stop)
    if s.evaluated_at != s.step:
        run_eval(s, stop)
    stopped = s.stopped
    diverged = _diverged(s.losses)
    fields = {
        "steps": s.step, "planned_steps": s.plan.steps, "completed": s.step >= s.plan.steps,
        # also a signal during the final checkpoint or evaluation, after the last step: both were completed
        "stopped_by_signal": bool(stop), "signal": stop.name if stop else None, "stopped_early": bool(stopped),
        "diverged": diverged is not None, "images_per_sec": s.timer.ips if s.timer else None,
        "data_wait": s.timer.wait_share() if s.timer else None,
        "seconds": time.time() - t_start,
        "device": s.device, "world": s.world.size, "checkpoint": str(s.run.checkpoint_path(s.step)),
        "skipped_corrupt": s.dataset.corrupt_counts(),
    }
    final = s.run.write_final(s.last_eval, s.dataset.class_names, fields)
    s.metrics.hparams(
        {k: v for k, v in s.plan.to_dict().items() if k != "decisions"}
        | {"model": s.recipe.model.name, "batch_split": s.layout.batch_split},
        {"top1": s.last_eval.top1, "top5": s.last_eval.top5, "loss": s.last_eval.loss},
    )
    status = "stopped early; rerun the same command to resume" if stopped else "done"
    if stop and not stopped:
        status += f" ({stop.name} during the final checkpoint and evaluation: both were completed)"
    skipped = {k: n for k, n in fields["skipped_corrupt"].items() if n}
    if skipped:
        status += " (skipped unreadable images: " + ", ".join(f"{n} in {k}" for k, n in skipped.items()) + ")"
    if diverged:
        status += f", but the loss diverged ({diverged}): lower rule.base_lr"
    if (fields["data_wait"] or 0) > Throughput.INPUT_BOUND:
        status += (f"; input-bound: {fields['data_wait']:.0%} of the time went waiting for images "
                   "(raise data.workers, or cache decoded data)")
    s.say(f"{status}: top-1 {_pct(s.last_eval.top1)} top-5 {_pct(s.last_eval.top5)} after {s.step} steps "
          f"({fields['seconds']:.0f} s). Curves: tensorboard --logdir {s.run.path.parent}", flush=True)
    return final


def _diverged(losses: list) -> str | None:
    """'2.3 at step 1 -> 6e+36 at step 20' when the last logged loss is far above the first."""
    if len(losses) < 2:
        return None
    (s0, first), (s1, last) = losses[0], losses[-1]
    if math.isfinite(last) and last <= DIVERGED_FACTOR * max(first, 1e-8):
        return None
    return f"{first:.3g} at step {s0} -> {last:.3g} at step {s1}"


# ----------------------------------------------------------------------------- batch_split: auto
def _batch_split(tcfg, plan, model, say) -> int:
    if tcfg.batch_split != "auto":
        return tcfg.batch_split
    return choose_batch_split(plan.batch_size, lambda m: probe(model, m, plan.crop, tcfg), log=say)



