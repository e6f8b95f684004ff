"""Recipes: typed validation, one-line errors with the fix, --set overrides, the plan CLI."""

import json
import subprocess
import sys

import pytest

from bit_transfer.config import recipe
from bit_transfer.errors import RecipeError
from conftest import ROOT, run_cli

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = recipe.load(path)
    assert r.name == path.stem
    assert r.path == str(path)
    # each shipped recipe says what it reproduces in a comment at the top
    assert path.read_text().startswith("#")


def test_defaults_and_types(tmp_path):
    r = recipe.load(write(tmp_path, "data: {source: hf, name: cifar10, image_size: 32x32}\ntrain: {batch_split: auto, device: cpu}\n"))
    assert r.data.image_size == (32, 32)
    assert r.train.batch_split == "auto"
    assert r.train.device == "CPU"  # case folded
    assert r.rule.steps is None and r.rule.base_lr is None
    assert r.model.name == "BiT-M-R50x1" and r.model.weights == "auto" and r.model.head == "zero"


def test_set_overrides_are_typed_like_yaml(tmp_path):
    p = write(tmp_path, "data: {source: hf, name: cifar10}\n")
    r = recipe.load(p, ["train.batch_split=8", "rule.mixup_alpha=0.2", "model.name=custom", "model.depths=[1,1,1,1]", "model.width=0.25", "rule.steps=null", "name=exp1"])
    assert r.train.batch_split == 8
    assert r.rule.mixup_alpha == 0.2
    assert r.model.depths == [1, 1, 1, 1]
    assert r.name == "exp1"


def test_round_trip_through_dict(tmp_path):
    r = recipe.load(write(tmp_path, "data: {source: cifar, path: /x, image_size: 32x40}\nrule: {schedule: [10, 20, 30]}\n"))
    again = recipe.from_dict(r.to_dict())
    assert again.to_dict() == r.to_dict()
    assert again.data.image_size == (32, 40)


@pytest.mark.parametrize(
    "text, sets, expected",
    [
        ("train: {batchsize: 8}", [], "unknown key 'train.batchsize' (did you mean 'train.batch_size'?)"),
        ("trian: {batch_size: 8}", [], "unknown key 'trian'"),
        ("data: {name: c, source: hf}\ntrain: {batch_split: many}", [], "bad value for 'train.batch_split'"),
        ("data: {name: c, source: hf}\ntrain: {batch_size: -4}", [], "bad value for 'train.batch_size': must be >= 1"),
        ("data: {name: c, source: hf}\nrule: {mixup_alpha: yes}", [], "bad value for 'rule.mixup_alpha': expected a number"),
        ("data: {name: c, source: hf, holdout: 1.5}", [], "bad value for 'data.holdout'"),
        ("data: {source: s3}", [], "bad value for 'data.source': expected one of hf, imagefolder, cifar, demo"),
        ("data: {source: imagefolder}", [], "data.path is not set"),
        ("data: {source: hf}", [], "neither data.name nor data.path"),
        ("data: {name: c, image_size: big}", [], "bad value for 'data.image_size'"),
        ("data: {name: c}\nrule: {precrop: 100, crop: 128}", [], "rule.crop (128) is larger than rule.precrop (100)"),
        ("data: {name: c}\ntrain: {batch_size: 100, batch_split: 3}", [], "not divisible by train.batch_split 3"),
        ("data: {name: c}\nrule: {schedule: [30, 20]}", [], "rule.schedule must be at least 2 increasing"),
        ("data: {name: c}\ntrain: {device: TPU}", [], "bad value for 'train.device'"),
        ("data: {name: c}", ["train.batch_splt=2"], "did you mean 'train.batch_split'"),
        ("data: {name: c}", ["batch_split"], "--set expects section.key=value"),
        ("data: [1, 2]", [], "'data' must be a mapping"),
        ("- a\n- b", [], "a recipe is a mapping"),
        ("data: {name: c\n", [], "not valid YAML at line"),
        ("data: {name: c}\nrule: {base_lr: 1e-3x}", [], "bad value for 'rule.base_lr': expected a number, got '1e-3x'"),
        ("data: {name: c}\nrule: {base_lr: inf}", [], "bad value for 'rule.base_lr': expected a number, got 'inf'"),
        ("data: {name: c}\nrule: {base_lr: .inf}", [], "bad value for 'rule.base_lr': expected a finite number"),
        ("data: {name: c}\nrule: {steps: 1.505e2}", [], "bad value for 'rule.steps': expected an integer, got 150.5"),
        ("data: {name: c}\nmodel: {name: BiT-M-R51x1}", [], "bad value for 'model.name': unknown model 'BiT-M-R51x1' (did you mean 'BiT-M-R50x1'?); use one of BiT-S-R50x1"),
        ("data: {name: c}\nmodel: {name: custom, depths: [1, 1, 1, 1]}", [], "model.name custom needs both model.depths"),
        ("data: {name: c}\nmodel: {name: custom}", [], "model.name custom needs both model.depths"),
        ("data: {name: c}\ntrain: {steps: 5}", [], "unknown key 'train.steps' (did you mean 'rule.steps'?)"),
        ("data: {name: c}\ntrain: {lr: 0.1}", [], "unknown key 'train.lr' (did you mean 'rule.base_lr'?)"),
    ],
)
def test_bad_recipes_give_one_line_with_the_fix(tmp_path, text, sets, expected):
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        recipe.load(p, sets)
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_missing_file():
    with pytest.raises(RecipeError, match="recipe file not found: nope.yaml"):
        recipe.load("nope.yaml")


def test_docs_reference_is_up_to_date():
    assert (ROOT / "docs" / "recipes.md").read_text() == recipe.reference_markdown() + "\n"


def test_plan_cifar10_json():
    out = run_cli("plan", "recipes/cifar10.yaml", "--json", "--set", "data.size=50000", "--set", "data.image_size=32x32")
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    assert (j["precrop"], j["crop"], j["steps"], j["mixup_alpha"]) == (160, 128, 10000, 0.1)
    assert j["schedule"] == [500, 3000, 6000, 9000, 10000]
    assert (j["dataset_size"], j["image_size"], j["base_lr"], j["batch_size"]) == (50000, [32, 32], 0.003, 512)
    assert (j["batch_split"], j["micro_batch"]) == (16, 32)
    assert j["source_of"]["dataset_size"] == "recipe: data.size"


def test_plan_text_explains_each_decision():
    out = run_cli("plan", "recipes/imagenet2012.yaml", "--set", "train.batch_split=4")
    assert out.returncode == 0, out.stderr
    assert "N=1 281 167 >= 500 000 -> 20 000 steps" in out.stdout
    assert "224x224 >= 96x96" in out.stdout
    assert "512 = 4 micro-batches x 128 images" in out.stdout
    assert "1 - 499" not in out.stdout and "0 - 499" in out.stdout


def test_plan_usage_error_exit_code_2_no_traceback(tmp_path):
    p = write(tmp_path, "data: {name: c}\ntrain: {batchsize: 8}\n")
    out = run_cli("plan", str(p))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "did you mean 'train.batch_size'" in out.stderr


def test_plan_does_not_import_mindspore(tmp_path):
    code = (
        "import sys; from bit_transfer import cli\n"
        "try:\n cli.main(['plan', 'recipes/cifar10.yaml', '--set', 'data.size=10', '--set', 'data.image_size=8x8'])\n"
        "except SystemExit: pass\n"
        "print('MS', 'mindspore' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "MS False" in out.stdout, out.stdout + out.stderr


def test_numbers_yaml_1_1_reads_as_strings_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 and 1e3 as strings; users mean the numbers."""
    p = write(tmp_path, "data: {name: c}\nrule: {base_lr: 1e-3, steps: 1e3, mixup_alpha: '0.2'}\ntrain: {batch_size: 2E2}\n")
    r = recipe.load(p, ["train.momentum=9e-1"])
    assert (r.rule.base_lr, r.rule.steps, r.rule.mixup_alpha) == (0.001, 1000, 0.2)
    assert r.train.batch_size == 200 and isinstance(r.train.batch_size, int)
    assert r.train.momentum == 0.9


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data: {name: c}\ntrain:\n  seed: 1\nrule: {steps: 10}\ntrain:\n  jit: false\n",
         "duplicate key 'train' at line 5 (first at line 2); merge the two 'train' sections"),
        ("data: {name: c}\nrule:\n  steps: 10\n  crop: 8\n  steps: 20\n",
         "duplicate key 'rule.steps' at line 5 (first at line 3); keep one of them"),
        ("data: {name: c, name: d}\n", "duplicate key 'data.name' at line 1 (first at line 1)"),
    ],
)
def test_duplicate_keys_are_refused_with_their_line(tmp_path, text, expected):
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        recipe.load(p)
    assert str(e.value).startswith(f"{p}: {expected}"), str(e.value)
    assert "\n" not in str(e.value)


def test_duplicate_keys_in_a_saved_run_recipe(tmp_path):
    saved = write(tmp_path, "name: r\ndata: {source: demo}\nlog: {every: 1}\nlog: {quiet: true}\n", "recipe.yaml")
    with pytest.raises(RecipeError, match="recipe.yaml: duplicate key 'log' at line 4"):
        recipe.load(saved)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    r = recipe.load(write(tmp_path, "data: {name: c}\ntrain: {<<: {seed: 1, jit: false}, seed: 2}\n"))
    assert (r.train.seed, r.train.jit) == (2, False)


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["train.lr=0.1"], "--set train.lr=0.1: unknown key 'train.lr' (did you mean 'rule.base_lr'?)"),
        (["train.seed=-1"], "--set train.seed=-1: bad value for 'train.seed': must be >= 0, got -1"),
        (["trian.seed=1"], "--set trian.seed=1: unknown key 'trian.seed' (did you mean 'train.seed'?)"),
        (["model.name=R51"], "--set model.name=R51: bad value for 'model.name': unknown model 'R51'"),
        (["train.batch_split=3"], "--set train.batch_split=3: train.batch_size 8 is not divisible"),
        (["name=a b"], "--set name=a b: bad value for 'name'"),
    ],
)
def test_set_errors_blame_the_flag_not_the_file(tmp_path, sets, expected):
    p = write(tmp_path, "data: {name: c}\ntrain: {batch_size: 8}\n")
    with pytest.raises(RecipeError) as e:
        recipe.load(p, sets)
    assert str(e.value).startswith(expected), str(e.value)
    assert str(p) not in str(e.value)


def test_file_errors_still_blame_the_file_when_sets_are_given(tmp_path):
    p = write(tmp_path, "data: {name: c}\ntrain: {lr: 0.1}\n")
    with pytest.raises(RecipeError, match=f"^{p}: unknown key 'train.lr'"):
        recipe.load(p, ["train.seed=1"])
