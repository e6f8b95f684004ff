"""The BiT-HyperRule must reproduce the authors' bit_hyperrule.py exactly."""

import re
import subprocess
import sys

import pytest

from bit_transfer.hyperrule.rule import plan, stretch_schedule

SMALL = (100, 200, 300, 400, 500)
MEDIUM = (500, 3000, 6000, 9000, 10000)
LARGE = (500, 6000, 12000, 18000, 20000)


@pytest.mark.parametrize(
    "n, schedule, alpha",
    [
        (1, SMALL, 0.0),
        (19_999, SMALL, 0.0),
        (20_000, MEDIUM, 0.1),
        (499_999, MEDIUM, 0.1),
        (500_000, LARGE, 0.1),
        (1_281_167, LARGE, 0.1),
    ],
)
def test_schedule_and_mixup_thresholds(n, schedule, alpha):
    p = plan(dataset_size=n, image_size=(224, 224))
    assert p.schedule == schedule
    assert p.steps == schedule[-1]
    assert p.mixup_alpha == alpha
    assert (p.base_lr, p.batch_size, p.momentum, p.weight_decay) == (0.003, 512, 0.9, 0.0)


@pytest.mark.parametrize(
    "hw, res",
    [
        ((32, 32), (160, 128)),
        ((95, 96), (160, 128)),  # 9120 < 9216
        ((96, 95), (160, 128)),
        ((96, 96), (512, 480)),  # == 96*96 is not "<"
        ((1, 9216), (512, 480)),
        ((97, 97), (512, 480)),
        ((500, 375), (512, 480)),
    ],
)
def test_resolution_threshold(hw, res):
    p = plan(dataset_size=1000, image_size=hw)
    assert (p.precrop, p.crop) == res


def reference_lr(step, base, b):
    """bit_hyperrule.get_lr, transcribed (google-research/big_transfer)."""
    if step < b[0]:
        return base * step / b[0]
    if step >= b[-1]:
        return None
    for s in b[1:]:
        if s < step:
            base /= 10
    return base


@pytest.mark.parametrize("n", [1000, 50_000, 1_000_000])
def test_lr_at_every_boundary_plus_minus_one(n):
    p = plan(dataset_size=n, image_size=(32, 32))
    for b in p.schedule:
        for step in (b - 1, b, b + 1):
            if step >= p.steps:
                with pytest.raises(ValueError):
                    p.lr(step)
            else:
                assert p.lr(step) == pytest.approx(reference_lr(step, 0.003, p.schedule), rel=1e-12)


def test_lr_values_medium_task():
    p = plan(dataset_size=50_000, image_size=(32, 32))
    assert p.lr(0) == 0.0
    assert p.lr(250) == pytest.approx(0.0015)
    assert p.lr(499) == pytest.approx(0.003 * 499 / 500)
    assert p.lr(500) == 0.003
    assert p.lr(3000) == 0.003  # boundaries count only when strictly passed
    assert p.lr(3001) == pytest.approx(0.0003)
    assert p.lr(9001) == pytest.approx(0.000003)
    assert p.lr(9999) == pytest.approx(0.000003)
    assert len(p.lrs()) == 10_000
    with pytest.raises(ValueError):
        p.lr(10_000)
    with pytest.raises(ValueError):
        p.lr(-1)


def test_overrides_are_recorded_with_origin():
    p = plan(dataset_size=50_000, image_size=(32, 32), precrop=40, crop=32, mixup_alpha=0.0, base_lr=0.01, batch_size=64)
    assert (p.precrop, p.crop, p.mixup_alpha, p.base_lr, p.batch_size) == (40, 32, 0.0, 0.01, 64)
    for k in ("precrop", "crop", "mixup_alpha", "base_lr", "batch_size"):
        assert p.decisions[k].origin == "user"
    assert p.decisions["schedule"].origin == "rule"
    assert "N=50 000 < 500 000 -> 10 000 steps" in p.decisions["schedule"].reason
    assert p.schedule == MEDIUM  # batch 64 without opt-in scaling keeps the paper's steps


def test_steps_override_stretches_boundaries():
    p = plan(dataset_size=1000, image_size=(32, 32), steps=200)
    assert p.schedule == (40, 80, 120, 160, 200)
    assert p.decisions["schedule"].origin == "user"
    assert stretch_schedule(SMALL, 3) == (1, 1, 2, 2, 3)


def test_explicit_schedule():
    p = plan(dataset_size=1000, image_size=(32, 32), schedule=[10, 20, 30])
    assert (p.steps, p.warmup_steps) == (30, 10)
    assert p.lr(25) == pytest.approx(0.0003)
    with pytest.raises(ValueError):
        plan(dataset_size=1000, image_size=(32, 32), schedule=[20, 10])
    with pytest.raises(ValueError):
        plan(dataset_size=1000, image_size=(32, 32), schedule=[10, 20], steps=30)


def test_linear_batch_scaling_is_opt_in():
    p = plan(dataset_size=50_000, image_size=(32, 32), batch_size=128, batch_scaling="linear")
    assert p.base_lr == pytest.approx(0.003 * 128 / 512)
    assert p.schedule == (2000, 12000, 24000, 36000, 40000)
    assert p.decisions["base_lr"].origin == "scaled"
    same = plan(dataset_size=50_000, image_size=(32, 32), batch_size=512, batch_scaling="linear")
    assert (same.base_lr, same.schedule) == (0.003, MEDIUM)


@pytest.mark.parametrize(
    "kw",
    [
        dict(dataset_size=0, image_size=(32, 32)),
        dict(dataset_size=10, image_size=(0, 32)),
        dict(dataset_size=10, image_size=(32, 32), precrop=100, crop=128),
        dict(dataset_size=10, image_size=(32, 32), mixup_alpha=-1),
        dict(dataset_size=10, image_size=(32, 32), batch_scaling="sqrt"),
    ],
)
def test_invalid_inputs(kw):
    with pytest.raises(ValueError):
        plan(**kw)


def test_explain_has_a_line_per_decision():
    lines = plan(dataset_size=1000, image_size=(500, 375)).explain()
    assert any("N=1 000 < 20 000 -> 500 steps" in line for line in lines)
    assert any(line.startswith("precrop") and "500x375 >= 96x96" in line for line in lines)
    assert len(lines) == 10


def test_importing_the_rule_does_not_import_mindspore():
    code = "import sys, bit_transfer.hyperrule.rule, bit_transfer.config.recipe, bit_transfer.hyperrule.planning; print('mindspore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_lr_segments_follow_the_boundaries_not_the_steps():
    """The `plan` table from the boundaries alone, step for step what `lr(step)` gives."""
    from bit_transfer.hyperrule.planning import lr_segments

    for sched in ([3, 3, 7, 7, 9], [1, 2], [5, 6, 7, 8], [2, 9, 9]):
        p = plan(dataset_size=1000, image_size=(32, 32), schedule=sched)
        segments = lr_segments(p)
        assert segments[0][0] == 0 and segments[-1][1] == p.steps - 1
        assert all(b + 1 == a for (_, b, _), (a, _, _) in zip(segments, segments[1:]))  # no gap, no overlap
        for a, b, lr in segments[1:]:
            assert {f"{p.lr(s):g}" for s in range(a, b + 1)} == {lr}
        assert len({lr for _, _, lr in segments[1:]}) == len(segments) - 1  # each range a new lr


def test_plan_of_a_billion_steps_answers_at_once_and_more_is_one_line(tmp_path):
    from conftest import one_line_error, run_cli

    billion = run_cli("plan", "recipes/demo.yaml", "--set", "rule.steps=1000000000", timeout=60)
    assert billion.returncode == 0, billion.stderr
    assert re.search(r"\n +800000001 - 999999999 +0.0001\n", billion.stdout), billion.stdout
    assert "batch         128 = 1 micro-batch x 128 images" in billion.stdout  # one, not "1 micro-batches"
    for flag in ("rule.steps=1e10", "rule.schedule=[10,20000000000]"):
        line = one_line_error(run_cli("plan", "recipes/demo.yaml", "--set", flag, timeout=60), "plan")
        assert "more steps than any run can mean (at most 1000000000)" in line
    line = one_line_error(run_cli("plan", "recipes/demo.yaml", "--set", "rule.crop=100000", timeout=60), "plan")
    assert "'rule.crop': 100000 is more pixels than any BiT resolution can mean" in line
    with pytest.raises(ValueError, match="at most 1 000 000 000"):
        plan(dataset_size=10, image_size=(32, 32), schedule=[10, 2 * 10**9])
