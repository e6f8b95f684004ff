"""The kernel builder: compiles a C++ source of csrc/ into a shared library once per key (source and
headers, flags, the compiler's target features) under settings.home()/kernels, atomically, in the
background at start-up where that helps. A failed build raises RuntimeError with the compiler's first
errors (real file and line); kernels/ops.py and kernels/onednn.py turn that into one line and
MindSpore's own ops.

The cache stays bounded (`prune`, before anything new is written to it and at most daily on a hit):
entries unused for KEEP_DAYS, folders derived from a file since replaced or removed on this machine
(the private oneDNN copy of a reinstalled wheel, 54 MB each), and the work of builds killed half-way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bit_transfer.system import files

CSRC = Path(__file__).parent / "csrc"  # the C++ sources, shipped as package data
SOURCE = CSRC / "cpu_kernels.cc"
# -fopenmp: the NCHW kernels stay single-threaded (with OpenMP threads they were faster on an idle
# machine but 2x slower than the built-in op when another job held a core: spinning barriers next to
# MindSpore's own thread pool). The channels-last GroupNorm runs between oneDNN's convolutions, which
# use the same GNU OpenMP team anyway: 2 threads made it 2x faster (R50x1 step: Custom ops 505 -> 345 ms).
# The target (-march=native, see target_flags) comes first on every kernel command line.
CXX_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]

# oneDNN's names for instruction sets below AVX-512 (ONEDNN_MAX_CPU_ISA values, oneDNN's docs:
# "CPU dispatcher control"): SSE41, AVX, AVX2, AVX2_VNNI, AVX2_VNNI_2.
BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")

KEEP_DAYS = 30  # a library or folder unused this long is removed by the next `prune`
STALE_GRACE = 3600  # a folder whose source file changed goes once unused this long (seconds): a
#                     process that has just found it (and touched it) links or loads it well within
SOURCE_RECORD = "source.json"  # in a folder derived from another file: that file's path, size and time


def target_flags() -> list[str]:
    """What the kernels are compiled for: this CPU (-march=native), without AVX-512 where oneDNN is
    capped below it (ONEDNN_MAX_CPU_ISA or DNNL_MAX_CPU_ISA, read as oneDNN reads them): one cap then
    holds for every kernel of the run, our loops run at the vector width oneDNN's do, and an AVX-512
    machine can stand in for an AVX2 one (benchmarks/train_step.py --isa avx2, the AVX2 tests)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    x86 = platform.machine() in ("x86_64", "AMD64")  # the flag is x86's (oneDNN ignores these names elsewhere)
    return ["-march=native", *(["-mno-avx512f"] if x86 and cap.upper() in BELOW_AVX512 else [])]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def target_features(cxx: str) -> str:
    """What target_flags mean to this compiler on this CPU: its predefined macros (__AVX512F__,
    __AVX2__, ..., __VERSION__); "" if the query fails (the build then fails with the compiler's
    own message)."""
    return _predefined_macros(cxx, tuple(target_flags()))


@functools.cache
def _predefined_macros(cxx: str, target: tuple[str, ...]) -> str:
    """~15 ms, so once per process and target."""
    try:
        out = subprocess.run([cxx, *target, *CXX_FLAGS, "-E", "-dM", "-x", "c++", "-"], input="",
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return "\n".join(sorted(out.splitlines()))


def source_text(source: Path) -> str:
    """A kernel's source as the compiler sees it: the .cc and every header beside it (what the key hashes)."""
    headers = sorted(Path(source).parent.glob("*.h"))
    return "\n".join(p.read_text() for p in [Path(source), *headers])


def library_key(target: str, source: Path | None = None, flags: list[str] | None = None, extra: str = "") -> str:
    """Source, flags and the compiler's target features: not the host name, so a shared home or a
    re-provisioned host with another CPU never loads a library built for instructions it lacks
    (an illegal-instruction crash), and one CPU model shares one build. `extra`: what else the
    library depends on (oneDNN's version header)."""
    source, flags = SOURCE if source is None else source, CXX_FLAGS if flags is None else flags
    text = source_text(source) + ("\n// " + extra if extra else "")
    return hashlib.sha256("\n".join([text, " ".join(flags), target]).encode()).hexdigest()[:16]


def _library_path(cxx: str, name: str = "cpu_kernels", source: Path | None = None,
                  flags: list[str] | None = None, extra: str = "") -> Path:
    from bit_transfer import settings

    key = library_key(target_features(cxx), source, flags, extra)
    return settings.home() / "kernels" / f"{name}-{key}.so"


def build(name: str = "cpu_kernels", source: Path | None = None, flags: list[str] | None = None,
          link: list[str] = (), extra: str = "") -> Path | None:
    """Compile a kernel library (default: csrc/cpu_kernels.cc with CXX_FLAGS) once per key into
    settings.home()/kernels (atomic rename, so concurrent processes are safe). `link` follows the
    source on the command line (libraries; kernels/onednn.py links oneDNN).

    None when there is no C++ compiler; RuntimeError (with the compiler's first errors) when it fails.
    """
    cxx = _compiler()
    if not cxx:
        return None
    source, flags = SOURCE if source is None else source, CXX_FLAGS if flags is None else flags
    lib = _library_path(cxx, name, source, flags + list(link), extra)
    if files.touch(lib):
        prune_daily(lib.parent)
        return lib
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        prune(lib.parent)  # before writing: room on a full disk
        return _compile([cxx, *target_flags(), *flags, f"-I{Path(source).parent}"], Path(source), list(link), lib)
    except OSError as e:  # BIT_TRANSFER_HOME a file, read-only, full: the built-in ops still work
        raise CacheUnwritable(f"cannot write the kernel cache {lib.parent} ({e.strerror or e})") from None


class CacheUnwritable(RuntimeError):
    """The kernel cache (settings.home()/kernels) cannot be written: the compiler is not the cause."""


_said: set[str] = set()


def notice(line: str) -> None:
    """`line` once per process, as one plain line on stderr (not a Python warning: no file:line, no
    source line): what is slower and why, from a build that fell back to MindSpore's ops."""
    if line not in _said:
        _said.add(line)
        print(f"bit-transfer: {line}", file=sys.stderr, flush=True)


def fallback_fix(e: Exception | None, silence: str) -> str:
    """The fix for a kernel build that failed with `e` (None: no compiler), naming its real cause."""
    if isinstance(e, CacheUnwritable):
        return f"set BIT_TRANSFER_HOME to a writable directory, or {silence} to silence this"
    if e is None:
        return f"install g++, or set {silence} to silence this"
    return f"set {silence} to silence this"


def _compile(command: list[str], source: Path, link: list[str], lib: Path) -> Path:
    work = files.private_workdir(lib.parent, lib.stem)
    try:
        out = work / "kernels.so"
        try:
            subprocess.run([*command, "-o", str(out), str(source), *link], check=True, capture_output=True, timeout=300)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{command[0]} failed: {first_errors(e.stderr.decode(errors='replace'))}") from None
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"{command[0]} failed: {e}") from None
        files.publish(out, lib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def record_source(folder: Path, source: Path) -> None:
    """Note in `folder` the file it was derived from (and on which machine), for `prune` to notice a
    reinstall. Raises OSError (the callers' CacheUnwritable)."""
    tmp = folder / f".{SOURCE_RECORD}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"host": socket.gethostname(), **_stamp(source)}))
        files.publish(tmp, folder / SOURCE_RECORD)
    finally:
        files.remove_quietly(tmp)


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _source_replaced(folder: Path) -> bool:
    """The file `folder` was derived from on this machine is gone or another file now (False: unknown,
    not derived, or another machine's: a shared home's other hosts see their own files)."""
    try:
        recorded = json.loads((folder / SOURCE_RECORD).read_text())
        if recorded.pop("host") != socket.gethostname():
            return False
        path = Path(recorded["path"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    try:
        return _stamp(path) != recorded
    except OSError:
        return True


def _last_used(entry: Path) -> float:
    """A library's time, or a folder's newest file's (use touches the library file)."""
    if entry.is_dir():
        return max((f.stat().st_mtime for f in entry.iterdir() if f.is_file()), default=entry.stat().st_mtime)
    return entry.stat().st_mtime


PRUNED = ".pruned"  # its time: the last prune (hits prune at most daily)


def prune(root: Path, now: float | None = None) -> None:
    """Remove what the cache no longer needs (see the module docstring): before anything is written
    to it, and on a hit at most daily (`prune_daily`). Best effort: a cache that cannot be cleaned
    still serves."""
    now = time.time() if now is None else now
    try:
        (root / PRUNED).touch()
        files.remove_abandoned(root, now)
        for entry in root.iterdir():
            if entry.name.startswith("."):
                continue
            used = _last_used(entry)
            if used < now - KEEP_DAYS * 86400 or (used < now - STALE_GRACE and entry.is_dir()
                                                  and _source_replaced(entry)):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    files.remove_quietly(entry)
    except Exception:  # noqa: BLE001 - housekeeping never fails a run
        pass


def prune_daily(root: Path) -> None:
    """`prune` on a cache hit, if the last was a day ago: a reinstalled wheel's copy goes without waiting
    for the next build."""
    try:
        if (root / PRUNED).stat().st_mtime > time.time() - 86400:
            return
    except OSError:
        pass
    prune(root)


def first_errors(stderr: str, most: int = 3) -> str:
    """The compiler's first `most` error lines (file:line:col: error: ...), joined into one line."""
    errors = [ln.strip() for ln in stderr.splitlines() if " error" in ln or ln.startswith("error")]
    if errors:
        return " | ".join(errors[:most])[:600]
    return (stderr.strip().splitlines() or ["no output"])[-1][:300]


_background: dict[str, threading.Thread] = {}


def build_in_background(name: str, build_fn) -> None:
    """Start compiling a kernel library in a thread (g++ runs outside the GIL) so the compile overlaps
    the rest of start-up (imports, data checks); `wait_for_build(name)` joins it before the library is
    needed. Errors are left to the foreground build, which meets them again and says why."""
    def quietly():
        try:
            build_fn()
        except Exception:  # noqa: BLE001 - reported by the foreground build
            pass

    if name not in _background:
        _background[name] = threading.Thread(target=quietly, name=f"build-{name}", daemon=True)
        _background[name].start()


def wait_for_build(name: str) -> None:
    thread = _background.get(name)
    if thread is not None:
        thread.join()



