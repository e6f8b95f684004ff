"""`bit-transfer fit` and `eval`: fine-tune a BiT with the HyperRule, evaluate, checkpoint, resume.

Read it top to bottom: set up the device, the data and the plan; build the model; then the loop
(one optimizer step = `batch_split` micro-batches), with logging, evaluation and checkpoints.
Everything random derives from (train.seed, step): data order, augmentation and MixUp, so a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bit_transfer import distributed, planning, recipe as recipes, runlog, runtime
from bit_transfer.errors import RecipeError, RunError, UsageError, WeightsError

CKPT_DIR = "checkpoints"


class TrainingDiverged(RunError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- building blocks
def build_model(model_cfg, num_classes: int, *, log=print):
    """Create the recipe's model and load its weights ('none' trains from scratch)."""
    from bit_transfer import models

    def create(padding="fixed"):
        return models.create_model(model_cfg.name, num_classes, depths=model_cfg.depths, width=model_cfg.width, padding=padding)

    if model_cfg.weights.lower() == "none":
        log("weights: none (training from scratch; the head is zero-initialised)")
        return create()
    path = models.resolve_weights(model_cfg.weights, model_cfg.name)
    model = create(models.weights_padding(path))  # google/bit-* HF checkpoints need TF "SAME" padding
    report = models.load_weights(model, path, head=model_cfg.head)
    log(f"weights: {path} ({report})")
    return model


def find_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / CKPT_DIR).glob("step-*.ckpt"))


def kept_checkpoint(run_dir: Path) -> str:
    """What a stopped run leaves to resume from, for its one-line message."""
    ckpts = find_checkpoints(run_dir)
    return f"the last good checkpoint {ckpts[-1]} is kept" if ckpts else "no checkpoint had been written"


def choose_batch_split(batch_size: int, try_micro_batch, world: int = 1, log=print) -> int:
    """`train.batch_split: auto`: the largest micro-batch that runs (try, catch out-of-memory, halve).

    `try_micro_batch(m)` runs one training micro-step at micro-batch m and raises on failure.
    Only divisors of the per-rank batch are tried, so the logical batch stays exact.
    """
    per_rank = batch_size // world
    candidates = [m for m in range(per_rank, 0, -1) if per_rank % m == 0]
    m = candidates[0]
    while True:
        try:
            try_micro_batch(m)
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            smaller = [c for c in candidates if c <= m // 2]
            if not smaller:
                raise UsageError(
                    f"even a micro-batch of {m} does not fit on this device; lower rule.crop or use a smaller model"
                ) from None
            log(f"batch_split auto: micro-batch {m} does not fit ({str(e).splitlines()[0][:80]}), trying {smaller[0]}")
            m = smaller[0]
            continue
        split = per_rank // m
        log(f"batch_split auto: micro-batch {m} fits -> batch_split {split}")
        return split


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return any(s in text for s in ("out of memory", "malloc", "memory not enough", "alloc", "oom"))


class StopFlag:
    """SIGINT/SIGTERM finish the current step, checkpoint, evaluate and exit cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def __bool__(self):
        return self.signal is not None


@dataclass
class RunState:
    step: int = 0
    evaluated_at: int | None = None  # the step of the last evaluation


# ----------------------------------------------------------------------------- fit
def fit(
    recipe: recipes.Recipe,
    *,
    run_dir: str | Path | None = None,
    quiet: bool | None = None,
    stop_after: int | None = None,
) -> dict:
    """Fine-tune the recipe's model with its plan; returns the final metrics (also in metrics.json).

    `stop_after` ends the run after that many steps of the plan as if interrupted (checkpoint,
    final eval); rerunning on the same run directory continues it.
    """
    from bit_transfer import checkpoint, data, models
    from bit_transfer.data import pipeline

    t_start = time.time()
    quiet = recipe.log.quiet if quiet is None else quiet
    tcfg = recipe.train

    # --- device and ranks (under msrun every rank runs this; rank 0 alone writes)
    device = runtime.setup(tcfg.device, jit=tcfg.jit)
    world = distributed.world()
    if world.size > 1 and not run_dir:
        raise UsageError("under msrun pass --run-dir DIR so that every rank uses the same run directory")
    if world.size > 1 and tcfg.batch_split == "auto":
        raise UsageError(f"train.batch_split: auto probes one device; with {world.size} ranks set a number")
    quiet = quiet or not world.is_main
    say = print if world.is_main else (lambda *a, **k: None)

    # --- run directory: new, or an existing one to resume
    run_dir = Path(run_dir) if run_dir else runlog.new_run_dir(recipe.log.dir, recipe.name)
    ckpts = find_checkpoints(run_dir)  # none for a new run directory
    resuming = bool(ckpts)
    if resuming:
        saved = recipes.load(run_dir / "recipe.yaml")
        if saved.to_dict() != recipe.to_dict():
            raise RecipeError(
                f"{run_dir} holds a run of a different recipe; resume it with `bit-transfer fit --resume {run_dir}` "
                "or start a new one with another --run-dir"
            )
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    say(f"run directory: {run_dir}" + (" (resuming)" if resuming else ""), flush=True)

    # --- data, plan
    runtime.seed_everything(tcfg.seed)
    dataset = data.load(recipe.data)
    info = planning.task_info(recipe)
    plan = planning.make_plan(recipe, info)
    num_classes = dataset.num_classes
    ranks = f" x {world.size} ranks" if world.size > 1 else ""
    say(
        f"device {device}{ranks}; {len(dataset.train)} training / {len(dataset.eval)} eval images, {num_classes} classes; "
        f"{plan.steps} steps at {plan.crop}px (precrop {plan.precrop}), MixUp {plan.mixup_alpha}",
        flush=True,
    )

    # --- model
    net = build_model(recipe.model, num_classes, log=say)
    if tcfg.mode == "linear":
        net.freeze_backbone()
    from bit_transfer.step import EvalStep, TrainStep, cast_model

    model = cast_model(net, tcfg.precision)  # fp16: a wrapper around `net`, same Parameters

    def make_step(split):
        return TrainStep(
            model,
            momentum=plan.momentum,
            weight_decay=plan.weight_decay,
            batch_split=split,
            precision=tcfg.precision,
            jit=tcfg.jit,
            world=world.size,
        )

    # --- batch layout (auto probes the device once, then is fixed for the run and its resumes)
    batch_split = tcfg.batch_split
    state_params, meta = (checkpoint.read_checkpoint(ckpts[-1]) if ckpts else ({}, {}))
    if meta.get("batch_split"):
        batch_split = int(meta["batch_split"])
    elif batch_split == "auto":
        batch_split = choose_batch_split(plan.batch_size, lambda m: _probe(model, m, plan.crop, num_classes, tcfg), log=say)
    # batch_split is kept from the checkpoint on resume: the global micro-batch (batch / batch_split)
    # and so the data stream stay the same whatever the number of ranks now.
    layout = planning.batch_layout(plan.batch_size, batch_split, world=world.size)
    micro = layout.micro_batch
    step_fn = make_step(batch_split)
    eval_step = EvalStep(model, tcfg.eval_batch_size or micro, jit=tcfg.jit)

    state = RunState()
    if ckpts:
        _restore(model, step_fn, state_params, ckpts[-1])
        state.step = int(meta["step"])
        say(f"resumed from {ckpts[-1].name} at step {state.step}", flush=True)
    elif world.is_main:
        runlog.write_yaml(run_dir / "recipe.yaml", recipe.to_dict())
        runlog.write_json(run_dir / "plan.json", planning.plan_json(info, plan, layout))
    say(f"batch {layout.describe()}", flush=True)

    metrics = runlog.MetricsLog(run_dir, tensorboard=recipe.log.tensorboard) if world.is_main else runlog.NullLog()
    if not resuming:
        metrics.text("plan", "\n".join(plan.explain()))

    def checkpoint_meta(step):
        return {
            "step": step,
            "batch_split": batch_split,
            "micro_batch": micro,
            "data_position": step * batch_split,  # global micro-batches consumed
            "world": world.size,
            "seed": tcfg.seed,
            "model": models.model_config(net),
            "class_names": list(dataset.class_names),
            "recipe": recipe.name,
            "plan_steps": plan.steps,
        }

    def save(step):
        path = run_dir / CKPT_DIR / f"step-{step:06d}.ckpt"
        path.parent.mkdir(exist_ok=True)
        params = {p.name: p.asnumpy() for p in model.get_parameters()}
        bad = [k for k, v in params.items() if not np.isfinite(v).all()]
        if bad:  # finite loss and gradients can still overflow the weights (a huge lr)
            raise TrainingDiverged(
                f"weights became non-finite at step {step} (e.g. {bad[0]}); {kept_checkpoint(run_dir)}; "
                "lower rule.base_lr or check the data"
            )
        if not world.is_main:
            return path
        params.update(step_fn.optimizer.state())
        checkpoint.save_checkpoint(path, params, checkpoint_meta(step))
        for old in find_checkpoints(run_dir)[: -tcfg.keep_checkpoints]:
            old.unlink()
        return path

    def run_eval(step):
        result = evaluate_split(
            eval_step, dataset.eval, plan.crop, eval_step.batch_size, num_classes, recipe.data.workers, world
        )
        metrics.log(step, result.scalars())
        state.evaluated_at = step
        progress.write(
            f"step {step}: val loss {result.loss:.4f} top-1 {100 * result.top1:.2f}% top-5 {100 * result.top5:.2f}% "
            f"({result.count} images, {result.images_per_sec:.1f} img/s)"
        )
        return result

    # --- the loop
    stream = pipeline.train_batches(
        dataset.train,
        precrop=plan.precrop,
        crop=plan.crop,
        micro_batch=micro,
        seed=tcfg.seed,
        random_crop=recipe.data.random_crop,
        random_flip=recipe.data.random_flip,
        workers=recipe.data.workers,
        start=state.step * batch_split,
        rank=world.rank,
        world=world.size,
    )
    progress = runlog.Progress(plan.steps, state.step, quiet)
    try:
        eval_every, ckpt_every = tcfg.eval_every, tcfg.checkpoint_every or tcfg.eval_every
        window_t, window_steps, train_ips = time.perf_counter(), 0, float("nan")
        last_eval, stopped, last_saved = None, None, None
        consecutive_skips = 0
        model.set_train(True)
        with StopFlag() as stop:
            while state.step < plan.steps:
                step = state.step
                lr = plan.lr(step)
                rng = np.random.default_rng([tcfg.seed, step, 1])  # MixUp randomness of this step
                lam = float(rng.beta(plan.mixup_alpha, plan.mixup_alpha)) if plan.mixup_alpha > 0 else 1.0
                batches = []
                for _ in range(batch_split):
                    x, y = next(stream)
                    if plan.mixup_alpha > 0:
                        perm = rng.permutation(len(x))
                        x, yb = (lam * x + (1.0 - lam) * x[perm]).astype(np.float32), y[perm]
                    else:
                        yb = y
                    batches.append((x, y, yb))
                loss, applied = step_fn(batches, lr, lam)
                if world.size > 1:  # log the loss of the whole logical batch
                    loss = float(distributed.all_reduce_sum(np.array([loss]))[0]) / world.size
                if not math.isfinite(loss) or not applied:
                    # fp16: an overflow skips this update (the loss scale was halved) and training moves
                    # on, as with PyTorch's GradScaler; the data position stays step * batch_split.
                    consecutive_skips += 1
                    if tcfg.precision != "fp16" or consecutive_skips >= 10:
                        raise TrainingDiverged(
                            f"loss became {loss} at step {step} (lr {lr:g}); the update was not applied and "
                            f"{kept_checkpoint(run_dir)}; lower rule.base_lr or check the data"
                        )
                else:
                    consecutive_skips = 0
                state.step = step = step + 1
                window_steps += 1

                if step % recipe.log.every == 0 or step == plan.steps:
                    now = time.perf_counter()
                    train_ips = window_steps * plan.batch_size / (now - window_t)
                    window_t, window_steps = now, 0
                    metrics.log(step, {"train/loss": loss, "train/lr": lr, "train/images_per_sec": train_ips})
                    eta = (plan.steps - step) * plan.batch_size / train_ips
                    progress.update(step, loss, lr, train_ips, eta, force_line=True)
                else:
                    progress.update(step, loss, lr, train_ips)

                if world.size > 1:  # a signal reaches the ranks at different steps: stop them together
                    stop.signal = stop.signal or (signal.SIGTERM if distributed.all_reduce_sum(np.array([bool(stop)]))[0] else None)
                if stop or (stop_after is not None and step >= stop_after and step < plan.steps):
                    stopped = signal.Signals(stop.signal).name if stop else f"--stop-after {stop_after}"
                    progress.write(f"{stopped}: stopping after step {step}")
                    break
                if eval_every and step % eval_every == 0 and step < plan.steps:
                    last_eval = run_eval(step)
                    model.set_train(True)
                if ckpt_every and step % ckpt_every == 0 and step < plan.steps:
                    last_saved = save(step)

        # --- the end: checkpoint, final evaluation, metrics.json
        last_saved = save(state.step)
        if state.evaluated_at != state.step:
            last_eval = run_eval(state.step)
        from bit_transfer.evaluate import save_report

        if world.is_main:
            save_report(last_eval, list(dataset.class_names), run_dir / "eval")
        final = {
            "top1": last_eval.top1,
            "top5": last_eval.top5,
            "loss": last_eval.loss,
            "steps": state.step,
            "planned_steps": plan.steps,
            "completed": state.step >= plan.steps,
            "stopped_by_signal": bool(stopped) and stopped.startswith("SIG"),
            "stopped_early": bool(stopped),
            "images_per_sec": train_ips,
            "eval_images_per_sec": last_eval.images_per_sec,
            "eval_images": last_eval.count,
            "seconds": time.time() - t_start,
            "device": device,
            "world": world.size,
            "checkpoint": str(last_saved),
        }
        if world.is_main:
            runlog.write_json(run_dir / "metrics.json", final)
        metrics.hparams(
            {k: v for k, v in plan.to_dict().items() if k != "decisions"} | {"model": recipe.model.name, "batch_split": batch_split},
            {"top1": last_eval.top1, "top5": last_eval.top5, "loss": last_eval.loss},
        )
        status = "stopped early; rerun the same command to resume" if stopped else "done"
        say(
            f"{status}: top-1 {100 * last_eval.top1:.2f}% top-5 {100 * last_eval.top5:.2f}% after {state.step} steps "
            f"({final['seconds']:.0f} s). Curves: tensorboard --logdir {run_dir.parent}",
            flush=True,
        )
        return final
    finally:
        progress.close()
        metrics.close()


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


def _probe(model, micro: int, crop: int, num_classes: int, tcfg) -> None:
    """Run one compiled micro-step at this size (for batch_split auto); raises when it does not fit."""
    from bit_transfer.step import TrainStep

    probe = TrainStep(model, momentum=0.0, weight_decay=0.0, batch_split=2, precision=tcfg.precision, jit=tcfg.jit)
    probe.gradients_only(np.zeros((micro, 3, crop, crop), np.float32), np.zeros((micro,), np.int32))
