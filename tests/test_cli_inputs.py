"""Bad CLI input through the real command: exit code 2, one line on stderr naming the fix, no traceback."""

import os
import time

import pytest

from bit_transfer.system import hub
from conftest import one_line_error, run_cli

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# plan needs no data for this recipe: size and resolution are stated
MEASURED = "data: {source: hf, name: cifar10, size: 1000, image_size: 32x32}\n"


@pytest.fixture
def recipe_file(tmp_path):
    def write(text=MEASURED, name="x.yaml"):
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


# ---------------------------------------------------------------- --set is blamed for what it set
def test_unknown_key_from_set_blames_set(recipe_file):
    p = recipe_file()
    line = one_line_error(run_cli("plan", p, "--set", "train.lr=0.1"), "plan")
    assert line.endswith(
        "error: --set train.lr=0.1: unknown key 'train.lr' (did you mean 'rule.base_lr'?); "
        "see docs/recipes.md for the keys of 'train'"
    )
    assert str(p) not in line


def test_bad_value_from_set_blames_set(recipe_file):
    line = one_line_error(run_cli("plan", recipe_file(), "--set", "train.seed=-1"), "plan")
    assert "error: --set train.seed=-1: bad value for 'train.seed': must be >= 0, got -1" in line


# ---------------------------------------------------------------- YAML
def test_yaml_1_1_exponent_is_a_number(recipe_file):
    out = run_cli("plan", recipe_file(MEASURED + "rule: {base_lr: 1e-3, steps: 1e3}\n"), "--json")
    assert out.returncode == 0, out.stderr
    assert '"base_lr": 0.001' in out.stdout and '"steps": 1000' in out.stdout


def test_duplicate_section_names_key_and_line(recipe_file):
    p = recipe_file(MEASURED + "train: {seed: 1}\nrule: {steps: 10}\ntrain: {jit: false}\n")
    line = one_line_error(run_cli("plan", p), "plan")
    assert line.endswith(f"error: {p}: duplicate key 'train' at line 4 (first at line 2); merge the two 'train' sections")


def test_duplicate_key_inside_a_section(recipe_file):
    p = recipe_file(MEASURED + "rule:\n  steps: 10\n  steps: 20\n")
    line = one_line_error(run_cli("plan", p), "plan")
    assert line.endswith(f"error: {p}: duplicate key 'rule.steps' at line 4 (first at line 3); keep one of them")


# ---------------------------------------------------------------- model names
def test_unknown_model_name_lists_the_known_ones(recipe_file):
    p = recipe_file(MEASURED + "model: {name: BiT-M-R51x1}\n")
    line = one_line_error(run_cli("plan", p), "plan")
    assert f"error: {p}: bad value for 'model.name': unknown model 'BiT-M-R51x1' (did you mean 'BiT-M-R50x1'?)" in line
    assert "BiT-S-R50x1" in line and "BiT-M-R152x4" in line and "'custom' with model.depths and model.width" in line


def test_custom_model_names_still_plan(recipe_file):
    out = run_cli("plan", recipe_file(MEASURED + "model: {name: custom, depths: [1, 1, 1, 1], width: 0.25}\n"))
    assert out.returncode == 0, out.stderr


def test_a_named_bit_with_custom_depths_or_width_is_a_conflict(recipe_file):
    """`--set model.name=BiT-M-R50x1` on a tiny recipe built the tiny model and recorded R50x1."""
    p = recipe_file(MEASURED + "model: {name: custom, depths: [1, 1, 1, 1], width: 0.25}\n")
    line = one_line_error(run_cli("plan", p, "--set", "model.name=BiT-M-R50x1"), "plan")
    assert line.endswith("error: --set model.name=BiT-M-R50x1: model.name BiT-M-R50x1 is the architecture depths "
                         "[3, 4, 6, 3], width 1, but the recipe also sets model.depths [1, 1, 1, 1] and model.width "
                         "0.25; drop them (--set model.depths=null --set model.width=null) or use model.name: custom")
    fixed = run_cli("plan", p, "--set", "model.name=BiT-M-R50x1", "--set", "model.depths=null", "--set", "model.width=null")
    assert fixed.returncode == 0, fixed.stderr
    same = recipe_file(MEASURED + "model: {name: BiT-S-R101x1, depths: [3, 4, 23, 3], width: 1}\n", "same.yaml")
    assert run_cli("plan", same).returncode == 0  # its own architecture spelled out: no conflict


# ---------------------------------------------------------------- argparse: one line, exit 2
@pytest.mark.parametrize(
    "args, command, expected",
    [
        (["plan", "{recipe}", "--devices", "0"], "plan", "argument --devices: must be a whole number >= 1, got 0"),
        (["plan", "{recipe}", "--devices", "-2"], "plan", "argument --devices: must be a whole number >= 1, got -2"),
        (["plan", "{recipe}", "--devices", "two"], "plan", "argument --devices: expected a whole number >= 1, got 'two'"),
        (["fit", "{recipe}", "--nodes", "0"], "fit", "argument --nodes: must be a whole number >= 1, got 0"),
        (["fit", "{recipe}", "--stop-after", "0"], "fit", "argument --stop-after: must be a whole number >= 1, got 0"),
        (["fit", "{recipe}", "--stop-after", "-1"], "fit", "argument --stop-after: must be a whole number >= 1, got -1"),
        (["export", "runs/x", "--format", "hf", "--out", "o", "--image-size", "-5"], "export",
         "argument --image-size: must be a whole number >= 1, got -5"),
        (["export", "runs/x", "--format", "hf", "--out", "o", "--image-size", "0"], "export",
         "argument --image-size: must be a whole number >= 1, got 0"),
        (["plan", "{recipe}", "--devcies", "2"], "plan",
         "unrecognized arguments: --devcies 2 (did you mean --devices?); see bit-transfer plan --help"),
        (["plan"], "plan", "the following arguments are required: recipe; see bit-transfer plan --help"),
    ],
)
def test_argparse_errors_are_one_line(recipe_file, args, command, expected):
    args = [str(recipe_file()) if a == "{recipe}" else a for a in args]
    line = one_line_error(run_cli(*args), command)
    assert line == f"bit-transfer {command}: error: {expected}"


def test_root_parser_errors_are_one_line():
    out = run_cli("plan-it")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("bit-transfer: error: argument COMMAND: invalid choice: 'plan-it'")


def test_help_still_works():
    out = run_cli("plan", "--help")
    assert out.returncode == 0 and "--devices N" in out.stdout and not out.stderr


# ---------------------------------------------------------------- Hugging Face hub without network
def no_network_env(tmp_path):
    """The real environment, minus any offline switch: the hub check itself must notice."""
    if hub.reachable(hub.endpoint()):
        pytest.skip("the hub is reachable here; these tests are about a machine without network")
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    env.update(HF_HOME=str(tmp_path / "hf-home"), BIT_TRANSFER_HOME=str(tmp_path / "bt-home"))
    return env


def test_hf_dataset_without_network_fails_fast_in_one_line(recipe_file, tmp_path):
    p = recipe_file("data: {source: hf, name: someone/not-cached-anywhere}\n")
    start = time.time()
    out = run_cli("plan", p, env=no_network_env(tmp_path))
    took = time.time() - start
    line = one_line_error(out, "plan")
    assert took < 15, f"{took:.1f} s"  # a retry loop takes 30 s and more; start-up under load ~5-12 s
    assert "Hugging Face dataset 'someone/not-cached-anywhere' is not cached under" in line
    assert f"{hub.host()} cannot be reached, so it ran with HF_HUB_OFFLINE=1" in line
    assert "datasets.load_dataset('someone/not-cached-anywhere')" in line and "data.path" in line


def test_hf_weights_without_network_fails_fast_in_one_line(tmp_path):
    env = no_network_env(tmp_path)
    start = time.time()
    out = run_cli("fit", "recipes/demo.yaml", "--quiet", "--set", "model.weights=hf:google/bit-50",
              "--set", f"log.dir={tmp_path / 'runs'}", env=env)
    took = time.time() - start
    line = one_line_error(out, "fit")
    assert took < 15, f"{took:.1f} s"  # a retry loop takes 30 s and more; start-up under load ~5-12 s
    cache = tmp_path / "bt-home" / "hf"
    assert f"cannot fetch config.json of hf:google/bit-50 (not in the cache {cache} and {hub.host()} cannot be reached, " \
           "so it ran with HF_HUB_OFFLINE=1)" in line
    assert line.endswith("put config.json and model.safetensors from https://huggingface.co/google/bit-50 into a "
                         "directory and set model.weights to it")


def test_hf_model_argument_without_network_names_model_not_a_recipe_key(tmp_path):
    """predict and export take the model as their MODEL argument: the fix names that, not model.weights."""
    from PIL import Image

    env = no_network_env(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    cache = tmp_path / "bt-home" / "hf"
    for command, args in (("predict", ["hf:google/bit-50", tmp_path / "x.png"]),
                          ("export", ["hf:google/bit-50", "--format", "hf", "--out", tmp_path / "out"])):
        line = one_line_error(run_cli(command, *args, env=env, timeout=60), command)
        assert f"cannot fetch config.json of hf:google/bit-50 (not in the cache {cache}" in line
        assert line.endswith("put config.json and model.safetensors from https://huggingface.co/google/bit-50 into a "
                             "directory and pass that directory as MODEL"), line
    assert not (tmp_path / "out").exists()


def test_batch_layout_refuses_zero_ranks_for_other_callers():
    from bit_transfer.hyperrule import planning
    from bit_transfer.errors import RecipeError

    with pytest.raises(RecipeError, match="0 ranks cannot train; use --devices and --nodes of at least 1"):
        planning.batch_layout(512, 1, world=0)


# ---------------------------------------------------------------- what a recipe path is
def test_a_recipe_path_that_is_not_a_file_says_what_it_is(recipe_file, tmp_path):
    """A directory, /dev/zero and a FIFO were all "not found" (and must not be read forever)."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.yaml").write_text(MEASURED)
    line = one_line_error(run_cli("plan", folder, timeout=60), "plan")
    assert line.endswith(f"error: recipe {folder} is a directory; give a recipe file (e.g. {folder / 'mine.yaml'})")
    line = one_line_error(run_cli("plan", "/dev/zero", timeout=60), "plan")
    assert line.endswith("error: recipe /dev/zero is a character device, not a file; give a .yaml recipe file "
                         "(e.g. recipes/cifar10.yaml)")
    os.mkfifo(tmp_path / "pipe.yaml")
    line = one_line_error(run_cli("plan", tmp_path / "pipe.yaml", timeout=60), "plan")
    assert "pipe.yaml is a FIFO (named pipe), not a file" in line
    big = recipe_file(MEASURED + "#" * (1 << 21) + "\n", "big.yaml")
    line = one_line_error(run_cli("plan", big, timeout=60), "plan")
    assert line.endswith(f"error: recipe {big} is larger than 1 MB, too large for a recipe; give the .yaml recipe "
                         "file (e.g. recipes/cifar10.yaml)")
    assert one_line_error(run_cli("plan", tmp_path / "nope.yaml"), "plan").endswith(f"recipe file not found: {tmp_path / 'nope.yaml'}")


@pytest.mark.parametrize("extra", [[], ["--master-addr", "10.0.0.1"], ["--master-port", "8118"]])
def test_several_machines_need_the_masters_address_and_port(extra, tmp_path):
    """Without them each machine waited on its own 127.0.0.1 and random port: a hang, not an error."""
    out = run_cli("fit", "recipes/demo.yaml", "--devices", "1", "--nodes", "2", *extra,
                  "--run-dir", str(tmp_path / "run"))
    line = one_line_error(out, "fit")
    assert "--nodes 2 needs --master-addr and --master-port, the same on every machine" in line, line
    assert not (tmp_path / "run").exists()
