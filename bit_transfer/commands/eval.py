"""`bit-transfer eval`: a checkpoint (or a run's latest) on a recipe's eval split.

Results go to a directory of their own, never over what `fit` wrote: `--out DIR`, else
`<run>/evals/<checkpoint>-<recipe>/` for a checkpoint of a run, else `<log.dir>/<recipe>-eval-<time>`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bit_transfer.hyperrule import planning
from bit_transfer.config import recipe as recipes
from bit_transfer.system import device as runtime
from bit_transfer.errors import DataError


def eval_checkpoint(recipe: recipes.Recipe, checkpoint_path: str | Path, *, out_dir: str | Path | None = None) -> dict:
    """`bit-transfer eval`: evaluate a checkpoint (or the latest of a run dir) on the recipe's eval split.

    Writes metrics.json, per_class.json and confusion.json (+ .png) to the output directory (module
    docstring) and returns the metrics.
    """
    from bit_transfer import data, models
    from bit_transfer.run import checkpoint
    from bit_transfer.system import compile_cache
    from bit_transfer.engine.metrics import evaluate_split
    from bit_transfer.system import memory
    from bit_transfer.models.inference import fold
    from bit_transfer.run.rundir import RunDir
    from bit_transfer.engine.step import EvalStep

    path, run = checkpoint.find_checkpoint(checkpoint_path, command="eval --checkpoint")  # a .ckpt, or a run's latest
    # a file, someone's directory, a run or a read-only place: refused before the work
    out = RunDir.claim(output_dir(recipe, path, run, out_dir), kind="eval", flag="--out")
    try:
        device = runtime.setup(recipe.train.device, jit=recipe.train.jit, device_id=recipe.train.device_id)
        # architecture, padding, head and the checkpoint's meta, from one read of the file
        model, report = models.create_model_from_weights(path)
        meta = report.meta
        dataset = data.load(recipe.data)
        num_classes = model.num_classes
        if num_classes != dataset.num_classes:
            raise DataError(
                f"{path} was trained for {num_classes} classes but the recipe's data has {dataset.num_classes}; "
                "evaluate it on the data it was trained for"
            )
        check_class_names(path, meta.get("class_names"), list(dataset.class_names))
        info = planning.task_info(recipe)
        plan = planning.make_plan(recipe, info)
        micro = recipe.train.eval_batch_size or int(meta.get("micro_batch") or 32)
        memory.check_batch(model.depths, model.width, plan.crop, micro,  # EvalStep pads every batch to micro
                           batch_fix="--set train.eval_batch_size={n}", size_fix="rule.crop")
        net = fold(model)  # weight standardisation computed once: plain convolutions
        del model  # the folded copy is all evaluation needs
        step = EvalStep(net, micro, jit=recipe.train.jit,
                        compile_cache=compile_cache.enabled(device, recipe.train.jit, 1))
        result = evaluate_split(step, dataset.eval, plan.crop, micro, num_classes, recipe.data.workers)
        fields = {"checkpoint": str(path), "step": meta.get("step"), "recipe": recipe.name, "crop": plan.crop,
                  "device": device}
        again = out.replaced_note()  # a rerun into its own directory replaces its results, and says so
        final = out.write_final(result, list(dataset.class_names), fields, report_dir="")
    except BaseException:
        if out.created:  # nothing was evaluated: leave no empty directory behind
            shutil.rmtree(out.path, ignore_errors=True)
        raise
    print(f"{path}: top-1 {100 * result.top1:.2f}% top-5 {100 * result.top5:.2f}% loss {result.loss:.4f} "
          f"on {result.count} images")
    print(f"wrote metrics.json, per_class.json and confusion.json to {out.path}{again}")
    return final


def output_dir(recipe: recipes.Recipe, ckpt: Path, run: Path, out_dir) -> Path:
    """--out; else `<run>/evals/<checkpoint>-<recipe>` inside the checkpoint's run; else a new directory."""
    from bit_transfer.run.rundir import is_run, new_run_path

    if out_dir:
        return Path(out_dir).expanduser()
    if is_run(run):
        return run / "evals" / f"{ckpt.stem}-{safe_name(recipe.name)}"
    return new_run_path(recipe.log.dir, f"{safe_name(recipe.name)}-eval")


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(name)) or "recipe"


def check_class_names(path: Path, trained: list | None, data: list[str]) -> None:
    """Refuse data whose classes are named (or ordered) differently from the checkpoint's.

    A checkpoint without class names (older, or not from fit) is evaluated as it is.
    """
    if not trained:
        return
    trained = [str(n) for n in trained]
    data = [str(n) for n in data]
    if trained == data:
        return
    same = sorted(trained) == sorted(data)
    order = " (the same classes in another order: its labels would be misread)" if same else ""
    if len(trained) <= 6 and len(data) <= 6:
        differ = f"checkpoint classes {trained} differ from the data's {data}"
    else:
        diffs = [i for i, (a, b) in enumerate(zip(trained, data)) if a != b]
        shown = ", ".join(f"#{i} {trained[i]!r} vs {data[i]!r}" for i in diffs[:3])
        differ = (f"checkpoint classes differ from the data's at {len(diffs)} of {len(data)} positions "
                  f"(checkpoint vs data: {shown}{', ...' if len(diffs) > 3 else ''})")
    raise DataError(f"{path}: {differ}{order}; evaluate it on the data it was trained for")
