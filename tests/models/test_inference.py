"""Inference with weight standardisation folded (models/inference.py): the logits of the training
graph, computed with plain convolutions; `refresh` follows the training weights."""

import gc

import mindspore as ms
import numpy as np
import pytest

from bit_transfer.system import device
from bit_transfer.models import create_model, model_config
from bit_transfer.models.inference import FoldedConv2d, FoldedResNetV2, fold, inference_arrays
from bit_transfer.models.resnetv2 import StdConv2d
from bit_transfer.engine.step import EvalStep

from test_models import images, randomise


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def tiny(padding, depths=(1, 1, 1, 1), seed=0):
    return randomise(create_model("custom", 5, depths=list(depths), width=0.25, padding=padding), seed)


@pytest.mark.parametrize("padding", ["fixed", "same"])
@pytest.mark.parametrize("size", [97, 64])
def test_folded_logits_equal_the_training_graph(padding, size):
    model = tiny(padding, depths=(1, 2, 1, 1))
    folded = fold(model)
    x = images(1, size)
    want = model(x).asnumpy()
    assert relative(folded(x).asnumpy(), want) <= 1e-5
    assert relative(EvalStep(folded, 1)(x.asnumpy()), want) <= 1e-5  # compiled
    np.testing.assert_allclose(folded.forward_features(x).asnumpy(), model.forward_features(x).asnumpy(),
                               rtol=1e-5, atol=1e-5)


def test_the_folded_model_is_plain_convolutions_and_the_training_model_is_unchanged():
    model = tiny("same")
    before = {p.name: p.asnumpy().copy() for p in model.get_parameters()}
    folded = fold(model)
    assert isinstance(folded, FoldedResNetV2) and model_config(folded) == model_config(model)
    cells = [c for _, c in folded.cells_and_names()]
    assert not any(isinstance(c, StdConv2d) for c in cells) and sum(isinstance(c, FoldedConv2d) for c in cells) == 17
    assert [p.name for p in folded.get_parameters()] == list(before) and folded.trainable_params() == []
    conv = folded.root.conv.weight.asnumpy()  # standardised: zero mean, unit variance per output channel
    np.testing.assert_allclose(conv.reshape(len(conv), -1).mean(1), 0, atol=1e-6)
    np.testing.assert_allclose(conv.reshape(len(conv), -1).std(1), 1, atol=1e-5)
    assert all(np.array_equal(p.asnumpy(), before[p.name]) for p in model.get_parameters())
    assert all(p.requires_grad for p in model.get_parameters())
    w64 = before["root.conv.weight"].astype(np.float64).reshape(len(conv), -1)  # float64 maths, eps 1e-10
    want = (w64 - w64.mean(1, keepdims=True)) / np.sqrt(w64.var(1, keepdims=True) + 1e-10)
    np.testing.assert_allclose(conv.reshape(len(conv), -1), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="not a folded one"):
        fold(folded)


def test_folded_weights_are_those_the_training_graph_convolves_with():
    conv = StdConv2d(4, 8, 3)
    device.assign(conv.weight, np.random.default_rng(3).normal(0.01, 0.05, (8, 4, 3, 3)))
    w64 = conv.weight.asnumpy().astype(np.float64).reshape(8, -1)
    want = (w64 - w64.mean(1, keepdims=True)) / np.sqrt(w64.var(1, keepdims=True) + 1e-10)
    got = conv.standardised_weight().asnumpy()
    np.testing.assert_allclose(got.reshape(8, -1), want, rtol=1e-5, atol=1e-5)
    # the training graph's convolution with them, and a plain one with the folded weight: the same numbers
    x = images(2, 9)[:, :1].tile((1, 4, 1, 1))
    plain = ms.ops.conv2d(x, ms.Tensor(got), None, 1, "pad", 1)
    np.testing.assert_array_equal(conv(x).asnumpy(), plain.asnumpy())


def test_refresh_follows_new_weights_in_a_compiled_graph():
    model = tiny("fixed")
    folded = fold(model)
    step = EvalStep(folded, 2)  # compiled once, before the weights change
    x = images(2, 40).asnumpy()
    first = step(x)
    rng = np.random.default_rng(7)
    for p in model.get_parameters():  # as a training step does: in place
        device.assign(p, p.asnumpy() + 0.3 * rng.standard_normal(p.shape).astype(np.float32))
    want = model(ms.Tensor(x)).asnumpy()
    assert relative(want, first) > 1e-2  # the weights did change the logits
    np.testing.assert_array_equal(step(x), first)  # not yet refreshed
    folded.refresh()
    assert relative(step(x), want) <= 1e-5


def test_packed_weights_go_with_their_model():
    """Channels-last, a folded model's convolutions keep oneDNN-packed copies of its weights; they are
    the size of the conv weights (padded blocks aside) and are freed when the model is."""
    from bit_transfer.kernels import onednn as onednn_conv

    model = tiny("fixed")
    if not model.nhwc:
        pytest.skip("channels-last oneDNN kernels not available here")
    folded = fold(model)
    step = EvalStep(folded, 2)
    step(images(2, 40).asnumpy())
    conv_bytes = sum(p.size * 4 for p in folded.get_parameters() if p.ndim == 4)
    assert conv_bytes <= onednn_conv.packed_bytes() <= 2 * conv_bytes
    del folded, step
    gc.collect()
    assert onednn_conv.packed_bytes() == 0


def test_refresh_needs_its_model():
    model = tiny("fixed")
    folded = fold(model)
    other = tiny("fixed", seed=5)
    folded.refresh(other)  # an explicit model, e.g. the one fit trains
    x = images(1, 33)
    assert relative(folded(x).asnumpy(), other(x).asnumpy()) <= 1e-5
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists; pass it: refresh"):
        folded.refresh()


def test_inference_arrays_of_a_folded_model_are_its_own():
    model = tiny("same")
    folded = fold(model)
    a, b = inference_arrays(model), inference_arrays(folded)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
