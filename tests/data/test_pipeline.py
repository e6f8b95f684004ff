"""The MindSpore input pipeline: the HyperRule transforms, determinism, resume, sharding, corrupt images."""

import itertools
import random
import time

import numpy as np
import pytest
from PIL import Image

import datagen
from bit_transfer import data
from bit_transfer.data import pipeline, pixels, sampling
from bit_transfer.errors import DataError


def take(it, n):
    out = list(itertools.islice(it, n))
    it.close()
    return out


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.fixture
def folder(tmp_path, home):
    sizes = [(24, 40), (40, 24), (33, 33)]
    root = datagen.image_folder(tmp_path / "d", {"a": 6, "b": 5, "c": 4}, eval_count=3, size=lambda c, i: sizes[i % 3])
    return data.load(datagen.data_cfg(source="imagefolder", path=str(root)))


def reference(split, i, size, crop, y, x, flip):
    """The official transform written out with PIL and numpy: square resize, crop, flip, CHW (uint8: the
    [-1, 1] scaling happens on the device, tests/engine/test_step.py)."""
    a = np.asarray(split.image(i).resize((size, size), Image.BILINEAR))[y : y + crop, x : x + crop]
    if flip:
        a = a[:, ::-1]
    return a.transpose(2, 0, 1)


def test_train_batches_match_the_official_transform(folder):
    split = folder.train
    batches = take(pipeline.train_batches(split, precrop=20, crop=16, micro_batch=4, seed=3), 5)
    stream = sampling.Stream(len(split), 4, 3, max_offset=4, flip=True)
    flips = 0
    for b, (images, labels) in enumerate(batches):
        assert images.shape == (4, 3, 16, 16) and images.dtype == np.uint8  # a quarter of float32's bytes
        assert labels.shape == (4,) and labels.dtype == np.int32
        idx = stream.indices(b)
        y, x, f = stream.augment(b)
        flips += f.sum()
        np.testing.assert_array_equal(labels, split.labels[idx])
        for k in range(4):
            np.testing.assert_array_equal(images[k], reference(split, idx[k], 20, 16, y[k], x[k], f[k]))
    assert 0 < flips < 20
    assert sorted(np.concatenate([stream.indices(b) for b in range(4)])[:15]) == list(range(15))  # an epoch


def test_labels_travel_with_images(folder):
    for images, labels in take(pipeline.train_batches(folder.train, precrop=24, crop=16, micro_batch=5, seed=0), 6):
        assert [datagen.label_of(im, 3) for im in images] == labels.tolist()


@pytest.mark.parametrize("source", ["hf", "cifar"])
def test_other_sources_flow_through_the_pipeline(tmp_path, hf_datasets_cache, source):
    if source == "hf":
        path = datagen.hf_dataset(tmp_path / "hf", "parquet", n_train=10, n_test=4)
    else:
        path = datagen.cifar_dir(tmp_path, "cifar10", per_batch=4)
    ds = data.load(datagen.data_cfg(source=source, path=str(path)))
    for images, labels in take(pipeline.train_batches(ds.train, precrop=40, crop=32, micro_batch=6, seed=0,
                                                      workers=2), 4):
        assert images.shape == (6, 3, 32, 32)
        assert [datagen.label_of(im, ds.num_classes) for im in images] == labels.tolist()


def test_stream_is_seeded_and_independent_of_workers(folder):
    def run(seed, workers):
        return take(pipeline.train_batches(folder.train, precrop=20, crop=16, micro_batch=4, seed=seed,
                                           workers=workers), 6)

    a = run(0, 1)
    assert same(a, run(0, 2))
    assert not same(a, run(1, 2))


def test_resume_skips_to_the_same_batches(folder):
    full = take(pipeline.train_batches(folder.train, precrop=20, crop=16, micro_batch=4, seed=7), 9)
    resumed = take(pipeline.train_batches(folder.train, precrop=20, crop=16, micro_batch=4, seed=7, start=5), 4)
    assert same(full[5:], resumed)


def test_ranks_partition_the_single_process_stream(folder):
    whole = take(pipeline.train_batches(folder.train, precrop=20, crop=16, micro_batch=6, seed=2, start=1), 3)
    parts = [
        take(pipeline.train_batches(folder.train, precrop=20, crop=16, micro_batch=3, seed=2, start=1, rank=r,
                                    world=2), 3)
        for r in range(2)
    ]
    for b in range(3):
        images = np.concatenate([parts[0][b][0], parts[1][b][0]])
        labels = np.concatenate([parts[0][b][1], parts[1][b][1]])
        assert np.array_equal(images, whole[b][0]) and np.array_equal(labels, whole[b][1])


def test_fewshot_subset_smaller_than_a_batch_is_sampled_with_replacement(folder):
    few = folder.fewshot(1, seed=0)
    assert len(few.train) == 3
    batches = take(pipeline.train_batches(few.train, precrop=20, crop=16, micro_batch=8, seed=0), 3)
    for images, labels in batches:
        assert images.shape == (8, 3, 16, 16) and set(labels.tolist()) <= {0, 1, 2}
    assert same(batches, take(pipeline.train_batches(few.train, precrop=20, crop=16, micro_batch=8, seed=0), 3))


def test_switching_off_crop_and_flip(folder):
    split = folder.train
    plain = take(pipeline.train_batches(split, precrop=20, crop=16, micro_batch=4, seed=0, random_crop=False,
                                        random_flip=False), 2)
    idx = sampling.Stream(len(split), 4, 0, max_offset=0, flip=False).indices(1)
    for k in range(4):  # no crop: resized straight to crop, like eval
        np.testing.assert_array_equal(plain[1][0][k], reference(split, idx[k], 16, 16, 0, 0, 0))
    noflip = take(pipeline.train_batches(split, precrop=20, crop=16, micro_batch=4, seed=0, random_flip=False), 3)
    stream = sampling.Stream(len(split), 4, 0, max_offset=4, flip=False)
    for b, (images, _) in enumerate(noflip):
        y, x, _ = stream.augment(b)
        for k in range(4):
            np.testing.assert_array_equal(images[k], reference(split, stream.indices(b)[k], 20, 16, y[k], x[k], 0))


def test_eval_batches_are_deterministic_whole_and_sharded(folder):
    split = folder.eval
    a = list(pipeline.eval_batches(split, crop=16, batch_size=4))
    assert [len(y) for _, y in a] == [4, 4, 1]
    assert same(a, list(pipeline.eval_batches(split, crop=16, batch_size=4, workers=2)))
    images = np.concatenate([x for x, _ in a])
    for i in range(len(split)):
        np.testing.assert_array_equal(images[i], reference(split, i, 16, 16, 0, 0, 0))
    np.testing.assert_array_equal(np.concatenate([y for _, y in a]), split.labels)
    shards = [np.concatenate([y for _, y in pipeline.eval_batches(split, crop=16, batch_size=2, rank=r, world=2)])
              for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(shards), split.labels)


def test_grayscale_digits_flow_as_rgb():
    ds = data.load(datagen.data_cfg(source="demo"))
    images, labels = take(pipeline.train_batches(ds.train, precrop=16, crop=12, micro_batch=8, seed=0), 1)[0]
    assert images.shape == (8, 3, 12, 12)
    assert np.array_equal(images[:, 0], images[:, 1]) and np.array_equal(images[:, 1], images[:, 2])


def test_pixels_scale_exactly_onto_minus_one_to_one():
    """0 and 255 from the pipeline become exactly -1 and 1 in the model's scaling and in ONNX Runtime's."""
    import mindspore as ms

    x = np.zeros((4, 8, 8, 3), np.uint8)
    x[1::2] = 255
    ds = data.from_arrays(x, np.array([0, 1, 0, 1]), eval_images=x, eval_labels=np.array([0, 1, 0, 1]))
    (images, _), = pipeline.eval_batches(ds.eval, crop=8, batch_size=4)
    assert (images[0::2] == 0).all() and (images[1::2] == 255).all()
    for scaled in (pixels.unit_range(ms.Tensor(images)).asnumpy(), pixels.unit_range_np(images)):
        assert scaled.dtype == np.float32 and (scaled[0::2] == -1.0).all() and (scaled[1::2] == 1.0).all()
    mid = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(pixels.unit_range(ms.Tensor(mid)).asnumpy(), pixels.unit_range_np(mid))
    np.testing.assert_allclose(pixels.unit_range_np(mid), mid / 127.5 - 1, atol=1e-7)  # ToTensor + Normalize(.5, .5)


def test_pipeline_leaves_global_rngs_alone(folder):
    np.random.seed(123)
    random.seed(123)
    take(pipeline.train_batches(folder.train, precrop=20, crop=16, micro_batch=4, seed=0), 2)
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)
    assert random.random() == random.Random(123).random()


def corrupt_one(tmp_path, skip):
    root = datagen.image_folder(tmp_path / "c", {"a": 4, "b": 4}, eval_count=3)
    bad = datagen.corrupt(root / "train" / "b" / "001.png")
    datagen.corrupt(root / "val" / "a" / "002.png", how="truncate")
    cfg = datagen.data_cfg(source="imagefolder", path=str(root), skip_corrupt=skip)
    return data.load(cfg), bad


def test_corrupt_image_stops_the_stream_naming_it(tmp_path):
    ds, bad = corrupt_one(tmp_path, skip=False)
    with pytest.raises(DataError, match="b/001.png.*skip_corrupt"):
        take(pipeline.train_batches(ds.train, precrop=20, crop=16, micro_batch=4, seed=0), 4)
    with pytest.raises(DataError, match="val/a/002.png"):
        list(pipeline.eval_batches(ds.eval, crop=16, batch_size=4))


def test_skip_corrupt_replaces_deterministically_and_counts(tmp_path):
    ds, bad = corrupt_one(tmp_path, skip=True)
    bad_i = [ds.train.where(i) for i in range(len(ds.train))].index(str(bad))

    def run():
        return take(pipeline.train_batches(ds.train, precrop=20, crop=16, micro_batch=4, seed=0), 4)

    a = run()  # 16 images = two epochs of 8: the bad one is met twice and replaced by the next
    assert same(a, run())
    assert all(im.shape == (4, 3, 16, 16) for im, _ in a)
    stream = sampling.Stream(len(ds.train), 4, 0, max_offset=4, flip=True)
    met = 0
    for b, (images, labels) in enumerate(a):
        idx = stream.indices(b)
        used = np.where(idx == bad_i, bad_i + 1, idx)  # the next image of the split stands in
        met += (idx == bad_i).sum()
        np.testing.assert_array_equal(labels, ds.train.labels[used])
        y, x, f = stream.augment(b)
        for k in range(4):
            np.testing.assert_allclose(images[k], reference(ds.train, used[k], 20, 16, y[k], x[k], f[k]), atol=1e-6)
    assert met == 2
    assert ds.skipped_corrupt == 1
    evals = list(pipeline.eval_batches(ds.eval, crop=16, batch_size=4))
    assert sum(len(y) for _, y in evals) == len(ds.eval) - 1
    assert ds.skipped_corrupt == 2 and "skipped 2 unreadable image(s)" in ds.corrupt_report()
    assert ds.corrupt_counts() == {"train": 1, "eval": 1}


def test_images_found_by_the_header_check_are_skipped_and_counted_per_split(tmp_path):
    ds, bad = corrupt_one(tmp_path, skip=True)  # train: garbage; eval: truncated after a valid header
    assert ds.check_readable() == {"train": 1, "eval": 0}  # the truncated one passes the header check
    a = take(pipeline.train_batches(ds.train, precrop=20, crop=16, micro_batch=4, seed=0), 4)
    assert all(len(y) == 4 for _, y in a)
    evals = list(pipeline.eval_batches(ds.eval, crop=16, batch_size=4))
    assert sum(len(y) for _, y in evals) == len(ds.eval) - 1
    assert ds.corrupt_counts() == {"train": 1, "eval": 1}  # the truncated one, met when decoded


def test_decode_workers_default_to_the_cpus_per_local_rank(monkeypatch):
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(2)))
    assert pipeline.num_workers(None) == 2 and pipeline.num_workers(8) == 2 and pipeline.num_workers(1) == 1
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(48)))
    assert pipeline.num_workers(None) == 48  # no fixed cap: a big host feeds its device
    monkeypatch.setenv("BIT_TRANSFER_LOCAL_RANKS", "8")  # `fit --devices 8` on this machine
    assert pipeline.num_workers(None) == 6 and pipeline.num_workers(10) == 10
    monkeypatch.delenv("BIT_TRANSFER_LOCAL_RANKS")
    monkeypatch.setenv("MS_WORKER_NUM", "16")  # a plain msrun: all its ranks counted, never too many threads
    assert pipeline.num_workers(None) == 3
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(4)))
    assert pipeline.num_workers(None) == 1


def test_prefetch_reads_ahead_in_order_and_stops_with_its_reader():
    """The next micro-batches are read while the consumer (the step) works; order and errors are kept."""
    import threading

    produced, closed = [], threading.Event()

    def source():
        try:
            for i in range(100):
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = pipeline.prefetch(source(), depth=2)
    assert next(it) == 0
    deadline = time.time() + 30  # the step runs: the thread fills the queue meanwhile (a loaded machine: later)
    while len(produced) < 4 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(produced) == 4  # 0 taken, 1 and 2 queued, 3 waiting for room, and no further
    assert [next(it) for _ in range(5)] == [1, 2, 3, 4, 5]
    it.close()
    assert closed.wait(5) and len(produced) < 12  # the thread stopped and closed its source

    def failing():
        yield 1
        raise DataError("cannot read image x.jpg")

    it = pipeline.prefetch(failing())
    assert next(it) == 1
    with pytest.raises(DataError, match="x.jpg"):
        next(it)
