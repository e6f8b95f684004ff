"""The compiled training step as the device sees it: uint8 in, MixUp inside, no waits between log points,
the fp16 loss scale on the device."""

import numpy as np
import pytest

from datagen import pattern_task, tiny_recipe


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pattern_task(tmp_path_factory.mktemp("patterns") / "cifar-10-batches-py", n_train=24, n_test=8)


@pytest.mark.slow
def test_fit_waits_for_the_device_only_at_log_points_and_sends_it_uint8(task, tmp_path, monkeypatch):
    """Was: every step read its loss and finite flag back (2 waits per step, 1 more per extra micro-batch)
    and sent float32 images (4 bytes a pixel), MixUp done on the host. Now 10 steps logged every 5
    read their results twice, micro-batched steps read their finite flag once each, and a micro-batch of
    8 at 16 px crosses as 8 x 768 bytes of uint8."""
    import mindspore as ms

    from bit_transfer.commands import fit as fit_module
    from bit_transfer.engine.step import TrainStep

    reads, sent, in_loop, steps = [], [], [False], [0]
    real_read, real_inputs, real_loop, real_call = ms.Tensor.asnumpy, TrainStep._inputs, fit_module.train_loop, \
        TrainStep.__call__

    def counted_read(self):
        if in_loop[0] and steps[0] > 1:  # after the first step, which compiles (and reads constants)
            reads.append(tuple(self.shape))
        return real_read(self)

    def counted_call(self, *args, **kwargs):
        steps[0] += 1
        return real_call(self, *args, **kwargs)

    def counted_inputs(self, batch, *args):
        inputs = real_inputs(self, batch, *args)
        sent.append((inputs[0].dtype, inputs[0].nbytes, sum(t.nbytes for t in inputs)))
        return inputs

    def loop(*args, **kwargs):
        in_loop[0] = True
        try:
            return real_loop(*args, **kwargs)
        finally:
            in_loop[0] = False

    monkeypatch.setattr(ms.Tensor, "asnumpy", counted_read)
    monkeypatch.setattr(TrainStep, "_inputs", counted_inputs)
    monkeypatch.setattr(TrainStep, "__call__", counted_call)
    monkeypatch.setattr(fit_module, "train_loop", loop)
    recipe = tiny_recipe(task, tmp_path, rule__steps=10, rule__mixup_alpha=0.1, train__batch_split=2,
                         log__every=5, train__eval_every=None)
    metrics = fit_module.fit(recipe, run_dir=tmp_path / "run")
    assert metrics["completed"] and metrics["steps"] == 10
    # one read per log point: (loss, applied, stop) of its 5 steps; micro-batched (batch_split 2), also the
    # finite flag before each update is launched (steps 2-10 here; the first one compiles)
    assert reads.count((5, 3)) == 2 and reads.count(()) == 9 and len(reads) == 11, reads
    assert len(sent) == 21 and all(dtype == ms.uint8 for dtype, _, _ in sent)  # 20 micro-batches; the cache key
    image_bytes, total = sent[0][1], sent[0][2]
    assert image_bytes == 8 * 3 * 16 * 16  # uint8 CHW: a quarter of float32's
    assert total - image_bytes == 8 * 4 * 2 + 4 + 1  # labels, partners; lam; first (then lr, stop: 8 a step)


def test_mixup_inside_the_step_is_the_host_mixup_of_scaled_images():
    import mindspore as ms

    from bit_transfer.data.pixels import unit_range_np
    from bit_transfer.engine.mixup import mixup

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    y = np.arange(6, dtype=np.int32)
    perm = rng.permutation(6).astype(np.int32)
    lam = 0.3
    mixed, yb = mixup(ms.Tensor(x), ms.Tensor(y), ms.Tensor(perm), ms.Tensor(lam, ms.float32))
    ref = unit_range_np(x)
    ref = lam * ref + (1 - lam) * ref[perm]
    np.testing.assert_allclose(mixed.asnumpy(), ref, atol=1e-6)
    assert yb.asnumpy().tolist() == perm.tolist()
    same, _ = mixup(ms.Tensor(x), ms.Tensor(y), ms.Tensor(perm), ms.Tensor(1.0, ms.float32))
    np.testing.assert_array_equal(same.asnumpy(), unit_range_np(x))  # λ = 1: exactly the scaled images


def test_the_fp16_loss_scale_halves_on_overflow_and_grows_after_a_run_of_finite_steps():
    import mindspore as ms

    from bit_transfer.engine.step import LossScale

    scaler = LossScale(init=8.0)
    scaler.GROWTH_INTERVAL = 3
    step = ms.jit(scaler)
    seen = [float(step(ms.Tensor(finite)).asnumpy()) for finite in [False, True, True, True, True, False, False,
                                                                      False, False, False]]
    assert seen == [4.0, 4.0, 4.0, 8.0, 8.0, 4.0, 2.0, 1.0, 1.0, 1.0]  # never below 1
    assert int(scaler.good.asnumpy()) == 0
