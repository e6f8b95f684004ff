"""evaluate(): metrics against a direct numpy computation, and throughput without the compile."""

import time

import numpy as np

from bit_transfer.engine.metrics import evaluate


def test_metrics_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((23, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 23)
    batches = [(logits[i : i + 5], labels[i : i + 5]) for i in range(0, 23, 5)]
    r = evaluate(lambda x: x, batches, num_classes=7)
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    nll = -(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(23), labels]
    assert r.count == 23
    np.testing.assert_allclose(r.loss, nll.mean(), rtol=1e-9)
    assert r.top1 == np.mean(logits.argmax(1) == labels)
    assert r.top5 == np.mean([lab in np.argsort(-row)[:5] for row, lab in zip(logits, labels)])
    assert r.confusion.sum() == 23 and np.trace(r.confusion) == (logits.argmax(1) == labels).sum()


def test_throughput_leaves_out_the_first_batch_which_compiles():
    calls = []

    def predict(x):
        calls.append(1)
        time.sleep(0.5 if len(calls) == 1 else 0.01)  # the first call "compiles"
        return np.zeros((len(x), 3), np.float32)

    batches = [(np.zeros((4, 1)), np.zeros(4, np.int64)) for _ in range(6)]
    r = evaluate(predict, batches, num_classes=3)
    assert r.count == 24
    assert r.images_per_sec > 100  # 20 images in ~0.05 s: ~400; with the first batch it would be < 50
    one = evaluate(predict, batches[:1], num_classes=3)  # a single batch is timed whole
    assert one.images_per_sec > 0


def test_eval_refuses_data_whose_classes_differ_from_the_checkpoints():
    import pytest

    from bit_transfer.errors import DataError
    from bit_transfer.commands.eval import check_class_names

    check_class_names("c.ckpt", ["cat", "dog"], ["cat", "dog"])
    check_class_names("c.ckpt", None, ["ant", "bee"])  # no names recorded: evaluated as it is
    check_class_names("c.ckpt", [], ["ant", "bee"])
    with pytest.raises(DataError) as e:
        check_class_names("c.ckpt", ["cat", "dog"], ["ant", "bee"])
    assert str(e.value) == ("c.ckpt: checkpoint classes ['cat', 'dog'] differ from the data's ['ant', 'bee']; "
                            "evaluate it on the data it was trained for")
    with pytest.raises(DataError, match="the same classes in another order: its labels would be misread"):
        check_class_names("c.ckpt", ["cat", "dog"], ["dog", "cat"])
    many = [f"c{i}" for i in range(100)]
    other = many[:50] + ["x50"] + many[51:]
    with pytest.raises(DataError, match=r"differ from the data's at 1 of 100 positions \(checkpoint vs data: "
                                        r"#50 'c50' vs 'x50'\)"):
        check_class_names("c.ckpt", many, other)
