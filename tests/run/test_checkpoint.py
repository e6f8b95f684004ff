"""Our .ckpt files: atomic save, meta round trip, one-line errors for broken files."""

import os

import mindspore as ms
import numpy as np
import pytest

from bit_transfer.models.weights.ckpt import read_checkpoint, save_checkpoint
from bit_transfer.errors import WeightsError


def params():
    rng = np.random.default_rng(0)
    return {
        "root.conv.weight": rng.standard_normal((4, 3, 7, 7)).astype(np.float32),
        "head.bias": ms.Tensor(rng.standard_normal(5).astype(np.float32)),
        "head.weight": ms.Parameter(ms.Tensor(rng.standard_normal((5, 8)).astype(np.float32)), name="w"),
        "optimizer.moments.head.bias": np.zeros(5, np.float32),
    }


def test_round_trip_keeps_arrays_and_meta(tmp_path):
    path = tmp_path / "step-000010.ckpt"
    meta = {"model": {"name": "BiT-M-R50x1", "depths": [3, 4, 6, 3]}, "class_names": ["cät", "dog"], "step": 10}
    save_checkpoint(path, params(), meta)
    assert sorted(os.listdir(tmp_path)) == ["step-000010.ckpt"]  # no temporary left behind
    got, got_meta = read_checkpoint(path)
    assert got_meta == meta
    want = {k: np.asarray(v.asnumpy() if hasattr(v, "asnumpy") else v) for k, v in params().items()}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"a": np.zeros(3, np.float32)}, {"step": 1})
    save_checkpoint(path, {"a": np.ones(3, np.float32)}, {"step": 2})
    got, meta = read_checkpoint(path)
    assert meta == {"step": 2} and got["a"].tolist() == [1, 1, 1]


def test_meta_must_be_json(tmp_path):
    with pytest.raises(WeightsError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "x.ckpt", {"a": np.zeros(1, np.float32)}, {"bad": object()})


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage", "missing"])
def test_broken_files_give_one_line_errors(tmp_path, damage):
    path = tmp_path / "x.ckpt"
    save_checkpoint(path, params(), {"step": 3})
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # a flipped byte inside tensor data: only the CRC notices
        data = bytearray(raw)
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(2000))
    else:
        path.unlink()
    with pytest.raises(WeightsError) as e:
        read_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    assert {"truncate": "corrupt", "flip": "corrupt", "empty": "empty", "garbage": "corrupt", "missing": "not found"}[
        damage
    ] in message
