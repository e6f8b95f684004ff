"""Which MindSpore we run on: the slow-convolution warning of MindSpore 2.9+ only where MindSpore's own
CPU convolutions run (one plain line, once, never before a command's one-line error), and a NumPy the
installed MindSpore cannot load is one line at start-up. Both CI legs run these (2.8 and the newest)."""

import os

import mindspore as ms
import pytest

from bit_transfer.system import device as runtime
from bit_transfer.kernels.layout import channels_last_available
from conftest import one_line_error, run_cli, write_recipe
from datagen import corrupt, pattern_task, tiny_recipe

runtime.setup("CPU")
SLOW = runtime.slow_cpu_warning(ms.__version__, "CPU") is not None  # MindSpore 2.9 and later


def test_only_mindspore_2_9_and_later_on_cpu_is_slow():
    assert runtime.slow_cpu_warning("2.8.0", "CPU") is None and runtime.slow_cpu_warning("2.10.0", "GPU") is None
    assert runtime.slow_cpu_warning("2.10.0", "CPU").startswith("MindSpore 2.10.0 runs its own CPU convolutions")


def cli(*args, kernels: str = "1", **extra_env):
    return run_cli(*args, env=os.environ | {"PYTHONUNBUFFERED": "1", "BIT_TRANSFER_CPU_KERNELS": kernels} | extra_env)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_the_slow_convolution_warning_is_one_plain_line_where_mindspores_convolutions_run(tmp_path, kernels):
    """A fit (train and eval steps, two compiled graphs) warns once, as one plain line, where the model
    runs MindSpore's convolutions on a slow MindSpore; with our kernels it says nothing."""
    r = tiny_recipe(pattern_task(tmp_path / "data"), tmp_path / "runs", rule__steps=2)
    out = cli("fit", write_recipe(tmp_path / "r.yaml", r), "--run-dir", tmp_path / "run", kernels=kernels)
    assert out.returncode == 0, out.stderr[-2000:]
    warned = [ln for ln in out.stderr.splitlines() if "convolutions ~100x slower" in ln]
    ours = kernels == "1" and channels_last_available()
    assert len(warned) == (1 if SLOW and not ours else 0), out.stderr
    assert all(ln.startswith("bit-transfer: warning: MindSpore ") for ln in warned)
    assert "RuntimeWarning" not in out.stderr


def test_a_command_failing_before_its_first_step_keeps_its_one_line_error(tmp_path):
    """MindSpore's convolutions chosen (our kernels off), the model built, then a corrupt weights file:
    the error is the only line, whatever the MindSpore."""
    weights = corrupt(tmp_path / "weights.npz")
    r = tiny_recipe(pattern_task(tmp_path / "data"), tmp_path / "runs", model__weights=str(weights))
    out = cli("fit", write_recipe(tmp_path / "r.yaml", r), "--run-dir", tmp_path / "run", kernels="0")
    assert "weights.npz" in one_line_error(out, "fit")


def test_a_numpy_mindspore_cannot_load_is_one_line_naming_both(tmp_path):
    """NumPy 2 installed beside a MindSpore built against NumPy 1 (its metadata first on the path, as
    `pip install -U numpy` leaves it): one line with both versions and the fix, before MindSpore's import."""
    (tmp_path / "numpy-2.1.0.dist-info").mkdir()
    r = tiny_recipe(pattern_task(tmp_path / "data"), tmp_path / "runs")
    out = cli("plan", write_recipe(tmp_path / "r.yaml", r), PYTHONPATH=str(tmp_path))
    line = one_line_error(out, "plan")
    assert f"NumPy 2.1.0 is installed, but MindSpore {ms.__version__} is built against NumPy 1" in line
    assert line.endswith("pip install 'numpy<2' 'pyarrow<26'")
    assert cli("plan", tmp_path / "r.yaml").returncode == 0  # the NumPy really installed is one it loads
