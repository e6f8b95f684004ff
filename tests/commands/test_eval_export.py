"""`bit-transfer eval` and `export` through the real command on real files: a bad input is one line on
stderr and exit code 2, no traceback, and nothing the user (or `fit`) wrote changes."""

import json
import pickle
import re
import shutil
import stat

import numpy as np
import pytest

from conftest import one_line_error, run_cli, scratch_fs, snapshot
from datagen import pattern_task, tiny_recipe


def ok(out):
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pattern_task(tmp_path_factory.mktemp("patterns") / "cifar-10-batches-py", n_train=20, n_test=8)


@pytest.fixture(scope="module")
def fitted(task, tmp_path_factory):
    """A real `fit` run of 2 steps (a tiny model): recipe.yaml, checkpoints, metrics.json, eval/."""
    from bit_transfer.commands.fit import fit

    runs = tmp_path_factory.mktemp("runs")
    fit(tiny_recipe(task, runs, rule__steps=2), run_dir=runs / "tiny-run")
    return runs / "tiny-run"


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A run whose model Hugging Face can express (width 0.5), written as fit writes it: steps 1 and 2."""
    from bit_transfer.models import create_model, model_config
    from bit_transfer.run.rundir import RunDir

    run = RunDir.claim(tmp_path_factory.mktemp("hf") / "run", kind="fit")
    run.write_json("plan.json", {"crop": 32})
    model = create_model("custom", 3, depths=[1, 1, 1, 1], width=0.5)
    for step in (1, 2):
        run.save_checkpoint(step, {p.name: p for p in model.get_parameters()},
                            {"model": model_config(model), "class_names": ["a", "b", "c"], "step": step}, keep=2)
    return run.path


# ---------------------------------------------------------------- export
def test_export_of_a_file_that_is_not_a_checkpoint_says_what_export_takes(tmp_path):
    (tmp_path / "some.yaml").write_text("name: mine\n")
    np.savez(tmp_path / "weights.npz", a=np.zeros(3, np.float32))
    before = snapshot(tmp_path)
    line = one_line_error(run_cli("export", "some.yaml", "--format", "hf", "--out", "X", cwd=tmp_path), "export")
    assert line.endswith("error: some.yaml is a YAML file, not a checkpoint; export takes a run directory "
                         "(runs/<name>-<time>) or its checkpoints/step-*.ckpt, written by bit-transfer fit or fewshot; "
                         "or pretrained weights: a Hugging Face directory (config.json + model.safetensors), "
                         "hf:org/name or an official BiT .npz"), line
    # a .npz is taken as pretrained weights (export converts them), and this one is not BiT's
    line = one_line_error(run_cli("export", "weights.npz", "--format", "hf", "--out", "X", cwd=tmp_path), "export")
    assert line.endswith("error: weights.npz has no BiT root conv and stages; it is not a BiT checkpoint"), line
    assert snapshot(tmp_path) == before  # and no X


@pytest.mark.slow
def test_export_of_a_corrupt_checkpoint_names_the_earlier_one(hf_run, tmp_path):
    run_dir = shutil.copytree(hf_run, tmp_path / "run")
    latest = run_dir / "checkpoints" / "step-000002.ckpt"
    latest.write_bytes(latest.read_bytes()[:5000])
    before = snapshot(run_dir)
    line = one_line_error(run_cli("export", run_dir, "--format", "hf", "--out", tmp_path / "hf"), "export")
    assert f"checkpoint {latest} is unreadable: truncated or corrupt" in line
    assert line.endswith(f"use the run's earlier checkpoint {run_dir / 'checkpoints' / 'step-000001.ckpt'}")
    assert "delete" not in line
    assert snapshot(run_dir) == before and not (tmp_path / "hf").exists()
    ok(run_cli("export", run_dir / "checkpoints" / "step-000001.ckpt", "--format", "hf", "--out", tmp_path / "hf"))


@pytest.mark.slow
def test_export_refuses_an_out_that_is_a_file_a_foreign_directory_or_a_run(hf_run, tmp_path):
    (tmp_path / "model.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine too")
    before, run_before = snapshot(tmp_path), snapshot(hf_run)
    cases = {
        tmp_path / "model.txt": f"{tmp_path / 'model.txt'} is a file; give a directory for the export "
                                f"(e.g. --out {tmp_path / 'model'}-export)",
        tmp_path / "mine": f"{tmp_path / 'mine'} exists and holds files but is not a bit-transfer export; "
                           "choose a new or empty directory for the export (--out)",
        hf_run: f"{hf_run} is a bit-transfer fit directory, not an export output; "
                "choose a new or empty directory for the export (--out)",
    }
    for out, message in cases.items():
        line = one_line_error(run_cli("export", hf_run, "--format", "hf", "--out", out), "export")
        assert line.endswith(f"error: {message}"), line
    assert snapshot(tmp_path) == before and snapshot(hf_run) == run_before


@pytest.mark.slow
def test_export_into_a_read_only_place_is_one_line(hf_run, tmp_path):
    with scratch_fs(tmp_path / "ro", size="1m", read_only=True) as ro:
        for out in (ro, ro / "export"):
            line = one_line_error(run_cli("export", hf_run, "--format", "mindir", "--out", out), "export")
            assert "is on a read-only file system; choose a writable place" in line, line
        assert list(ro.iterdir()) == []


def test_export_without_space_is_one_line_and_leaves_nothing(hf_run, tmp_path):
    with scratch_fs(tmp_path / "small", size="1m") as small:  # the model's weights are 8 MB
        line = one_line_error(run_cli("export", hf_run, "--format", "hf", "--out", small / "hf"), "export")
        assert f"no space left writing {small / 'hf' / 'model.safetensors'}" in line, line
        assert list(small.iterdir()) == []


@pytest.mark.slow
def test_exported_files_are_0644_and_a_rerun_updates_its_own_export(hf_run, tmp_path):
    for fmt, files in [("hf", ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]),
                       ("mindir", ["model.json", "model.mindir"])]:
        out = tmp_path / fmt
        said = ok(run_cli("export", hf_run, "--format", fmt, "--out", out))
        assert said.strip() == f"exported {fmt}: {out if fmt == 'hf' else out / 'model.mindir'}"
        first = snapshot(out)
        again = ok(run_cli("export", hf_run, "--format", fmt, "--out", out))  # its own directory: updated, and said
        assert again.strip() == f"exported {fmt}: {out if fmt == 'hf' else out / 'model.mindir'} (replaced the " \
                                f"earlier {fmt} export in {out})"
        assert sorted(p.name for p in out.iterdir()) == sorted([*files, ".bit-transfer-run"])  # no temporaries
        for name in files:
            assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, (fmt, name)
        assert snapshot(out).keys() == first.keys()
    config = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert config["size"] == {"height": 32, "width": 32}  # plan.json's crop


# ---------------------------------------------------------------- eval
@pytest.mark.slow
def test_eval_writes_its_own_directory_and_keeps_what_fit_wrote(fitted):
    before = snapshot(fitted)
    said = ok(run_cli("eval", fitted / "recipe.yaml", "--checkpoint", fitted))
    out = fitted / "evals" / "step-000002-tiny"
    assert f"wrote metrics.json, per_class.json and confusion.json to {out}" in said
    after = snapshot(fitted)
    assert {k: after[k] for k in before} == before  # fit's metrics.json and eval/ untouched
    assert all(k.startswith("evals/step-000002-tiny/") for k in set(after) - set(before))

    def no_nan(token):
        raise ValueError(f"non-strict JSON: {token}")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=no_nan)
    fit_metrics = json.loads((fitted / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(fit_metrics["top1"]) and metrics["step"] == 2
    assert metrics["checkpoint"] == str(fitted / "checkpoints" / "step-000002.ckpt")
    assert set(json.loads((out / "per_class.json").read_text())) == {"horizontal", "vertical", "checker", "flat"}
    assert json.loads((out / "confusion.json").read_text())["class_names"][0] == "horizontal"
    again = ok(run_cli("eval", fitted / "recipe.yaml", "--checkpoint", fitted))  # its own directory: updated, said
    assert f"wrote metrics.json, per_class.json and confusion.json to {out} (replaced the earlier ones there)" in again
    assert "replaced" not in said


@pytest.mark.slow
def test_eval_refuses_an_out_that_is_a_file_a_foreign_directory_or_a_run(fitted, tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    before, run_before = snapshot(tmp_path), snapshot(fitted)
    cases = {
        tmp_path / "metrics.json": "is a file; give a directory for the eval (e.g. --out ",
        tmp_path / "mine": "exists and holds files but is not a bit-transfer eval; choose a new or empty directory",
        fitted / "eval": "exists and holds files but is not a bit-transfer eval",  # fit's report: no marker
        fitted: "is a bit-transfer fit directory, not an eval output",
    }
    for out, message in cases.items():
        line = one_line_error(run_cli("eval", fitted / "recipe.yaml", "--checkpoint", fitted, "--out", out), "eval")
        assert f"error: {out} {message}" in line, line
    line = one_line_error(run_cli("eval", fitted / "recipe.yaml", "--checkpoint", fitted / "recipe.yaml"), "eval")
    assert "recipe.yaml is a YAML file, not a checkpoint; eval --checkpoint takes a run directory" in line
    assert snapshot(tmp_path) == before and snapshot(fitted) == run_before


def test_eval_refuses_a_batch_that_cannot_fit_in_memory(fitted):
    """Estimated from the model and the crop before any image is decoded: one line, nothing written."""
    from bit_transfer.system import memory

    before = snapshot(fitted)
    out = run_cli("eval", fitted / "recipe.yaml", "--checkpoint", fitted, "--set", "rule.precrop=16384",
                  "--set", "rule.crop=16384", "--set", "train.eval_batch_size=64")
    line = one_line_error(out, "eval")
    need = memory.batch_bytes([1, 1, 1, 1], 0.125, 16384, 64) / memory.GB
    assert f"error: a batch of 64 images at 16384x16384 px needs about {need:.1f} GB of memory but " in line, line
    assert re.search(r" GB is available; (use --set train.eval_batch_size=\d+ \(about [\d.]+ GB\) or a smaller rule.crop"
                     r"|even one image needs [\d.]+ GB: use a smaller rule.crop \(at most \d+ fits\))$", line), line
    assert snapshot(fitted) == before


def test_eval_into_a_read_only_place_is_one_line(fitted, tmp_path):
    with scratch_fs(tmp_path / "ro", size="1m", read_only=True) as ro:
        line = one_line_error(run_cli("eval", fitted / "recipe.yaml", "--checkpoint", fitted, "--out", ro / "ev"), "eval")
        assert f"{ro / 'ev'} is on a read-only file system; choose a writable place" in line, line


def test_eval_refuses_data_whose_class_names_differ(fitted, task, tmp_path):
    other = shutil.copytree(task, tmp_path / "cifar-10-batches-py")
    with open(other / "batches.meta", "wb") as f:  # same 4 classes by count, other names
        pickle.dump({b"label_names": [b"ant", b"bee", b"cat", b"dog"]}, f)
    before = snapshot(fitted)
    line = one_line_error(run_cli("eval", fitted / "recipe.yaml", "--checkpoint", fitted, "--set", f"data.path={other}"),
                          "eval")
    assert line.endswith(
        f"error: {fitted / 'checkpoints' / 'step-000002.ckpt'}: checkpoint classes ['horizontal', 'vertical', "
        "'checker', 'flat'] differ from the data's ['ant', 'bee', 'cat', 'dog']; "
        "evaluate it on the data it was trained for"
    )
    assert snapshot(fitted) == before  # no evals/ directory left behind


def test_eval_of_a_loose_checkpoint_without_class_names_writes_under_log_dir(fitted, tmp_path):
    from bit_transfer.models.weights.ckpt import read_checkpoint, save_checkpoint

    params, meta = read_checkpoint(fitted / "checkpoints" / "step-000002.ckpt")
    del meta["class_names"]  # older checkpoints: evaluated as they are
    save_checkpoint(tmp_path / "loose.ckpt", params, meta)
    said = ok(run_cli("eval", fitted / "recipe.yaml", "--checkpoint", tmp_path / "loose.ckpt",
                  "--set", f"log.dir={tmp_path / 'runs'}"))
    (out,) = (tmp_path / "runs").glob("tiny-eval-*")
    assert f"to {out}" in said and (out / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose.ckpt", "runs"]
