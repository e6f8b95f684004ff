"""`bit-transfer doctor [RECIPE]`: what this machine gives bit-transfer, for a person with new hardware.

MindSpore's version and build, the devices it sees (and, where it sees none, its own plugin load
errors), CUDA/CANN versions, our CPU kernels, then a short training smoke run of R50x1 (random
weights) on the chosen device in each precision that device supports (runtime.PRECISIONS_BY_DEVICE),
and with a recipe the input pipeline's images/s on its data: whether training it would be input-bound.
Every line is a finding; a failed smoke run is printed, not raised, and makes the exit code 1.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from bit_transfer.system import device as runtime

# Where CANN records its version (the toolkit's version.cfg / *_install.info files); ASCEND_HOME_PATH first.
CANN_ROOTS = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/latest", "/usr/local/Ascend/cann")
TINY = {"depths": [1, 1, 1, 1], "width": 0.125}  # --model tiny: the tests' model


def mindspore_build() -> str:
    """'MindSpore 2.8.0 at <dir>; plugins shipped: cpu, gpu (CUDA 11.1, 11.6), ascend'."""
    import mindspore as ms

    root = Path(ms.__file__).parent
    plugins = sorted(p.name for p in (root / "lib" / "plugin").glob("*") if p.is_dir())
    shipped = [p for p in plugins if not re.fullmatch(r"gpu[0-9.]+", p)]
    cudas = runtime.gpu_plugins()
    shipped = [f"gpu (CUDA {', '.join(cudas)})" if p == "gpu" and cudas else p for p in shipped]
    return f"MindSpore {ms.__version__} at {root}; plugins shipped: {', '.join(shipped) or 'none'}"


def devices_seen() -> list[str]:
    """One line per device: how many MindSpore can use, or why none (its own load error)."""
    lines = []
    for device in runtime.AUTO_ORDER:
        n = runtime.device_count(device)
        if n:
            lines.append(f"{device}: {n} device(s)")
        elif device != "CPU":
            why = runtime.plugin_load_error(device) or runtime.no_plugin_reason(device)
            lines.append(f"{device}: none ({why})")
    nodes = runtime.device_nodes()
    lines.append("device nodes: " + ("; ".join(f"{d}: {', '.join(p)}" for d, p in nodes.items()) if nodes
                                     else "none (/dev/nvidia*, /dev/davinci*)"))
    return lines


def cuda_version() -> str:
    """The driver's CUDA version and the GPUs, from nvidia-smi; or why not."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "not found (no nvidia-smi on PATH)"
    try:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
        names = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed ({e})"
    m = re.search(r"CUDA Version:\s*([0-9.]+)", out)
    return f"CUDA {m[1] if m else 'unknown'} (driver); GPUs: {'; '.join(names) or 'none listed'}"


def cann_version(roots=None) -> str:
    """CANN's version from its install files, or 'not found'."""
    import os

    roots = roots or tuple(filter(None, [os.environ.get("ASCEND_HOME_PATH")])) + CANN_ROOTS
    for root in roots:
        for f in sorted(glob.glob(f"{root}/version.cfg") + glob.glob(f"{root}/*/ascend_toolkit_install.info")
                        + glob.glob(f"{root}/*_install.info")):
            m = re.search(r"^\s*(?:version|Version)\s*=\s*\[?([^\]\s]+)", Path(f).read_text(errors="replace"), re.M)
            if m:
                return f"CANN {m[1]} ({f})"
    return "not found (no CANN version file under " + ", ".join(roots) + ")"


def cpu_kernels_status() -> str:
    from bit_transfer import settings
    from bit_transfer.kernels import onednn as onednn_conv, ops as kernel_ops

    if not settings.cpu_kernels():
        return "off (BIT_TRANSFER_CPU_KERNELS=0): MindSpore's own operators, NCHW"
    if not kernel_ops.available():
        return "not used (CPU is not MindSpore's only device, or no C++ compiler): MindSpore's own operators"
    conv = "oneDNN convolutions" if onednn_conv.library() is not None else "MindSpore's convolutions"
    return f"compiled (GroupNorm, weight standardisation, max-pool, finite check) with {conv}"


def smoke(model_name: str, precision: str, *, steps: int, size: int, batch: int, seconds: float) -> tuple[float, int]:
    """Train `steps` steps of the model (random weights, random images) in `precision`, or fewer when
    they take over `seconds` (fp16 on CPU runs MindSpore's slow half-precision kernels); (images/s of
    the steps after the first, which compiles; steps run)."""
    from bit_transfer import models
    from bit_transfer.engine.step import TrainStep, cast_model

    tiny = model_name == "tiny"
    net = models.create_model("custom" if tiny else model_name, 10, **(TINY if tiny else {}))
    model = cast_model(net, precision)
    step = TrainStep(model, momentum=0.9, weight_decay=0.0, batch_split=1, precision=precision)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)  # pixels, as fit's pipeline gives them
    y = rng.integers(0, 10, batch).astype(np.int32)
    model.set_train(True)
    step([(x, y, None)], 0.001, 1.0).read()  # compiles
    t, done = time.perf_counter(), 1
    while done < steps and (done < 3 or time.perf_counter() - t < seconds):
        step([(x, y, None)], 0.001, 1.0).read()
        done += 1
    return (done - 1) * batch / max(time.perf_counter() - t, 1e-9), done


def input_pipeline(recipe, seconds: float = 5.0) -> tuple[float, int, int]:
    """(images/s, crop, workers) of the recipe's training stream on its own data, for about `seconds`."""
    from bit_transfer import data
    from bit_transfer.hyperrule import planning
    from bit_transfer.data import pipeline

    dataset = data.load(recipe.data)
    plan = planning.make_plan(recipe, planning.task_info(recipe))
    d = recipe.data
    micro = min(32, len(dataset.train))
    stream = pipeline.train_batches(dataset.train, precrop=plan.precrop, crop=plan.crop, micro_batch=micro,
                                    seed=recipe.train.seed, random_crop=d.random_crop, random_flip=d.random_flip,
                                    workers=d.workers)
    next(stream)  # workers start
    n, t = 0, time.perf_counter()
    while n < 4 or (time.perf_counter() - t < seconds and n < 64):
        next(stream)
        n += 1
    return n * micro / (time.perf_counter() - t), plan.crop, pipeline.num_workers(d.workers)


def run(args) -> int:
    """The report, printed line by line as it is found (a slow smoke run shows what came before)."""
    from bit_transfer.config import recipe as recipes

    r = recipes.load(args.recipe, args.sets) if args.recipe else None
    requested = args.device or (r.train.device if r else "auto")
    say(mindspore_build())
    for line in devices_seen():
        say(line)
    say(f"CUDA: {cuda_version()}")
    say(f"CANN: {cann_version()}")
    device = runtime.setup(requested, option="--device" if args.device else "train.device")
    say(f"CPU kernels: {cpu_kernels_status()}")
    model = "tiny" if args.model == "tiny" else args.model
    say(f"smoke run on {device}: {model}, random weights, {args.image_size} px, micro-batch {args.batch}, "
        f"{args.steps} steps or {args.seconds:g} s each")
    failed, best = False, None
    for precision in runtime.PRECISIONS_BY_DEVICE[device]:
        try:
            ips, done = smoke(model, precision, steps=args.steps, size=args.image_size, batch=args.batch,
                              seconds=args.seconds)
        except Exception as e:  # a diagnosis: say what failed and go on
            failed = True
            say(f"  {precision}: FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}")
            continue
        best = best if best and best[1] >= ips else (precision, ips)
        say(f"  {precision}: {ips:.1f} images/s (training step; {done} steps)")
    if r is not None and best is not None:
        ips, crop, workers = input_pipeline(r)
        step_at_crop = best[1] * (args.image_size / crop) ** 2  # a step's work grows with the pixels
        bound = "yes: the device would wait for data" if ips < step_at_crop else "no"
        say(f"input pipeline ({args.recipe}): {ips:.1f} images/s at {crop} px with {workers} workers; "
            f"the {best[0]} step at {crop} px ~{step_at_crop:.1f} images/s (scaled from {args.image_size} px); "
            f"input-bound: {bound}")
    return 1 if failed else 0


def say(line: str) -> None:
    print(line, flush=True)
