"""End-to-end `fit`/`eval` on a tiny BiT and a small generated, learnable task."""

import json
from pathlib import Path

import numpy as np
import pytest

from bit_transfer.config import recipe as recipes
from bit_transfer.errors import UsageError
from conftest import use_graph
# The learnable task and the tiny recipe live in datagen; test_run_safety imports them from here too.
from datagen import (EQUAL_MATHS_ATOL, PATTERN_NAMES, assert_params_close, final_params, pattern_task, read_jsonl,
                     tiny_recipe)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pattern_task(tmp_path_factory.mktemp("patterns") / "cifar-10-batches-py", n_train=40, n_test=8)


SCHEDULE, LEARN_LR = [10, 50, 75, 90, 100], 0.01


@pytest.fixture(scope="module")
def learned(task, graph, tmp_path_factory):
    """One real run per graph (conftest.GRAPHS), shared by the tests that only read what it wrote."""
    from bit_transfer.commands.fit import fit

    runs = tmp_path_factory.mktemp("runs")
    # Random crops off: a tiny model trained from scratch on 40 images generalises across the
    # crop's scale change unreliably; the crop itself is tested in the data tests. Width 1/4. The rule's
    # schedule at lr 0.02 (warm-up to step 20, peak to 40) learned on our kernels (94-100 % for seeds
    # 0-4) but spiked on MindSpore's operators (loss 4.1 at step 40, top-1 87.5 %): a learnability test
    # must not hang on one rounding path. lr 0.01, warm-up 10, peak to 50 (SCHEDULE): top-1 100 % on
    # both graphs, kernels seeds 0-1 and msops seeds 0-2, last/first loss 0.001-0.02 (measured).
    r = tiny_recipe(task, runs, rule__steps=100, rule__base_lr=LEARN_LR, rule__schedule=SCHEDULE, model__width=0.25,
                    train__eval_every=50, data__random_crop=False)
    with use_graph(graph):
        metrics = fit(r, run_dir=runs / "learned")
    return runs / "learned", metrics


@pytest.mark.slow
def test_learnable_task_reaches_high_accuracy_and_loss_falls(learned):
    run_dir, metrics = learned
    assert metrics["top1"] >= 0.9, metrics
    assert metrics["completed"] and metrics["steps"] == 100
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    first, last = np.mean([r["train/loss"] for r in rows[:3]]), np.mean([r["train/loss"] for r in rows[-3:]])
    assert last < 0.2 * first, (first, last)


def test_run_directory_contents(learned):
    run_dir, metrics = learned
    for name in ("recipe.yaml", "plan.json", "metrics.jsonl", "metrics.json", "eval/per_class.json", "eval/confusion.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "metrics.json").read_text())["top1"] == metrics["top1"]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["steps"], plan["crop"], plan["precrop"], plan["batch_split"]) == (100, 16, 20, 1)
    confusion = json.loads((run_dir / "eval/confusion.json").read_text())
    assert confusion["class_names"] == PATTERN_NAMES
    assert np.array(confusion["matrix"]).sum() == 32
    # the saved recipe reloads to the same recipe
    again = recipes.load(run_dir / "recipe.yaml")
    assert again.to_dict()["rule"] == tiny_recipe(Path("x"), Path("y"), rule__steps=100, rule__base_lr=LEARN_LR,
                                                  rule__schedule=SCHEDULE).to_dict()["rule"]
    assert list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    pytest.importorskip("matplotlib")
    assert (run_dir / "eval/confusion.png").stat().st_size > 1000


def test_lr_in_metrics_equals_the_plan_at_every_logged_step(learned):
    from bit_transfer.hyperrule.rule import plan as make_plan

    run_dir, _ = learned
    plan = make_plan(160, (32, 32), precrop=20, crop=16, steps=100, schedule=SCHEDULE, base_lr=LEARN_LR, batch_size=16)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/lr" in r]
    assert [r["step"] for r in rows] == list(range(1, 101))
    for r in rows:  # the row of step s logs the lr used for the update that made step s
        assert r["train/lr"] == pytest.approx(plan.lr(r["step"] - 1), rel=1e-6, abs=1e-12)
    vals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/top1" in r]
    assert [r["step"] for r in vals] == [50, 100]
    assert all(0.0 <= r["train/data_wait"] <= 1.0 for r in rows)  # the share of the window spent on input


def test_tensorboard_holds_the_scalars(learned):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir, _ = learned
    acc = event_accumulator.EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_sec", "train/data_wait", "val/loss", "val/top1",
            "val/top5"} <= tags
    assert len(acc.Scalars("train/lr")) == 100
    assert acc.Scalars("val/top1")[-1].step == 100


def test_eval_command_reproduces_the_final_metrics(learned, graph, tmp_path):
    from bit_transfer.commands.eval import eval_checkpoint

    run_dir, metrics = learned
    r = recipes.load(run_dir / "recipe.yaml")
    with use_graph(graph):
        out = eval_checkpoint(r, run_dir, out_dir=tmp_path / "ev")
    assert out["top1"] == pytest.approx(metrics["top1"])
    assert out["loss"] == pytest.approx(metrics["loss"], rel=1e-4)
    assert (tmp_path / "ev" / "metrics.json").is_file()


@pytest.mark.slow
def test_micro_batching_gives_the_same_update(task, graph, tmp_path, monkeypatch):
    """batch_split 1 vs 4, same data order (no random crop/flip, no MixUp): same weights. With the
    direct convolution kernels: training picks Winograd by a micro-batch's tile count (16 images of
    this model have enough, 4 do not), another rounding, and this tiny model (GroupNorm over 2-4
    values on 1x1 maps) turns a 1e-7 change of its input into 2e-4 of its gradients (measured), so
    it would test the conditioning, not the accumulation."""
    from bit_transfer.commands.fit import fit

    monkeypatch.setenv("BIT_TRANSFER_WINOGRAD", "0")

    common = dict(rule__steps=3, rule__mixup_alpha=0.0, data__random_crop=False, data__random_flip=False)
    with use_graph(graph):
        fit(tiny_recipe(task, tmp_path, train__batch_split=1, **common), run_dir=tmp_path / "s1")
        fit(tiny_recipe(task, tmp_path, train__batch_split=4, **common), run_dir=tmp_path / "s4")
    assert_params_close(final_params(tmp_path / "s1"), final_params(tmp_path / "s4"), atol=EQUAL_MATHS_ATOL)


def test_mixup_changes_the_loss_as_expected():
    import mindspore as ms

    from bit_transfer.system import device
    from bit_transfer.engine.mixup import mixup_loss

    device.setup("auto")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 4)).astype(np.float32)
    ya, yb = np.array([0, 1, 2, 3, 0, 1], np.int32), np.array([3, 2, 1, 0, 1, 0], np.int32)

    def ce(y):
        z = logits - logits.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(6), y]))

    t = ms.Tensor
    assert float(mixup_loss(t(logits), t(ya), t(yb), t(1.0, ms.float32)).asnumpy()) == pytest.approx(ce(ya), rel=1e-5)
    mixed = float(mixup_loss(t(logits), t(ya), t(yb), t(0.3, ms.float32)).asnumpy())
    assert mixed == pytest.approx(0.3 * ce(ya) + 0.7 * ce(yb), rel=1e-5)


@pytest.mark.slow
def test_mixup_in_the_loop_changes_the_loss(task, tmp_path):
    from bit_transfer.commands.fit import fit

    fit(tiny_recipe(task, tmp_path, rule__steps=3, rule__mixup_alpha=0.0), run_dir=tmp_path / "plain")
    fit(tiny_recipe(task, tmp_path, rule__steps=3, rule__mixup_alpha=0.5), run_dir=tmp_path / "mix")
    plain = [r["train/loss"] for r in read_jsonl(tmp_path / "plain/metrics.jsonl") if "train/loss" in r]
    mix = [r["train/loss"] for r in read_jsonl(tmp_path / "mix/metrics.jsonl") if "train/loss" in r]
    # steps 1-2: zero head -> uniform logits -> loss ln(4) whatever the mixing (step 1 has lr 0);
    # the update of step 2 used mixed images and labels, so the loss of step 3 differs
    for losses in (plain, mix):
        assert losses[:2] == pytest.approx([np.log(4)] * 2, rel=1e-5)
    assert abs(plain[2] - mix[2]) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["kernels"], indirect=True)  # on MindSpore's operators: the kill -9 resume test
def test_resume_equals_an_uninterrupted_run(task, graph, tmp_path):
    from bit_transfer.commands.fit import fit

    r = tiny_recipe(task, tmp_path, rule__steps=8, rule__mixup_alpha=0.2)
    with use_graph(graph):
        fit(r, run_dir=tmp_path / "straight")
        first = fit(r, run_dir=tmp_path / "resumed", stop_after=4)
        assert not first["completed"] and first["steps"] == 4
        second = fit(r, run_dir=tmp_path / "resumed")
    assert second["completed"] and second["steps"] == 8
    assert_params_close(final_params(tmp_path / "straight"), final_params(tmp_path / "resumed"), atol=1e-6)
    steps = [row["step"] for row in read_jsonl(tmp_path / "resumed/metrics.jsonl") if "train/loss" in row]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_resume_refuses_a_different_recipe(task, tmp_path):
    from bit_transfer.commands.fit import fit

    fit(tiny_recipe(task, tmp_path, rule__steps=2), run_dir=tmp_path / "r")
    with pytest.raises(UsageError, match="different recipe"):
        fit(tiny_recipe(task, tmp_path, rule__steps=3), run_dir=tmp_path / "r")


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(task, tmp_path):
    from bit_transfer.commands.fit import TrainingDiverged, fit

    r = tiny_recipe(task, tmp_path, rule__steps=40, rule__base_lr=1e30, train__checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="lower rule.base_lr") as e:
        fit(r, run_dir=tmp_path / "nan")
    assert "\n" not in str(e.value)
    ckpts = sorted((tmp_path / "nan/checkpoints").glob("step-*.ckpt"))
    assert ckpts, "the last good checkpoint must be kept"
    params = final_params(tmp_path / "nan")
    assert all(np.isfinite(v).all() for v in params.values())


def test_choose_batch_split_halves_until_it_fits():
    from bit_transfer.engine.batch_split import choose_batch_split

    tried = []

    def fits_at_most_48(m):
        tried.append(m)
        if m > 48:
            raise RuntimeError("Out of memory: Malloc for kernel output failed")

    assert choose_batch_split(512, fits_at_most_48, log=lambda *a: None) == 16  # 512 -> 256 -> 128 -> 64 -> 32
    assert tried == [512, 256, 128, 64, 32]

    def broken(m):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        choose_batch_split(8, broken, log=lambda *a: None)


@pytest.mark.parametrize("impl", ["sum", "kernel", "amp"])  # amp: ms.amp.all_finite, what Ascend and GPU use
def test_all_finite_catches_inf_and_nan_anywhere(impl):
    import mindspore as ms

    from bit_transfer.kernels import ops as kernel_ops
    from bit_transfer.system import device
    from bit_transfer.engine.step import all_finite

    device.setup("auto")
    kernel = None
    if impl == "kernel":
        kernel = kernel_ops.all_finite_primitive()
        if kernel is None:
            pytest.skip("compiled CPU kernels not available here")
    def eager(*grads):
        return all_finite(grads, kernel, amp=impl == "amp")

    check = ms.jit(eager)  # as in the train step
    ok = [np.ones((3, 2), np.float32), np.full(1031, -2.0, np.float32), np.zeros((2, 5, 3, 3), np.float32)]
    if impl == "kernel":  # huge but finite: a sum would overflow, the bit test must not
        ok.append(np.full(7, 3e38, np.float32))
    for fn in (eager, check):
        assert bool(fn(*map(ms.Tensor, ok)).asnumpy())
        for bad in (np.inf, -np.inf, np.nan):
            for where in (0, 1030):  # first and last element: the vector loop and its remainder
                arrs = [a.copy() for a in ok]
                arrs[1][where] = bad
                assert not bool(fn(*map(ms.Tensor, arrs)).asnumpy()), (bad, where)
    if impl == "kernel":  # > 512 K values: the check splits the tensors over OpenMP threads
        big = [np.ones(300_001, np.float32) for _ in range(4)]
        assert bool(check(*map(ms.Tensor, big)).asnumpy())
        for t in (0, 3):
            big[t][-1] = np.nan
            assert not bool(check(*map(ms.Tensor, big)).asnumpy())
            big[t][-1] = 1.0


def test_bf16_on_cpu_is_a_usage_error(task, tmp_path):
    from bit_transfer.commands.fit import fit

    with pytest.raises(UsageError, match="bf16 cannot train on CPU: MindSpore's CPU backend has no bf16"):
        fit(tiny_recipe(task, tmp_path, train__precision="bf16"), run_dir=tmp_path / "bf16")


@pytest.mark.slow
def test_batch_split_auto_picks_the_whole_batch_when_it_fits(task, tmp_path, capsys):
    from bit_transfer.commands.fit import fit

    m = fit(tiny_recipe(task, tmp_path, rule__steps=2, train__batch_split="auto"), run_dir=tmp_path / "auto")
    assert m["completed"]
    assert "batch_split auto: micro-batch 16 fits -> batch_split 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "auto" / "plan.json").read_text())["batch_split"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("batch_split", [1, 2])
def test_pynative_train_step_matches_the_compiled_one(batch_split):
    """train.jit: false (PyNative, for debugging) runs the same maths as the compiled step,
    including the running gradient sum of batch_split > 1."""
    from bit_transfer.system import device
    from bit_transfer.models import create_model
    from bit_transfer.engine.step import TrainStep

    device.setup("auto")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2 * batch_split, 4, 3, 16, 16), dtype=np.uint8)
    y = rng.integers(0, 3, (2 * batch_split, 4)).astype(np.int32)
    weights = []
    for jit in (True, False):
        device.seed_everything(0)
        model = create_model("custom", 3, depths=[1, 1, 1, 1], width=0.25)
        for p in model.head.get_parameters():  # a non-zero head, so every layer gets gradients
            device.assign(p, np.full(p.shape, 0.05, np.float32))
        step = TrainStep(model, momentum=0.9, weight_decay=0.0, batch_split=batch_split, jit=jit)
        model.set_train(True)
        for s in range(2):
            micro = [(x[s * batch_split + i], y[s * batch_split + i], np.arange(4)[::-1]) for i in range(batch_split)]
            loss, applied, _ = step(micro, 0.01, 0.7).read()  # MixUp with partners, inside the step
            assert applied and np.isfinite(loss)
        weights.append({p.name: p.asnumpy() for p in model.trainable_params()})
    compiled, eager = weights
    for name, w in compiled.items():
        np.testing.assert_allclose(eager[name], w, rtol=1e-4, atol=EQUAL_MATHS_ATOL, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("batch_split", [1, 2])
def test_fp16_trains_and_saves_a_usable_checkpoint(task, tmp_path, batch_split):
    """fp16 (amp O2, dynamic loss scaling): the loss falls as in fp32, the checkpoint is complete.
    (Broken before: NaN gradients from the CPU kernels' backward under amp, and the amp wrapper
    lacked the model config the checkpoint needs.)"""
    from bit_transfer.commands.fit import fit

    # 30 steps at lr 0.05: the last losses 7-9 % of the first (measured; at 0.02 they needed 60 steps)
    r = tiny_recipe(task, tmp_path, rule__steps=30, rule__base_lr=0.05, model__width=0.25, data__random_crop=False,
                    train__precision="fp16", train__batch_split=batch_split)
    metrics = fit(r, run_dir=tmp_path / "fp16")
    assert metrics["completed"] and metrics["steps"] == 30
    losses = [row["train/loss"] for row in read_jsonl(tmp_path / "fp16" / "metrics.jsonl") if "train/loss" in row]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    params = final_params(tmp_path / "fp16")
    assert all(np.isfinite(v).all() for v in params.values())
