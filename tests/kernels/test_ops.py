"""The compiled CPU GroupNorm kernel gives the built-in op's values and gradients (bit_transfer/kernels/build.py)."""

import os
import platform
import re

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from bit_transfer.kernels import build as cpu_kernels

from bit_transfer.kernels import ops as kernel_ops
from bit_transfer.kernels.layers import kernel_group_norm

# The build itself is tested below without a skip; these compare results where the kernels exist.
needs_kernels = pytest.mark.skipif(not kernel_ops.available(), reason="compiled CPU kernels not available here")


@needs_kernels
@pytest.mark.parametrize("relu", [False, True], ids=["gn", "gn_relu"])
@pytest.mark.parametrize("shape,groups,eps", [((2, 64, 9, 7), 32, 1e-5), ((3, 16, 5, 5), 16, 1e-5), ((24, 1, 36), 1, 1e-10)])
def test_kernel_matches_ops_group_norm_values_and_gradients(shape, groups, eps, relu):
    rng = np.random.default_rng(0)
    x = Tensor((rng.standard_normal(shape) * 3 + 1).astype(np.float32))
    c = shape[1] if groups > 1 else 1
    gamma = Tensor(rng.standard_normal(c).astype(np.float32))
    beta = Tensor(rng.standard_normal(c).astype(np.float32))
    r = Tensor(rng.standard_normal(shape).astype(np.float32))
    kernel, eps_t = kernel_ops.group_norm_primitive(relu), Tensor([eps], ms.float32)

    def builtin(x, g, b):
        if groups == 1:  # the weight-standardisation form: no affine in ops.group_norm
            return (ops.relu(ops.group_norm(x, 1, None, None, eps) * g + b) * r).sum()
        return (ops.relu(ops.group_norm(x, groups, g, b, eps)) * r).sum()

    def compiled(x, g, b):  # relu(GN) * r either way: fused in the kernel, or after it
        y = kernel_group_norm(kernel, x, groups, g, b, eps_t)
        return ((y if relu else ops.relu(y)) * r).sum()

    for jit in (False, True):
        wrap = ms.jit if jit else (lambda f: f)
        want = wrap(ms.value_and_grad(builtin, (0, 1, 2)))(x, gamma, beta)
        got = wrap(ms.value_and_grad(compiled, (0, 1, 2)))(x, gamma, beta)
        np.testing.assert_allclose(got[0].asnumpy(), want[0].asnumpy(), rtol=1e-5, atol=1e-4)
        for a, b in zip(got[1], want[1]):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-4 * np.abs(b.asnumpy()).max())


@needs_kernels
@pytest.mark.parametrize("shape", [(8, 3, 7, 7), (16, 24, 1, 1), (5, 4, 3, 3), (512, 128, 3, 3)])  # the last: 2 threads
def test_weight_standardisation_kernel_matches_group_norm_on_the_flat_view(shape):
    """The WS kernel works on (O, I, kh, kw) as is; the reference reshapes to (O, 1, I*kh*kw)."""
    from bit_transfer.models.resnetv2 import WS_EPS

    rng = np.random.default_rng(1)
    w = Tensor((rng.standard_normal(shape) * 0.1 + 0.02).astype(np.float32))
    r = Tensor(rng.standard_normal(shape).astype(np.float32))
    kernel, eps_t = kernel_ops.weight_standardisation_primitive(), Tensor([WS_EPS], ms.float32)

    def builtin(w):
        return (ops.group_norm(w.reshape(w.shape[0], 1, -1), 1, None, None, WS_EPS).reshape(w.shape) * r).sum()

    def compiled(w):
        return (kernel(w, eps_t)[0] * r).sum()

    for jit in (False, True):
        wrap = ms.jit if jit else (lambda f: f)
        want = wrap(ms.value_and_grad(builtin))(w)
        got = wrap(ms.value_and_grad(compiled))(w)
        np.testing.assert_allclose(got[0].asnumpy(), want[0].asnumpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got[1].asnumpy(), want[1].asnumpy(), rtol=1e-4, atol=1e-4 * np.abs(want[1].asnumpy()).max())


@needs_kernels
@pytest.mark.parametrize("relu", [False, True], ids=["gn", "gn_relu"])
@pytest.mark.parametrize("cg,hw", [(1, 1), (2, 3)], ids=["one_value", "constant_group"])
def test_a_group_equal_to_its_mean_gives_exactly_beta(relu, cg, hw):
    """x - mean = 0, so y = beta, bit for bit: one value per group is what narrow models meet on 1x1
    maps. The folded form x*a + (beta - mean*a) gave FMA rounding noise instead (~1e-4 at
    a = 1/sqrt(eps)) that changed with the batch size, and later GroupNorms scaled it up."""
    rng = np.random.default_rng(2)
    groups, n = 32, 5
    x = np.repeat(rng.standard_normal((n * groups, 1, 1)) * 30, cg, 1).repeat(hw, 2).astype(np.float32)
    gamma, beta = rng.standard_normal((2, groups * cg)).astype(np.float32)
    y = kernel_ops.group_norm_primitive(relu)(Tensor(x), Tensor(gamma), Tensor(beta), Tensor([1e-5], ms.float32))[0]
    want = np.broadcast_to(np.tile(beta.reshape(groups, cg, 1), (n, 1, hw)), x.shape)
    np.testing.assert_array_equal(y.asnumpy(), np.maximum(want, 0) if relu else want)


def test_library_key_follows_the_compilers_target_features(monkeypatch):
    """Not the host name: a shared home or a re-provisioned host with another CPU must not load a
    library built for instructions it lacks."""
    avx2, avx512 = "#define __AVX2__ 1", "#define __AVX2__ 1\n#define __AVX512F__ 1"
    assert cpu_kernels.library_key(avx2) != cpu_kernels.library_key(avx512)
    assert cpu_kernels.library_key(avx2) == cpu_kernels.library_key(avx2)
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # this host's own target first (a capped run too)
        monkeypatch.delenv(cap, raising=False)
    cxx = cpu_kernels._compiler()
    if not cxx:
        pytest.skip("no C++ compiler")
    path = cpu_kernels._library_path(cxx)
    monkeypatch.setattr("platform.node", lambda: "another-host")
    assert cpu_kernels._library_path(cxx) == path
    native = cpu_kernels.target_features(cxx)
    assert "__VERSION__" in native  # the compiler's version is part of the key too
    if platform.machine() in ("x86_64", "AMD64") and "__AVX2__" in native:
        # oneDNN capped below AVX-512 (its ONEDNN_MAX_CPU_ISA) caps our kernels too, in another library
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
        capped = cpu_kernels.target_features(cxx)
        assert "__AVX2__" in capped and "__AVX512F__" not in capped
        if "__AVX512F__" in native:  # an AVX-512 host must not share a library with an AVX2 one
            assert cpu_kernels.library_key(native) != cpu_kernels.library_key(capped)
            assert cpu_kernels._library_path(cxx) != path
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
        assert cpu_kernels.target_features(cxx) == native


def test_kernels_build_wherever_a_compiler_is_present(monkeypatch):
    """Not a skip: a source that stops compiling would otherwise silently drop every test above."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler")
    assert cpu_kernels.build() is not None
    monkeypatch.delenv("BIT_TRANSFER_CPU_KERNELS", raising=False)
    kernel_ops.clear_caches()
    try:
        assert kernel_ops.available()
    finally:
        kernel_ops.clear_caches()


def test_a_failing_build_is_one_line_and_the_builtin_ops(monkeypatch, home, tmp_path, capfd):
    """The compiler's first error, with the real file and line, in one plain line on stderr."""
    import shutil

    monkeypatch.delenv("BIT_TRANSFER_CPU_KERNELS", raising=False)
    broken = tmp_path / "csrc" / "cpu_kernels.cc"  # a copy of the real source (its header beside it), broken
    shutil.copytree(cpu_kernels.CSRC, broken.parent)
    broken.write_text(broken.read_text() + "\n#error deliberately broken\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setattr(cpu_kernels, "_said", set())
    kernel_ops.clear_caches()
    try:
        assert kernel_ops.group_norm_primitive() is None
        assert kernel_ops.all_finite_primitive() is None and not kernel_ops.available()
        (line,) = capfd.readouterr().err.splitlines()
        assert re.fullmatch(r"bit-transfer: compiled CPU kernels unavailable \(.* failed: .*cpu_kernels\.cc:\d+:\d+: "
                            r"error: #error deliberately broken\); "
                            r"GroupNorm uses MindSpore's built-in op, about 2x slower training on CPU; "
                            r"set BIT_TRANSFER_CPU_KERNELS=0 to silence this", line), line
    finally:
        kernel_ops.clear_caches()


UNWRITABLE = """
import bit_transfer, mindspore
from bit_transfer.kernels import onednn as onednn_conv, ops as kernel_ops
for _ in range(2):  # models, steps and the feature pass each ask
    kernel_ops.clear_caches()
    assert kernel_ops.group_norm_primitive() is None and onednn_conv.library() is None
"""


def test_an_unwritable_kernel_cache_is_said_once_in_one_plain_line(tmp_path):
    """Not a RuntimeWarning with file:line and its source line, not "Install g++": the cache is the cause."""
    import subprocess
    import sys

    if not cpu_kernels._compiler():
        pytest.skip("no C++ compiler here")
    (tmp_path / "home").write_text("a file, not a directory")
    env = dict(os.environ, BIT_TRANSFER_HOME=str(tmp_path / "home"), BIT_TRANSFER_CPU_KERNELS="1")
    out = subprocess.run([sys.executable, "-c", UNWRITABLE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if not ln.startswith("[WARNING]")]
    assert lines == [f"bit-transfer: compiled CPU kernels unavailable (cannot write the kernel cache "
                     f"{tmp_path / 'home' / 'kernels'} (Not a directory)); GroupNorm uses MindSpore's built-in op, about "
                     "2x slower training on CPU; set BIT_TRANSFER_HOME to a writable directory, or "
                     "BIT_TRANSFER_CPU_KERNELS=0 to silence this"], out.stderr


SPIN_PROBE = """
import ctypes, os, sys, time
import bit_transfer, mindspore  # the CLI's order: bit_transfer first, then MindSpore loads libgomp
lib = ctypes.CDLL(sys.argv[1])
lib.work(100000)
t = time.process_time()
for _ in range(20):  # a short OpenMP region, then idle: what do libgomp's threads burn meanwhile?
    lib.work(1000)
    time.sleep(0.02)
print(time.process_time() - t)
"""


@pytest.mark.slow
def test_libgomp_threads_stop_spinning_soon_after_a_kernel_unless_the_user_set_it(home, tmp_path):
    """bit_transfer/__init__.py sets GOMP_SPINCOUNT=10000 before MindSpore loads libgomp; with
    libgomp's default (300,000 spins) the idle threads hold the cores MindSpore's threads need."""
    import os
    import subprocess
    import sys

    source = tmp_path / "omp_probe.cc"
    source.write_text('extern "C" double work(int n) { double s = 0;\n'
                      "#pragma omp parallel for reduction(+:s)\nfor (int i = 0; i < n; i++) s += i * 0.5;\n"
                      "return s; }\n")
    lib = cpu_kernels.build("omp_probe", source, ["-O1", "-fopenmp", "-shared", "-fPIC"])
    if lib is None:
        pytest.skip("no C++ compiler here")

    def cpu_while_idle(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
        out = subprocess.run([sys.executable, "-c", SPIN_PROBE, str(lib)], capture_output=True, text=True,
                             env=base | {"OMP_NUM_THREADS": "2"} | env, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    ours, users = cpu_while_idle(), cpu_while_idle(GOMP_SPINCOUNT="300000")
    assert ours < 0.05 and users > 3 * ours, (ours, users)  # measured: 0.006 s vs 0.095 s
    assert cpu_while_idle(OMP_WAIT_POLICY="ACTIVE") > 0.2  # theirs wins: libgomp spins throughout
