"""Ascend and GPU, as far as a CPU-only machine can check them: the device choice and its one-line
reasons, the precision-by-device table at plan and fit, train.device_id, fp16's loss scale across a
kill -9 resume, and `bit-transfer doctor`."""

import numpy as np
import pytest

from conftest import one_line_error, run_cli, start_fit, use_graph, wait_for, write_recipe
from datagen import final_params, pattern_task, tiny_recipe


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pattern_task(tmp_path_factory.mktemp("accel") / "cifar-10-batches-py", n_train=40, n_test=8)


def recipe_file(task, tmp_path, **sets):
    return write_recipe(tmp_path / "r.yaml", tiny_recipe(task, tmp_path / "runs", **sets))


# ---------------------------------------------------------------- device choice
def test_auto_on_cpu_beside_an_accelerator_says_why_and_what_to_install(tmp_path):
    """/dev cannot be faked: the check takes its device-node roots, here a directory with a fake node."""
    from bit_transfer.system import device as runtime

    assert runtime.unused_accelerator("CPU", roots=(str(tmp_path),)) is None  # no accelerator: nothing to say
    (tmp_path / "nvidia0").write_text("")
    gpu = runtime.unused_accelerator("CPU", roots=(str(tmp_path),))
    assert "\n" not in gpu and f"{tmp_path / 'nvidia0'} exists but MindSpore trains on CPU" in gpu
    assert "could not load its GPU plugin" in gpu
    cudas = runtime.gpu_plugins()  # what this MindSpore build ships (2.8 on PyPI: 11.1, 11.6)
    assert (f"install CUDA {' or '.join(cudas)}" if cudas else "build with GPU plugins") in gpu, gpu
    assert runtime.unused_accelerator("GPU", roots=(str(tmp_path),)) is None  # the accelerator is in use
    (tmp_path / "nvidia0").unlink()
    (tmp_path / "davinci0").write_text("")
    ascend = runtime.unused_accelerator("CPU", roots=(str(tmp_path),))
    assert "could not load its Ascend plugin" in ascend and "CANN" in ascend and "\n" not in ascend
    if runtime.plugin_load_error("Ascend"):  # MindSpore's own reason, e.g. libge_runner.so missing
        assert runtime.plugin_load_error("Ascend") in ascend


def test_devices_are_counted_with_the_current_api(monkeypatch):
    """mindspore.device_context, not the deprecated mindspore.hal.is_available (made to fail here)."""
    import mindspore as ms

    from bit_transfer.system import device as runtime

    def deprecated(*args):
        raise AssertionError("mindspore.hal.is_available is deprecated")

    monkeypatch.setattr(ms.hal, "is_available", deprecated)
    runtime.device_count.cache_clear()
    runtime.available_devices.cache_clear()
    try:
        assert runtime.available_devices() == ("CPU",) and runtime.device_count("CPU") == 1
        for device in ("GPU", "Ascend"):  # on this CPU-only machine neither is usable
            assert runtime.device_count(device) == 0
    finally:
        runtime.device_count.cache_clear()
        runtime.available_devices.cache_clear()


def test_an_explicit_gpu_that_cannot_be_had_says_the_cause(task, tmp_path):
    rec = recipe_file(task, tmp_path)
    line = one_line_error(run_cli("fit", rec, "--set", "train.device=GPU", "--run-dir", tmp_path / "run"), "fit")
    assert "train.device is GPU but MindSpore cannot use it: its GPU plugin did not load" in line, line
    assert "CUDA" in line and "or set train.device: auto" in line
    assert not (tmp_path / "run").exists()


def test_device_id_beyond_the_devices_and_with_ranks_is_one_line(task, tmp_path):
    rec = recipe_file(task, tmp_path)
    line = one_line_error(run_cli("fit", rec, "--set", "train.device_id=3", "--run-dir", tmp_path / "a"), "fit")
    assert "train.device_id is 3 but MindSpore sees 1 CPU device(s) (ids 0..0)" in line
    line = one_line_error(run_cli("fit", rec, "--set", "train.device_id=0", "--devices", "2",
                                  "--run-dir", tmp_path / "b"), "fit")
    assert "train.device_id is for one-process runs; with 2 ranks" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- precision by device
def test_the_precision_table_matches_the_docs():
    from pathlib import Path

    from bit_transfer.system import device as runtime

    text = (Path(__file__).resolve().parents[2] / "docs" / "accelerators.md").read_text()
    for device, ok in runtime.PRECISIONS_BY_DEVICE.items():
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| {device} |"))
        for precision in ("fp32", "fp16", "bf16"):
            assert (f"{precision} ✓" in row) == (precision in ok), (device, precision, row)


@pytest.mark.parametrize("device", ["auto", "CPU", "GPU", "Ascend"])
def test_an_unsupported_precision_is_refused_at_plan(task, tmp_path, device):
    rec = recipe_file(task, tmp_path)
    line = one_line_error(run_cli("plan", rec, "--set", "train.precision=bf16", "--set", f"train.device={device}"),
                          "plan")
    shown = "CPU" if device == "auto" else device  # auto on this machine is CPU
    assert f"train.precision: bf16 cannot train on {shown}: " in line and "use fp32 or fp16" in line, line


def test_an_unsupported_precision_is_refused_at_fit_before_anything_runs(task, tmp_path):
    rec = recipe_file(task, tmp_path)
    out = run_cli("fit", rec, "--set", "train.precision=bf16", "--run-dir", tmp_path / "run")
    assert "MindSpore's CPU backend has no bf16 kernels" in one_line_error(out, "fit")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["msops"], indirect=True)  # fp16 runs on MindSpore's operators on every device
def test_fp16_kill_9_resume_keeps_the_loss_scale_and_ends_bit_identical(task, graph, tmp_path):
    """The dynamic loss scale is in the checkpoint: a resume continues with the scale the run had (here
    lowered by fp16 overflows at lr 1.0), not 2^16, whose overflow would skip a step the straight run took."""
    from bit_transfer.models.weights.ckpt import read_checkpoint

    rec = recipe_file(task, tmp_path, rule__steps=12, train__checkpoint_every=3, train__precision="fp16",
                      rule__base_lr=1.0, rule__mixup_alpha=0.2, model__width=0.25, log__tensorboard=False)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    with use_graph(graph):
        assert run_cli("fit", rec, "--run-dir", straight, "--quiet").returncode == 0
        _, meta = read_checkpoint(straight / "checkpoints" / "step-000012.ckpt")
        assert 1.0 <= meta["loss_scale"] < 2.0**16, meta  # overflows halved it: what a resume must restore
        proc = start_fit(rec, killed)
        wait_for(lambda: (killed / "checkpoints" / "step-000009.ckpt.tmp").exists(), proc)
        proc.kill()
        proc.wait()
        out = run_cli("fit", rec, "--run-dir", killed, "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    _, resumed_meta = read_checkpoint(killed / "checkpoints" / "step-000012.ckpt")
    assert resumed_meta["loss_scale"] == meta["loss_scale"]
    a, b = final_params(straight), final_params(killed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), "resume is not bit-identical"


# ---------------------------------------------------------------- doctor
@pytest.mark.slow
def test_doctor_reports_the_machine_a_smoke_run_per_precision_and_the_input_pipeline(task, tmp_path):
    rec = recipe_file(task, tmp_path)
    out = run_cli("doctor", rec, "--model", "tiny", "--steps", "3", "--image-size", "32", "--batch", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("MindSpore 2.") and "plugins shipped:" in lines[0]
    for start in ("CPU: 1 device(s)", "GPU: none (", "Ascend: none (", "device nodes: ", "CUDA: ", "CANN: ",
                  "CPU kernels: ", "smoke run on CPU: tiny, random weights, 32 px, micro-batch 2, 3 steps or 10 s each",
                  "  fp32: ", "  fp16: ", "input pipeline ("):
        assert any(ln.startswith(start) for ln in lines), (start, out.stdout)
    for precision in ("fp32", "fp16"):
        line = next(ln for ln in lines if ln.startswith(f"  {precision}: "))
        assert float(line.split()[1]) > 0 and line.endswith("images/s (training step; 3 steps)"), line
    pipeline = next(ln for ln in lines if ln.startswith("input pipeline ("))
    assert "images/s at 16 px with 1 workers" in pipeline and "input-bound: " in pipeline, pipeline


def test_doctor_with_a_bad_recipe_is_one_line(tmp_path):
    (tmp_path / "r.yaml").write_text("train: {precision: fp8}\n")
    assert "precision" in one_line_error(run_cli("doctor", tmp_path / "r.yaml"), "doctor")


@pytest.mark.slow
def test_the_step_with_ms_amp_all_finite_trains_and_skips_like_ours(monkeypatch):
    """The train step as Ascend/GPU compile it (`ms.amp.all_finite` inside the jit graph, under `if finite`),
    built here by answering GPU to the step's device question: the same losses as the CPU check, and an
    inf in the batch skips the update."""
    import mindspore as ms

    from bit_transfer import models
    from bit_transfer.system import device as runtime
    from bit_transfer.engine.step import TrainStep

    runtime.setup("auto")
    real = ms.get_context
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32), np.arange(4, dtype=np.int32)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    runs = []
    with use_graph("msops"):
        for device in ("CPU", "GPU"):
            ms.set_seed(0)
            net = models.create_model("custom", 4, depths=[1, 1, 1, 1], width=0.125)
            monkeypatch.setattr(ms, "get_context", lambda k: device if k == "device_target" else real(k))
            step = TrainStep(net, momentum=0.9, weight_decay=0.0, batch_split=1)
            monkeypatch.setattr(ms, "get_context", real)
            assert step._settings["finite_amp"] == (device == "GPU")
            runs.append([step([(x, y, None)], 0.05, 1.0).read()[:2] for _ in range(3)]
                        + [step([(bad, y, None)], 0.05, 1.0).read()[:2]])
    assert runs[0] == runs[1] and [applied for _, applied in runs[1]] == [True, True, True, False], runs
