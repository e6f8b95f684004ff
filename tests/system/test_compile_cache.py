"""The compiled training step reused across runs (compile_cache.py): the same weights whether the
step was compiled, loaded or rebuilt, a key that tells graphs apart, and a cache that can fail
without failing the run. Real `bit-transfer fit` processes on a tiny model."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, scratch_fs, write_recipe
from datagen import final_params, pattern_task, tiny_recipe

SAVED, LOADED, OFF = "compiled step saved to", "compiled step loaded from", "compile cache off"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pattern_task(tmp_path_factory.mktemp("patterns") / "cifar-10-batches-py", n_train=40, n_test=8)


def _fit(recipe_path, run_dir, home, **env):
    out = subprocess.run([sys.executable, "-m", "bit_transfer", "fit", str(recipe_path), "--run-dir", str(run_dir)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, BIT_TRANSFER_HOME=str(home), PYTHONUNBUFFERED="1", **env))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return out.stdout


def _entries(home):
    return sorted(p for p in (home / "compile-cache").iterdir() if not p.name.startswith("."))


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_a_second_fit_loads_the_step_and_trains_the_same_weights(task, tmp_path):
    """Micro-batching (gradient sums held in Parameters) and MixUp: the step's Parameters must be
    rebound by name on a load (a step compiled as a plain function trained on NaN from its cache).
    An entry MindSpore refuses (here: its check of the entry script's imports fails) is compiled
    anew, then removed."""
    home = tmp_path / "home"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(task, tmp_path, rule__steps=4, rule__mixup_alpha=0.2,
                                                           train__batch_split=2))
    first = _fit(recipe, tmp_path / "compiled", home)
    assert SAVED in first and LOADED not in first
    (entry,) = _entries(home)
    second = _fit(recipe, tmp_path / "loaded", home)
    assert f"{LOADED} {entry}" in second, second

    manifest = json.loads((entry / "manifest.json").read_text())
    (dependencies,) = entry.rglob("compile_dependency.hash")
    dependencies.chmod(0o600)
    dependencies.write_text("0" * 64)
    manifest[str(dependencies.relative_to(entry))] = hashlib.sha256(b"0" * 64).hexdigest()
    (entry / "manifest.json").write_text(json.dumps(manifest))
    third = _fit(recipe, tmp_path / "refused", home)
    assert f"compile cache: {entry} did not load; removed" in third and not entry.exists()

    _fit(recipe, tmp_path / "uncached", home, BIT_TRANSFER_COMPILE_CACHE="0")
    reference = final_params(tmp_path / "uncached")
    assert all(np.isfinite(v).all() for v in reference.values())
    for run in ("compiled", "loaded", "refused"):
        _same_weights(final_params(tmp_path / run), reference)
    _predict_twice(tmp_path / "uncached", task, home)


def _predict_twice(run, task, home):
    """`predict` caches its (folded) inference graph the same way, silently: the second run loads it
    (its manifest is touched) and writes the same probabilities."""
    from datagen import save_image

    images = [save_image(run.parent / "images" / f"{k}.png", k, size=(16, 16)) for k in range(4)]
    env = dict(os.environ, BIT_TRANSFER_HOME=str(home))
    for i in (1, 2):
        out = subprocess.run([sys.executable, "-m", "bit_transfer", "predict", str(run), *map(str, images),
                              "--out", str(run.parent / f"predicted{i}.csv"), "--quiet"],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        (entry,) = [e for e in _entries(home) if json.loads((e / "key.json").read_text())["settings"].get("step") == "eval"]
        manifest = entry / "manifest.json"
        if i == 1:
            os.utime(manifest, (1000, 1000))
    assert manifest.stat().st_mtime > 1000  # loaded
    assert (run.parent / "predicted1.csv").read_text() == (run.parent / "predicted2.csv").read_text()


def test_a_damaged_entry_and_abandoned_work_are_removed(tmp_path):
    from bit_transfer.system import compile_cache

    cache, key = tmp_path / "compile-cache", "k" * 32
    work = cache / "work"
    (work / "rank_0").mkdir(parents=True)
    (work / "rank_0" / "compile_cache_0.mindir").write_bytes(b"graph" * 100)
    compile_cache._publish(work, cache / key)
    assert compile_cache._prepare(cache, key) == (cache / key, cache / key)  # intact: used as it is

    graph = cache / key / "rank_0" / "compile_cache_0.mindir"
    graph.write_bytes(graph.read_bytes()[:250])  # a half-written or damaged file
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    abandoned = cache / f".tmp-{key}-0a-{host}-{dead.pid}"  # a process killed while compiling
    alive = cache / f".tmp-{key}-0b-{host}-{os.getppid()}"  # another process compiling now
    elsewhere = cache / f".tmp-{key}-0c-another-host-{dead.pid}"  # a shared home: its pid is not ours to ask
    for d in (abandoned, alive, elsewhere):
        d.mkdir()
    entry, work = compile_cache._prepare(cache, key)
    assert entry == cache / key and not entry.exists()
    assert work.parent == cache and work.name.startswith(f".tmp-{key}-") and work.name.endswith(f"-{host}-{os.getpid()}")
    assert work.is_dir() and not abandoned.exists() and alive.exists() and elsewhere.exists()
    day_old = time.time() - 86400 - 60
    os.utime(elsewhere, (day_old, day_old))
    compile_cache._prepare(cache, key)
    assert not elsewhere.exists() and alive.exists()


def test_entries_unused_for_a_month_are_pruned_when_one_is_saved(tmp_path):
    from bit_transfer.system import compile_cache

    cache = tmp_path / "compile-cache"
    for key in ("old", "recent"):
        work = cache / f"work-{key}"
        (work / "rank_0").mkdir(parents=True)
        (work / "rank_0" / "compile_cache_0.mindir").write_bytes(b"graph")
        compile_cache._publish(work, cache / key)
    month = compile_cache.KEEP_DAYS * 86400
    os.utime(cache / "old" / "manifest.json", (0, 1000))
    compile_cache._prune(cache, now=1000 + month + 1)
    assert sorted(p.name for p in cache.iterdir()) == ["recent"]


def test_graph_keys_tell_apart_what_shapes_the_graph():
    from bit_transfer.system import compile_cache
    from bit_transfer.system import device
    from bit_transfer.models import create_model
    from bit_transfer.engine.step import TrainStep

    device.setup("CPU")
    x = np.zeros((4, 3, 16, 16), np.uint8), np.zeros((4,), np.int32), np.zeros((4,), np.int32)

    def key(inputs=x, split=1, **model):
        args = dict(depths=[1, 1, 1, 1], width=0.125) | model
        step = TrainStep(create_model("custom", 3, **args), momentum=0.9, weight_decay=0.0, batch_split=split)
        return compile_cache.graph_key(step._cell, inputs, step._settings)

    base = key()
    assert key() == base  # a model built twice
    assert key(padding="same") != base  # the stride-2 convolutions pad from the input size
    assert key(width=0.25) != base
    assert key(depths=[1, 1, 2, 1]) != base
    assert key(split=2) != base
    assert key(inputs=tuple(a[:2] for a in x)) != base

    import mindspore as ms

    step = TrainStep(create_model("custom", 3, depths=[1, 1, 1, 1], width=0.125), momentum=0.9, weight_decay=0.0,
                     batch_split=1)
    step.optimizer.momentum = ms.Tensor(0.5, ms.float32)  # a Tensor (not a Parameter) is compiled in as a value
    assert compile_cache.graph_key(step._cell, x, step._settings) != base


@pytest.mark.slow
def test_an_unusable_cache_costs_one_line_not_the_run(task, tmp_path):
    """A nearly full disk under the cache: the run goes on without it and says so in one line."""
    home = tmp_path / "home"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(task, tmp_path, rule__steps=2))
    with scratch_fs(home / "compile-cache", size="8m"):
        out = _fit(recipe, tmp_path / "full", home)
        assert f"{OFF} for this run: less than 64 MB free ({home / 'compile-cache'})" in out, out
        assert not _entries(home)


def test_a_file_where_the_cache_goes_is_named_and_left_alone(home, monkeypatch):
    from bit_transfer.system import compile_cache
    from bit_transfer.system import device
    from bit_transfer.models import create_model
    from bit_transfer.engine.step import TrainStep

    device.setup("CPU")
    monkeypatch.setattr(compile_cache, "_used", False)  # this process may have trained already
    home.mkdir()
    (home / "compile-cache").write_text("mine")
    step = TrainStep(create_model("custom", 3, depths=[1, 1, 1, 1], width=0.125), momentum=0.9, weight_decay=0.0,
                     batch_split=1)
    said = []
    with compile_cache.first_call(step._cell, (np.zeros((2, 3, 16, 16), np.uint8),), step._settings, said.append):
        pass
    assert said == [f"{OFF} for this run: File exists ({home / 'compile-cache'})"]
    assert (home / "compile-cache").read_text() == "mine"
