"""Reusing the compiled training step across runs: MindSpore's compile cache, made safe.

Compiling R50x1's train step takes ~7 s of the ~10 s before a run's first step; loading it from
MindSpore's compile cache takes ~1 s. MindSpore 2.8 does not key that cache by the graph: it names
a cached graph by its place in the process's compile order, in one directory fixed at the process's
first cached compile, and checks only a hash of the entry script's own imports
(mindspore/ccsrc/frontend/jit/ps/compile_cache_manager.cc: `GetCompileCachePath(idx)`,
`CanLoadCache`). Used as it is, another model, micro-batch or resume order would load the wrong
graph. So here:

- a process caches exactly one graph, its first training step, with the cache switched on for that
  step only: the graph is always number 0 of its directory;
- the directory is named by a hash of everything that shapes that graph (`key`): the cells and
  their settings, every Parameter's name, shape and dtype, the step's settings and input shapes,
  bit-transfer's source, MindSpore's version, the CPU's features and the environment that picks
  kernels;
- an entry is written to a private directory and renamed into place with a manifest of its files'
  hashes once the step has run; an entry whose files do not match is removed and rebuilt.

The step's Parameters must be reachable from a Cell (step.py `_StepCell`): a cache load rebinds a
graph's Parameters by name from the compiled object's `parameters_dict()`, and a plain function
has none (its cached graph computed NaN). Verified on CPU only, so used only there
(docs/performance.md); BIT_TRANSFER_COMPILE_CACHE=0 turns it off. Entries are ~1 MB, in
settings.home()/compile-cache, and safe to delete.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from bit_transfer import settings
from bit_transfer.system import files

VERSION = 1  # of the key's recipe: bump when what goes into it changes
MANIFEST = "manifest.json"
KEY = "key.json"
KEEP_DAYS = 30  # an entry unused this long is removed when another is saved
MIN_FREE = 64 << 20  # an entry is ~1 MB; leave the disk to checkpoints when it runs low
_ENV_PREFIXES = ("BIT_TRANSFER_", "ONEDNN_", "DNNL_", "MS_", "OMP_", "KMP_")
_ENV_IGNORED = ("BIT_TRANSFER_HOME", "BIT_TRANSFER_BAR", "BIT_TRANSFER_COMPILE_CACHE", "MS_COMPILER_CACHE_")
_CELL_BASE_KEPT = ("training", "requires_grad", "mixed_precision_type")
_used = False  # MindSpore fixes the cache directory at a process's first cached compile


def root() -> Path:
    return settings.home() / "compile-cache"


def enabled(device: str, jit: bool, ranks: int) -> bool:
    """On for compiled single-process CPU steps (the case verified), unless BIT_TRANSFER_COMPILE_CACHE=0."""
    return settings.compile_cache() and jit and ranks == 1 and device == "CPU"


@contextlib.contextmanager
def first_call(cell, inputs, settings: dict, log=None):
    """Around a compiled step's first call (which compiles it): load its graph from the cache, or save it.

    Does nothing after the process's first use, or when the cache cannot be used; a cache that
    cannot be written costs one line to `log` (None: silent), never the run.
    """
    global _used
    log = log or _silent
    if _used:
        yield
        return
    _used = True
    try:
        parts = graph_parts(cell, inputs, settings)
        entry, work = _prepare(root(), _digest(parts))
        if work != entry:
            (work / KEY).write_text(json.dumps(parts, indent=1, sort_keys=True, default=str))
    except (OSError, ValueError, SyntaxError) as e:  # home not writable; an entry script MindSpore cannot read
        log(f"compile cache off for this run: {_reason(e)}")
        yield
        return
    _switch(work)
    try:
        yield
    except BaseException:
        _switch(None)
        if work != entry:
            shutil.rmtree(work, ignore_errors=True)
        raise
    _switch(None)
    _finish(entry, work, log)


def _finish(entry: Path, work: Path, log) -> None:
    """After the first step: say what was loaded, or publish what was compiled."""
    if work == entry:
        if _intact(entry):
            files.touch(entry / MANIFEST)
            log(f"compiled step loaded from {entry}")
        else:  # MindSpore did not load it and compiled (and wrote) anew: the next run rebuilds it
            shutil.rmtree(entry, ignore_errors=True)
            log(f"compile cache: {entry} did not load; removed")
        return
    try:
        _publish(work, entry)
        _prune(entry.parent)
        log(f"compiled step saved to {entry}")
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        log(f"compile cache not saved: {_reason(e)}")


def graph_key(cell, inputs, settings: dict) -> str:
    """A hash of everything that shapes the compiled graph of `cell` called on `inputs`."""
    return _digest(graph_parts(cell, inputs, settings))


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def graph_parts(cell, inputs, settings: dict) -> dict:
    """What the key hashes; kept in the entry as key.json, to tell why two runs did not share one."""
    return {
        "version": VERSION,
        "settings": settings,
        "cells": [_describe_cell(name, c) for name, c in cell.cells_and_names()],
        "parameters": [(p.name, tuple(p.shape), str(p.dtype), bool(p.requires_grad))
                       for p in cell.get_parameters()],
        "inputs": [(tuple(x.shape), str(x.dtype)) for x in inputs],
        "environment": environment(),
    }


def environment() -> dict:
    """What outside the graph's own code decides what MindSpore compiles it to."""
    import mindspore as ms
    from mindspore.common import api

    return {
        "bit_transfer": _source_digest(),
        "mindspore": ms.__version__,
        "mindspore_library": [_file_stamp(f) for f in sorted(Path(ms.__file__).parent.glob("_c_expression*.so"))],
        "device": ms.get_context("device_target"),
        "python": sys.version,
        "machine": platform.machine(),
        "cpu": _cpu_flags(),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(_ENV_PREFIXES) and not k.startswith(_ENV_IGNORED)},
        # MindSpore's own check (`CanLoadCache`): the same files, so its answer is always ours
        "mindspore_dependencies": _files_digest(api._get_compile_cache_dep_files()),
    }


def _describe_cell(name: str, cell) -> tuple:
    """A cell's class, its plain settings (kernel, stride, padding, layout, groups, ...) and its
    primitives; a compiled kernel's by its library path, which names its source and CPU target."""
    from mindspore import Parameter, Tensor

    base = _cell_base_attributes()
    settings = {k: v for k, v in vars(cell).items()
                if (k not in base or k in _CELL_BASE_KEPT) and isinstance(v, (bool, int, float, str, tuple, type(None)))}
    primitives = {k: (p.name, str(getattr(p, "func", ""))) for k, p in cell._primitives.items() if p is not None}
    constants = {k: _tensor_digest(v) for k, v in {**vars(cell), **cell._buffers}.items()
                 if isinstance(v, Tensor) and not isinstance(v, Parameter)}  # compiled into the graph as values
    return (name, f"{type(cell).__module__}.{type(cell).__qualname__}", sorted(settings.items()),
            sorted(primitives.items()), sorted(constants.items()))


def _tensor_digest(t) -> str:
    a = t.asnumpy()
    return f"{a.dtype}{a.shape}:{hashlib.sha256(a.tobytes()).hexdigest()}"


@functools.cache
def _cell_base_attributes() -> frozenset[str]:
    """Every Cell's own bookkeeping (phase caches, hooks, create time): not settings of a layer."""
    from mindspore import nn

    return frozenset(vars(nn.Cell()))


def _source_digest() -> str:
    package = Path(__file__).parents[1]  # bit_transfer/
    sources = [f for f in package.rglob("*") if f.suffix in (".py", ".cc", ".cpp", ".h") and "__pycache__" not in f.parts]
    return _files_digest(sources, package)


def _files_digest(files, root: Path | None = None) -> str:
    """Names (relative to `root`, if given) and bytes of `files`, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(files):
        name = str(Path(f).relative_to(root)) if root else str(f)
        h.update(name.encode() + b"\0" + Path(f).read_bytes())
    return h.hexdigest()


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return hashlib.sha256(line.encode()).hexdigest()
    except OSError:
        pass
    return platform.processor()


# ----------------------------------------------------------------------------- entries on disk
def _prepare(cache: Path, key: str) -> tuple[Path, Path]:
    """(entry, where this process's compile reads or writes): the entry itself when it is complete,
    else a new private directory; a damaged entry is removed."""
    entry = cache / key
    if entry.is_dir():
        if _intact(entry):
            return entry, entry
        shutil.rmtree(entry, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    files.remove_abandoned(cache)
    if shutil.disk_usage(cache).free < MIN_FREE:  # MindSpore would fail half-way, with two ERROR lines
        raise OSError(errno.ENOSPC, f"less than {MIN_FREE >> 20} MB free", str(cache))
    return entry, files.private_workdir(cache, key)


def _publish(work: Path, entry: Path) -> None:
    """The manifest, then one rename: readers see a whole entry or none (another process's equal
    entry, renamed first, is kept)."""
    files = _manifest(work)
    if not any(name.endswith(".mindir") for name in files):
        raise OSError(f"MindSpore wrote no graph to {work}")
    (work / MANIFEST).write_text(json.dumps(files, sort_keys=True))
    try:
        os.rename(work, entry)
    except OSError:
        if not _intact(entry):
            raise
        shutil.rmtree(work, ignore_errors=True)


def _intact(entry: Path) -> bool:
    try:
        recorded = json.loads((entry / MANIFEST).read_text())
        return bool(recorded) and _manifest(entry) == recorded
    except (OSError, ValueError):
        return False


def _manifest(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*")) if f.is_file() and f.name != MANIFEST}


def _prune(cache: Path, now: float | None = None) -> None:
    """Entries not used for KEEP_DAYS (other versions of bit-transfer or MindSpore, old recipes)."""
    cutoff = (time.time() if now is None else now) - KEEP_DAYS * 86400
    for entry in cache.iterdir():
        try:
            unused = (entry / MANIFEST).stat().st_mtime < cutoff
        except OSError:
            continue  # not an entry (work in progress, something else)
        if unused:
            shutil.rmtree(entry, ignore_errors=True)


def _silent(*_args) -> None:
    pass


def _switch(directory: Path | None) -> None:
    import mindspore as ms

    if directory is None:
        ms.set_context(enable_compile_cache=False)
    else:
        ms.set_context(enable_compile_cache=True, compile_cache_path=str(directory))


def _reason(e: BaseException) -> str:
    where = getattr(e, "filename", None)
    return f"{getattr(e, 'strerror', None) or e}" + (f" ({where})" if where else "")
