"""No way to lose work: signals at the final checkpoint and the final evaluation, kill -9 during a
checkpoint write, foreign run directories, read-only and full disks, finished and changed runs.
Real `bit-transfer fit` processes, real signals, real files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import (GRAPHS, ROOT, one_line_error, run_cli, scratch_fs, snapshot, start_fit, use_graph,
                      wait_for, write_recipe)
from datagen import final_params, pattern_task, read_jsonl, tiny_recipe

STEPS = 20


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pattern_task(tmp_path_factory.mktemp("safety") / "cifar-10-batches-py", n_train=40, n_test=64)


def recipe_path(task, tmp_path, **sets) -> Path:
    """A tiny recipe whose final checkpoint write and evaluation take long enough to be hit by a signal."""
    sets = {"rule__steps": STEPS, "model__width": 0.5, "log__tensorboard": False, **sets}
    return write_recipe(tmp_path / "r.yaml", tiny_recipe(task, tmp_path / "runs", **sets))


def signal_at(proc, condition, signals, gap=0.0):
    wait_for(condition, proc)
    for i, s in enumerate(signals):
        if i:
            time.sleep(gap)
        proc.send_signal(s)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def final_tmp(run_dir: Path):
    return lambda: (run_dir / "checkpoints" / f"step-{STEPS:06d}.ckpt.tmp").exists()


def final_ckpt(run_dir: Path):
    return lambda: (run_dir / "checkpoints" / f"step-{STEPS:06d}.ckpt").exists()


def assert_whole(run_dir: Path, step: int = STEPS):
    """The checkpoint of `step` reads back (CRC checked), and no temporary is left."""
    from bit_transfer.models.weights.ckpt import read_checkpoint

    _, meta = read_checkpoint(run_dir / "checkpoints" / f"step-{step:06d}.ckpt")
    assert meta["step"] == step
    assert not list((run_dir / "checkpoints").glob("*.tmp")), list((run_dir / "checkpoints").iterdir())


def rerun_finishes(recipe: Path, run_dir: Path) -> dict:
    out = run_cli("fit", recipe, "--run-dir", run_dir, "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["completed"] and m["steps"] == STEPS and m["top1"] is not None
    assert (run_dir / "eval" / "confusion.json").is_file()
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # no step trained twice
    return m


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_the_final_checkpoint_write_loses_nothing(task, tmp_path, sig):
    """Was: the process died inside the last save and left only step-000020.ckpt.tmp/."""
    recipe, run_dir = recipe_path(task, tmp_path), tmp_path / "run"
    code, out, err = signal_at(start_fit(recipe, run_dir), final_tmp(run_dir), [sig])
    assert code in (0, 130), err
    assert "Traceback" not in err
    assert_whole(run_dir)
    m = rerun_finishes(recipe, run_dir)
    if code == 0:  # the signal came after the last step: the run finished, evaluation included
        assert m["completed"]


@pytest.mark.slow
def test_two_signals_at_the_final_checkpoint_keep_it_whole_and_a_rerun_evaluates(task, tmp_path):
    """20 ms apart, both inside the write (~30 ms here). Sent back to back, the kernel merges the second
    into the first while that is still pending (a standard signal does not queue): one signal was counted,
    the evaluation ran to its end and fit exited 0, in 5 of 6 runs on one machine (and once in CI)."""
    recipe, run_dir = recipe_path(task, tmp_path), tmp_path / "run"
    code, out, err = signal_at(start_fit(recipe, run_dir), final_tmp(run_dir), [signal.SIGTERM, signal.SIGTERM],
                               gap=0.02)
    assert code == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("bit-transfer fit: interrupted: SIGTERM") and "rerun the same command" in line, err
    assert "Traceback" not in err
    assert_whole(run_dir)
    assert not (run_dir / "metrics.json").exists()
    rerun_finishes(recipe, run_dir)


@pytest.mark.slow
def test_two_sigints_during_the_final_evaluation_stop_it_and_a_rerun_finishes(task, tmp_path):
    """SIGINT is reported as SIGINT (MindSpore's own handler would turn it into SIGTERM)."""
    recipe, run_dir = recipe_path(task, tmp_path), tmp_path / "run"
    code, out, err = signal_at(start_fit(recipe, run_dir), final_ckpt(run_dir), [signal.SIGINT, signal.SIGINT], gap=0.05)
    assert "Traceback" not in err
    assert_whole(run_dir)
    if code == 130:  # (the evaluation of 64 images can end between the two signals)
        line = err.strip().splitlines()[-1]
        assert line.startswith("bit-transfer fit: interrupted: SIGINT"), err
        assert f"checkpoint step-{STEPS:06d}.ckpt is complete" in line, line
    else:
        assert code == 0, err
    rerun_finishes(recipe, run_dir)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_checkpoints_evaluates_and_exits_130(task, tmp_path, sig):
    recipe, run_dir = recipe_path(task, tmp_path, rule__steps=100000), tmp_path / "run"
    proc = start_fit(recipe, run_dir)
    code, out, err = signal_at(proc, lambda: (run_dir / "metrics.jsonl").is_file()
                               and (run_dir / "metrics.jsonl").read_text().count("\n") >= 3, [sig])
    assert code == 130, err
    # A Ctrl-C that lands inside a compiled step's run meets MindSpore's SignalGuard, which turns it
    # into SIGTERM (mindspore/ccsrc/utils/signal_util.cc); between steps it is reported as SIGINT.
    names = ("SIGINT", "SIGTERM") if sig == signal.SIGINT else (sig.name,)
    assert any(f"{name}: stopping after step" in out for name in names), out
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["stopped_by_signal"] and not m["completed"] and m["steps"] >= 3
    assert_whole(run_dir, m["steps"])


def test_a_signal_while_loading_is_one_line_and_leaves_no_run(task, tmp_path):
    recipe, run_dir = recipe_path(task, tmp_path), tmp_path / "run"
    proc = start_fit(recipe, run_dir)
    code, out, err = signal_at(proc, lambda: (run_dir / ".bit-transfer-run").exists(), [signal.SIGINT])
    assert code == 130, err
    assert "Traceback" not in err and "SIGTERM" not in out + err  # reported as what was sent
    if not list((run_dir / "checkpoints").glob("*.ckpt")) if run_dir.exists() else True:
        assert not run_dir.exists(), list(run_dir.iterdir())  # a new run with nothing to resume is removed
        line = one_line_error(subprocess.CompletedProcess([], code, out, err), "fit", 130, "interrupted")
        assert line.startswith("bit-transfer fit: interrupted: SIGINT while") and "rerun the same command" in line


@pytest.mark.slow
@pytest.mark.parametrize("graph", GRAPHS)
def test_kill_9_during_a_checkpoint_write_resumes_to_the_same_weights(task, tmp_path, graph):
    recipe = recipe_path(task, tmp_path, train__checkpoint_every=5, rule__mixup_alpha=0.2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    with use_graph(graph):
        assert run_cli("fit", recipe, "--run-dir", straight, "--quiet").returncode == 0
        proc = start_fit(recipe, killed)
        wait_for(lambda: (killed / "checkpoints" / "step-000015.ckpt.tmp").exists(), proc)
        proc.kill()
        proc.wait()
        assert not (killed / "checkpoints" / "step-000015.ckpt").exists()
        rerun_finishes(recipe, killed)
    assert not list((killed / "checkpoints").glob("*.tmp"))
    a, b = final_params(straight), final_params(killed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), "resume is not bit-identical"


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(task, tmp_path):
    recipe, run_dir = recipe_path(task, tmp_path, train__checkpoint_every=5), tmp_path / "run"
    out = run_cli("fit", recipe, "--run-dir", run_dir, "--quiet", "--stop-after", 10)
    assert out.returncode == 0, out.stderr
    latest = run_dir / "checkpoints" / "step-000010.ckpt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a full disk on another tool
    out = run_cli("fit", recipe, "--run-dir", run_dir, "--quiet")
    assert out.returncode == 0, out.stderr
    assert "notice: step-000010.ckpt is truncated or corrupt" in out.stdout
    assert "resumed from step-000005.ckpt at step 5" in out.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["completed"]


# ----------------------------------------------------------------------------- the run directory
def test_fit_never_writes_into_a_directory_that_is_not_a_run(task, tmp_path):
    """Was: `fit recipe.yaml --run-dir .` overwrote the user's recipe.yaml (comments gone), plan.json, metrics.json."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("# my notes\n" + recipe_path(task, tmp_path).read_text())
    (mine / "plan.json").write_text('{"mine": 1}')
    (mine / "metrics.json").write_text('{"mine": 2}')
    before = snapshot(mine)
    out = run_cli("fit", mine / "recipe.yaml", "--run-dir", ".", cwd=mine)
    line = one_line_error(out, "fit")
    assert "is not a bit-transfer run" in line and "--run-dir" in line
    assert snapshot(mine) == before


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_a_run_directory_that_is_a_file_is_one_line(task, tmp_path, where):
    (tmp_path / "f").write_text("mine")
    target = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    out = run_cli("fit", recipe_path(task, tmp_path), "--run-dir", target)
    line = one_line_error(out, "fit")
    assert "file" in line
    assert (tmp_path / "f").read_text() == "mine"


def test_resume_of_a_missing_directory_is_refused_not_started(task, tmp_path):
    out = run_cli("fit", recipe_path(task, tmp_path), "--resume", tmp_path / "runs" / "typo")
    line = one_line_error(out, "fit")
    assert "--resume" in line and "does not exist" in line
    assert not (tmp_path / "runs" / "typo").exists()


def test_a_read_only_place_is_one_line(task, tmp_path):
    with scratch_fs(tmp_path / "ro", read_only=True) as ro:
        out = run_cli("fit", recipe_path(task, tmp_path), "--run-dir", ro / "run")
    assert "read-only" in one_line_error(out, "fit")


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_much_was_needed(task, tmp_path):
    recipe = recipe_path(task, tmp_path, train__checkpoint_every=5, train__keep_checkpoints=5)
    sizing = tmp_path / "sizing"
    assert run_cli("fit", recipe, "--run-dir", sizing, "--quiet", "--stop-after", 5).returncode == 0
    ckpt = (sizing / "checkpoints" / "step-000005.ckpt").stat().st_size
    small = sum(p.stat().st_size for p in sizing.rglob("*") if p.is_file() and p.suffix != ".ckpt")
    with scratch_fs(tmp_path / "full", size=f"{(small + int(1.5 * ckpt)) // 1024 + 64}k") as disk:
        out = run_cli("fit", recipe, "--run-dir", disk / "run", "--quiet")
        line = one_line_error(out, "fit")
        assert "no space left" in line and "MB needed" in line and "step-000005.ckpt is kept" in line, line
        ckpts = sorted(p.name for p in (disk / "run" / "checkpoints").iterdir())
        assert ckpts == ["step-000005.ckpt"], ckpts  # the whole previous one; no partial file
        assert_whole(disk / "run", 5)


@pytest.mark.slow
def test_rerunning_a_finished_run_reports_it_and_writes_nothing(task, tmp_path):
    recipe, run_dir = recipe_path(task, tmp_path, rule__steps=3), tmp_path / "run"
    assert run_cli("fit", recipe, "--run-dir", run_dir, "--quiet").returncode == 0
    before = snapshot(run_dir)
    out = run_cli("fit", recipe, "--run-dir", run_dir, "--quiet")
    assert out.returncode == 0, out.stderr
    assert "is finished: top-1" in out.stdout and "nothing to do" in out.stdout
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_changed_recipe_names_the_keys_and_what_may_change(task, tmp_path):
    recipe, run_dir = recipe_path(task, tmp_path), tmp_path / "run"
    assert run_cli("fit", recipe, "--run-dir", run_dir, "--quiet", "--stop-after", 2).returncode == 0
    line = one_line_error(run_cli("fit", recipe, "--run-dir", run_dir, "--set", "rule.base_lr=0.1"), "fit")
    assert "rule.base_lr (0.05 there, 0.1 now)" in line and "another --run-dir" in line and "train.eval_every" in line
    out = run_cli("fit", recipe, "--run-dir", run_dir, "--quiet", "--set", "train.eval_every=5",
                  "--set", "data.skip_corrupt=true")
    assert out.returncode == 0, out.stderr
    assert "resuming with changed settings: data.skip_corrupt, train.eval_every" in out.stdout
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["eval_every"] == 5


def test_a_failed_new_run_leaves_no_empty_directory(task, tmp_path):
    bad = write_recipe(tmp_path / "bad.yaml", tiny_recipe(tmp_path / "no-such-data", tmp_path / "runs"))
    out = run_cli("fit", bad)
    one_line_error(out, "fit")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------- data integrity
def corrupt_folder(tmp_path, where: str) -> Path:
    import datagen

    root = datagen.image_folder(tmp_path / "imgs", {"a": 6, "b": 6}, eval_count=3)
    victim = sorted((root / where).rglob("*.png"))[0]
    datagen.corrupt(victim)
    return root


def folder_recipe(tmp_path, root: Path, **sets) -> Path:
    sets = {"rule__steps": 3, "log__tensorboard": False, **sets}
    r = tiny_recipe(root, tmp_path / "runs", **sets).with_overrides(["data.source=imagefolder"])
    return write_recipe(tmp_path / "folder.yaml", r)


def test_a_corrupt_eval_image_is_found_before_training(tmp_path):
    root = corrupt_folder(tmp_path, "val")
    t = time.time()
    out = run_cli("fit", folder_recipe(tmp_path, root), "--run-dir", tmp_path / "run")
    line = one_line_error(out, "fit")
    assert "val" in line and "data.skip_corrupt" in line, line
    assert "step 1" not in out.stdout and not (tmp_path / "run").exists()
    assert time.time() - t < 60


@pytest.mark.slow
def test_skip_corrupt_counts_are_printed_and_recorded(tmp_path):
    root = corrupt_folder(tmp_path, "val")
    out = run_cli("fit", folder_recipe(tmp_path, root, data__skip_corrupt=True), "--run-dir", tmp_path / "run", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "skipping unreadable images (data.skip_corrupt): 1 in eval" in out.stdout
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["skipped_corrupt"] == {"train": 0, "eval": 1} and m["eval_images"] == 5


def test_two_ranks_check_the_data_before_launching(tmp_path):
    """Was: 41 s and 37 lines of stack frames from every rank, the message cut."""
    root = corrupt_folder(tmp_path, "train")
    t = time.time()
    out = run_cli("fit", folder_recipe(tmp_path, root), "--devices", 2, "--run-dir", tmp_path / "run")
    line = one_line_error(out, "fit")
    assert "cannot read image" in line and "data.skip_corrupt" in line
    assert time.time() - t < 20 and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- what the loop reports
def test_a_non_finite_step_names_the_step_and_its_own_lr(task, tmp_path):
    """Was: 'loss became 1.35e+28 at step 3 (lr 7.5e+29)': a finite loss, a 0-based step, the next step's lr."""
    import re

    from bit_transfer.hyperrule.rule import plan as make_plan
    from bit_transfer.commands.fit import TrainingDiverged, fit

    r = tiny_recipe(task, tmp_path, rule__steps=40, rule__base_lr=1e30)  # no checkpoint (and its weight check) before
    with pytest.raises(TrainingDiverged) as e:
        fit(r, run_dir=tmp_path / "nan")
    msg = str(e.value)
    m = re.search(r"^the (loss|gradients) became (\S+).* at step (\d+) \(lr ([^)]+)\)", msg)
    assert m, msg
    step, lr = int(m.group(3)), float(m.group(4))
    plan = make_plan(160, (32, 32), precrop=20, crop=16, steps=40, base_lr=1e30, batch_size=16)
    assert lr == pytest.approx(plan.lr(step - 1), rel=1e-3)  # the lr of the update that failed
    if m.group(1) == "loss":
        assert not np.isfinite(float(m.group(2)))
    done = [row["step"] for row in read_jsonl(tmp_path / "nan" / "metrics.jsonl") if "train/loss" in row]
    assert done[-1] == step - 1  # the failed step is the one after the last logged

    # Read from the device only at log points (every 50 here), a step's results still name the same step,
    # and the evaluation due at step 20 is not run on what the divergence left.
    r = tiny_recipe(task, tmp_path, rule__steps=40, rule__base_lr=1e30, log__every=50, train__eval_every=20)
    with pytest.raises(TrainingDiverged) as e:
        fit(r, run_dir=tmp_path / "lazy")
    assert re.search(r"at step (\d+) ", str(e.value)).group(1) == str(step), (str(e.value), msg)
    assert step < 20 and not (tmp_path / "lazy").exists()  # nothing logged, no evaluation: the failed run is gone


def test_divergence_without_nan_is_flagged():
    from bit_transfer.commands.fit import _diverged

    assert _diverged([(1, 2.3), (10, 1.1), (20, 0.4)]) is None
    assert _diverged([(1, 2.3), (20, 6e36)]) == "2.3 at step 1 -> 6e+36 at step 20"
    assert _diverged([(1, 2.3), (20, float("inf"))]) is not None


def test_eta_counts_only_the_steps_of_this_process():
    """Was: 43.9 min for a 15 s run right after a resume (the resumed steps counted as done here)."""
    from bit_transfer.run.runlog import Throughput

    t = Throughput(batch=16, step=990)  # resumed at step 990 of 1000
    t.tick()
    assert t.eta(991, 1000) is None  # the first step carries the compile: no estimate from it
    t.t1 -= 1.0  # pretend the steps after the first took 0.5 s each
    t.tick()
    t.tick()
    assert t.eta(993, 1000) == pytest.approx(7 * 0.5, rel=0.05)


def test_data_wait_is_the_share_of_time_spent_waiting_for_batches():
    """train/data_wait, and the final line's input-bound note, measure real waits (time.sleep here)."""
    import time

    from bit_transfer.run.runlog import Throughput

    t = Throughput(batch=8, step=0)
    t.waited(0.05)
    t.tick()  # the first step: its wait is start-up, counted in the window only
    t.window()
    for _ in range(3):
        start = time.perf_counter()
        time.sleep(0.03)  # waiting for a batch
        t.waited(time.perf_counter() - start)
        time.sleep(0.01)  # the step itself
        t.tick()
    _, share = t.window()
    assert 0.5 < share <= 0.9, share
    assert 0.5 < t.wait_share() <= 0.9 and t.wait_share() > Throughput.INPUT_BOUND


def test_metrics_json_is_strict_json(tmp_path):
    from bit_transfer.run import runlog

    runlog.write_json(tmp_path / "m.json", {"loss": float("nan"), "x": [float("inf"), 1.0], "ok": 2})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) == \
        {"loss": None, "x": [None, 1.0], "ok": 2}
    log = runlog.MetricsLog(tmp_path, tensorboard=False)
    log.log(1, {"train/loss": float("nan")})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": None}


@pytest.mark.slow
def test_an_interrupted_fewshot_sweep_exits_130_and_a_rerun_completes_it(task, tmp_path):
    recipe = recipe_path(task, tmp_path, rule__steps=30)
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "bit_transfer", "fewshot", str(recipe), "--shots", "1,2", "--seeds", "0",
            "--run-dir", str(sweep), "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    first = sweep / "shots1-seed0" / "metrics.jsonl"
    code, out, err = signal_at(proc, lambda: first.is_file() and first.read_text().count("\n") >= 3, [signal.SIGINT])
    assert code == 130, err
    assert "Traceback" not in err and "resume it with --run-dir" in out
    assert not (sweep / "summary.csv").exists()
    again = run_cli("fewshot", recipe, "--shots", "1,2", "--seeds", "0", "--run-dir", sweep, "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (sweep / "summary.csv").read_text().count("\n") == 3  # header + two runs


def test_a_node_rank_outside_the_nodes_is_one_line(task, tmp_path):
    line = one_line_error(run_cli("fit", recipe_path(task, tmp_path), "--nodes", 2, "--node-rank", 2), "fit")
    assert "--node-rank 2 is not below --nodes 2" in line


@pytest.mark.slow
@pytest.mark.parametrize("size", ["24k", "48k"])  # TensorBoard's writer thread, then metrics.jsonl, fills it
def test_a_disk_that_fills_with_logs_is_one_line(task, tmp_path, size):
    """Was: a traceback from closing the log, then tensorboardX's atexit flush and its thread."""
    recipe = recipe_path(task, tmp_path, rule__steps=400, log__tensorboard=True)
    with scratch_fs(tmp_path / "small", size=size) as disk:
        line = one_line_error(run_cli("fit", recipe, "--run-dir", disk / "run", "--quiet"), "fit")
    assert "no space left writing" in line and ("metrics.jsonl" in line or "tfevents" in line), line


@pytest.mark.slow
def test_each_kind_of_output_stays_its_own(task, tmp_path):
    """Was: `fewshot --run-dir <a fit run>` wrote a sweep into the run, `fit --run-dir <an export>` trained there."""
    recipe, run_dir = recipe_path(task, tmp_path, rule__steps=2), tmp_path / "run"
    assert run_cli("fit", recipe, "--run-dir", run_dir, "--quiet").returncode == 0
    export = tmp_path / "export"
    assert run_cli("export", run_dir, "--format", "hf", "--out", export).returncode == 0
    before = snapshot(tmp_path)
    line = one_line_error(run_cli("fewshot", recipe, "--shots", 1, "--seeds", 0, "--run-dir", run_dir), "fewshot")
    assert "is a bit-transfer fit directory, not a few-shot sweep" in line
    line = one_line_error(run_cli("fit", recipe, "--run-dir", export), "fit")
    assert "is a bit-transfer export directory, not a fit run" in line
    assert snapshot(tmp_path) == before


def test_a_feature_cache_that_is_a_file_is_one_line(task, tmp_path):
    (tmp_path / "cache").write_text("mine")
    out = run_cli("fewshot", recipe_path(task, tmp_path), "--shots", 1, "--seeds", 0, "--mode", "linear",
                  "--feature-cache", tmp_path / "cache", "--run-dir", tmp_path / "sweep")
    assert "a file stands where a directory should be" in one_line_error(out, "fewshot")
    assert (tmp_path / "cache").read_text() == "mine"


@pytest.mark.slow
def test_two_signals_during_one_long_c_call_count_twice():
    """Python runs its handler once for both when they land inside one C call (a checkpoint write);
    the stop flag counts the deliveries, so the second signal still skips the evaluation."""
    import threading

    from bit_transfer.run.signals import StopFlag

    big = np.random.default_rng(0).random(40_000_000)
    with StopFlag() as stop:
        def send_two():
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)

        sender = threading.Thread(target=send_two)
        sender.start()
        t = time.perf_counter()
        np.sort(big)  # one C call, far longer than the sender's 70 ms
        assert time.perf_counter() - t > 0.1
        sender.join()
        time.sleep(0.01)
        assert stop.count == 2 and stop.hard and stop.name == "SIGTERM"


# ----------------------------------------------------------------------------- one writer per directory
def refused_by(out, holder: subprocess.Popen, command: str = "fit") -> str:
    line = one_line_error(out, command)
    assert f"in use by another bit-transfer process (pid {holder.pid})" in line, line
    return line


def training(run_dir: Path, steps: int = 2):
    """Once `steps` train rows are logged (the run is claimed and training)."""
    log = run_dir / "metrics.jsonl"
    return lambda: log.is_file() and log.read_text().count("train/loss") >= steps


@pytest.mark.slow
def test_a_second_fit_on_a_run_is_refused_before_it_touches_anything(task, tmp_path):
    """Was: both trained, metrics.jsonl got every row twice, and the second deleted the first's checkpoint in flight."""
    recipe = recipe_path(task, tmp_path, rule__steps=100000, train__checkpoint_every=5, train__keep_checkpoints=10**6)
    run_dir = tmp_path / "run"  # (every checkpoint kept: eval reads one while fit goes on)
    first = start_fit(recipe, run_dir)
    try:
        wait_for(lambda: training(run_dir)() and list((run_dir / "checkpoints").glob("*.ckpt")), first)
        in_flight = run_dir / "checkpoints" / "step-999999.ckpt.tmp"  # what a claim's clean-up would remove
        in_flight.mkdir()
        refused_by(run_cli("fit", recipe, "--run-dir", run_dir, "--quiet"), first)
        assert in_flight.is_dir()
        in_flight.rmdir()
        # readers keep working on the run being written
        assert run_cli("eval", recipe, "--checkpoint", run_dir).returncode == 0
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=180)
    assert first.returncode == 130 and "Traceback" not in err, err
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["stopped_by_signal"]
    assert_whole(run_dir, m["steps"])
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, m["steps"] + 1)), steps  # every step logged once: one writer


@pytest.mark.slow
def test_kill_9_of_the_holder_leaves_no_lock_and_a_new_fit_resumes(task, tmp_path):
    recipe, run_dir = recipe_path(task, tmp_path, train__checkpoint_every=5), tmp_path / "run"
    proc = start_fit(recipe, run_dir)
    wait_for(lambda: (run_dir / "checkpoints" / "step-000005.ckpt").is_file(), proc)
    proc.kill()
    proc.wait()
    out = run_cli("fit", recipe, "--run-dir", run_dir, "--quiet")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step-0000" in out.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["completed"]


@pytest.mark.slow
def test_a_concurrent_fewshot_sweep_is_refused(task, tmp_path):
    recipe, sweep = recipe_path(task, tmp_path, rule__steps=100000), tmp_path / "sweep"
    args = ["fewshot", str(recipe), "--shots", "1", "--seeds", "0", "--run-dir", str(sweep), "--quiet"]
    first = subprocess.Popen([sys.executable, "-m", "bit_transfer", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_for(training(sweep / "shots1-seed0"), first)
        before = (sweep / "sweep.yaml").read_bytes()
        line = refused_by(run_cli(*args), first, "fewshot")
        assert str(sweep) in line and "--run-dir" in line
        assert (sweep / "sweep.yaml").read_bytes() == before and first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=180)
    assert first.returncode == 130 and "Traceback" not in err, err


def test_a_second_writer_in_another_process_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    """The lock itself, across real processes: held while the holder lives, free the moment it is killed."""
    from bit_transfer.errors import UsageError
    from bit_transfer.run.rundir import RunDir

    out = tmp_path / "export"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom bit_transfer.run.rundir import RunDir\n"
                               f"run = RunDir.claim({str(out)!r}, kind='export', flag='--out')\n"
                               "print('held', flush=True)\ntime.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=rf"in use by another bit-transfer process \(pid {holder.pid}\).*\(--out\)"):
            RunDir.claim(out, kind="export", flag="--out")
        RunDir.claim(out, kind="export", writer=False)  # a reader
    finally:
        holder.kill()
        holder.wait()
    run = RunDir.claim(out, kind="export", flag="--out")
    again = RunDir.claim(out, kind="export", flag="--out")  # one process: the same lock, shared
    assert run.lock is again.lock is not None
    assert sorted(p.name for p in out.iterdir()) == [".bit-transfer-run"]  # the marker is the lock: no other file


# ----------------------------------------------------------------------------- signals at the edges
def catches_sigterm(pid: int) -> bool:
    """The process has a SIGTERM handler (Python alone has none): bit-transfer's first instruction ran."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def loads_mindspore(pid: int) -> bool:
    """MindSpore's C library is mapped: `import mindspore` is under way (where a signal once cut it in half)."""
    return "_c_expression" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
def test_a_signal_in_the_first_seconds_of_fit_is_one_line_and_exit_130(task, tmp_path):
    """Was: a KeyboardInterrupt traceback ending in 'ImportError: initialization failed' (exit 1), an abort
    at shutdown (exit 134), or for SIGTERM exit 143 and no word. Delays from bit-transfer's first instruction
    (before it, the interpreter itself is starting: no program can answer for that)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc to see when the process starts listening")
    recipe, run_dir = recipe_path(task, tmp_path, rule__steps=3), tmp_path / "run"
    # no moment later than 0.5 s: with a warm compile cache this recipe trains within ~2 s of the first
    # instruction, and a signal in a step is a graceful stop (a checkpoint, said on stdout), tested apart
    for sig, moment in [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.1), (signal.SIGINT, loads_mindspore),
                        (signal.SIGTERM, 0.5)]:
        proc = start_fit(recipe, run_dir)
        wait_for(lambda: catches_sigterm(proc.pid), proc)
        if callable(moment):
            wait_for(lambda: moment(proc.pid), proc)
        else:
            time.sleep(moment)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=180)
        line = one_line_error(subprocess.CompletedProcess([], proc.returncode, out, err), "fit", 130, "interrupted")
        assert line.startswith(f"bit-transfer fit: interrupted: {sig.name}") and "rerun the same command" in line, line
        assert not list(run_dir.glob("checkpoints/*.ckpt"))
    out = run_cli("fit", recipe, "--run-dir", run_dir, "--quiet")  # the same command, later: a run
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["completed"]


@pytest.mark.slow
def test_a_signal_during_the_final_checkpoint_write_is_said_recorded_and_exits_130(task, tmp_path):
    """Was: ignored without a word, exit 0, `stopped_by_signal: false`."""
    recipe, run_dir = recipe_path(task, tmp_path), tmp_path / "run"
    code, out, err = signal_at(start_fit(recipe, run_dir), final_tmp(run_dir), [signal.SIGTERM])
    assert code == 130 and "Traceback" not in err, err
    assert f"SIGTERM: finishing the evaluation at step {STEPS}; signal again to skip it" in out, out
    assert "SIGTERM during the final checkpoint and evaluation: both were completed" in out, out
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["completed"] and m["stopped_by_signal"] and m["signal"] == "SIGTERM" and not m["stopped_early"]
    assert_whole(run_dir)
    again = run_cli("fit", recipe, "--run-dir", run_dir, "--quiet")  # finished: reported, not rerun
    assert again.returncode == 0 and "is finished" in again.stdout, again.stderr


@pytest.mark.slow
def test_a_signal_during_the_final_evaluation_is_said_recorded_and_exits_130(task, tmp_path):
    recipe, run_dir = recipe_path(task, tmp_path, train__eval_batch_size=2), tmp_path / "run"  # 32 batches
    code, out, err = signal_at(start_fit(recipe, run_dir), final_ckpt(run_dir), [signal.SIGINT])
    assert code == 130 and "Traceback" not in err, err
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["completed"]
    if m["stopped_by_signal"]:  # it landed in the evaluation (nearly always: 32 batches)
        assert m["signal"] == "SIGINT" and f"SIGINT: finishing the evaluation at step {STEPS}" in out, out
        assert not err.strip(), err
    else:  # after metrics.json was written: the CLI says so itself
        line = one_line_error(subprocess.CompletedProcess([], code, out, err), "fit", 130, "interrupted")
        assert "SIGINT as fit was ending; its work is complete" in line, line


# ----------------------------------------------------------------------------- what a resume may be given
def test_resume_with_another_run_dir_is_refused(task, tmp_path):
    """Was: --run-dir silently ignored."""
    run_dir, other = tmp_path / "run", tmp_path / "other"
    run_dir.mkdir()
    line = one_line_error(run_cli("fit", "--resume", run_dir, "--run-dir", other), "fit")
    assert f"--resume {run_dir} and --run-dir {other} name two directories" in line and "drop --run-dir" in line
    assert not other.exists() and not list(run_dir.iterdir())


@pytest.mark.slow
def test_a_resume_spelling_out_the_rules_own_value_is_the_same_recipe(task, tmp_path):
    """Was: refused as 'a different recipe: rule.steps (None there, 500 now)'. The rule gives 500 steps here."""
    recipe, run_dir = recipe_path(task, tmp_path, rule__steps=None), tmp_path / "run"
    assert run_cli("fit", recipe, "--run-dir", run_dir, "--quiet", "--stop-after", 2).returncode == 0
    assert json.loads((run_dir / "plan.json").read_text())["steps"] == 500
    saved = (run_dir / "recipe.yaml").read_bytes()
    out = run_cli("fit", recipe, "--run-dir", run_dir, "--quiet", "--stop-after", 3, "--set", "rule.steps=500")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step-000002.ckpt at step 2" in out.stdout and "changed settings" not in out.stdout
    assert (run_dir / "recipe.yaml").read_bytes() == saved  # the run's own spelling is kept
    line = one_line_error(run_cli("fit", recipe, "--run-dir", run_dir, "--set", "rule.steps=400"), "fit")
    assert "different recipe: rule.steps (None there, 400 now)" in line, line


# ----------------------------------------------------------------------------- the fix a storage error names
@pytest.mark.slow
def test_a_read_only_run_or_feature_cache_names_the_option_that_moves_it(task, tmp_path):
    """Was: 'e.g. --run-dir or --out' for both; eval has no --run-dir, and fewshot's cache is --feature-cache."""
    recipe = recipe_path(task, tmp_path, rule__steps=2)
    with scratch_fs(tmp_path / "ro", size="64m") as disk:
        out = run_cli("fit", recipe, "--run-dir", disk / "run", "--quiet")
        assert out.returncode == 0, out.stderr[-2000:]
        (disk / "cache").mkdir()
        r = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot remount read-only ({r.stderr.strip()[:80]})")
        line = one_line_error(run_cli("eval", recipe, "--checkpoint", disk / "run"), "eval")
        assert "is on a read-only file system; choose a writable place with --out" in line, line
        line = one_line_error(run_cli("fewshot", recipe, "--shots", 1, "--seeds", 0, "--mode", "linear",
                                      "--feature-cache", disk / "cache", "--run-dir", tmp_path / "sweep"), "fewshot")
        assert f"{disk / 'cache'}" in line and "choose a writable place with --feature-cache" in line, line


def test_a_launched_run_that_fails_before_its_first_checkpoint_keeps_the_worker_logs(tmp_path):
    """Was: rank 0 removed what the failed run had made, `msrun/` too, while the launcher's one line said
    "see the worker logs in <run>/msrun". Now those logs and the marker stay; the rest goes."""
    from bit_transfer.run.rundir import MARKER, RunDir

    run_dir = tmp_path / "run"
    RunDir.claim(run_dir, kind="fit").release()  # what the launcher makes before it starts msrun
    (run_dir / "msrun").mkdir()
    (run_dir / "msrun" / "worker_0.log").write_text("RuntimeError: what went wrong\n")
    run = RunDir.claim(run_dir, kind="fit", lock=False)  # rank 0 under the launcher
    (run_dir / "plan.json").write_text("{}")
    run.discard_if_unused()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([MARKER, "msrun"])
    assert (run_dir / "msrun" / "worker_0.log").read_text() == "RuntimeError: what went wrong\n"
    RunDir.claim(run_dir, kind="fit").release()  # the same command again may claim it
