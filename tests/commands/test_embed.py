"""`bit-transfer embed` through the real command and `Predictor.embed`: the model's own pre-logits, the
same numbers in .npz, .parquet and .npy, labels from class folders, --out never replacing a user's file,
and a head trained on embed's output reproducing `fewshot --mode linear`."""

import json
import os

import numpy as np
import pytest
import yaml

from conftest import one_line_error, run_cli, snapshot
from datagen import image_folder

CROP = 16
CLASSES = ["cat", "dog", "emu"]


def ok(out) -> str:
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    return out.stdout


def assert_close(a, b):
    """Equal to 1e-5 of the features' scale (~2 here): float32 rounding, which differs with the batch size
    (oneDNN picks its algorithm per shape) and between the folded and the training model (docs/models.md)."""
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(b).max()))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Class folders and random tiny pretrained weights as a Hugging Face directory (a backbone to embed with)."""
    from bit_transfer.system import device as runtime
    from bit_transfer.models import create_model
    from bit_transfer.commands.export import export_hf

    root = tmp_path_factory.mktemp("embed")
    image_folder(root / "data", counts={c: 4 for c in CLASSES}, eval_count=3)
    runtime.seed_everything(5)
    export_hf(create_model("custom", 10, depths=[1, 1, 1, 1], width=0.5), root / "weights")
    return root


@pytest.fixture(scope="module")
def embedded(world):
    """Both splits' class folders embedded once (batch 16: the batch the few-shot feature pass uses)."""
    out = ok(run_cli("embed", world / "weights", world / "data/train", world / "data/val", "--image-size", CROP,
                     "--batch-size", 16, "--out", world / "all.npz"))
    with np.load(world / "all.npz") as z:
        return out, {k: z[k] for k in z.files}


@pytest.mark.slow
def test_features_are_the_models_own_pre_logits(world, embedded):
    import mindspore as ms

    from bit_transfer.data import pipeline
    from bit_transfer.models import create_model_from_weights
    from bit_transfer.predict import files_split

    said, z = embedded
    assert z["features"].dtype == np.float32 and z["features"].shape == (21, 1024)  # width 0.5: 2048 x 0.5
    assert [p.split(os.sep)[-2] for p in z["paths"]] == list(z["labels"])  # the class folder of each image
    assert sorted(set(z["labels"])) == CLASSES and len(z["paths"]) == len(set(z["paths"]))
    model, _ = create_model_from_weights(world / "weights")  # the training model: weight standardisation in it
    model.set_train(False)
    split = files_split(list(z["paths"]))
    ref = np.zeros_like(z["features"])
    for x, pos in pipeline.eval_batches(split, crop=CROP, batch_size=16, workers=1):
        ref[pos] = model.forward_features(ms.Tensor(x)).asnumpy()
    assert_close(z["features"], ref)
    assert "embedded 21 images in" in said and "images/s" in said and "wrote 21 x 1024 features" in said


@pytest.mark.slow
def test_parquet_and_predictor_give_the_same_numbers(world, embedded, tmp_path):
    import pyarrow.parquet as pq

    from bit_transfer.predict import Predictor

    _, z = embedded
    ok(run_cli("embed", world / "weights", world / "data/train", world / "data/val", "--image-size", CROP,
               "--batch-size", 16, "--out", tmp_path / "f.parquet", "--quiet"))
    table = pq.read_table(tmp_path / "f.parquet")
    assert table.column_names == ["path", "label", "features"]
    assert table.schema.field("features").type.list_size == 1024
    assert table.column("path").to_pylist() == list(z["paths"])
    assert table.column("label").to_pylist() == list(z["labels"])
    assert np.array_equal(np.array(table.column("features").to_pylist(), np.float32), z["features"])

    p = Predictor(world / "weights", image_size=CROP, batch_size=16)
    assert_close(p.embed(list(z["paths"])), z["features"])
    assert p.embed(z["paths"][0]).shape == (1024,)


@pytest.mark.slow
def test_out_is_never_replaced_without_overwrite_and_npy_is_the_matrix(world, embedded, tmp_path):
    _, z = embedded
    out = tmp_path / "mine.npy"
    out.write_bytes(b"my own file")
    before = snapshot(tmp_path)
    line = one_line_error(run_cli("embed", world / "weights", world / "data/val", "--out", out), "embed")
    assert "exists" in line and "--overwrite" in line
    assert snapshot(tmp_path) == before
    line = one_line_error(run_cli("embed", world / "weights", world / "data/val", "--out", tmp_path / "f.csv"), "embed")
    assert ".npz" in line and ".parquet" in line
    val = [p for p in z["paths"] if f"{os.sep}val{os.sep}" in p]
    ok(run_cli("embed", world / "weights", *val, "--image-size", CROP, "--batch-size", 16, "--out", out, "--overwrite"))
    # loose files: the bare matrix; 6 images run as one batch of 6, which may round the last bits differently
    assert_close(np.load(out), z["features"][-len(val):])
    assert [p.name for p in tmp_path.iterdir()] == ["mine.npy"]  # no temporary left


@pytest.mark.slow
def test_a_head_trained_on_embed_reproduces_fewshot_linear(world, embedded, tmp_path):
    from mindspore import nn

    from bit_transfer import data
    from bit_transfer.commands.fewshot import sweep as fewshot
    from bit_transfer.hyperrule import planning
    from bit_transfer.config import recipe as recipes
    from bit_transfer.commands.fewshot.probe import train_head
    from bit_transfer.engine.step import TrainStep

    raw = {
        "name": "tiny",
        "data": {"source": "imagefolder", "path": str(world / "data"), "workers": 1},
        "model": {"name": "custom", "depths": [1, 1, 1, 1], "width": 0.5, "weights": str(world / "weights")},
        "train": {"batch_size": 16, "batch_split": 1, "seed": 0},
        "rule": {"precrop": 20, "crop": CROP, "steps": 60},
        "log": {"dir": str(tmp_path / "runs"), "every": 20, "quiet": True, "tensorboard": False},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    ok(run_cli("fewshot", tmp_path / "r.yaml", "--shots", "2", "--seeds", "0", "--mode", "linear", "--run-dir",
               tmp_path / "sweep", "--feature-cache", tmp_path / "cache", "--quiet"))
    run_dir = tmp_path / "sweep/shots2-seed0"
    _, z = embedded
    by_path = {os.path.realpath(p): f for p, f in zip(z["paths"], z["features"])}

    base = recipes.load(tmp_path / "r.yaml").with_overrides(["train.mode=linear"])
    run = fewshot.Run(2, 0, run_dir, fewshot.run_recipe(base, 2, 0))
    subset = fewshot.Pools(base).subset(run)
    _, plan = fewshot.run_plan(run, planning.task_info(run.recipe), len(subset.train))

    def rows(split):
        x = np.stack([by_path[os.path.realpath(split.where(i))] for i in range(len(split))])
        return x, split.labels.astype(np.int32)

    x, y = rows(subset.train)
    head = nn.Dense(x.shape[1], len(CLASSES), weight_init="zeros", bias_init="zeros")
    step = TrainStep(head, momentum=plan.momentum, weight_decay=plan.weight_decay, batch_split=1, mix=False)

    class Metrics:
        def log(self, step, values):
            pass

    batch = min(plan.batch_size, len(x))
    train_head(step, x, y, plan, batch, base.train.seed, Metrics(), 20, label="embed")
    from bit_transfer.models.weights.ckpt import read_checkpoint

    params, _ = read_checkpoint(sorted((run_dir / "checkpoints").glob("*.ckpt"))[-1])
    assert np.abs(head.weight.asnumpy() - params["head.weight"]).max() <= 1e-5
    assert np.abs(head.bias.asnumpy() - params["head.bias"]).max() <= 1e-5
    ex, ey = rows(data.load(run.recipe.data).eval)
    top1 = float(np.mean(np.argmax(ex @ head.weight.asnumpy().T + head.bias.asnumpy(), 1) == ey))
    assert top1 == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["top1"])
