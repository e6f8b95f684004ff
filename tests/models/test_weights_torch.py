"""Optional cross-checks against PyTorch: transformers' BitForImageClassification and an
official-style bit_pytorch model. Skipped unless torch (and transformers) are installed."""

import mindspore as ms
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from bit_transfer.models import create_model, create_model_from_weights, load_weights  # noqa: E402
from bit_transfer.commands.export import export_hf  # noqa: E402

from datagen import official_arrays  # noqa: E402


def logits(model, x):
    """Logits in graph mode."""

    def forward(inp):
        return model(inp)

    return ms.jit(forward)(ms.Tensor(x)).asnumpy()


@pytest.mark.parametrize("global_padding, dynamic", [(None, False), ("SAME", True)])
def test_logits_match_transformers(tmp_path, global_padding, dynamic):
    transformers = pytest.importorskip("transformers")
    config = transformers.BitConfig(embedding_size=32, hidden_sizes=[128, 256, 512, 1024], depths=[1, 2, 1, 1],
                                     global_padding=global_padding, embedding_dynamic_padding=dynamic, num_labels=7)
    torch.manual_seed(0)
    reference = transformers.BitForImageClassification(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(tmp_path)
    model, _ = create_model_from_weights(tmp_path)
    assert model.padding == ("same" if dynamic else "fixed")
    for size in (64, 97):  # even: the paddings differ; odd: they agree
        x = np.random.default_rng(size).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            want = reference(torch.from_numpy(x)).logits.numpy()
        np.testing.assert_allclose(logits(model, x), want, rtol=1e-4, atol=1e-4)


def test_exported_model_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = create_model("custom", 3, depths=[1, 1, 1, 1], width=0.5, padding="same")
    rng = np.random.default_rng(0)
    for p in model.get_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * (0.1 if "norm" in p.name else 1)))
    export_hf(model, tmp_path, class_names=["a", "b", "c"], image_size=64)
    reference = transformers.BitForImageClassification.from_pretrained(tmp_path).eval()
    assert reference.config.id2label == {0: "a", 1: "b", 2: "c"}
    x = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(logits(model, x), want, rtol=1e-4, atol=1e-4)
    processor = transformers.BitImageProcessor.from_pretrained(tmp_path)
    pixels = processor(np.full((80, 70, 3), 255, np.uint8), return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64) and np.allclose(pixels, 1.0)  # white -> +1


# -- an official-style reference: bit_pytorch/models.py semantics, written for this test --------
def std_conv(x, w, stride=1, padding=0):
    v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
    return F.conv2d(x, (w - m) / torch.sqrt(v + 1e-10), None, stride, padding)


def official_forward(weights, x, depths):
    """Forward pass straight from the authors' .npz keys (torch tensors, HWIO kernels)."""

    def t(key):
        a = weights[key]
        return a.permute(3, 2, 0, 1) if a.ndim == 4 else a

    def gn(x, prefix):
        return F.group_norm(x, 32, t(prefix + "gamma"), t(prefix + "beta"), 1e-5)

    x = std_conv(x, t("resnet/root_block/standardized_conv2d/kernel"), 2, 3)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)  # zero pad, then an unpadded pool
    for b, depth in enumerate(depths, 1):
        for u in range(1, depth + 1):
            p = f"resnet/block{b}/unit{u:02d}/"
            stride = 2 if (b > 1 and u == 1) else 1
            out = F.relu(gn(x, p + "a/group_norm/"))
            shortcut = std_conv(out, t(p + "a/proj/standardized_conv2d/kernel"), stride) if u == 1 else x
            out = std_conv(out, t(p + "a/standardized_conv2d/kernel"))
            out = std_conv(F.relu(gn(out, p + "b/group_norm/")), t(p + "b/standardized_conv2d/kernel"), stride, 1)
            out = std_conv(F.relu(gn(out, p + "c/group_norm/")), t(p + "c/standardized_conv2d/kernel"))
            x = out + shortcut
    x = F.relu(gn(x, "resnet/group_norm/")).mean(dim=(2, 3))
    return x @ weights["resnet/head/conv2d/kernel"][0, 0] + weights["resnet/head/conv2d/bias"]


def test_npz_logits_and_gradients_match_an_official_style_torch_model(tmp_path):
    depths = [1, 2, 1, 1]  # width 0.5: 32 groups everywhere, like the published models
    arrays = official_arrays(depths=depths, width=0.5, classes=5, seed=3)
    arrays = {k: 1 + 0.1 * v if k.endswith("gamma") else v for k, v in arrays.items()}
    np.savez(tmp_path / "w.npz", **arrays)
    model = create_model("custom", 5, depths=depths, width=0.5)
    load_weights(model, tmp_path / "w.npz", head="keep")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    labels = np.array([1, 4])

    weights = {k: torch.from_numpy(v).requires_grad_() for k, v in arrays.items()}
    out = official_forward(weights, torch.from_numpy(x), depths)
    loss = F.cross_entropy(out, torch.from_numpy(labels))
    loss.backward()

    def ms_loss(inp):
        return ms.ops.cross_entropy(model(inp), ms.Tensor(labels.astype(np.int32)))

    checked = {  # our parameter -> official key, gradients compared in our layout
        "root.conv.weight": "resnet/root_block/standardized_conv2d/kernel",
        "stages.1.units.1.conv2.weight": "resnet/block2/unit02/b/standardized_conv2d/kernel",
        "stages.2.units.0.norm1.weight": "resnet/block3/unit01/a/group_norm/gamma",
        "norm.bias": "resnet/group_norm/beta",
    }
    params = [p for p in model.get_parameters() if p.name in checked]
    ms_value, grads = ms.jit(ms.value_and_grad(ms_loss, None, params))(ms.Tensor(x))

    np.testing.assert_allclose(logits(model, x), out.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(ms_value), loss.item(), rtol=1e-4)
    for p, g in zip(params, grads):
        want = weights[checked[p.name]].grad.numpy()
        want = want.transpose(3, 2, 0, 1) if want.ndim == 4 else want
        np.testing.assert_allclose(g.asnumpy(), want, rtol=1e-3, atol=1e-4 * np.abs(want).max(), err_msg=p.name)
