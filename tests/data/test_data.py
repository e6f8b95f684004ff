"""Data sources, measurement, few-shot subsets and holdout splits (no MindSpore needed)."""

import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import datagen
from conftest import ROOT
from bit_transfer import data
from bit_transfer.data import sampling
from bit_transfer.errors import DataError, UsageError


# No hub, and a private HF datasets cache and bit-transfer home per test (conftest.py).
pytestmark = pytest.mark.usefixtures("offline_hub", "home")


def labels_follow_images(split, num_classes):
    for i in range(len(split)):
        img = np.asarray(split.image(i))
        assert datagen.label_of(img, num_classes) == split.labels[i], split.where(i)


# ---------------------------------------------------------------- image folders


def test_imagefolder_sizes_classes_and_labels(tmp_path):
    root = datagen.image_folder(tmp_path / "pets", {"cat": 5, "dog": 4, "emu": 3}, eval_count=2)
    ds = data.load(datagen.data_cfg(source="imagefolder", path=str(root)))
    assert ds.class_names == ["cat", "dog", "emu"] and ds.num_classes == 3
    assert len(ds.train) == 12 and len(ds.eval) == 6
    assert ds.train.labels.dtype == np.int64
    assert np.bincount(ds.train.labels).tolist() == [5, 4, 3]
    labels_follow_images(ds.train, 3)
    labels_follow_images(ds.eval, 3)
    assert ds.eval.where(0).endswith("val/cat/000.png")
    assert ds.name == f"imagefolder:{root.resolve()}"


def test_imagefolder_follows_torchvision_rules(tmp_path):
    root = datagen.image_folder(tmp_path / "d", {"a": 2, "b": 2})
    datagen.save_image(root / "train" / "b" / "2019" / "deep.png", 1)  # nested: still class b
    datagen.save_image(root / "train" / "a" / "UPPER.PNG", 0)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / "._001.png").write_bytes(b"macOS resource fork")  # hidden: ignored
    (root / "train" / ".cache").mkdir()
    datagen.save_image(root / "train" / ".cache" / "x.png", 0)
    ds = data.load(datagen.data_cfg(source="imagefolder", path=str(root)))
    assert ds.class_names == ["a", "b"] and np.bincount(ds.train.labels).tolist() == [3, 3]
    labels_follow_images(ds.train, 2)


def test_imagefolder_prefers_test_then_val_and_honours_eval_split(tmp_path):
    root = datagen.image_folder(tmp_path / "d", splits=("train", "val", "test"), eval_count=1)
    datagen.image_folder(tmp_path / "d", splits=("train", "test"), eval_count=2)  # test/ has 2 per class
    ds = data.load(datagen.data_cfg(source="imagefolder", path=str(root)))
    assert "/test/" in ds.eval.where(0) and len(ds.eval) == 6
    ds = data.load(datagen.data_cfg(source="imagefolder", path=str(root), eval_split="val"))
    assert "/val/" in ds.eval.where(0) and len(ds.eval) == 3


def test_single_folder_needs_holdout_and_then_splits_it(tmp_path):
    root = datagen.image_folder(tmp_path / "flat", {"a": 10, "b": 10}, splits=None)
    with pytest.raises(DataError, match="data.holdout"):
        data.load(datagen.data_cfg(source="imagefolder", path=str(root)))
    ds = data.load(datagen.data_cfg(source="imagefolder", path=str(root), holdout=0.25, seed=3))
    assert (len(ds.train), len(ds.eval)) == (15, 5)
    assert set(ds.train.rows).isdisjoint(ds.eval.rows)
    assert ds.class_names == ["a", "b"]


def test_imagefolder_errors_are_one_line_usage_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        data.load(datagen.data_cfg(source="imagefolder", path=str(tmp_path / "nope")))
    root = datagen.image_folder(tmp_path / "d")
    datagen.save_image(root / "train" / "loose.png", 0)
    with pytest.raises(UsageError, match="not inside a class folder") as e:
        data.load(datagen.data_cfg(source="imagefolder", path=str(root)))
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    datagen.image_folder(tmp_path / "x", {"a": 2, "b": 2})
    datagen.save_image(tmp_path / "x" / "val" / "zebra" / "0.png", 0)
    with pytest.raises(DataError, match="zebra"):
        data.load(datagen.data_cfg(source="imagefolder", path=str(tmp_path / "x")))


def plan_folder(tmp_path, root):
    """`bit-transfer plan` on an image-folder recipe (it lists and measures the folder)."""
    from conftest import run_cli

    recipe = tmp_path / "folder.yaml"
    recipe.write_text(f"data: {{source: imagefolder, path: {root}}}\nmodel: {{name: custom, depths: [1, 1, 1, 1], "
                      "width: 0.25, weights: none}\n")
    return run_cli("plan", recipe, timeout=60)


def test_an_empty_training_class_folder_is_called_empty(tmp_path):
    """train/emu exists but holds no image: not "val has class folder(s) emu that the training folder does not"."""
    from conftest import one_line_error

    root = datagen.image_folder(tmp_path / "d")
    for image in (root / "train" / "emu").iterdir():
        image.unlink()
    line = one_line_error(plan_folder(tmp_path, root), "plan")
    assert line.endswith(f"error: training class folder {root / 'train' / 'emu'} holds no images (files ending in "
                         f".jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp, .gif, .jfif) but {root / 'val'} has "
                         "images of that class; add training images to it, or remove the class from both"), line
    (root / "train" / "emu").rmdir()  # no such folder at all: the other message
    assert "has class folder(s) emu that the training folder does not" in one_line_error(plan_folder(tmp_path, root), "plan")


def test_a_fifo_named_like_an_image_is_skipped_with_a_line_not_opened(tmp_path):
    root = datagen.image_folder(tmp_path / "d")
    os.mkfifo(root / "train" / "cat" / "x.png")  # opening it would wait for a writer forever
    os.mkfifo(root / "val" / "dog" / "y.jpg")
    out = plan_folder(tmp_path, root)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines() == [
        f"bit-transfer: skipped {root / 'train' / 'cat' / 'x.png'}: a FIFO (named pipe), not an image file",
        f"bit-transfer: skipped {root / 'val' / 'dog' / 'y.jpg'}: a FIFO (named pipe), not an image file"]
    assert "measured: 12 training images" in out.stdout


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    root = tmp_path / "modes"
    for c in ("a", "b"):
        for split in ("train", "val"):
            ext = "jpg" if mode == "CMYK" else "png"
            datagen.save_image(root / split / c / f"0.{ext}", 0, mode=mode)
    ds = data.load(datagen.data_cfg(source="imagefolder", path=str(root)))
    img = ds.train.image(0)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert ds.train.pixels(0, 20).shape == (20, 20, 3)


def gray_ramp(h: int = 24, w: int = 40) -> np.ndarray:
    """8-bit gray values covering 0..255 (every value a pixel), as an H×W uint8 array."""
    return (np.arange(h * w).reshape(h, w) * 255 // (h * w - 1)).astype(np.uint8)


def test_wide_gray_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    """A real 16-bit PNG (I;16) decodes to the pixels of the same scene saved at 8 bits (convert("RGB")
    clipped every value above 255); 32-bit integer and float TIFFs are stretched over their own range."""
    eight = gray_ramp()
    files = {"8bit.png": Image.fromarray(eight),
             "16bit.png": Image.fromarray(eight.astype(np.uint16) * 257),  # 0..65535, Pillow mode I;16
             "int32.tif": Image.fromarray(eight.astype(np.int32) * 1000 - 7000),
             "float.tif": Image.fromarray(eight.astype(np.float32) / 255 * 3.5 + 1)}
    for name, im in files.items():
        im.save(tmp_path / name)
    split = data.Split(data.split.FileStore([str(tmp_path / n) for n in files], "x"), np.arange(4), np.zeros(4), "x")
    assert [Image.open(tmp_path / n).mode for n in files] == ["L", "I;16", "I", "F"]  # what a user's files open as
    want = np.repeat(eight[..., None], 3, axis=-1)
    for i, name in enumerate(files):
        got = np.asarray(split.image(i))
        assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1, name
    assert np.array_equal(split.pixels(1, 16), split.pixels(0, 16))  # resized for the pipeline: the same


def test_a_constant_or_non_finite_float_image_is_black_not_an_error():
    from bit_transfer.data.split import to_rgb

    flat = np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 7.5, np.float32))))
    nan = np.asarray(to_rgb(Image.fromarray(np.full((4, 4), np.nan, np.float32))))
    assert flat.max() == 0 and nan.max() == 0 and flat.shape == (4, 4, 3)


def test_large_jpeg_reduced_decode_matches_full_decode(tmp_path):
    path = tmp_path / "train" / "a" / "big.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(datagen.pattern(3, 1203, 1601)).save(path, quality=95)
    split = data.Split(data.split.FileStore([str(path)], "x"), [0], [0], "x")
    fast = split.pixels(0, 200).astype(np.float32)  # decoded at 1/4 scale, then resized
    full = np.asarray(Image.open(path).convert("RGB").resize((200, 200), Image.BILINEAR), np.float32)
    assert fast.shape == (200, 200, 3) and np.abs(fast - full).mean() < 0.5


# ---------------------------------------------------------------- corrupt images


def test_corrupt_image_is_named_by_default(tmp_path):
    root = datagen.image_folder(tmp_path / "d")
    bad = datagen.corrupt(root / "train" / "dog" / "001.png")
    ds = data.load(datagen.data_cfg(source="imagefolder", path=str(root)))
    i = [ds.train.where(k) for k in range(len(ds.train))].index(str(bad))
    with pytest.raises(DataError, match="dog/001.png.*skip_corrupt") as e:
        ds.train.image(i)
    assert "\n" not in str(e.value)
    truncated = datagen.corrupt(root / "train" / "cat" / "002.png", how="truncate")
    j = [ds.train.where(k) for k in range(len(ds.train))].index(str(truncated))
    with pytest.raises(DataError, match="cat/002.png"):
        ds.train.pixels(j, 16)
    assert ds.skipped_corrupt == 2


def test_fewshot_with_skip_corrupt_takes_k_readable_images(tmp_path):
    root = datagen.image_folder(tmp_path / "d", {"cat": 4, "dog": 4})
    cfg = datagen.data_cfg(source="imagefolder", path=str(root), examples_per_class=3, seed=1)
    clean = data.load(cfg)
    chosen = [clean.train.where(i) for i in range(len(clean.train))]
    datagen.corrupt(tmp_path / "d" / chosen[0].split("/d/")[1])  # break one chosen cat image
    ds = data.load(datagen.data_cfg(**{**vars(cfg), "skip_corrupt": True}))
    assert np.bincount(ds.train.labels).tolist() == [3, 3]
    assert chosen[0] not in [ds.train.where(i) for i in range(len(ds.train))]
    assert ds.skipped_corrupt == 1 and "skipped 1 unreadable" in ds.corrupt_report()
    assert ds.corrupt_counts() == {"train": 1, "eval": 0}  # passed over while choosing the subset
    for i in range(len(ds.train)):
        ds.train.image(i)  # all readable
    # without skip_corrupt the broken image stays chosen and fails when read
    ds = data.load(cfg)
    with pytest.raises(DataError, match="cannot read image"):
        [ds.train.image(i) for i in range(len(ds.train))]


def test_check_readable_names_a_bad_eval_image_before_training(tmp_path):
    root = datagen.image_folder(tmp_path / "d", {"a": 3, "b": 3}, eval_count=2)
    cfg = datagen.data_cfg(source="imagefolder", path=str(root))
    assert data.load(cfg).check_readable() == {"train": 0, "eval": 0}
    datagen.corrupt(root / "val" / "b" / "001.png")  # the eval split: met only at the final evaluation
    datagen.corrupt(root / "val" / "b" / "000.png", how="truncate")  # valid header: decoding finds it
    with pytest.raises(DataError, match=r"val/b/001.png \(.*\); .*--set data.skip_corrupt=true") as e:
        data.load(cfg).check_readable()
    assert "\n" not in str(e.value)


def test_check_readable_with_skip_corrupt_counts_per_split(tmp_path):
    root = datagen.image_folder(tmp_path / "d", {"a": 3, "b": 3}, eval_count=2)
    for bad in ("train/a/000.png", "train/b/002.png", "val/a/001.png"):
        (root / bad).write_bytes(b"")
    ds = data.load(datagen.data_cfg(source="imagefolder", path=str(root), skip_corrupt=True))
    assert ds.corrupt_counts() == {"train": 0, "eval": 0}
    assert ds.check_readable(workers=2) == {"train": 2, "eval": 1}
    assert ds.check_readable() == {"train": 2, "eval": 1}  # known ones are not opened again
    assert sorted(ds.train.store.where(j) for j in ds.train.store.corrupt) == [
        str(root / "train/a/000.png"), str(root / "train/b/002.png")]
    assert ds.skipped_corrupt == 3 and "skipped 3 unreadable" in ds.corrupt_report()


def test_corrupt_counts_split_a_shared_store_between_holdout_and_train(tmp_path):
    root = datagen.image_folder(tmp_path / "d", {"a": 4, "b": 4}, splits=None)
    ds = data.load(datagen.data_cfg(source="imagefolder", path=str(root), holdout=0.25, skip_corrupt=True))
    assert ds.train.store is ds.eval.store
    for path in (ds.train.where(0), ds.train.where(3), ds.eval.where(1)):
        datagen.corrupt(tmp_path / path)
    assert ds.check_readable() == {"train": 2, "eval": 1}


def test_check_readable_on_hf_rows_and_arrays(tmp_path):
    import io

    import datasets

    good = io.BytesIO()
    Image.fromarray(datagen.pattern(0)).save(good, "PNG")
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    cells = [{"bytes": good.getvalue(), "path": None}] * 5 + [{"bytes": b"<html>404</html>", "path": None}]
    split = datasets.Dataset.from_dict({"img": cells, "label": [0, 1] * 3}, features=feats)
    datasets.DatasetDict(train=split, test=split.select(range(4))).save_to_disk(str(tmp_path / "hf"))
    cfg = datagen.data_cfg(source="hf", path=str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"row 5 of .* split train \(cannot identify image"):
        data.load(cfg).check_readable()
    ds = data.load(datagen.data_cfg(**{**vars(cfg), "skip_corrupt": True}))
    assert ds.check_readable() == {"train": 1, "eval": 0} and ds.train.store.corrupt == {5}
    assert data.from_arrays(*datagen.arrays(6, 2)).check_readable() == {"train": 0, "eval": 0}


# ---------------------------------------------------------------- CIFAR pickles


def test_cifar10_pickles(tmp_path):
    d = datagen.cifar_dir(tmp_path, "cifar10", per_batch=6, n_test=10)
    renamed = d.rename(tmp_path / "my-cifar")
    for path in (renamed, tmp_path):  # the extracted dir (any name), or the folder it was extracted into
        ds = data.load(datagen.data_cfg(source="cifar", path=str(path)))
        assert (len(ds.train), len(ds.eval)) == (30, 10)
        assert ds.class_names == [f"class{c}" for c in range(10)]
        labels_follow_images(ds.train, 10)
        # the 3072 values are R, G, B planes of a row-major 32×32 image
        np.testing.assert_array_equal(np.asarray(ds.eval.image(3)), datagen.pattern(3))


def test_cifar100_fine_and_coarse(tmp_path):
    d = datagen.cifar_dir(tmp_path, "cifar100", per_batch=8, n_test=5)
    ds = data.load(datagen.data_cfg(source="cifar", path=str(d)))
    assert ds.num_classes == 100 and ds.class_names[7] == "fine7" and len(ds.train) == 40
    coarse = data.load(datagen.data_cfg(source="cifar", path=str(d), label_column="coarse_label"))
    assert coarse.num_classes == 20 and (coarse.train.labels == ds.train.labels // 5).all()
    with pytest.raises(DataError, match="label_column"):
        data.load(datagen.data_cfg(source="cifar", path=str(d), label_column="superclass"))


def test_cifar_holdout_is_seeded_and_disjoint(tmp_path):
    d = datagen.cifar_dir(tmp_path, "cifar10", per_batch=20)
    a = data.load(datagen.data_cfg(source="cifar", path=str(d), holdout=0.2, seed=0))
    b = data.load(datagen.data_cfg(source="cifar", path=str(d), holdout=0.2, seed=0))
    c = data.load(datagen.data_cfg(source="cifar", path=str(d), holdout=0.2, seed=1))
    assert (len(a.train), len(a.eval)) == (80, 20)
    assert set(a.train.rows).isdisjoint(a.eval.rows) and len(set(a.train.rows) | set(a.eval.rows)) == 100
    assert a.eval.store is a.train.store  # carved from train, not the test batch
    np.testing.assert_array_equal(a.eval.rows, b.eval.rows)
    assert not np.array_equal(a.eval.rows, c.eval.rows)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.flag}",))


def test_cifar_refuses_pickles_that_are_not_plain_data(tmp_path):
    d = datagen.cifar_dir(tmp_path, "cifar10")
    _Evil.flag = tmp_path / "pwned"
    with open(d / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="data_batch_2 is not a plain CIFAR batch"):
        data.load(datagen.data_cfg(source="cifar", path=str(d)))
    assert not _Evil.flag.exists()


def test_cifar_path_errors(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        data.load(datagen.data_cfg(source="cifar", path=str(tmp_path)))
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(DataError, match="extract it"):
        data.load(datagen.data_cfg(source="cifar", path=str(archive)))


# ---------------------------------------------------------------- Hugging Face datasets


def test_hf_saved_to_disk_detects_columns_and_class_names(tmp_path):
    root = datagen.hf_dataset(tmp_path / "hf", "save_to_disk", "img", "label", n_train=12, n_test=6)
    ds = data.load(datagen.data_cfg(source="hf", path=str(root)))
    assert ds.class_names == ["airplane", "bird", "cat"]
    assert (len(ds.train), len(ds.eval)) == (12, 6)
    labels_follow_images(ds.train, 3)
    assert "row 5" in ds.train.where(5)


def test_hf_parquet_dir_with_other_column_names(tmp_path):
    root = datagen.hf_dataset(tmp_path / "pq", "parquet", "image", "fine_label", n_train=9, n_test=3)
    ds = data.load(datagen.data_cfg(source="hf", path=str(root)))
    assert ds.class_names == ["airplane", "bird", "cat"] and len(ds.train) == 9
    labels_follow_images(ds.eval, 3)


def test_hf_named_columns_and_string_labels(tmp_path):
    root = datagen.hf_dataset(tmp_path / "s", image_column="photo_data", label_column="kind", string_labels=True)
    with pytest.raises(DataError, match="data.label_column"):
        data.load(datagen.data_cfg(source="hf", path=str(root)))
    ds = data.load(datagen.data_cfg(source="hf", path=str(root), label_column="kind"))
    assert ds.class_names == ["airplane", "bird", "cat"]
    labels_follow_images(ds.train, 3)
    with pytest.raises(DataError, match="'pixels' is not a column"):
        data.load(datagen.data_cfg(source="hf", path=str(root), label_column="kind", image_column="pixels"))


def test_hf_array_image_column(tmp_path):
    import datasets

    x, y = datagen.arrays(8, 2, size=(6, 5))
    train = datasets.Dataset.from_dict({"pixels": x.tolist(), "label": y.tolist()})  # lists of ints
    datasets.DatasetDict(train=train, test=train).save_to_disk(str(tmp_path / "arr"))
    ds = data.load(datagen.data_cfg(source="hf", path=str(tmp_path / "arr"), image_column="pixels"))
    assert ds.class_names == ["0", "1"]
    np.testing.assert_array_equal(np.asarray(ds.train.image(3)), x[3])
    assert data.describe(datagen.data_cfg(source="hf", path=str(tmp_path / "arr"), image_column="pixels")
                         ).image_size == (6, 5)


def test_hf_split_errors(tmp_path):
    root = datagen.hf_dataset(tmp_path / "u", test_labels=[-1] * 6)
    with pytest.raises(DataError, match="outside 0..2"):
        data.load(datagen.data_cfg(source="hf", path=str(root)))
    ds = data.load(datagen.data_cfg(source="hf", path=str(root), holdout=0.25))  # the unlabelled test is not used
    assert (len(ds.train), len(ds.eval)) == (9, 3)
    with pytest.raises(DataError, match="'validation' is not a split"):
        data.load(datagen.data_cfg(source="hf", path=str(root), eval_split="validation"))
    with pytest.raises(DataError, match="neither data.name"):
        data.load(datagen.data_cfg(source="hf"))


def test_hf_offline_without_cache_says_what_to_download(tmp_path):
    code = (
        "from bit_transfer import data; import datagen\n"
        "data.load(datagen.data_cfg(source='hf', name='cifar10'))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / "tests")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert "DataError" in last and "load_dataset('cifar10')" in last and "not cached" in last, out.stderr


# ---------------------------------------------------------------- numpy arrays and the demo


def test_from_arrays_converts_gray_and_rgba(tmp_path):
    for channels in (None, 1, 4):
        x, y = datagen.arrays(20, 4, channels=channels)
        ds = data.from_arrays(x, y, class_names=list("abcd"), eval_images=x[:5], eval_labels=y[:5])
        img = ds.train.image(3)
        assert img.mode == "RGB" and np.asarray(img).shape == (8, 8, 3)
        assert (len(ds.train), len(ds.eval), ds.num_classes) == (20, 5, 4)
    gray = np.asarray(data.from_arrays(*datagen.arrays(6, 2, channels=None)).train.image(0))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_from_arrays_holdout_and_errors():
    x, y = datagen.arrays(50, 5)
    ds = data.from_arrays(x, y)  # no eval arrays: a seeded 20 % holdout
    assert (len(ds.train), len(ds.eval)) == (40, 10) and ds.class_names == list("01234")
    assert np.array_equal(ds.eval.rows, data.from_arrays(x, y, seed=0).eval.rows)
    assert not np.array_equal(ds.eval.rows, data.from_arrays(x, y, seed=1).eval.rows)
    with pytest.raises(DataError, match="uint8"):
        data.from_arrays(x.astype(np.float32) / 255, y)
    with pytest.raises(DataError, match="labels"):
        data.from_arrays(x, y[:-1])
    with pytest.raises(DataError, match="0..1"):
        data.from_arrays(x, y, class_names=["a", "b"])


def test_demo_digits_become_rgb_with_a_seeded_holdout():
    ds = data.load(datagen.data_cfg(source="demo"))
    assert ds.num_classes == 10 and len(ds.train) + len(ds.eval) == 1797
    assert len(ds.eval) == round(0.2 * 1797)
    assert ds.train.image(0).mode == "RGB" and ds.train.image(0).size == (8, 8)
    info = data.describe(datagen.data_cfg(source="demo"))
    assert info.dataset_size == len(ds.train) and info.image_size == (8, 8)


# ---------------------------------------------------------------- few-shot


def test_fewshot_exactly_k_per_class_and_seeded():
    labels = np.repeat(np.arange(5), [30, 12, 40, 7, 22])
    a = data.fewshot_indices(labels, 5, seed=0)
    assert np.bincount(labels[a]).tolist() == [5] * 5
    assert np.all(np.diff(a) > 0)  # sorted, distinct
    np.testing.assert_array_equal(a, data.fewshot_indices(labels, 5, seed=0))
    assert not np.array_equal(a, data.fewshot_indices(labels, 5, seed=1))
    # nested: the 1-shot subset of a seed is inside its 5-shot subset
    assert set(data.fewshot_indices(labels, 1, seed=0)) <= set(a)


def test_fewshot_is_the_same_on_every_machine():
    # Golden values: these only change if the sampling algorithm changes (then bump the docs).
    labels = np.arange(40) % 4
    assert data.fewshot_indices(labels, 2, seed=0).tolist() == [5, 9, 14, 16, 27, 28, 34, 39]
    assert data.holdout_indices(10, 0.3, seed=0)[1].tolist() == [0, 4, 6]


def test_fewshot_too_few_names_the_class():
    labels = np.repeat(np.arange(3), [5, 2, 5])
    with pytest.raises(DataError, match="class 'bird' has only 2 training images.*allow_fewer"):
        data.fewshot_indices(labels, 3, seed=0, class_names=["ant", "bird", "cow"])
    got = data.fewshot_indices(labels, 3, seed=0, allow_fewer=True)
    assert np.bincount(labels[got]).tolist() == [3, 2, 3]
    with pytest.raises(DataError, match="class 'cow' has only 0"):
        data.fewshot_indices(labels[labels < 2], 1, seed=0, class_names=["ant", "bird", "cow"])


def test_fewshot_through_load_follows_holdout(tmp_path):
    d = datagen.cifar_dir(tmp_path, "cifar10", per_batch=20)
    cfg = datagen.data_cfg(source="cifar", path=str(d), holdout=0.2, examples_per_class=3, seed=4)
    ds = data.load(cfg)
    assert len(ds.train) == 30 and np.bincount(ds.train.labels).tolist() == [3] * 10
    assert set(ds.train.rows).isdisjoint(ds.eval.rows)
    assert len(ds.eval) == 20
    labels_follow_images(ds.train, 10)
    again = data.load(cfg)
    np.testing.assert_array_equal(ds.train.rows, again.train.rows)
    other = data.load(datagen.data_cfg(**{**vars(cfg), "seed": 5}))
    assert not np.array_equal(ds.train.rows, other.train.rows)


def test_holdout_is_disjoint_complete_and_seeded():
    tr, ev = data.holdout_indices(100, 0.02, seed=0)
    assert len(ev) == 2 and len(tr) == 98
    assert set(tr).isdisjoint(ev) and set(tr) | set(ev) == set(range(100))
    assert np.array_equal(ev, data.holdout_indices(100, 0.02, seed=0)[1])
    assert not np.array_equal(data.holdout_indices(100, 0.5, 0)[1], data.holdout_indices(100, 0.5, 1)[1])
    with pytest.raises(DataError, match="empty"):
        data.holdout_indices(10, 0.01, seed=0)


# ---------------------------------------------------------------- measurement for the rule


def test_describe_measures_median_resolution_and_caches(tmp_path):
    sizes = {0: (30, 40), 1: (60, 80), 2: (90, 120)}  # image i of each class gets size i % 3
    root = datagen.image_folder(tmp_path / "d", {"a": 3, "b": 3}, size=lambda c, i: sizes[i % 3])
    cfg = datagen.data_cfg(source="imagefolder", path=str(root), cache_dir=str(tmp_path / "cache"))
    info = data.describe(cfg)
    assert info.dataset_size == 6 and info.image_size == (60, 80)
    assert info.num_classes == 2 and info.class_names == ["a", "b"]
    assert info.source_of["dataset_size"] == "measured: 6 training images"
    assert info.source_of["image_size"] == "measured: median 60x80 of all 6 images"
    assert len(list((tmp_path / "cache" / "measurements").glob("*.json"))) == 1
    t = time.perf_counter()
    again = data.describe(cfg)
    assert time.perf_counter() - t < 0.05
    assert again.image_size == (60, 80) and again.source_of["dataset_size"].endswith("(cached)")
    # adding images changes the folder's mtime, so the cache is not reused
    datagen.save_image(root / "train" / "a" / "new.png", 0, size=(90, 120))
    datagen.save_image(root / "train" / "b" / "new.png", 1, size=(90, 120))
    fresh = data.describe(cfg)
    assert fresh.dataset_size == 8 and fresh.image_size == (75, 100)
    assert "cached" not in fresh.source_of["dataset_size"]


def test_describe_sees_images_replaced_in_place(tmp_path):
    """Same names, same folders (whose mtimes do not change): only the files' sizes and mtimes do."""
    root = datagen.image_folder(tmp_path / "d", {"a": 3, "b": 3}, size=(16, 16))
    cfg = datagen.data_cfg(source="imagefolder", path=str(root), cache_dir=str(tmp_path / "cache"))
    assert data.describe(cfg).image_size == (16, 16)
    assert data.describe(cfg).source_of["image_size"].endswith("(cached)")
    folders = {p: p.stat().st_mtime_ns for p in (root / "train").rglob("*") if p.is_dir()}
    for i, path in enumerate(sorted((root / "train").rglob("*.png"))):
        old = path.stat().st_mtime_ns
        datagen.save_image(path, i % 2, size=(200, 180 + i))  # overwritten in place
        os.utime(path, ns=(old + 10**9, old + 10**9))  # a new mtime even on coarse-clock file systems
    assert {p: p.stat().st_mtime_ns for p in folders} == folders
    fresh = data.describe(cfg)
    assert fresh.image_size == (200, 182)  # median of widths 180..185
    assert "cached" not in fresh.source_of["image_size"]
    assert data.describe(cfg).source_of["image_size"].endswith("(cached)")


def test_fingerprint_covers_every_level_and_no_hidden_files(tmp_path):
    from bit_transfer.data.measure import fingerprint

    deep = datagen.save_image(tmp_path / "d" / "train" / "a" / "x" / "y" / "1.png", 0)
    datagen.save_image(tmp_path / "d" / "train" / "b" / "1.png", 1)
    before = fingerprint(tmp_path / "d")
    assert before.startswith("2 files ") and fingerprint(tmp_path / "d") == before
    (tmp_path / "d" / ".DS_Store").write_bytes(b"finder")
    assert fingerprint(tmp_path / "d") == before
    deep.write_bytes(deep.read_bytes() + b"\0")  # one byte more, four levels down
    assert fingerprint(tmp_path / "d") != before
    assert fingerprint(tmp_path / "missing") == "missing"


def test_describe_counts_the_fewshot_subset_and_holdout(tmp_path):
    d = datagen.cifar_dir(tmp_path, "cifar10", per_batch=20)
    info = data.describe(datagen.data_cfg(source="cifar", path=str(d), examples_per_class=5))
    assert info.dataset_size == 50 and info.image_size == (32, 32)
    assert info.source_of["dataset_size"] == "measured: 50 training images, 5 per class"
    info = data.describe(datagen.data_cfg(source="cifar", path=str(d), holdout=0.1))
    assert info.dataset_size == 90


def test_describe_recipe_values_win_and_skip_the_data(tmp_path):
    cfg = datagen.data_cfg(source="imagefolder", path=str(tmp_path / "missing"), size=1234, image_size=(300, 400))
    info = data.describe(cfg)  # the path does not exist: the data must not be touched
    assert (info.dataset_size, info.image_size, info.num_classes) == (1234, (300, 400), None)
    assert info.source_of == {"dataset_size": "recipe: data.size", "image_size": "recipe: data.image_size"}
    root = datagen.image_folder(tmp_path / "d", size=(50, 70))
    info = data.describe(datagen.data_cfg(source="imagefolder", path=str(root), image_size=(224, 224)))
    assert info.image_size == (224, 224) and info.dataset_size == 12
    assert info.source_of["image_size"] == "recipe: data.image_size"


def test_describe_does_not_import_mindspore(tmp_path):
    root = datagen.image_folder(tmp_path / "d")
    code = (
        "import sys, datagen; from bit_transfer import data\n"
        f"data.describe(datagen.data_cfg(source='imagefolder', path={str(root)!r}))\n"
        "assert 'mindspore' not in sys.modules, 'describe imported mindspore'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "BIT_TRANSFER_HOME": str(tmp_path / "h"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_real_recipe_dataconfig_is_accepted(tmp_path):
    recipe = pytest.importorskip("bit_transfer.config.recipe")
    root = datagen.image_folder(tmp_path / "d")
    cfg = recipe.DataConfig(source="imagefolder", path=str(root), cache_dir=str(tmp_path / "c"))
    assert data.describe(cfg).dataset_size == 12


def test_stream_plan_is_a_pure_function_of_seed_and_position():
    s = sampling.Stream(10, 4, seed=0, max_offset=32, flip=True)
    first = [s.indices(b) for b in range(6)]
    again = sampling.Stream(10, 4, seed=0, max_offset=32, flip=True)
    assert all(np.array_equal(again.indices(b), first[b]) for b in (5, 2, 0))  # any order
    epoch0 = np.concatenate(first)[:10]
    assert sorted(epoch0) == list(range(10))  # each epoch is a permutation
    assert not np.array_equal(np.concatenate(first)[10:20], epoch0)  # reshuffled
    y, x, f = s.augment(3)
    assert y.max() <= 32 and x.min() >= 0 and set(f) <= {0, 1}
    small = sampling.Stream(3, 8, seed=0, max_offset=0, flip=False)  # smaller than a batch
    idx = small.indices(0)
    assert len(idx) == 8 and set(idx) <= {0, 1, 2} and not small.augment(0)[2].any()
