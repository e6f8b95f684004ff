"""From a recipe to a plan: what the data says, what the rule decides, how a batch is split.

No MindSpore import here: `bit-transfer plan` must start fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bit_transfer.hyperrule import rule as hyperrule
from bit_transfer.errors import RecipeError
from bit_transfer.data.measure import DataInfo  # what the rule needs from the data (no MindSpore)
from bit_transfer.config.recipe import Recipe


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").split("/")[-1]


def task_info(recipe: Recipe) -> DataInfo:
    """Training-set size and image resolution: from the recipe when stated, else measured."""
    d = recipe.data
    source_of = {}
    if d.size is not None:
        source_of["dataset_size"] = "recipe: data.size"
    if d.image_size is not None:
        source_of["image_size"] = "recipe: data.image_size"
    elif d.source == "hf" and d.name and _normalise(d.name) in hyperrule.KNOWN_IMAGE_SIZES:
        d = dataclasses.replace(d, image_size=hyperrule.KNOWN_IMAGE_SIZES[_normalise(d.name)])
        source_of["image_size"] = f"known size of {d.name}"
    if d.size is not None and d.image_size is not None:
        if d.examples_per_class is not None:
            raise RecipeError(
                "data.size is set together with data.examples_per_class; drop data.size so the rule "
                "sees the few-shot subset's size"
            )
        return DataInfo(d.size, tuple(d.image_size), source_of=source_of)
    from bit_transfer import data  # measuring needs the data stack; imported only when needed

    info = data.describe(d)
    merged = dict(info.source_of)
    merged.update(source_of)
    return DataInfo(
        dataset_size=info.dataset_size,
        image_size=tuple(info.image_size),
        num_classes=info.num_classes,
        class_names=list(info.class_names) if info.class_names is not None else None,
        source_of=merged,
    )


def make_plan(recipe: Recipe, info: DataInfo) -> hyperrule.Plan:
    r, t = recipe.rule, recipe.train
    try:
        return hyperrule.plan(
            dataset_size=info.dataset_size,
            image_size=info.image_size,
            precrop=r.precrop,
            crop=r.crop,
            steps=r.steps,
            schedule=r.schedule,
            mixup_alpha=r.mixup_alpha,
            base_lr=r.base_lr,
            batch_size=t.batch_size,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            batch_scaling=r.batch_scaling,
        )
    except ValueError as e:
        raise RecipeError(f"the rule cannot be applied: {e}") from None


def same_plan(saved: dict, now: Recipe) -> bool:
    """Do a run's saved recipe and this one give the same plan? `rule.steps: null` and the 500 the rule
    gives are two spellings of one recipe, not two recipes (a resume compares what the rule resolves)."""
    from bit_transfer.errors import UsageError
    from bit_transfer.config.recipe import from_dict

    try:
        info = task_info(now)  # the data is the same: its keys may not change on a resume
        before, after = make_plan(from_dict(saved), info).to_dict(), make_plan(now, info).to_dict()
    except UsageError:  # what cannot be planned is not the same plan; fit says why later
        return False
    before.pop("decisions"), after.pop("decisions")  # where a value came from: the spelling
    return before == after


@dataclass(frozen=True)
class BatchLayout:
    """logical batch = world (ranks) x batch_split (accumulated micro-batches) x micro_batch."""

    batch_size: int
    batch_split: int | str  # "auto" until the training loop has probed the device
    world: int = 1

    @property
    def micro_batch(self) -> int | None:
        if self.batch_split == "auto":
            return None
        return self.batch_size // (self.world * self.batch_split)

    def describe(self) -> str:
        ranks = f"{self.world} ranks x " if self.world > 1 else ""
        if self.batch_split == "auto":
            return f"{self.batch_size} = {ranks}auto (largest micro-batch that fits, chosen at start)"
        micro = "micro-batch" if self.batch_split == 1 else "micro-batches"
        return f"{self.batch_size} = {ranks}{self.batch_split} {micro} x {self.micro_batch} images"


def batch_layout(batch_size: int, batch_split: int | str, world: int = 1) -> BatchLayout:
    if world < 1:  # the CLI refuses --devices/--nodes below 1; this guards other callers
        raise RecipeError(f"{world} ranks cannot train; use --devices and --nodes of at least 1")
    per_rank, rem = divmod(batch_size, world)
    if rem:
        raise RecipeError(f"batch {batch_size} does not split evenly over {world} ranks; use a device count that divides it")
    if batch_split != "auto":
        if per_rank % batch_split:
            raise RecipeError(
                f"batch {batch_size} does not split into {world} rank(s) x {batch_split} micro-batches; "
                f"choose train.batch_split dividing {batch_size // max(world, 1)}"
            )
    return BatchLayout(batch_size, batch_split, world)


def lr_segments(plan: hyperrule.Plan) -> list[tuple[int, int, str]]:
    """The schedule as (first step, last step, lr) ranges: warmup, then each constant stretch.

    The lr changes only at the step after a boundary, so the ranges come from the boundaries alone:
    O(boundaries), not O(steps) (`plan --set rule.steps=1000000000` answers at once).
    """
    out = [(0, plan.warmup_steps - 1, f"warmup 0 -> {plan.base_lr:g}")] if plan.warmup_steps > 0 else []
    starts = sorted({plan.warmup_steps, *(b + 1 for b in plan.schedule[1:])})
    starts = [s for s in starts if plan.warmup_steps <= s < plan.steps]
    for start, end in zip(starts, [*starts[1:], plan.steps]):  # each start passes one more boundary
        out.append((start, end - 1, f"{plan.lr(start):g}"))
    return out


def plan_report(recipe: Recipe, info: DataInfo, plan: hyperrule.Plan, layout: BatchLayout) -> str:
    """The human-readable `bit-transfer plan` output."""
    lines = [f"recipe        {recipe.path or recipe.name} ({recipe.name})"]
    for k in ("dataset_size", "image_size"):
        if k in info.source_of:
            lines.append(f"{k:<13} {info.source_of[k]}")
    if info.num_classes:
        lines.append(f"classes       {info.num_classes}")
    lines += ["", "BiT-HyperRule decisions (value [origin] reason):"]
    lines += ["  " + line for line in plan.explain()]
    lines += ["", "learning rate by step:"]
    w = max(6, len(str(plan.steps - 1)))
    lines += [f"  {a:>{w}} - {b:<{w}} {lr}" for a, b, lr in lr_segments(plan)]
    lines += ["", f"batch         {layout.describe()}"]
    lines += [f"trainable     {describe_trainable(trainable(recipe, info))}"]
    return "\n".join(lines)


def trainable(recipe: Recipe, info: DataInfo) -> dict:
    """What `train.freeze` leaves to train: {freeze, trainable, total} parameter counts (the head's
    size needs the class count; without it both counts leave the head out and `head_counted` says so)."""
    from bit_transfer.models.archs import MODELS, canonical_name, frozen_parts, parameter_counts
    from bit_transfer.config.recipe import frozen_part

    m = recipe.model
    depths, width = MODELS.get(canonical_name(m.name), (None, None))
    depths = m.depths if m.depths is not None else depths
    width = m.width if m.width is not None else width
    counts = parameter_counts(depths, width, info.num_classes)
    freeze = frozen_part(recipe.train)
    frozen = sum(counts[p] for p in frozen_parts(freeze))
    total = sum(counts.values())
    return {"freeze": freeze, "trainable": total - frozen, "total": total, "head_counted": bool(info.num_classes)}


def describe_trainable(t: dict) -> str:
    head = "" if t["head_counted"] else " (without the head: the class count is not known yet)"
    return f"{t['trainable']:,} of {t['total']:,} parameters (train.freeze {t['freeze']}){head}"


def plan_json(info: DataInfo, plan: hyperrule.Plan, layout: BatchLayout) -> dict:
    out = plan.to_dict()
    out.update(
        batch_split=layout.batch_split,
        micro_batch=layout.micro_batch,
        world=layout.world,
        num_classes=info.num_classes,
        source_of=info.source_of,
    )
    return out
