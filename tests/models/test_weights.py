"""Loading weights: official .npz, Hugging Face layout, our .ckpt; precise one-line errors."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from bit_transfer.models.weights.ckpt import save_checkpoint
from bit_transfer.errors import WeightsError
from bit_transfer.models import create_model, create_model_from_weights, load_weights, model_config, weights_padding
from bit_transfer.models.weights.hf import build_config, parse_config, to_hf_name
from datagen import official_arrays

DEPTHS = [1, 2, 1, 1]


def tiny(num_classes=5, width=0.25, depths=DEPTHS, padding="fixed"):
    return create_model("custom", num_classes, depths=depths, width=width, padding=padding)


def write_npz(path, **kw):
    np.savez(path, **official_arrays(**kw))
    return path


def expected_from_official(arrays):
    """Our name -> array, converted by hand: blockB/unitUU are 1-based, a/b/c -> 1/2/3, HWIO -> OIHW."""
    out = {}
    for key, a in arrays.items():
        parts = key.split("/")
        if parts[1] == "root_block":
            name = "root.conv.weight"
        elif parts[1] == "group_norm":
            name = "norm." + {"gamma": "weight", "beta": "bias"}[parts[2]]
        elif parts[1] == "head":
            name = "head." + {"kernel": "weight", "bias": "bias"}[parts[3]]
        else:
            s, u, layer = int(parts[1][5:]) - 1, int(parts[2][4:]) - 1, "abc".index(parts[3]) + 1
            prefix = f"stages.{s}.units.{u}."
            if parts[4] == "proj":
                name = prefix + "proj.weight"
            elif parts[4] == "group_norm":
                name = prefix + f"norm{layer}." + {"gamma": "weight", "beta": "bias"}[parts[5]]
            else:
                name = prefix + f"conv{layer}.weight"
        if name == "head.weight":
            a = a[0, 0].T
        elif a.ndim == 4:
            a = np.transpose(a, (3, 2, 0, 1))
        out[name] = a
    return out


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(WeightsError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_official_npz_round_trip_every_tensor(tmp_path):
    arrays = official_arrays()
    np.savez(tmp_path / "w.npz", **arrays)
    model = tiny()
    report = load_weights(model, tmp_path / "w.npz", head="keep")
    want = expected_from_official(arrays)
    got = {p.name: p.asnumpy() for p in model.get_parameters()}
    assert sorted(got) == sorted(want) and sorted(report.loaded) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_zero_head_is_the_default(tmp_path):
    model = tiny(num_classes=3)  # a different class count is fine when the head is replaced
    report = load_weights(model, write_npz(tmp_path / "w.npz"))
    assert report.head == "zero" and "head.weight" not in report.loaded
    assert not model.head.weight.asnumpy().any() and not model.head.bias.asnumpy().any()
    assert "loaded 52 tensors" in str(report)  # 5 units x 9 + 4 proj + root + final norm (2)


def test_other_architecture_names_the_fix(tmp_path):
    msg = one_line_error(load_weights, tiny(), write_npz(tmp_path / "w.npz", depths=[1, 1, 1, 1]))
    assert "holds depths [1, 1, 1, 1], width 0.25 but the model is BiT-custom (depths [1, 2, 1, 1]" in msg
    assert "create the model with depths=[1, 1, 1, 1], width=0.25" in msg and "(9 missing, 0 unexpected" in msg
    msg = one_line_error(load_weights, create_model("BiT-S-R101x1", 3), write_npz(tmp_path / "w.npz"))
    assert "but the model is BiT-S-R101x1 (R101x1)" in msg


def test_shape_mismatch(tmp_path):
    msg = one_line_error(load_weights, tiny(width=0.25), write_npz(tmp_path / "w.npz", width=0.5))
    assert "holds depths [1, 2, 1, 1], width 0.5 but the model is" in msg and "width=0.5" in msg
    with pytest.raises(WeightsError) as e:
        load_weights(tiny(width=0.25), tmp_path / "w.npz")
    assert e.value.report.problems()[0] == "shape mismatch root.conv.weight: file (32, 3, 7, 7) vs model (16, 3, 7, 7)"


def test_unexpected_and_missing_keys(tmp_path):
    arrays = official_arrays()
    arrays["resnet/block9/extra"] = np.zeros(3, np.float32)
    del arrays["resnet/block2/unit02/b/standardized_conv2d/kernel"]
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(WeightsError) as e:
        load_weights(tiny(), tmp_path / "w.npz")
    assert e.value.report.problems() == [
        "missing stages.1.units.1.conv2.weight: the model has it, the file does not",
        "unexpected resnet/block9/extra: the file has it, the model does not",
    ]
    assert "missing stages.1.units.1.conv2.weight" in str(e.value)


def test_truncated_and_wrong_files(tmp_path):
    raw = write_npz(tmp_path / "w.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    assert "truncated or corrupt" in one_line_error(load_weights, tiny(), tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_text("not weights")
    assert "not a readable .npz" in one_line_error(load_weights, tiny(), tmp_path / "text.npz")
    (tmp_path / "w.bin").write_bytes(b"\x00" * 64)
    assert "unknown weights format" in one_line_error(load_weights, tiny(), tmp_path / "w.bin")
    assert "not found" in one_line_error(load_weights, tiny(), tmp_path / "nope.npz")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert "not a readable" in one_line_error(load_weights, tiny(), tmp_path / "cut.safetensors")


def test_keep_head_needs_a_matching_head(tmp_path):
    path = write_npz(tmp_path / "w.npz", classes=5)
    msg = one_line_error(load_weights, tiny(num_classes=3), path, head="keep")
    assert "5-class head, the model 3" in msg and "num_classes=5" in msg and "head='zero'" in msg
    arrays = official_arrays()
    del arrays["resnet/head/conv2d/kernel"], arrays["resnet/head/conv2d/bias"]
    np.savez(tmp_path / "nohead.npz", **arrays)
    assert "no classifier head" in one_line_error(load_weights, tiny(), tmp_path / "nohead.npz", head="keep")
    assert "head must be" in one_line_error(load_weights, tiny(), path, head="new")


def test_our_checkpoint_ignores_optimizer_state_and_checks_padding(tmp_path):
    source = tiny()
    load_weights(source, write_npz(tmp_path / "w.npz"), head="keep")
    params = {p.name: p for p in source.get_parameters()}
    params["optimizer.moments.root.conv.weight"] = np.zeros((16, 3, 7, 7), np.float32)
    save_checkpoint(tmp_path / "step-1.ckpt", params, {"model": model_config(source), "step": 1})
    model = tiny()
    report = load_weights(model, tmp_path / "step-1.ckpt", head="keep")
    assert report.format == "ckpt" and report.meta["step"] == 1
    for p in model.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), params[p.name].asnumpy())
    assert weights_padding(tmp_path / "step-1.ckpt") == weights_padding(tmp_path / "w.npz") == "fixed"
    msg = one_line_error(load_weights, tiny(padding="same"), tmp_path / "step-1.ckpt")
    assert "padding 'fixed'" in msg and "padding='fixed'" in msg


def test_create_model_from_weights(tmp_path):
    path = write_npz(tmp_path / "BiT-M-R50x1.npz", classes=7)  # named like R50x1 but tiny: custom
    model, report = create_model_from_weights(path)
    assert model_config(model) == {"name": "BiT-custom", "num_classes": 7, "depths": DEPTHS, "width": 0.25,
                                   "padding": "fixed"}
    assert report.head == "keep" and model.head.weight.asnumpy().any()
    model, report = create_model_from_weights(path, num_classes=2)
    assert model.num_classes == 2 and report.head == "zero"


def hf_dir(tmp_path, model, config_changes=None):
    """A Hugging Face-layout directory (config.json + model.safetensors) for `model`."""
    config = build_config(model)
    config.update(config_changes or {})
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({to_hf_name(p.name): p.asnumpy() for p in model.get_parameters()}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_hf_directory_sets_and_checks_padding(tmp_path):
    source = tiny(width=0.5, padding="same")
    path = hf_dir(tmp_path / "hf", source)
    model, report = create_model_from_weights(path)
    assert report.format == "hf" and model.padding == "same" and model.width == 0.5
    assert weights_padding(path) == weights_padding(path / "model.safetensors") == "same"
    msg = one_line_error(load_weights, tiny(width=0.5), path)
    assert "padding 'same'" in msg and "create_model_from_weights" in msg
    (path / "config.json").unlink()
    assert "no config.json" in one_line_error(load_weights, tiny(width=0.5), path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_type": "bottleneck"}, "ViT-hybrid"),
        ({"global_padding": "SAME", "embedding_dynamic_padding": False}, "not one we reproduce"),
        ({"global_padding": "VALID"}, "not one we reproduce"),
        ({"num_groups": 8}, "num_groups 8"),
        ({"hidden_sizes": [128, 256, 512, 1000]}, "do not follow"),
        ({"output_stride": 16}, "output_stride 16"),
    ],
)
def test_unsupported_hf_configs_are_refused(change, message):
    config = build_config(tiny(width=0.5))
    config.update(change)
    with pytest.raises(WeightsError, match=message):
        parse_config(config, "config.json")


def test_google_bit_50_config_means_same_padding():
    # the fields of google/bit-50's config.json that decide the architecture
    config = {"model_type": "bit", "layer_type": "preactivation", "global_padding": "same",
              "embedding_dynamic_padding": True, "depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048],
              "embedding_size": 64, "num_groups": 32, "width_factor": 1, "num_labels": 1000}
    parsed = parse_config(config, "config.json")
    assert parsed["padding"] == "same" and parsed["depths"] == [3, 4, 6, 3] and parsed["width"] == 1


def test_official_weights_into_a_same_padding_model_load_with_a_note(tmp_path):
    report = load_weights(tiny(padding="same"), write_npz(tmp_path / "w.npz"))
    assert "note: official weights were trained with fixed padding" in str(report)


def test_loading_after_a_compile_reaches_the_compiled_graph(tmp_path):
    """Weights are written in place: a graph compiled before loading must use them."""
    import mindspore as ms

    model = tiny()
    x = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))

    def forward(inp):
        return model(inp)

    compiled = ms.jit(forward)
    assert not compiled(x).asnumpy().any()  # zero head
    load_weights(model, write_npz(tmp_path / "w.npz"), head="keep")
    eager = model(x).asnumpy()
    assert np.abs(eager).max() > 0
    np.testing.assert_allclose(compiled(x).asnumpy(), eager, rtol=1e-5, atol=1e-5)
    load_weights(model, tmp_path / "w.npz")  # head="zero": zeroed in place
    assert not compiled(x).asnumpy().any()
