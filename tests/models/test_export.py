"""Export to the Hugging Face layout and to MindIR, directly and from a run's checkpoint."""

import json
import stat

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from bit_transfer.models.weights.ckpt import save_checkpoint
from bit_transfer.errors import UsageError, WeightsError
from bit_transfer.models import create_model, create_model_from_weights, model_config
from bit_transfer.run.checkpoint import find_checkpoint
from bit_transfer.commands.export import export_from_checkpoint, export_hf, export_mindir
from bit_transfer.models.inference import fold
from bit_transfer.kernels.layout import channels_last_available
from bit_transfer.run.rundir import MARKER, RunDir


def trained(padding="fixed", num_classes=3, seed=0):
    """A tiny exportable model (width 0.5: every layer has 32 GroupNorm groups) with random weights."""
    model = create_model("custom", num_classes, depths=[1, 2, 1, 1], width=0.5, padding=padding)
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        value = rng.standard_normal(p.shape).astype(np.float32)
        p.set_data(ms.Tensor(1 + 0.1 * value if "norm" in p.name and p.name.endswith("weight") else value))
    return model


def images(size=64):
    return ms.Tensor(np.random.default_rng(1).uniform(-1, 1, (2, 3, size, size)).astype(np.float32))


@pytest.mark.parametrize("padding", ["fixed", "same"])
def test_hf_round_trip_gives_identical_logits(tmp_path, padding):
    model = trained(padding)
    out = export_hf(model, tmp_path / "hf", class_names=["cat", "dog", "owl"], image_size=64)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "owl"} and config["layer_type"] == "preactivation"
    assert config["global_padding"] == ("SAME" if padding == "same" else None)
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]
    loaded, report = create_model_from_weights(out)
    assert report.head == "keep" and model_config(loaded) == model_config(model) | {"name": "BiT-custom"}
    assert report.meta["class_names"] == ["cat", "dog", "owl"]
    np.testing.assert_array_equal(loaded(images()).asnumpy(), model(images()).asnumpy())


def test_hf_export_refuses_what_bitconfig_cannot_express(tmp_path):
    narrow = create_model("custom", 2, depths=[1, 1, 1, 1], width=0.25)  # 16-channel layers: 16 groups
    with pytest.raises(WeightsError, match="cannot be expressed as a Hugging Face BitConfig"):
        export_hf(narrow, tmp_path)
    with pytest.raises(WeightsError, match="2 class names for a 3-class head"):
        export_hf(trained(), tmp_path, class_names=["a", "b"])


def test_mindir_export_runs_with_the_same_logits(tmp_path):
    model = trained()
    path = export_mindir(model, tmp_path / "mindir", image_size=64, class_names=["a", "b", "c"])
    assert path.name == "model.mindir"
    info = json.loads((tmp_path / "mindir" / "model.json").read_text())
    assert info["input"]["shape"] == [1, 3, 64, 64] and info["class_names"] == ["a", "b", "c"]
    graph = nn.GraphCell(ms.load(str(path)))
    x = images()[:1]
    np.testing.assert_allclose(graph(x).asnumpy(), model(x).asnumpy(), rtol=1e-5, atol=1e-5)
    # MindSpore's ops only: a compiled kernel would be a Custom op naming a .so on this machine
    raw = path.read_bytes()
    assert b"Custom" not in raw and b".so:" not in raw and b"kernels" not in raw
    folded = fold(model)  # a model given folded is exported as it is: it gets its kernels back afterwards
    norms = [c.gn_kernel for _, c in folded.cells_and_names() if hasattr(c, "gn_kernel")]
    export_mindir(folded, tmp_path / "again", image_size=64)
    assert folded.nhwc == channels_last_available()
    assert [c.gn_kernel for _, c in folded.cells_and_names() if hasattr(c, "gn_kernel")] == norms


def make_run(tmp_path, model, steps=(100, 500, 20)):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "plan.json").write_text(json.dumps({"crop": 48}))
    params = {p.name: p for p in model.get_parameters()}
    for step in steps:  # only the latest step holds the real weights
        scale = 1.0 if step == max(steps) else 0.0
        save_checkpoint(
            run / "checkpoints" / f"step-{step:06d}.ckpt",
            {**{k: v.asnumpy() * scale for k, v in params.items()}, "optimizer.lr": np.zeros(1, np.float32)},
            {"model": model_config(model), "class_names": ["x", "y", "z"], "step": step},
        )
    return run


def test_export_from_a_run_dir_takes_the_latest_checkpoint(tmp_path):
    model = trained("same")
    run = make_run(tmp_path, model)
    assert find_checkpoint(run) == (run / "checkpoints" / "step-000500.ckpt", run)
    out = export_from_checkpoint(run, "hf", tmp_path / "hf")
    loaded, _ = create_model_from_weights(out)
    assert json.loads((out / "config.json").read_text())["id2label"]["2"] == "z"
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 48, "width": 48}
    np.testing.assert_array_equal(loaded(images()).asnumpy(), model(images()).asnumpy())

    mindir = export_from_checkpoint(run / "checkpoints" / "step-000500.ckpt", "mindir", tmp_path / "mi")
    assert json.loads((mindir.parent / "model.json").read_text())["input"]["shape"] == [1, 3, 48, 48]


def test_export_errors(tmp_path):
    with pytest.raises(WeightsError, match="unknown export format 'tflite'; use one of hf, mindir, onnx"):
        export_from_checkpoint(tmp_path, "tflite", tmp_path / "o")
    with pytest.raises(WeightsError, match="no checkpoints"):
        export_from_checkpoint(tmp_path, "hf", tmp_path / "o")
    save_checkpoint(tmp_path / "bare.ckpt", {"a": np.zeros(1, np.float32)}, {})
    with pytest.raises(WeightsError, match="not a BiT checkpoint"):
        export_from_checkpoint(tmp_path / "bare.ckpt", "hf", tmp_path / "o")
    model = trained()
    params = {p.name: p for p in model.get_parameters()}
    save_checkpoint(tmp_path / "nometa.ckpt", params, {})  # BiT weights, but no record of the model's padding
    with pytest.raises(WeightsError, match="no model config in its meta; export takes checkpoints written by"):
        export_from_checkpoint(tmp_path / "nometa.ckpt", "hf", tmp_path / "o")
    save_checkpoint(tmp_path / "m.ckpt", params, {"model": model_config(model)})
    with pytest.raises(WeightsError, match=r"no image size for .*m\.ckpt: there is no .*plan\.json and the "
                                           r"checkpoint's meta records none; pass --image-size N"):
        export_from_checkpoint(tmp_path / "m.ckpt", "mindir", tmp_path / "o")
    with pytest.raises(UsageError, match="--image-size must be a whole number of pixels >= 1 .* got 0"):
        export_from_checkpoint(tmp_path / "m.ckpt", "mindir", tmp_path / "o", image_size=0)
    assert not (tmp_path / "o").exists()  # a failed export leaves no directory behind


def test_export_refuses_files_that_are_not_checkpoints_or_weights(tmp_path):
    (tmp_path / "some.yaml").write_text("name: mine\n")
    np.savez(tmp_path / "weights.npz", a=np.zeros(3, np.float32))
    with pytest.raises(WeightsError) as e:
        export_from_checkpoint(tmp_path / "some.yaml", "hf", tmp_path / "o")
    assert str(e.value) == (f"{tmp_path / 'some.yaml'} is a YAML file, not a checkpoint; export takes a run directory "
                            "(runs/<name>-<time>) or its checkpoints/step-*.ckpt, written by bit-transfer fit "
                            "or fewshot; or pretrained weights: a Hugging Face directory (config.json + "
                            "model.safetensors), hf:org/name or an official BiT .npz")
    with pytest.raises(WeightsError, match=r"weights\.npz has no BiT root conv and stages; it is not a BiT checkpoint"):
        export_from_checkpoint(tmp_path / "weights.npz", "hf", tmp_path / "o")
    assert (tmp_path / "some.yaml").read_text() == "name: mine\n" and not (tmp_path / "o").exists()
    # eval keeps its own message: it takes checkpoints only
    with pytest.raises(WeightsError, match=r"weights\.npz is a \.npz weights file, not a checkpoint; eval --checkpoint "
                                           r"takes a run directory .* fit or fewshot$"):
        find_checkpoint(tmp_path / "weights.npz", command="eval --checkpoint")


def test_export_converts_pretrained_weights(tmp_path):
    """An official .npz and a Hugging Face directory export like a run: bit-transfer as a converter."""
    from datagen import official_arrays

    np.savez(tmp_path / "BiT-M-tiny.npz", **official_arrays(width=0.5, classes=4))
    with pytest.raises(WeightsError, match=r"no image size for .*BiT-M-tiny\.npz: official \.npz weights record no "
                                           r"training resolution; pass --image-size N \(the resolution"):
        export_from_checkpoint(tmp_path / "BiT-M-tiny.npz", "mindir", tmp_path / "mi")
    assert not (tmp_path / "mi").exists()
    path = export_from_checkpoint(tmp_path / "BiT-M-tiny.npz", "mindir", tmp_path / "mi", image_size=40)
    source, _ = create_model_from_weights(tmp_path / "BiT-M-tiny.npz")
    x = images(40)[:1]
    np.testing.assert_allclose(nn.GraphCell(ms.load(str(path)))(x).asnumpy(), source(x).asnumpy(), rtol=1e-5, atol=1e-5)

    hf_dir = export_from_checkpoint(tmp_path / "BiT-M-tiny.npz", "hf", tmp_path / "hf", image_size=40)
    again = export_from_checkpoint(hf_dir, "hf", tmp_path / "hf2")  # an HF directory: its size comes along
    assert json.loads((again / "preprocessor_config.json").read_text())["size"] == {"height": 40, "width": 40}
    loaded, _ = create_model_from_weights(again)
    np.testing.assert_array_equal(loaded(x).asnumpy(), source(x).asnumpy())


@pytest.mark.parametrize(
    "plan, message",
    [
        ("{not json", r"plan\.json is not a readable plan \(not valid JSON\); pass --image-size N"),
        ('{"crop": 0}', r"plan\.json has crop 0, not a whole number of pixels >= 1; pass --image-size N"),
        ('{"crop": "big"}', r"plan\.json has crop 'big', not a whole number"),
        ('{"steps": 10}', r"no image size for .*: .*plan\.json has no 'crop' and the checkpoint's meta records none"),
    ],
)
def test_export_names_what_is_wrong_with_the_plan(tmp_path, plan, message):
    run = make_run(tmp_path, trained(), steps=(5,))
    (run / "plan.json").write_text(plan)
    with pytest.raises(WeightsError, match=message) as e:
        export_from_checkpoint(run, "mindir", tmp_path / "mi")
    assert "missing" not in str(e.value)
    # an explicit size needs no plan
    path = export_from_checkpoint(run, "mindir", tmp_path / "mi", image_size=32)
    assert json.loads((path.parent / "model.json").read_text())["input"]["shape"] == [1, 3, 32, 32]


def test_exported_files_are_0644_and_a_rerun_updates_the_export(tmp_path):
    run = make_run(tmp_path, trained(), steps=(5,))
    for fmt, files in [("hf", {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"}),
                       ("mindir", {"model.mindir", "model.json"})]:
        out = tmp_path / fmt
        for _ in range(2):  # the second export replaces the first's files in its own directory
            export_from_checkpoint(run, fmt, out)
            names = {p.name for p in out.iterdir()}
            assert names == files | {MARKER}, names  # no temporaries left
            for name in names:
                assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, (fmt, name)


def test_export_refuses_a_foreign_directory_a_file_and_a_run(tmp_path):
    RunDir.claim(tmp_path / "run", kind="fit")  # a fit run (its marker)
    run = make_run(tmp_path, trained(), steps=(5,))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "file.txt").write_text("keep me too")
    with pytest.raises(UsageError, match="mine exists and holds files but is not a bit-transfer export; choose a new"):
        export_from_checkpoint(run, "hf", mine)
    with pytest.raises(UsageError, match=r"file\.txt is a file; give a directory for the export \(e\.g\. --out "):
        export_from_checkpoint(run, "hf", tmp_path / "file.txt")
    with pytest.raises(UsageError, match="is a bit-transfer fit directory, not an export output"):
        export_from_checkpoint(run, "hf", run)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file.txt").read_text() == "keep me too"
    assert not (run / "config.json").exists()
