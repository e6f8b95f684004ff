"""The held-out digits `make demo` predicts: class folders of images never trained on, claimed like any output."""

import subprocess
import sys

from conftest import ROOT, snapshot


def samples(out, *extra):
    return subprocess.run([sys.executable, "-m", "bit_transfer.demo.samples", str(out), *map(str, extra)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_samples_are_the_first_held_out_digits_in_class_folders(tmp_path):
    from bit_transfer import data
    from bit_transfer.config import recipe as recipes
    from bit_transfer.demo.samples import DEMO_RECIPE

    out = samples(tmp_path / "s", "--count", 5)
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "s").rglob("*.png"))
    assert len(files) == 5
    held_out = data.load(recipes.load(DEMO_RECIPE).data)
    for f in files:
        i = int(f.stem.split("-")[1])
        assert f.parent.name == held_out.class_names[int(held_out.eval.labels[i])]
    assert samples(tmp_path / "s", "--count", 5).returncode == 0  # a rerun rewrites its own folder


def test_samples_never_write_into_a_folder_of_the_users(tmp_path):
    (tmp_path / "mine.txt").write_text("mine")
    before = snapshot(tmp_path)
    out = samples(tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
