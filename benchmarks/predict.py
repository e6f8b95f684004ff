"""Inference speed of bit-transfer's predict path (folded WS) beside ONNX Runtime on its export and PyTorch eager.

    .venv/bin/python benchmarks/predict.py                              # R50x1, batch 8, 128 and 480 px
    .venv/bin/python benchmarks/predict.py --sizes 128 --steps 20
    .venv/bin/python benchmarks/predict.py --no-torch --sizes 64 --steps 2    # a quick check that it runs
    .venv/bin/python benchmarks/predict.py --e2e DIR                    # also `bit-transfer predict` on DIR's images

One model (`--model`, random weights, seeded: `train_step.build_ours`), one set of weights, four ways
to get its logits, each configuration in a fresh child process (its own peak RSS, ru_maxrss):

1. bit-transfer, training graph: `step.EvalStep(model)`, weight standardisation inside the graph
   (what evaluation ran before folding);
2. bit-transfer, folded: `models.inference.fold(model)` + `EvalStep`, what `predict` and `eval` run;
3. ONNX Runtime (CPU provider, intra-op threads = every CPU) on the file `export_onnx` writes from the
   same weights; the child opens it with onnxruntime alone (`load_onnx` would import MindSpore, ~0.33 GB
   of someone else's peak RSS);
4. PyTorch eager under `torch.no_grad()` (threads = every CPU): `train_step.torch_model`, the weights
   passed as a .npz, so the torch child never imports MindSpore.

A first child builds the model and writes the .npz and the .onnx (and, with --e2e, a .ckpt) to a temporary
directory. Every child first computes the logits of the timed batch and checks them against the
training graph's (child 1); more than 1e-3 relative (to the largest |logit|) stops the run before
timing. Throughput is the median over `--steps` timed batches after `--warmup` batches; "to first
logits" is the child's wall time from start to the first batch's logits (imports, weights, compile;
for ONNX Runtime the session on the ready file: the export is the first child's work).
With `--e2e DIR` the real command, `python -m bit_transfer predict MODEL DIR --quiet`, also runs on
the .ckpt and on the .onnx at each size: its own images/s (decode + forward, first batch's compile
included), wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_step import CLEAN_ENV, build_ours, make_data, median_rate, peak_rss_gb, torch_model  # noqa: E402

CONFIGS = ("unfolded", "folded", "onnxruntime", "torch")
LABELS = {
    "unfolded": "bit-transfer, training graph (WS in graph)",
    "folded": "bit-transfer, folded (`predict`)",
    "onnxruntime": "ONNX Runtime on the export",
    "torch": "PyTorch eager, no_grad",
}
RTOL = 1e-3  # max |logits - reference| / max |reference logit|
CPUS = len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- children
def prepare(args) -> dict:
    """The seeded model's weights as .npz (torch), its ONNX export, with --e2e a .ckpt; the arch as data."""
    from bit_transfer.models.weights import ckpt as checkpoint
    from bit_transfer.models import model_config
    from bit_transfer.commands.export import export_onnx

    from train_step import arch_spec

    model = build_ours(args)
    tmp = Path(args.tmp)
    np.savez(tmp / "weights.npz", **{p.name: p.asnumpy() for p in model.get_parameters()})
    if have("onnx"):
        export_onnx(model, tmp / "onnx", image_size=args.size)
    if args.e2e:
        checkpoint.save_checkpoint(tmp / "model.ckpt", {p.name: p for p in model.get_parameters()},
                                   {"model": model_config(model)})
    return {"arch": arch_spec(args.model)}


def load_ours(args):
    """The model of `prepare`, its weights read back from the .npz."""
    from bit_transfer.system import device as runtime
    from bit_transfer.models import create_model

    runtime.setup("CPU")
    model = create_model(args.model, args.classes)
    arrays = np.load(Path(args.tmp) / "weights.npz")
    for p in model.get_parameters():
        runtime.assign(p, arrays[p.name])
    return model


def forward_unfolded(args):
    import mindspore as ms

    from bit_transfer.engine import step

    return step.EvalStep(load_ours(args), args.batch), f"mindspore {ms.__version__}"


def forward_folded(args):
    import mindspore as ms

    from bit_transfer.engine import step
    from bit_transfer.models.inference import fold

    net = fold(load_ours(args))  # as predict: the training model is dropped once folded
    return step.EvalStep(net, args.batch), f"mindspore {ms.__version__}"


def forward_onnxruntime(args):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = CPUS
    session = ort.InferenceSession(str(Path(args.tmp) / "onnx" / "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    return (lambda x: session.run(["logits"], {"images": x})[0]), f"onnxruntime {ort.__version__}, {CPUS} threads"


def forward_torch(args):
    import torch

    torch.set_num_threads(CPUS)  # its default is the physical cores (1 on a 2-vCPU VM)
    arrays = np.load(Path(args.tmp) / "weights.npz")
    # torch_model copies from anything with get_parameters() -> objects with .name and .asnumpy()
    weights = SimpleNamespace(get_parameters=lambda: [SimpleNamespace(name=k, asnumpy=lambda k=k: arrays[k])
                                                      for k in arrays.files])
    model = torch_model(args, weights).eval()

    def forward(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return forward, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def check_logits(args, logits: np.ndarray) -> dict:
    """Compare with the training graph's logits (the first config writes them); exit before timing if off."""
    ref_path = Path(args.tmp) / f"reference_{args.size}.npy"
    if args.child == "unfolded":
        np.save(ref_path, logits)
    ref = np.load(ref_path)
    diff, scale = float(np.abs(logits - ref).max()), float(np.abs(ref).max())
    if not diff <= RTOL * scale:
        sys.exit(f"LOGITS DIFFER: {args.child} at {args.size} px: max |logits - training graph's| = {diff:.3g} "
                 f"> {RTOL:g} x max |logit| {scale:.3g}; not timing a different model")
    return {"max_diff": diff, "max_logit": scale}


def measure(args, start: float) -> dict:
    fn, version = globals()[f"forward_{args.child}"](args)
    x = make_data(args, args.batch)[0]
    out = {"version": version, **check_logits(args, np.asarray(fn(x), np.float32))}
    out["first_s"] = time.perf_counter() - start
    out["img_s"] = median_rate(lambda: fn(x), args.batch, args.steps, args.warmup)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def predict_cli(args) -> dict:
    """`bit-transfer predict` end to end on the --e2e folder; this child's only child is that command."""
    cmd = [sys.executable, "-m", "bit_transfer", "predict", args.model_file, args.e2e, "--quiet",
           "--image-size", str(args.size), "--batch-size", str(args.batch), "--device", "CPU"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=CLEAN_ENV)  # see train_step.CLEAN_ENV
    wall = time.perf_counter() - t
    m = re.search(r"predicted (\d+) images? in [\d.]+ s \(([\d.]+) images/s\)", proc.stdout)
    if proc.returncode or not m:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-1000:]}{proc.stderr[-2000:]}")
    return {"images": int(m.group(1)), "img_s": float(m.group(2)), "wall_s": wall,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}


def child(args) -> None:
    start = time.perf_counter()
    if args.child in ("prepare", "unfolded", "folded"):  # first, as the CLI: libgomp's spin count (bit_transfer/__init__.py)
        import bit_transfer  # noqa: F401
    if args.child == "prepare":
        result = prepare(args)
    elif args.child == "e2e":
        result = predict_cli(args)
    else:
        result = measure(args, start)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent
def spawn(args, which: str, size: int, *extra: str) -> dict:
    """Run one child; its RESULT, or stop the whole run with its error (a logits mismatch included)."""
    what = f"predict {Path(extra[-1]).name}" if which == "e2e" else which
    print(f"# {what} at {size} px ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, __file__, "--child", which, "--tmp", args.tmp, "--size", str(size), "--model", args.model,
           "--classes", str(args.classes), "--batch", str(args.batch), "--steps", str(steps_for(args, size)),
           "--warmup", str(args.warmup), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=CLEAN_ENV)  # see train_step.CLEAN_ENV
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    sys.exit(f"{which} at {size} px failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def steps_for(args, size: int) -> int:
    return args.steps or (10 if size <= 224 else 4)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def read(path: str) -> str:
    return Path(path).read_text() if Path(path).is_file() else ""


def machine_info() -> list[str]:
    cpuinfo, meminfo = read("/proc/cpuinfo"), read("/proc/meminfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    mem = re.search(r"MemTotal:\s*(\d+)", meminfo)
    ram = f", {int(mem.group(1)) / 2**20:.0f} GB RAM" if mem else ""
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512f", "avx512_bf16", "avx2"))
    versions = ", ".join(f"{d} {version(d)}" for d in ("mindspore", "onnxruntime", "onnx", "torch", "numpy"))
    return [f"# {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f} (compare only runs made back to back)",
            f"# CPU: {model.group(1) if model else platform.processor()}, {CPUS} CPUs usable{ram}; {isa}",
            f"# python {platform.python_version()}, {versions}"]


def configs(args) -> list[str]:
    chosen = ["unfolded", "folded"]
    if have("onnx") and have("onnxruntime"):
        chosen.append("onnxruntime")
    else:
        print("# ONNX Runtime or onnx not installed: no ONNX row (pip install 'bit-transfer[deploy]')")
    if args.no_torch:
        print("# --no-torch: no PyTorch row")
    elif have("torch"):
        chosen.append("torch")
    else:
        print("# PyTorch not installed: no PyTorch row (.venv/bin/pip install torch==2.13.0, or pass --no-torch)")
    return chosen


def ratio(folded: dict, r: dict) -> str:
    if r is folded:
        return "–"
    return f"{folded['img_s'] / r['img_s']:.2f}x, {folded['peak_rss_gb'] / r['peak_rss_gb']:.2f}x"


def print_table(size: int, rows: dict, args) -> None:
    folded = rows["folded"]
    diffs = ", ".join(f"{k} {r['max_diff']:.1e}" for k, r in rows.items() if k in CONFIGS and k != "unfolded")
    print(f"\n## {size} px, batch {args.batch}: median of {steps_for(args, size)} timed batches "
          f"after {args.warmup} warm-up")
    print(f"# same logits: max |logits - training graph's| {diffs} (max |logit| {rows['unfolded']['max_logit']:.2f})")
    print("| framework | img/s | to first logits s | peak RSS GB | ours folded / this (img/s, RSS) |")
    print("|---|---:|---:|---:|---|")
    for key, r in rows.items():
        if key in CONFIGS:
            print(f"| {LABELS[key]} ({r['version']}) | {r['img_s']:.1f} | {r['first_s']:.1f} | "
                  f"{r['peak_rss_gb']:.2f} | {ratio(folded, r)} |")
        else:
            print(f"| `bit-transfer predict {key} DIR --quiet` ({r['images']} images, wall {r['wall_s']:.1f} s) | "
                  f"{r['img_s']:.1f} | – | {r['peak_rss_gb']:.2f} | (decode + first-batch compile included) |")
    sys.stdout.flush()


def run_size(args, size: int, chosen: list[str], arch: str) -> dict:
    rows = {which: spawn(args, which, size, "--arch", arch) for which in chosen}
    if args.e2e:
        models = [Path(args.tmp) / "model.ckpt"] + ([Path(args.tmp) / "onnx" / "model.onnx"]
                                                    if "onnxruntime" in chosen else [])
        for path in models:
            rows[f"model{path.suffix}"] = spawn(args, "e2e", size, "--e2e", args.e2e, "--model-file", str(path))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="BiT-M-R50x1")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 480], help="square input sizes, px")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, help="timed batches (median); default 10 up to 224 px, else 4")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches after the first (checked) one")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch row")
    ap.add_argument("--e2e", metavar="DIR", help="also time `bit-transfer predict` on the images in DIR")
    ap.add_argument("--child", choices=("prepare", "e2e") + CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--arch", help=argparse.SUPPRESS)  # train_step.arch_spec as JSON, for the torch child
    ap.add_argument("--model-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.e2e and not Path(args.e2e).is_dir():
        ap.error(f"--e2e {args.e2e}: not a directory of images")
    print("\n".join(machine_info()))
    print(f"# {args.model}, {args.classes} classes, random weights (seed 0), fp32, batch {args.batch}")
    chosen = configs(args)
    with tempfile.TemporaryDirectory(prefix="bit-predict-bench-") as tmp:
        args.tmp = tmp
        extra = ["--e2e", args.e2e] if args.e2e else []
        arch = json.dumps(spawn(args, "prepare", max(args.sizes), *extra)["arch"])
        for size in args.sizes:
            print_table(size, run_size(args, size, chosen, arch), args)
    print(f"# load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
