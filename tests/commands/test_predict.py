"""`bit-transfer predict` through the real command, and `Predictor` in-process: every MODEL kind (run,
.ckpt, Hugging Face directory, hf:org/name, official .npz, .onnx), every INPUT kind (files,
directories, glob patterns, stdin, --recipe), labels from class folders giving eval's numbers,
CSV/JSONL columns, unreadable and non-image files skipped or (--strict) refused, --out never
replacing a user's file."""

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import GRAPHS, ROOT, one_line_error, run_cli, scratch_fs, snapshot, use_graph
from datagen import image_folder, tiny_folder_recipe

CLASSES = ["cat", "dog", "emu"]
CROP = 16


def ok(out) -> str:
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    return out.stdout


def predict(*args, cwd=ROOT, stdin=None):
    """`bit-transfer predict ARGS` in a new process (stdin optional)."""
    return subprocess.run([sys.executable, "-m", "bit_transfer", "predict", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, input=stdin, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def table(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """The stdout table as {path: [(class, percent), ...]}."""
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["path", "top-1", "prob"], lines[0]
    rows = {}
    for line in lines[1:]:
        if line.startswith(("predicted ", "top-1 ", "wrote ", "note: ")):
            continue
        path, *rest = line.split()
        rows[path] = [(rest[i], float(rest[i + 1].rstrip("%"))) for i in range(0, len(rest), 2)]
    return rows


def summary(stdout: str) -> str:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("predicted ")]
    return line


def noise_image(path: Path, seed: int = 0, size: int = 48) -> Path:
    """An incompressible image: cutting its file in half really loses pixels."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A class-folder dataset and a real 3-step `fit` on it (width 0.5: Hugging Face can express it)."""
    root = tmp_path_factory.mktemp("predict")
    data = image_folder(root / "data", counts={c: 4 for c in CLASSES}, eval_count=3)
    ok(run_cli("fit", tiny_folder_recipe(root, data, CROP), "--run-dir", root / "run", "--quiet"))
    return root


@pytest.fixture(scope="module")
def run_table(world):
    """The run's own predictions on the val folder (the reference for the other model kinds)."""
    out = ok(predict(world / "run", "data/val", "--report", world / "ref-report", cwd=world))
    return table(out)


@pytest.fixture(scope="module")
def hf_export(world):
    """The run's model as a Hugging Face directory (class names in id2label, its crop in preprocessor_config)."""
    from bit_transfer.models import create_model_from_weights
    from bit_transfer.commands.export import export_hf

    (ckpt,) = sorted((world / "run" / "checkpoints").glob("step-*.ckpt"))[-1:]
    model, report = create_model_from_weights(ckpt)
    return export_hf(model, world / "hf", report.meta["class_names"], image_size=CROP)


# ---------------------------------------------------------------- labels from folders: eval's numbers
@pytest.mark.slow
@pytest.mark.parametrize("graph", GRAPHS)  # predict = eval on our CPU kernels and on MindSpore's operators
def test_labelled_folder_gives_evals_numbers_and_report(world, graph, tmp_path):
    run = world / "run"
    if graph != "kernels":  # a run of its own (without the other graph's evals): eval and predict write into it
        run = Path(shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("evals")))
    with use_graph(graph):
        _labelled_folder_gives_evals_numbers_and_report(world, run)


def _labelled_folder_gives_evals_numbers_and_report(world, run):
    ok(run_cli("eval", world / "r.yaml", "--checkpoint", run))
    (ev,) = (run / "evals").glob("step-*-tiny")
    before = snapshot(run)
    said = ok(predict(run, "data/val", "--quiet", cwd=world))
    (mine,) = (run / "evals").glob("step-*-predict-val")
    evals = json.loads((ev / "metrics.json").read_text())
    got = json.loads((mine / "metrics.json").read_text())
    assert got["top1"] == evals["top1"] and got["top5"] == evals["top5"] and got["eval_images"] == 9
    assert got["loss"] == pytest.approx(evals["loss"], abs=1e-5)
    assert json.loads((mine / "confusion.json").read_text()) == json.loads((ev / "confusion.json").read_text())
    assert set(json.loads((mine / "per_class.json").read_text())) == set(CLASSES)
    assert f"top-1 {100 * evals['top1']:.2f}% top-5 {100 * evals['top5']:.2f}%" in said
    assert "on 9 images labelled by the class folders of data/val" in said
    assert f"wrote metrics.json, per_class.json and confusion.json to {mine}" in said
    assert "at 16x16 px (the run's plan.json crop)" in summary(said)
    after = snapshot(run)
    assert {k: after[k] for k in before} == before  # fit's and eval's files untouched


def test_a_read_only_run_predicts_and_reports_beside_the_user(world, tmp_path):
    with scratch_fs(tmp_path / "ro", size="64m") as ro:
        shutil.copytree(world / "run", ro / "run", ignore=shutil.ignore_patterns("evals"))
        if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        said = ok(predict(ro / "run", world / "data" / "val", "--quiet", cwd=tmp_path))
        (report,) = (tmp_path / "runs").glob("predict-val-*")
        assert f"wrote metrics.json, per_class.json and confusion.json to {report.relative_to(tmp_path)}" in said
        assert not (ro / "run" / "evals").exists()


def test_recipe_eval_split_gives_evals_top1(world):
    said = ok(predict(world / "run", "--recipe", world / "r.yaml", "--quiet", "--report", world / "rec-report"))
    fitted = json.loads((world / "run" / "metrics.json").read_text())  # fit's final evaluation, same split
    got = json.loads((world / "rec-report" / "metrics.json").read_text())
    assert got["eval_images"] == 9 and "labelled by tiny's eval split" in said
    assert got["top1"] == fitted["top1"] and got["loss"] == pytest.approx(fitted["loss"], abs=1e-5)
    line = one_line_error(predict(world / "run", "data/val", "--recipe", world / "r.yaml"), "predict")
    assert line.endswith("give INPUT images or --recipe RECIPE, not both")


def test_folders_not_named_like_the_classes_are_not_labels(world, tmp_path):
    shutil.copytree(world / "data" / "val" / "cat", tmp_path / "pics" / "cat")
    shutil.copytree(world / "data" / "val" / "dog", tmp_path / "pics" / "holiday")
    said = ok(predict(world / "run", tmp_path / "pics", "--quiet"))
    assert "top-1 " not in said and "labelled by the" not in said
    assert f"note: {tmp_path / 'pics'} is not labelled by its folders: sub-folder(s) holiday are not classes" in said
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- output: table, CSV, JSONL
@pytest.mark.slow
def test_table_csv_and_jsonl_hold_the_same_predictions(world, run_table, tmp_path):
    paths = sorted(f"data/val/{c}/{i:03d}.png" for c in CLASSES for i in range(3))
    assert list(run_table) == paths  # directories: recursive, sorted
    assert all(len(v) == 3 for v in run_table.values())  # top-5 of a 3-class model: 3
    ok(predict(world / "run", "data/val", "--out", tmp_path / "p.csv", "--top-k", 2, cwd=world))
    said = ok(predict(world / "run", "data/val", "--out", tmp_path / "p.jsonl", cwd=world))
    assert "path" not in said.splitlines()[0] and f"wrote 9 predictions to {tmp_path / 'p.jsonl'}" in said
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "pred", "prob", "topk"] and [r[0] for r in rows[1:]] == paths
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [list(x) for x in lines] == [["path", "pred", "prob", "topk"]] * 9
    for (path, pred, prob, topk), js in zip(rows[1:], lines):
        pairs = [p.split(":") for p in topk.split(";")]
        assert len(pairs) == 2 and pairs[0] == [pred, prob] and len(prob.split(".")[1]) == 6
        assert js["path"] == path and js["pred"] == pred and js["prob"] == pytest.approx(float(prob), abs=1e-6)
        assert len(js["topk"]) == 3 and [js["topk"][0][0], js["topk"][1][0]] == [p[0] for p in pairs]
        probs = [p for _, p in js["topk"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
        assert [(n, round(100 * p, 1)) for n, p in js["topk"]] == [(n, pytest.approx(v, abs=0.051))
                                                                  for n, v in run_table[path]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.jsonl"]  # no temporaries
    assert oct((tmp_path / "p.csv").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_out_never_replaces_a_file_without_overwrite(world, tmp_path):
    (tmp_path / "mine.csv").write_text("my own notes\n")
    (tmp_path / "dir.csv").mkdir()
    before = snapshot(tmp_path)
    cases = {
        "mine.csv": f"--out {tmp_path / 'mine.csv'} exists; choose a new file, or add --overwrite to replace it",
        "dir.csv": f"--out {tmp_path / 'dir.csv'} is a directory; give a .csv or .jsonl file in it",
        "p.txt": f"--out {tmp_path / 'p.txt'}: give a .csv or .jsonl file (e.g. --out preds.csv)",
    }
    for name, message in cases.items():
        line = one_line_error(predict(world / "run", "data/val", "--out", tmp_path / name, cwd=world), "predict")
        assert f"error: {message}" in line, line
    assert snapshot(tmp_path) == before
    ok(predict(world / "run", "data/val", "--out", tmp_path / "mine.csv", "--overwrite", cwd=world))
    assert (tmp_path / "mine.csv").read_text().startswith("path,pred,prob,topk\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.csv", "mine.csv"]


# ---------------------------------------------------------------- inputs
@pytest.mark.slow
def test_files_globs_and_stdin_in_order_once_each(world, run_table):
    files = ["data/val/emu/002.png", "data/val/cat/000.png"]
    rows = table(ok(predict(world / "run", *files, "data/val/emu/002.png", cwd=world)))
    assert list(rows) == files  # in the order given, a repeated one once
    rows = table(ok(predict(world / "run", "data/val/*/001.png", "data/val/**/002.png", cwd=world)))
    assert list(rows) == [f"data/val/{c}/001.png" for c in CLASSES] + [f"data/val/{c}/002.png" for c in CLASSES]
    listed = "\n".join(["data/val/dog/000.png", "", str(world / "data" / "val" / "cat" / "001.png")]) + "\n"
    rows = table(ok(predict(world / "run", "-", cwd=world, stdin=listed)))
    assert list(rows) == ["data/val/dog/000.png", str(world / "data" / "val" / "cat" / "001.png")]
    for path, top in rows.items():
        assert top == run_table[os.path.relpath(os.path.join(world, path), world)]


def test_bad_inputs_are_one_line(world, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    cases = [
        (["nope.png"], "input nope.png not found; give image files, directories, glob patterns, or - to read"),
        (["data/*.jpeg"], "no file matches 'data/*.jpeg'; check the pattern"),
        ([tmp_path / "empty"], f"no images under {tmp_path / 'empty'} (files ending in .jpg"),
        ([], "predict needs INPUT images (files, directories, glob patterns, or - for paths on stdin) or --recipe"),
        (["-", "-"], "- (paths on stdin) is given twice"),
    ]
    for inputs, message in cases:
        line = one_line_error(predict(world / "run", *inputs, cwd=world, stdin=""), "predict")
        assert message in line, line
    line = one_line_error(predict(world / "run", "-", cwd=world, stdin="missing.png\n"), "predict")
    assert "input missing.png not found (a path read from stdin)" in line
    for flag in (["--top-k", "0"], ["--device", "TPU"], ["--batch-size", "x"]):
        out = predict(world / "run", "data/val", *flag, cwd=world)
        assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    # a device this machine cannot give: the cause, in the words of the flag the user typed (not train.device)
    from bit_transfer.system import device

    if "GPU" in device.available_devices():
        return  # a machine with a usable GPU: nothing to refuse
    line = one_line_error(predict(world / "run", "data/val", "--device", "GPU", cwd=world), "predict")
    assert "--device GPU but MindSpore cannot use it: its GPU plugin did not load" in line, line
    assert "CUDA" in line and line.endswith("or use --device auto") and "train.device" not in line, line


@pytest.mark.slow
def test_unreadable_and_non_image_files_are_named_and_skipped_or_strict(world, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(world / "data" / "val" / "cat", bad)
    (bad / "fake.jpg").write_bytes(b"<html>not found</html>")
    noise = noise_image(tmp_path / "noise.png").read_bytes()
    (bad / "truncated.png").write_bytes(noise[: len(noise) // 2])  # a valid header, pixels cut off
    notes = tmp_path / "notes.txt"
    notes.write_text("a text file given as an image")
    out = predict(world / "run", bad, notes, "--out", tmp_path / "p.csv")
    said = ok(out)
    skipped = sorted(ln for ln in out.stderr.splitlines() if ln.startswith("skipped "))
    assert skipped == [f"skipped {bad / 'fake.jpg'}: not an image (unknown format)",
                       f"skipped {bad / 'truncated.png'}: truncated or corrupt (image file is truncated)",
                       f"skipped {notes}: not an image (unknown format)"], out.stderr
    assert summary(said).endswith("; 3 unreadable files skipped (named above)")
    with open(tmp_path / "p.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)][1:] == [str(bad / f"{i:03d}.png") for i in range(3)]
    for inputs, first in [((bad, notes), bad / "fake.jpg"), ((notes, bad), notes),
                          ((bad / "000.png", bad / "truncated.png"), bad / "truncated.png")]:
        out = predict(world / "run", *inputs, "--strict", "--out", tmp_path / "strict.csv")
        line = one_line_error(out, "predict")
        assert line.startswith(f"bit-transfer predict: error: {first}: "), line
        assert line.endswith("; replace or delete it, or drop --strict to skip unreadable files")
        assert not (tmp_path / "strict.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "noise.png", "notes.txt", "p.csv"]
    out = predict(world / "run", bad / "fake.jpg")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"skipped {bad / 'fake.jpg'}: not an image (unknown format)",
        "bit-transfer predict: error: none of the 1 images could be read (each named above); nothing to predict"]


def test_a_fifo_among_the_inputs_is_skipped_with_a_line_not_waited_on(world, tmp_path):
    """A FIFO named x.png made predict hang forever (Pillow waits for a writer)."""
    shutil.copytree(world / "data" / "val" / "cat", tmp_path / "pics")
    os.mkfifo(tmp_path / "pics" / "x.png")
    os.mkfifo(tmp_path / "y.jpg")
    out = predict(world / "run", tmp_path / "pics", tmp_path / "y.jpg", "--out", tmp_path / "p.csv")
    ok(out)
    assert out.stderr.splitlines()[:2] == [f"skipped {tmp_path / 'pics' / 'x.png'}: a FIFO (named pipe), not an image file",
                                           f"skipped {tmp_path / 'y.jpg'}: a FIFO (named pipe), not an image file"]
    with open(tmp_path / "p.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)][1:] == [str(tmp_path / "pics" / f"{i:03d}.png") for i in range(3)]
    out = predict(world / "run", tmp_path / "y.jpg", str(tmp_path / "*.jpg"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"skipped {tmp_path / 'y.jpg'}: a FIFO (named pipe), not an image file",
        "bit-transfer predict: error: no images to predict: 1 input(s) are not image files (named above); give image "
        "files, directories or glob patterns"]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_16_bit_png_predicts_as_the_same_scene_at_8_bits(world, tmp_path):
    """Real 16-bit PNGs (Pillow mode I;16) are scaled, not clipped: the same predictions as their 8-bit twins."""
    rng = np.random.default_rng(5)
    for i in range(3):
        gray = rng.integers(0, 256, (20, 20), dtype=np.uint8)
        Image.fromarray(gray).save(tmp_path / f"{i}-8.png")
        Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / f"{i}-16.png")
        assert Image.open(tmp_path / f"{i}-16.png").mode == "I;16"
    ok(predict(world / "run", *sorted(tmp_path.glob("*-8.png")), "--out", tmp_path / "8.jsonl"))
    ok(predict(world / "run", *sorted(tmp_path.glob("*-16.png")), "--out", tmp_path / "16.jsonl"))
    eight, sixteen = jsonl(tmp_path / "8.jsonl"), jsonl(tmp_path / "16.jsonl")
    assert [Path(r["path"]).name for r in sixteen] == [f"{i}-16.png" for i in range(3)]
    assert [r["topk"] for r in sixteen] == [r["topk"] for r in eight]


def test_a_decompression_bomb_is_one_line_without_a_stray_period(world, tmp_path):
    """Pillow's message ends in "DOS attack."; the line went on "DOS attack.; replace ..."."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 10_000)).save(bomb)  # 2e8 pixels: over twice Pillow's limit, refused at open
    line = one_line_error(predict(world / "run", bomb, "--strict"), "predict")
    assert line.startswith(f"bit-transfer predict: error: {bomb}: Image size (200000000 pixels) exceeds limit of ")
    assert line.endswith("could be decompression bomb DOS attack; replace or delete it, or drop --strict to skip "
                         "unreadable files"), line


@pytest.mark.slow
def test_a_repeated_predict_says_it_replaced_its_own_report(world, tmp_path):
    """As eval does in its own directory: the same --report again is updated, and the output line says so."""
    report = tmp_path / "report"
    first = ok(predict(world / "run", "data/val", "--quiet", "--report", report, cwd=world))
    assert f"wrote metrics.json, per_class.json and confusion.json to {report}\n" in first
    before = snapshot(report)
    again = ok(predict(world / "run", "data/val", "--quiet", "--report", report, cwd=world))
    assert f"wrote metrics.json, per_class.json and confusion.json to {report} (replaced the earlier ones there)" in again
    assert snapshot(report).keys() == before.keys()


def test_a_size_that_cannot_fit_in_memory_is_one_line_before_any_decoding(world, tmp_path):
    """--image-size 4000 on 4 images took 6.5 GB: the batch's memory is estimated first."""
    from bit_transfer.system import memory

    line = one_line_error(predict(world / "run", "data/val/cat/000.png", "--image-size", 100_000, cwd=world), "predict")
    need = memory.batch_bytes([1, 1, 1, 1], 0.5, 100_000, 1) / memory.GB
    assert re.fullmatch(rf"bit-transfer predict: error: a batch of 1 image at 100000x100000 px needs about {need:.1f} GB "
                        r"of memory but [\d.]+ GB is available; even one image needs [\d.]+ GB: use a smaller "
                        r"--image-size \(at most \d+ fits\)", line), line
    assert not (world / "run" / "evals" / "step-000003-predict-cat").exists()


def test_the_memory_check_proposes_the_batch_that_fits():
    from bit_transfer.system import memory
    from bit_transfer.errors import UsageError

    per_image = memory.batch_bytes([3, 4, 6, 3], 1, 4000, 1)  # R50x1 at 4000 px: 360 B/px
    assert per_image == 360 * 4000 * 4000
    memory.check_batch([3, 4, 6, 3], 1, 4000, 4, batch_fix="--batch-size {n}", size_fix="--image-size",
                       available=4 * per_image)  # fits exactly: no error
    with pytest.raises(UsageError) as e:
        memory.check_batch([3, 4, 6, 3], 1, 4000, 4, batch_fix="--batch-size {n}", size_fix="--image-size",
                           available=int(2.5 * per_image))
    assert str(e.value) == ("a batch of 4 images at 4000x4000 px needs about 21.5 GB of memory but 13.4 GB is "
                            "available; use --batch-size 2 (about 10.7 GB) or a smaller --image-size")
    assert memory.available_bytes() > 0


# ---------------------------------------------------------------- model kinds
@pytest.mark.slow
def test_a_loose_checkpoint_a_hf_directory_and_hf_repo_predict_as_the_run(world, run_table, hf_export, tmp_path):
    (ckpt,) = sorted((world / "run" / "checkpoints").glob("step-*.ckpt"))[-1:]
    loose = shutil.copy(ckpt, tmp_path / "model.ckpt")
    said = ok(predict(loose, "data/val", cwd=world))  # no run around it: 128 px, said so
    assert "at 128x128 px (the default; pass --image-size N for the resolution" in summary(said)
    said = ok(predict(loose, "data/val", "--image-size", CROP, cwd=world))
    assert table(said) == run_table and "at 16x16 px (--image-size)" in summary(said)
    said = ok(predict(hf_export, "data/val", cwd=world))
    assert table(said) == run_table and "at 16x16 px (preprocessor_config.json)" in summary(said)
    assert "top-1 " in said  # class names from config.json's id2label: labelled by the folders

    home = tmp_path / "home"  # hf:org/name from the hub's cache, offline
    snap = home / "hf" / "models--org--tiny-bit" / "snapshots" / ("0" * 40)
    shutil.copytree(hf_export, snap, ignore=shutil.ignore_patterns(".bit-transfer-run"))
    (home / "hf" / "models--org--tiny-bit" / "refs").mkdir()
    (home / "hf" / "models--org--tiny-bit" / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, BIT_TRANSFER_HOME=str(home), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "bit_transfer", "predict", "hf:org/tiny-bit", "data/val/cat", "--quiet"],
                         capture_output=True, text=True, cwd=world, env=env, timeout=300)
    assert "labelled by the class folders of data/val/cat" not in ok(out)  # cat/ holds images, not class folders
    assert "predicted 3 images" in out.stdout
    line = one_line_error(subprocess.run(
        [sys.executable, "-m", "bit_transfer", "predict", "hf:org/other", "data/val"],
        capture_output=True, text=True, cwd=world, env=env, timeout=300), "predict")
    assert "cannot fetch config.json of hf:org/other" in line


def test_an_official_npz_answers_with_class_indices(world, tmp_path):
    from datagen import official_arrays

    np.savez(tmp_path / "BiT-M-tiny.npz", **official_arrays(classes=7))
    said = ok(predict(tmp_path / "BiT-M-tiny.npz", "data/val", "--top-k", 2, "--out", tmp_path / "p.jsonl",
                      cwd=world))
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(r["pred"] in [str(i) for i in range(7)] for r in rows)
    assert all(len(r["topk"]) == 2 for r in rows) and "labelled" not in said  # no names: no labels
    assert "at 128x128 px (the default" in summary(said)


@pytest.mark.slow
def test_a_missing_or_non_bit_model_is_one_line(world, tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3, np.float32))
    (tmp_path / "r.yaml").write_text("name: x\n")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.md").write_text("hi")
    (tmp_path / "cut.ckpt").write_bytes(b"\x00" * 100)
    cases = {
        tmp_path / "nope": f"model {tmp_path / 'nope'} not found; predict takes a run directory or its .ckpt, "
                           "a Hugging Face directory or hf:org/name, an official BiT .npz, or an .onnx",
        tmp_path / "other.npz": "it is not a BiT checkpoint",
        tmp_path / "r.yaml": f"{tmp_path / 'r.yaml'} is a '.yaml' file, not a model; predict takes",
        tmp_path / "stuff": "holds neither checkpoints/*.ckpt (a run) nor config.json and model.safetensors",
        tmp_path / "cut.ckpt": "is unreadable: truncated or corrupt",
    }
    before = snapshot(tmp_path)
    for model, message in cases.items():
        line = one_line_error(predict(model, "data/val", cwd=world), "predict")
        assert message in line, line
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- Predictor (in-process)
def test_import_bit_transfer_stays_light_and_predictor_is_lazy():
    code = ("import sys, bit_transfer\nassert 'mindspore' not in sys.modules\n"
            "from bit_transfer import Predictor, Prediction\nprint(Predictor.__module__, 'mindspore' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bit_transfer.predict", "False"]


def test_predictor_takes_paths_pil_images_and_arrays(world, run_table):
    from bit_transfer import Predictor
    from bit_transfer.errors import DataError

    p = Predictor(world / "run")
    assert p.class_names == CLASSES and p.image_size == CROP
    path = world / "data" / "val" / "dog" / "001.png"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    one = p.predict(str(path))
    assert one.source == str(path) and one.names == tuple(n for n, _ in run_table["data/val/dog/001.png"])
    assert [round(100 * x, 1) for x in one.probs] == [v for _, v in run_table["data/val/dog/001.png"]]
    same = p.predict([path, Image.open(path), pixels, np.stack([pixels, pixels])[0]], top_k=2)
    assert [s.names for s in same] == [one.names[:2]] * 4
    np.testing.assert_allclose([s.probs for s in same], [one.probs[:2]] * 4, atol=1e-6)
    gray = p.predict(pixels[..., 0])  # H×W: gray, repeated to RGB
    assert len(gray.names) == 3 and gray.label in CLASSES and 0 < gray.prob <= 1
    batch = p.predict(np.stack([pixels, pixels]))  # N×H×W×C: a list
    assert len(batch) == 2 and batch[0].names == one.names
    assert p.logits([path]).shape == (1, 3)
    with pytest.raises(DataError, match="images must be uint8"):
        p.predict(pixels.astype(np.float32) / 255)
    with pytest.raises(DataError, match="nope.png: no such file or directory; .*strict=False"):
        p.predict([path, world / "nope.png"])
    assert p.predict([path, world / "nope.png"], strict=False)[1] is None
    assert "Prediction(" in repr(one) and "%" in repr(one)
    from bit_transfer.errors import UsageError
    from bit_transfer.system import device

    if "GPU" not in device.available_devices():  # named as the caller wrote it, not as a flag or a recipe key
        with pytest.raises(UsageError, match=r"^device='GPU' but MindSpore cannot use it: .*, or use device='auto'$"):
            Predictor(world / "run", device="GPU")


# ---------------------------------------------------------------- ONNX
@pytest.mark.slow
def test_an_exported_onnx_predicts_as_the_checkpoint(world, run_table, tmp_path):
    import bit_transfer.data.pipeline  # noqa: F401  MindSpore before onnx loads protobuf (see predict.model._onnx_model)

    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from bit_transfer import Predictor

    ok(run_cli("export", world / "run", "--format", "onnx", "--out", tmp_path / "onnx"))
    model = tmp_path / "onnx" / "model.onnx"
    said = ok(predict(model, "data/val", "--report", tmp_path / "report", cwd=world))
    rows = table(said)
    assert {p: r[0][0] for p, r in rows.items()} == {p: r[0][0] for p, r in run_table.items()}  # the same top-1
    for path, top in rows.items():
        assert [n for n, _ in top] == [n for n, _ in run_table[path]]
        np.testing.assert_allclose([v for _, v in top], [v for _, v in run_table[path]], atol=0.11)
    assert f"with {model} at 16x16 px (the ONNX model's metadata)" in summary(said)
    reference = json.loads((world / "ref-report" / "metrics.json").read_text())  # the checkpoint's, labelled
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["top1"] == reference["top1"]
    assert table(ok(predict(tmp_path / "onnx", "data/val", cwd=world))) == rows  # the export directory
    one = Predictor(model).predict(world / "data" / "val" / "emu" / "000.png")
    assert one.names == tuple(n for n, _ in run_table["data/val/emu/000.png"])

    from onnx import TensorProto, helper, save  # an image classifier that is not a BiT: refused

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["logits"])], "foreign",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "other.onnx")
    line = one_line_error(predict(tmp_path / "other.onnx", "data/val", cwd=world), "predict")
    assert line.endswith(f"{tmp_path / 'other.onnx'} was not exported by bit-transfer (its metadata names no BiT "
                         "model); predict runs the .onnx that bit-transfer export --format onnx writes"), line


@pytest.mark.slow
def test_onnx_without_onnxruntime_says_what_to_install(world, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08")
    code = ("import sys\nsys.modules['onnxruntime'] = None\nfrom bit_transfer import cli\n"
            f"cli.main(['predict', {str(tmp_path / 'model.onnx')!r}, 'data/val'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=world, timeout=120)
    line = one_line_error(out, "predict")
    assert line.endswith("pip install 'bit-transfer[deploy]'"), line
    if importlib.util.find_spec("onnxruntime"):
        line = one_line_error(predict(tmp_path / "model.onnx", "data/val", cwd=world), "predict")
        assert f"{tmp_path / 'model.onnx'} is not a readable ONNX model" in line, line
