"""bit-transfer: BiT-HyperRule fine-tuning of Big Transfer models on MindSpore."""

import os as _os

# MindSpore logs every missing accelerator plugin as a WARNING on stderr; keep our users'
# terminals readable (errors only) unless they ask for more with GLOG_v themselves.
_os.environ.setdefault("GLOG_v", "3")
# MindSpore's generated protobuf modules need protobuf's pure-Python backend; MindSpore selects it
# only when it is imported before anything else that loads protobuf (tensorboardX does), and
# otherwise fails with "Descriptors cannot be created directly".
_os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
# Our CPU kernels (oneDNN, cpu_kernels) run on libgomp's threads, MindSpore's own ops and its graph
# runtime on MindSpore's thread pool. After each kernel libgomp's idle threads spin 300,000 times by
# default (https://gcc.gnu.org/onlinedocs/libgomp/GOMP_005fSPINCOUNT.html; ~5 ms here) on the cores
# MindSpore's threads need. 10,000 spins (~0.2 ms) still bridge the ~40 us between two of our
# kernels: training at micro-batch 8 +7 % (docs/performance.md). libgomp reads it once, when
# `import mindspore` loads it, hence here; a user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from bit_transfer.settings import VERSION as __version__  # noqa: E402, F401 (after the environment above)


def __getattr__(name):
    """`from bit_transfer import Predictor`: imported on first use, so `import bit_transfer` stays light
    (no MindSpore) for the CLI's fast commands."""
    if name in ("Predictor", "Prediction"):
        from bit_transfer import predict

        return getattr(predict, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
