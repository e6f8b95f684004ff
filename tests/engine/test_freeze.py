"""`train.freeze`: frozen parts stay bit-identical through a real fit, the rest trains; `plan` counts
what is trainable; changing it on resume is refused."""

import json

import numpy as np
import pytest

from conftest import one_line_error, run_cli, write_recipe
from datagen import final_params, pattern_task, tiny_recipe


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pattern_task(tmp_path_factory.mktemp("patterns") / "cifar-10-batches-py", n_train=24, n_test=8)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Random tiny weights as a Hugging Face directory: what the frozen run starts from."""
    from bit_transfer.system import device as runtime
    from bit_transfer.models import create_model
    from bit_transfer.commands.export import export_hf

    runtime.seed_everything(3)
    model = create_model("custom", 4, depths=[1, 1, 1, 1], width=0.5)
    out = export_hf(model, tmp_path_factory.mktemp("start") / "hf")
    return out, {p.name: p.asnumpy().copy() for p in model.get_parameters()}


@pytest.mark.parametrize("depths,width,classes", [([1, 1, 1, 1], 0.125, 4), ([2, 1, 3, 1], 0.25, 7), ([3, 4, 6, 3], 1, 10)])
def test_counted_parameters_equal_the_model(depths, width, classes):
    from bit_transfer.models.archs import frozen_parts, parameter_counts
    from bit_transfer.models import create_model

    model = create_model("custom", classes, depths=depths, width=width)
    counts = parameter_counts(depths, width, classes)
    assert sum(counts.values()) == sum(p.size for p in model.get_parameters())
    for part in ("stem", "stage2", "stage4", "backbone"):
        model.freeze_to(part)
        trainable = sum(p.size for p in model.trainable_params())
        assert trainable == sum(counts.values()) - sum(counts[k] for k in frozen_parts(part)), part


@pytest.mark.slow
def test_frozen_parameters_are_bit_identical_after_a_fit(task, start, tmp_path):
    weights, initial = start
    r = tiny_recipe(task, tmp_path, model__width=0.5, model__weights=str(weights), rule__steps=6,
                    rule__base_lr=0.05, train__freeze="stage2")
    # stopped after 3 steps and resumed: checkpoints of a frozen run hold what resuming needs
    out = run_cli("fit", write_recipe(tmp_path / "r.yaml", r), "--run-dir", tmp_path / "run", "--stop-after", 3)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train.freeze stage2:" in out.stdout and "parameters trainable" in out.stdout
    out = run_cli("fit", tmp_path / "r.yaml", "--run-dir", tmp_path / "run")
    assert out.returncode == 0 and "resumed from step-000003.ckpt" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert json.loads((tmp_path / "run/metrics.json").read_text())["steps"] == 6
    after = final_params(tmp_path / "run")
    frozen = [k for k in initial if k.startswith(("root.", "stages.0.", "stages.1."))]
    trained = [k for k in initial if k not in frozen and not k.startswith("head.")]
    assert frozen and trained
    for k in frozen:
        assert np.array_equal(after[k], initial[k]), k
    for k in trained:
        assert not np.array_equal(after[k], initial[k]), k
    assert np.abs(after["head.weight"]).max() > 0  # the zero-initialised head learnt
    from bit_transfer.models.weights.ckpt import read_checkpoint

    params, _ = read_checkpoint(sorted((tmp_path / "run/checkpoints").glob("*.ckpt"))[-1])
    moments = {k.removeprefix("optimizer.moments.") for k in params if k.startswith("optimizer.moments.")}
    assert moments == set(trained) | {"head.weight", "head.bias"}  # no optimizer state for frozen parts

    # plan says how many parameters that run trains
    shown = run_cli("plan", tmp_path / "r.yaml", "--json")
    assert shown.returncode == 0, shown.stderr
    t = json.loads(shown.stdout)["trainable"]
    assert t["trainable"] == sum(after[k].size for k in trained) + after["head.weight"].size + after["head.bias"].size
    assert t["total"] == sum(a.size for a in after.values()) and t["freeze"] == "stage2"
    text = run_cli("plan", tmp_path / "r.yaml").stdout
    assert f"trainable     {t['trainable']:,} of {t['total']:,} parameters (train.freeze stage2)" in text

    # a resume with another train.freeze is another recipe: refused in one line, the run untouched
    line = one_line_error(run_cli("fit", tmp_path / "r.yaml", "--run-dir", tmp_path / "run",
                                  "--set", "train.freeze=stem"), "fit")
    assert "train.freeze" in line and "different recipe" in line


def test_mode_linear_is_freeze_backbone_and_conflicts_are_one_line(task, tmp_path):
    from bit_transfer.config.recipe import frozen_part

    assert frozen_part(tiny_recipe(task, tmp_path, train__mode="linear").train) == "backbone"
    assert frozen_part(tiny_recipe(task, tmp_path).train) == "none"
    p = write_recipe(tmp_path / "r.yaml", tiny_recipe(task, tmp_path))
    line = one_line_error(run_cli("plan", p, "--set", "train.mode=linear", "--set", "train.freeze=stem"), "plan")
    assert "train.freeze" in line and "train.mode" in line
    line = one_line_error(run_cli("plan", p, "--set", "train.freeze=stage5"), "plan")
    assert "stage4" in line


def test_a_run_recorded_before_train_freeze_existed_resumes():
    from bit_transfer.run.rundir import recipe_diff

    old = {"train": {"seed": 0, "mode": "finetune"}}
    assert recipe_diff(old, {"train": {"seed": 0, "mode": "finetune", "freeze": "none"}}) == []
    assert recipe_diff(old, {"train": {"seed": 0, "mode": "finetune", "freeze": "stem"}}) == ["train.freeze"]
