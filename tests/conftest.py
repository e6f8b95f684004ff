"""Fixtures and helpers the test files share: a private cache home, no Hugging Face hub, the CLI as a
real process, the one-line-error promise, tiny recipes on generated data (written by datagen.py),
and scratch file systems (read-only, full)."""

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# An xdist worker runs as `python -c ...`: MindSpore takes sys.argv[0] as the entry script its compile
# cache depends on (mindspore/common/api.py, entry_script_path) and then fails to read "-c". The entry
# script of a test process is pytest's.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.path.isfile(sys.argv[0]):
    sys.argv[0] = pytest.__file__

# datagen holds shared assertions (assert_params_close): pytest explains them as in a test file.
pytest.register_assert_rewrite("datagen")


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory):
    """The whole suite caches (measurements, features, kernels) under a temporary BIT_TRANSFER_HOME,
    never the user's. Tests that need a home of their own set it themselves."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("bt-home")
    mp.setenv("BIT_TRANSFER_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture
def home(monkeypatch, tmp_path):
    """A bit-transfer home of this test's own (caches start empty)."""
    path = tmp_path / "bt-home"
    monkeypatch.setenv("BIT_TRANSFER_HOME", str(path))
    return path


def _private_datasets_cache(monkeypatch, path: Path) -> Path:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", path)
    return path


@pytest.fixture
def hf_datasets_cache(monkeypatch, tmp_path):
    """An empty Hugging Face datasets cache of this test's own."""
    return _private_datasets_cache(monkeypatch, tmp_path / "hf-cache")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No Hugging Face hub (HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, set before `datasets` is first
    imported) and an empty datasets cache of this test's own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return _private_datasets_cache(monkeypatch, tmp_path / "hf-cache")


# The two graphs a model trains on: "kernels", our compiled CPU kernels and oneDNN's channels-last
# convolutions (CPU's default), and "msops", MindSpore's own operators in NCHW (BIT_TRANSFER_CPU_KERNELS=0),
# the graph Ascend and GPU compile. Tests of training, evaluation, prediction, resume, micro-batching,
# fp16 and 2 ranks run on both (the `graph` fixture); `make test` so exercises the accelerators' graph.
GRAPHS = ("kernels", "msops")


def _forget_kernels() -> None:
    from bit_transfer.kernels import onednn as onednn_conv, ops as kernel_ops

    kernel_ops.clear_caches()
    onednn_conv.clear_caches()


@contextlib.contextmanager
def use_graph(graph: str):
    """Models built and CLI processes started inside run on `graph` (GRAPHS)."""
    mp = pytest.MonkeyPatch()
    if graph == "msops":
        mp.setenv("BIT_TRANSFER_CPU_KERNELS", "0")
    _forget_kernels()
    try:
        yield graph
    finally:
        mp.undo()
        _forget_kernels()


@pytest.fixture(scope="module", params=GRAPHS)
def graph(request):
    """Each graph in turn (module-scoped: a module's shared runs are made once per graph); a test
    activates it with `use_graph(graph)`. Pin a test to one with
    `@pytest.mark.parametrize("graph", ["kernels"], indirect=True)`."""
    return request.param


def run_cli(*args, cwd=ROOT, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`bit-transfer ARGS` as a user runs it: a new process, its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "bit_transfer", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env or dict(os.environ, PYTHONUNBUFFERED="1"), timeout=timeout)


def start_fit(recipe: Path, run_dir: Path, *extra) -> subprocess.Popen:
    """`bit-transfer fit` as a running process, to signal or kill while it works."""
    return subprocess.Popen(
        [sys.executable, "-m", "bit_transfer", "fit", str(recipe), "--run-dir", str(run_dir), "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def wait_for(condition, proc, timeout=120.0, every=0.0005):
    """Poll fast until `condition()`; the child must still be running."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(every)


def one_line_error(out, command: str, code: int = 2, label: str = "error") -> str:
    """The single stderr line of a failed command, after checking the promise: exit code, no traceback."""
    assert out.returncode == code, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = [ln for ln in out.stderr.strip().splitlines() if not ln.startswith("[WARNING]")]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"bit-transfer {command}: {label}: "), lines[0]
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every file below `root` (or `root` itself), by relative name, with its bytes and mode: to prove
    nothing a user had was changed."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)) if p != root else ".": (p.read_bytes(), p.stat().st_mode) for p in files}


def write_recipe(path: Path, recipe) -> Path:
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return path


@contextlib.contextmanager
def scratch_fs(path: Path, size: str = "4m", read_only: bool = False):
    """A tmpfs mounted at `path` (root only): a disk that fills up, or a read-only place. Skips where
    mounting is not allowed (CI and developers run as root here, so it runs)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    tag = f"bt-{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, tag, str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
