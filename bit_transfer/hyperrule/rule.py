"""The BiT-HyperRule: decide resolution, schedule, steps and MixUp from a task's size and resolution.

Pure Python on purpose (no MindSpore import): `bit-transfer plan` must start fast.

The numbers are those of the authors' code, `google-research/big_transfer/bit_hyperrule.py`,
which produced every published result (see ../shared/bit-facts.md):

- resolution: (160, 128) if H*W < 96*96 else (512, 480)   (the paper text says 448/384; the code 512/480)
- schedule: N < 20k -> [100, 200, 300, 400, 500]; N < 500k -> [500, 3k, 6k, 9k, 10k];
  else [500, 6k, 12k, 18k, 20k]; the last boundary is the step count
- lr: linear warmup over boundaries[0], then x0.1 after each later boundary it has passed
- MixUp alpha: 0.0 if N < 20k else 0.1
- SGD momentum 0.9, base lr 0.003, batch 512, no weight decay

Every decision can be overridden; the plan records, per value, whether the rule or the user
chose it and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bit_transfer.config.converters import MAX_STEPS

BASE_LR = 0.003
BATCH_SIZE = 512
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0

SMALL_IMAGE_AREA = 96 * 96
SMALL_RESOLUTION = (160, 128)
LARGE_RESOLUTION = (512, 480)

SMALL_TASK, MEDIUM_TASK = 20_000, 500_000
SCHEDULES = {
    "small": (100, 200, 300, 400, 500),
    "medium": (500, 3000, 6000, 9000, 10_000),
    "large": (500, 6000, 12_000, 18_000, 20_000),
}
MIXUP_SMALL, MIXUP_LARGE = 0.0, 0.1

# Bounds on what a recipe may ask for (config/converters.py): far beyond any real run (the paper's longest
# is 20 000 steps of batch 512 at 480 px), so a value above one is a typo, refused in one line.

BATCH_SCALINGS = ("none", "linear")

# Resolutions of well-known datasets: a shortcut only; any dataset's resolution can be measured.
KNOWN_IMAGE_SIZES = {
    "cifar10": (32, 32),
    "cifar100": (32, 32),
    "oxford_iiit_pet": (224, 224),
    "oxford_flowers102": (224, 224),
    "imagenet2012": (224, 224),
}


def _n(x: float) -> str:
    """20000 -> '20 000' (the thin spacing the paper's tables use)."""
    if float(x).is_integer():
        return f"{int(x):,}".replace(",", " ")
    return f"{x:g}"


@dataclass(frozen=True)
class Decision:
    """Where one value of the plan came from: 'rule', 'user' or 'scaled' (opt-in batch scaling)."""

    origin: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """The hyper-parameters of one fine-tuning run; `lr(step)` is the schedule."""

    dataset_size: int
    image_size: tuple[int, int]
    precrop: int
    crop: int
    schedule: tuple[int, ...]
    mixup_alpha: float
    base_lr: float
    batch_size: int
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    batch_scaling: str = "none"
    decisions: dict[str, Decision] = field(default_factory=dict, compare=False)

    @property
    def steps(self) -> int:
        return self.schedule[-1]

    @property
    def warmup_steps(self) -> int:
        return self.schedule[0]

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based), as `bit_hyperrule.get_lr` computes it."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} is outside the schedule [0, {self.steps})")
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        decays = sum(1 for b in self.schedule[1:] if b < step)
        return self.base_lr / 10**decays

    def lrs(self) -> list[float]:
        """The whole schedule, one value per step (what the training loop feeds the optimizer)."""
        return [self.lr(s) for s in range(self.steps)]

    def explain(self) -> list[str]:
        """One line per decision: value, origin and reason."""
        return [f"{k:<13} {_fmt(getattr(self, k))!s:<20} [{d.origin}] {d.reason}" for k, d in self.decisions.items()]

    def to_dict(self) -> dict:
        return {
            "dataset_size": self.dataset_size,
            "image_size": list(self.image_size),
            "precrop": self.precrop,
            "crop": self.crop,
            "steps": self.steps,
            "schedule": list(self.schedule),
            "warmup_steps": self.warmup_steps,
            "mixup_alpha": self.mixup_alpha,
            "base_lr": self.base_lr,
            "batch_size": self.batch_size,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "batch_scaling": self.batch_scaling,
            "decisions": {k: {"origin": d.origin, "reason": d.reason} for k, d in self.decisions.items()},
        }


def _fmt(v):
    if isinstance(v, tuple) and len(v) == 2:  # image size
        return "x".join(map(str, v))
    if isinstance(v, tuple):
        return "[" + ", ".join(_n(x) for x in v) + "]"
    if isinstance(v, int):
        return _n(v)
    return v


def rule_resolution(image_size: tuple[int, int]) -> tuple[tuple[int, int], str]:
    h, w = image_size
    if h * w < SMALL_IMAGE_AREA:
        return SMALL_RESOLUTION, f"{h}x{w} < 96x96 -> small images"
    return LARGE_RESOLUTION, f"{h}x{w} >= 96x96 -> large images"


def rule_schedule(dataset_size: int) -> tuple[tuple[int, ...], str]:
    n = _n(dataset_size)
    if dataset_size < SMALL_TASK:
        return SCHEDULES["small"], f"N={n} < {_n(SMALL_TASK)} -> {_n(SCHEDULES['small'][-1])} steps"
    if dataset_size < MEDIUM_TASK:
        return SCHEDULES["medium"], f"N={n} < {_n(MEDIUM_TASK)} -> {_n(SCHEDULES['medium'][-1])} steps"
    return SCHEDULES["large"], f"N={n} >= {_n(MEDIUM_TASK)} -> {_n(SCHEDULES['large'][-1])} steps"


def rule_mixup(dataset_size: int) -> tuple[float, str]:
    if dataset_size < SMALL_TASK:
        return MIXUP_SMALL, f"N={_n(dataset_size)} < {_n(SMALL_TASK)} -> no MixUp"
    return MIXUP_LARGE, f"N={_n(dataset_size)} >= {_n(SMALL_TASK)} -> MixUp alpha 0.1"


def stretch_schedule(schedule: tuple[int, ...], steps: int) -> tuple[int, ...]:
    """Rescale boundaries to a new step count, keeping their proportions (warmup at least 1 step)."""
    old = schedule[-1]
    out = [max(1, round(b * steps / old)) for b in schedule[:-1]] + [steps]
    for i in range(1, len(out)):  # keep them non-decreasing after rounding
        out[i] = max(out[i], out[i - 1])
    return tuple(out)


def _schedule(n: int, steps, schedule, scale: float, batch_size: int) -> tuple[tuple[int, ...], Decision]:
    """The lr boundaries: the user's schedule, the rule's stretched to `steps`, scaled, or the rule's."""
    rule_sched, why = rule_schedule(n)
    if schedule is not None:
        sched = tuple(int(b) for b in schedule)
        if len(sched) < 2 or any(b <= 0 for b in sched) or list(sched) != sorted(sched):
            raise ValueError(f"schedule must be >= 2 increasing positive steps, got {list(schedule)}")
        if steps is not None and steps != sched[-1]:
            raise ValueError(f"steps {steps} disagrees with the schedule's last boundary {sched[-1]}")
        return sched, Decision("user", f"rule.schedule (rule: {list(rule_sched)})")
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return (stretch_schedule(rule_sched, int(steps)),
                Decision("user", f"rule.steps={_n(steps)}; rule boundaries {list(rule_sched)} stretched"))
    if scale != 1.0:
        return (stretch_schedule(rule_sched, max(1, math.ceil(rule_sched[-1] / scale))),
                Decision("scaled", f"{why}; x512/{batch_size} for batch_scaling=linear"))
    return rule_sched, Decision("rule", why)


def _bounded(sched: tuple[int, ...]) -> tuple[int, ...]:
    if sched[-1] > MAX_STEPS:
        raise ValueError(f"{_n(sched[-1])} steps is more than any run can mean (at most {_n(MAX_STEPS)}); "
                         "lower rule.steps or rule.schedule")
    return sched


def _base_lr(base_lr, scale: float, batch_size: int) -> tuple[float, Decision]:
    if base_lr is not None:
        return base_lr, Decision("user", f"rule.base_lr (rule: {BASE_LR})")
    if scale != 1.0:
        return BASE_LR * scale, Decision("scaled", f"{BASE_LR} x {batch_size}/512 for batch_scaling=linear")
    return BASE_LR, Decision("rule", f"the paper's base lr {BASE_LR}")


def _checked_task(dataset_size, image_size, batch_scaling: str) -> tuple[int, tuple[int, int]]:
    if int(dataset_size) < 1:
        raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
    h, w = (int(image_size[0]), int(image_size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if batch_scaling not in BATCH_SCALINGS:
        raise ValueError(f"batch_scaling must be one of {BATCH_SCALINGS}, got {batch_scaling!r}")
    return int(dataset_size), (h, w)


def _resolution(image_size, precrop, crop, d: dict) -> tuple[int, int]:
    """(precrop, crop): the rule's for this image size, or the recipe's; their decisions into `d`."""
    (rule_pre, rule_crop), why = rule_resolution(image_size)
    if precrop is None:
        precrop, d["precrop"] = rule_pre, Decision("rule", why)
    else:
        d["precrop"] = Decision("user", f"rule.precrop (rule: {rule_pre})")
    if crop is None:
        crop, d["crop"] = rule_crop, Decision("rule", why)
    else:
        d["crop"] = Decision("user", f"rule.crop (rule: {rule_crop})")
    if crop > precrop:
        raise ValueError(f"crop {crop} is larger than precrop {precrop}; set rule.crop <= rule.precrop")
    return precrop, crop


def plan(
    dataset_size: int,
    image_size: tuple[int, int],
    *,
    precrop: int | None = None,
    crop: int | None = None,
    steps: int | None = None,
    schedule: list[int] | tuple[int, ...] | None = None,
    mixup_alpha: float | None = None,
    base_lr: float | None = None,
    batch_size: int | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    batch_scaling: str = "none",
) -> Plan:
    """Apply the BiT-HyperRule to a task; every keyword left as None is decided by the rule.

    `batch_scaling="linear"` (opt-in) adapts the rule to a batch size B != 512: base lr x B/512 and
    every schedule boundary x 512/B, i.e. the same number of epochs (the linear scaling rule of
    Goyal et al. 2017). The default, "none", keeps the paper's numbers for any batch size, as the
    official README did for its batch-128 CIFAR runs (lr given explicitly, steps unchanged).
    """
    n, (h, w) = _checked_task(dataset_size, image_size, batch_scaling)
    d: dict[str, Decision] = {"dataset_size": Decision("data", f"{_n(n)} training images"),
                              "image_size": Decision("data", f"{h}x{w}")}
    precrop, crop = _resolution((h, w), precrop, crop, d)

    if batch_size is None:
        batch_size, d["batch_size"] = BATCH_SIZE, Decision("rule", f"the paper's batch {BATCH_SIZE}")
    else:
        d["batch_size"] = Decision("user", f"train.batch_size (rule: {BATCH_SIZE})")
    scale = batch_size / BATCH_SIZE if batch_scaling == "linear" else 1.0

    sched, d["schedule"] = _schedule(n, steps, schedule, scale, batch_size)
    sched = _bounded(sched)

    rule_alpha, why = rule_mixup(n)
    if mixup_alpha is None:
        mixup_alpha, d["mixup_alpha"] = rule_alpha, Decision("rule", why)
    else:
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0, got {mixup_alpha}")
        d["mixup_alpha"] = Decision("user", f"rule.mixup_alpha (rule: {rule_alpha})")

    base_lr, d["base_lr"] = _base_lr(base_lr, scale, batch_size)

    for key, value, default in (("momentum", momentum, MOMENTUM), ("weight_decay", weight_decay, WEIGHT_DECAY)):
        if value is None:
            d[key] = Decision("rule", f"the paper's {key.replace('_', ' ')} {default}")
        else:
            d[key] = Decision("user", f"train.{key} (rule: {default})")

    return Plan(
        dataset_size=n,
        image_size=(h, w),
        precrop=int(precrop),
        crop=int(crop),
        schedule=tuple(sched),
        mixup_alpha=float(mixup_alpha),
        base_lr=float(base_lr),
        batch_size=int(batch_size),
        momentum=MOMENTUM if momentum is None else float(momentum),
        weight_decay=WEIGHT_DECAY if weight_decay is None else float(weight_decay),
        batch_scaling=batch_scaling,
        decisions=d,
    )
