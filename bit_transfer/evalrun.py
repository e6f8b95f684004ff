"""`bit-transfer eval`: a checkpoint (or a run's latest) on a recipe's eval split."""

from __future__ import annotations

from pathlib import Path

from bit_transfer import planning, recipe as recipes, runlog, runtime
from bit_transfer.errors import UsageError


def eval_checkpoint(recipe: recipes.Recipe, checkpoint_path: str | Path, *, out_dir: str | Path | None = None) -> dict:
    """`bit-transfer eval`: evaluate a checkpoint (or the latest of a run dir) on the recipe's eval split."""
    from bit_transfer import checkpoint, data, models
    from bit_transfer.evaluate import evaluate_split, save_report
    from bit_transfer.step import EvalStep

    path, _ = checkpoint.find_checkpoint(checkpoint_path)  # a .ckpt, or a run's latest
    device = runtime.setup(recipe.train.device, jit=recipe.train.jit)
    # architecture, padding, head and the checkpoint's meta, from one read of the file
    model, report = models.create_model_from_weights(path)
    meta = report.meta
    dataset = data.load(recipe.data)
    num_classes = model.num_classes
    if num_classes != dataset.num_classes:
        raise UsageError(
            f"{path} was trained for {num_classes} classes but the recipe's data has {dataset.num_classes}; "
            "evaluate it on the data it was trained for"
        )
    info = planning.task_info(recipe)
    plan = planning.make_plan(recipe, info)
    micro = recipe.train.eval_batch_size or int(meta.get("micro_batch") or 32)
    result = evaluate_split(EvalStep(model, micro, jit=recipe.train.jit), dataset.eval, plan.crop, micro, num_classes, recipe.data.workers)
    out = Path(out_dir) if out_dir else path.parent.parent / "eval"
    save_report(result, list(dataset.class_names), out)
    final = {"top1": result.top1, "top5": result.top5, "loss": result.loss, "eval_images": result.count,
             "eval_images_per_sec": result.images_per_sec, "checkpoint": str(path), "device": device}
    runlog.write_json(out / "metrics.json", final)
    print(f"{path}: top-1 {100 * result.top1:.2f}% top-5 {100 * result.top5:.2f}% loss {result.loss:.4f} on {result.count} images")
    return final
