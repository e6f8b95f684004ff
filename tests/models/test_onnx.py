"""ONNX export (models/onnx_export.py, `bit-transfer export --format onnx`): ONNX Runtime gives
bit-transfer's logits at any batch and size, for both paddings; metadata; weights sources; the CLI."""

import json
import os
import shutil
import stat
import subprocess
import sys

import mindspore as ms
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bit_transfer.errors import UsageError
from bit_transfer.models import create_model, create_model_from_weights, model_config
from bit_transfer.commands.export import export_hf, export_onnx
from bit_transfer.models.export.onnx import IR_VERSION, OPSET, build_onnx, load_onnx
from bit_transfer.run.rundir import MARKER

from conftest import GRAPHS, ROOT, one_line_error, run_cli, use_graph
from test_export import make_run, trained
from test_models import images, randomise

NAMES = ["cat", "dog", "owl", "emu", "yak"]


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def tiny(padding):
    return randomise(create_model("custom", 5, depths=[1, 2, 1, 1], width=0.25, padding=padding))


@pytest.fixture(scope="module", params=["fixed", "same"])
def exported(request, tmp_path_factory):
    """(model, OnnxModel) of a width-0.25 model with random weights, one file per padding."""
    model = tiny(request.param)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "out", 128, NAMES)
    return model, load_onnx(path)


@pytest.mark.parametrize("size", [128, 97])
@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_runtime_gives_bit_transfers_logits(exported, size, batch):
    model, onnx_model = exported
    x = images(batch, size, seed=size + batch)
    want = model(x).asnumpy()
    assert relative(onnx_model(x.asnumpy()), want) <= 1e-4


def test_one_file_runs_at_every_batch_and_size(exported):
    model, onnx_model = exported
    shapes = [i.shape for i in onnx_model.session.get_inputs()]
    assert shapes == [["batch", 3, "height", "width"]]
    for n, h, w in [(2, 64, 64), (3, 33, 50), (1, 8, 8), (2, 160, 96)]:
        x = np.ascontiguousarray(images(n, max(h, w)).asnumpy()[:, :, :h, :w])
        assert relative(onnx_model(x), model(ms.Tensor(x)).asnumpy()) <= 1e-4, (n, h, w)


def test_the_two_paddings_differ_on_even_sizes_and_agree_on_odd_ones():
    def logits(padding, x):  # the same weights for both (one seed)
        proto = build_onnx(tiny(padding), 64)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"images": x})[0]

    x = images(2, 64).asnumpy()
    assert relative(logits("fixed", x), logits("same", x)) > 1e-3
    x = images(2, 65).asnumpy()  # odd at every layer: TF-SAME pads as the fixed padding does
    assert relative(logits("fixed", x), logits("same", x)) <= 1e-5


def test_metadata_and_a_valid_portable_file(exported):
    model, onnx_model = exported
    proto = onnx.load(str(onnx_model.path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == IR_VERSION and [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]
    ops = {n.op_type for n in proto.graph.node}
    assert "GroupNormalization" not in ops and {"InstanceNormalization", "Conv", "MaxPool", "Gemm"} <= ops
    assert [o.name for o in proto.graph.output] == ["logits"]
    meta = onnx_model.metadata
    assert json.loads(meta["class_names"]) == NAMES and onnx_model.class_names == NAMES
    assert meta["image_size"] == "128" and onnx_model.image_size == 128
    pre = json.loads(meta["preprocessing"])
    assert pre["resize"] == [128, 128] and pre["mean"] == pre["std"] == [0.5] * 3 and pre["layout"] == "NCHW"
    assert "[-1, 1]" in pre["description"]
    assert meta["padding"] == model.padding and json.loads(meta["model"]) == model_config(model)
    assert meta["bit_transfer_version"] and meta["num_classes"] == "5"


def test_files_are_0644_a_rerun_updates_and_large_models_keep_weights_beside(tmp_path):
    model = tiny("same")
    out = tmp_path / "out"
    path = export_onnx(model, out, 64, external=True)  # as a model over 1 GB of weights is written
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "model.onnx", "model.onnx.data"])
    assert (out / "model.onnx").stat().st_size < 100_000 < (out / "model.onnx.data").stat().st_size
    x = images(2, 64)
    assert relative(load_onnx(path)(x.asnumpy()), model(x).asnumpy()) <= 1e-4
    export_onnx(model, out, 64)  # inline weights: the earlier side file goes
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "model.onnx"])
    assert stat.S_IMODE((out / "model.onnx").stat().st_mode) == 0o644
    assert load_onnx(path).metadata["class_names"] == "null"  # none given
    with pytest.raises(UsageError, match="2 class names for a 5-class head"):
        export_onnx(model, tmp_path / "bad", 64, ["a", "b"])
    assert not (tmp_path / "bad").exists()


def test_an_unreadable_onnx_file_is_one_line(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(UsageError, match=r"model\.onnx is not a readable ONNX model \(.*\); export it again") as e:
        load_onnx(tmp_path / "model.onnx")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the command
def check_export(out, model, size, names):
    """The CLI's file runs in ONNX Runtime with the model's logits and the recorded metadata."""
    onnx_model = load_onnx(out / "model.onnx")
    assert onnx_model.image_size == size and onnx_model.class_names == names
    for batch, px in [(1, 48), (4, 33)]:
        x = images(batch, px)
        assert relative(onnx_model(x.asnumpy()), model(x).asnumpy()) <= 1e-4


@pytest.mark.parametrize("graph", GRAPHS)  # ONNX = the model on our CPU kernels and on MindSpore's operators
def test_export_a_run_to_onnx(tmp_path, graph):
    with use_graph(graph):
        model = trained("same")
        run = make_run(tmp_path, model)
        out = run_cli("export", run, "--format", "onnx", "--out", tmp_path / "onnx")
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert out.stdout.strip() == f"exported onnx: {tmp_path / 'onnx' / 'model.onnx'}"
        check_export(tmp_path / "onnx", model, 48, ["x", "y", "z"])  # plan.json's crop, the checkpoint's class names


@pytest.mark.slow
def test_export_pretrained_weights_to_onnx(tmp_path):
    """A Hugging Face directory, hf:org/name (from the hub's cache, offline) and an official .npz."""
    from datagen import official_arrays

    model = trained("same")
    hf_dir = export_hf(model, tmp_path / "hf", ["a", "b", "c"], image_size=40)
    out = run_cli("export", hf_dir, "--format", "onnx", "--out", tmp_path / "from-hf")
    assert out.returncode == 0, out.stderr
    check_export(tmp_path / "from-hf", model, 40, ["a", "b", "c"])  # size from preprocessor_config.json

    home = tmp_path / "home"
    repo = home / "hf" / "models--org--tiny-bit"
    shutil.copytree(hf_dir, repo / "snapshots" / ("0" * 40), ignore=shutil.ignore_patterns(MARKER))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, BIT_TRANSFER_HOME=str(home), HF_HUB_OFFLINE="1")
    out = run_cli("export", "hf:org/tiny-bit", "--format", "onnx", "--out", tmp_path / "from-hub", env=env)
    assert out.returncode == 0, out.stderr
    check_export(tmp_path / "from-hub", model, 40, ["a", "b", "c"])

    np.savez(tmp_path / "BiT-M-tiny.npz", **official_arrays(width=0.25, classes=6))
    npz_model, _ = create_model_from_weights(tmp_path / "BiT-M-tiny.npz")
    line = one_line_error(run_cli("export", tmp_path / "BiT-M-tiny.npz", "--format", "onnx", "--out",
                                  tmp_path / "from-npz"), "export")
    assert "official .npz weights record no training resolution; pass --image-size N" in line, line
    assert not (tmp_path / "from-npz").exists()
    out = run_cli("export", tmp_path / "BiT-M-tiny.npz", "--format", "onnx", "--out", tmp_path / "from-npz",
                  "--image-size", "224")
    assert out.returncode == 0, out.stderr
    check_export(tmp_path / "from-npz", npz_model, 224, None)  # an official file names no classes


def test_export_without_onnx_installed_says_how_to_install_it(tmp_path):
    run = make_run(tmp_path, trained(), steps=(5,))
    code = ("import sys; sys.modules['onnx'] = None; from bit_transfer.cli import main; "
            f"main(['export', {str(run)!r}, '--format', 'onnx', '--out', {str(tmp_path / 'onnx')!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    line = one_line_error(out, "export")
    assert line.endswith("error: ONNX export needs the onnx package: pip install 'bit-transfer[deploy]'"), line
    assert not (tmp_path / "onnx").exists()
