"""`bit-transfer predict MODEL INPUT... | --recipe RECIPE`: every refusal before any image is decoded
(`_prepare`), then the table or --out file, the summary line and, for labelled images, eval's report.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bit_transfer.data.split import Split
from bit_transfer.errors import DataError, UsageError
from bit_transfer.predict.inputs import collect_inputs, files_split, label_folders
from bit_transfer.predict.model import LoadedModel, load_model
from bit_transfer.predict.output import OutFile, Table
from bit_transfer.predict.running import Unreadable, best_k, stream


def predict_command(args) -> int:
    """`bit-transfer predict MODEL INPUT... | --recipe RECIPE` (cli.py's arguments)."""
    if args.recipe and args.inputs:
        raise UsageError("give INPUT images or --recipe RECIPE, not both")
    if not args.recipe and not args.inputs:
        raise UsageError("predict needs INPUT images (files, directories, glob patterns, or - for paths on stdin) "
                         "or --recipe RECIPE for a recipe's eval split")
    out = OutFile(args.out, args.overwrite) if args.out else None  # refused before any work
    try:
        job = _prepare(args)
        _run(job, args, out)
    except BaseException:
        if out:
            out.abort()
        raise
    return 0


@dataclass
class _Job:
    model: LoadedModel
    split: Split  # labels = positions
    labels: np.ndarray | None  # model class per position, when labelled
    labelled_by: str
    class_names: list[str]
    report: object = None  # RunDir of the labelled case
    workers: int | None = None
    notes: list[str] = field(default_factory=list)


def _prepare(args) -> _Job:
    """The model, the images and their labels, and the report directory: every one-line refusal
    happens here, before a single image is decoded."""
    if args.recipe:
        return _prepare_recipe(args)
    inputs = collect_inputs(args.inputs)  # a missing path fails before the model loads
    model = load_model(args.model, image_size=args.image_size, batch_size=args.batch_size, device=args.device)
    inputs = label_folders(inputs, model.class_names)
    split = files_split(inputs.paths, inputs.folders[0][0] if len(inputs.folders) == 1 else "inputs")
    _check_memory(model, len(split))
    job = _Job(model, split, inputs.labels, inputs.labelled_by, model.names, workers=args.workers, notes=inputs.notes)
    if job.labels is not None:
        job.report = _claim_report(args.report, model, inputs.name, "runs")
    elif args.report:
        job.notes.append("--report was not written: the images carry no labels (no class folders)")
    return job


def _prepare_recipe(args) -> _Job:
    from bit_transfer import data
    from bit_transfer.hyperrule import planning
    from bit_transfer.config import recipe as recipes
    from bit_transfer.commands.eval import check_class_names

    r = recipes.load(args.recipe)

    def rule_crop() -> tuple[int, str]:
        return planning.make_plan(r, planning.task_info(r)).crop, f"the rule's crop for {r.name}'s data"

    batch = args.batch_size or r.train.eval_batch_size
    model = load_model(args.model, image_size=args.image_size, batch_size=batch, device=args.device,
                       fallback_size=rule_crop)
    dataset = data.load(r.data)
    if model.num_classes != dataset.num_classes:
        raise DataError(f"{model.source} has {model.num_classes} classes but {r.name}'s data has "
                        f"{dataset.num_classes}; predict with a model trained for it")
    check_class_names(Path(model.source), model.class_names, list(dataset.class_names))
    ev = dataset.eval
    split = Split(ev.store, ev.rows, np.arange(len(ev)), ev.name, skip_corrupt=True)
    _check_memory(model, len(split))
    job = _Job(model, split, ev.labels, f"{r.name}'s eval split", list(dataset.class_names),
               workers=args.workers or r.data.workers)
    job.report = _claim_report(args.report, model, r.name, r.log.dir)
    return job


def _check_memory(model: LoadedModel, images: int) -> None:
    """A batch that cannot fit in memory at this size is refused in one line, before any image is decoded."""
    from bit_transfer.system import memory

    if model.arch is not None:
        batch = max(1, min(model.batch_size, images))  # what `stream` runs
        memory.check_batch(*model.arch, model.image_size, batch, batch_fix="--batch-size {n}", size_fix="--image-size")


def _claim_report(report_dir, model: LoadedModel, name: str, parent: str):
    """--report, else `<run>/evals/<checkpoint>-predict-<name>` for a run's checkpoint (a run that is
    not writable, e.g. shared read-only, is not written to), else a new `<parent>/predict-<name>-<time>`;
    claimed like eval's directory (never someone's files)."""
    from bit_transfer.commands.eval import safe_name
    from bit_transfer.run.rundir import RunDir, is_run, new_run_path

    if report_dir:
        path = Path(report_dir).expanduser()
    elif model.run is not None and is_run(model.run) and os.access(model.run, os.W_OK):
        path = model.run / "evals" / f"{model.checkpoint.stem}-predict-{safe_name(name)}"
    else:
        path = new_run_path(parent, f"predict-{safe_name(name)}")
    return RunDir.claim(path, kind="eval", flag="--report")


def _run(job: _Job, args, out: OutFile | None) -> None:
    import shutil

    from tqdm import tqdm

    split, model = job.split, job.model
    k = min(args.top_k, model.num_classes)
    show_table = out is None and not args.quiet
    bar = tqdm(total=len(split), unit="img", file=sys.stderr, dynamic_ncols=True, leave=False,
               disable=True if args.quiet or len(split) <= model.batch_size else None)
    table = Table(split, model.names, k) if show_table else None
    unreadable = Unreadable(split, args.strict, lambda s: bar.write(s, file=sys.stderr))
    done = 0
    start = time.perf_counter()

    def emit(pos: np.ndarray, logits: np.ndarray) -> np.ndarray:
        nonlocal done
        idx, probs = best_k(logits, k)
        for p, ii, pp in zip(pos, idx, probs):
            names, values = [model.names[i] for i in ii], [float(x) for x in pp]
            if out:
                out.write(split.where(int(p)), names, values)
            if table:
                bar.write(table.row(split.where(int(p)), names, values), file=sys.stdout)
        done += len(pos)
        bar.update(len(pos))
        return logits

    try:
        if table:
            bar.write(table.header(), file=sys.stdout)
        batches = stream(model, split, unreadable, job.workers)
        if job.labels is not None:
            from bit_transfer.engine.metrics import evaluate

            try:
                result = evaluate(lambda z: z, ((emit(p, z), job.labels[p]) for p, z in batches), model.num_classes)
            except ValueError:  # nothing was readable
                result = None
        else:
            for p, z in batches:
                emit(p, z)
            result = None
    except BaseException:
        if job.report is not None and job.report.created:
            shutil.rmtree(job.report.path, ignore_errors=True)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if not done:
        raise DataError(f"none of the {len(split)} images could be read (each named above); nothing to predict")
    if out:
        out.commit()
    _summary(job, args, out, result, done, len(unreadable.positions), seconds)


def _summary(job: _Job, args, out, result, done: int, skipped: int, seconds: float) -> None:
    model = job.model
    rate = done / max(seconds, 1e-9)
    size = f"{model.image_size}x{model.image_size} px ({model.size_from})"
    skip = f"; {skipped} unreadable file{'s' if skipped != 1 else ''} skipped (named above)" if skipped else ""
    print(f"predicted {done} image{'s' if done != 1 else ''} in {seconds:.1f} s ({rate:.1f} images/s) with "
          f"{model.source} at {size}{skip}")
    for note in job.notes:
        print(f"note: {note}")
    if out:
        print(f"wrote {done} prediction{'s' if done != 1 else ''} to {out.path}")
    if result is not None:
        fields = {"model": model.source, "inputs": job.labelled_by, "crop": model.image_size,
                  "skipped_unreadable": skipped}
        if model.checkpoint is not None:
            fields["checkpoint"] = str(model.checkpoint)
        again = job.report.replaced_note()  # a rerun into its own report directory replaces it, and says so
        job.report.write_final(result, job.class_names, fields, report_dir="")
        print(f"top-1 {100 * result.top1:.2f}% top-5 {100 * result.top5:.2f}% loss {result.loss:.4f} on "
              f"{result.count} images labelled by {job.labelled_by}")
        print(f"wrote metrics.json, per_class.json and confusion.json to {job.report.path}{again}")
