"""Training and eval speed of bit-transfer's real step, side by side with the same model in PyTorch.

    .venv/bin/python benchmarks/train_step.py                         # R50x1, micro-batch 8 and 32, 128 px, fp32
    .venv/bin/python benchmarks/train_step.py --batch 8 --precision fp32 bf16
    .venv/bin/python benchmarks/train_step.py --no-torch --steps 5
    .venv/bin/python benchmarks/train_step.py --batch 8 --split 4         # micro-batching: 4 x 8 per step
    .venv/bin/python benchmarks/train_step.py --torch-compile             # also PyTorch torch.compile (inductor)
    .venv/bin/python benchmarks/train_step.py --torch-compile --isa avx2  # both sides capped at AVX2

Each configuration runs in a fresh child process, so its peak RSS (ru_maxrss) is its own and a
compiled graph of one run cannot help or hurt the next. bit-transfer runs `step.TrainStep` and
`step.EvalStep` (the code path of `fit`: jitted value_and_grad of the MixUp loss, fused
ApplyMomentum); its eval column (fp32) is the folded model (models/inference.py) that `eval`,
`predict` and feature extraction run, and a second line gives `fit`'s periodic evaluation (the
training graph). Its peak RSS is taken before the folded copy exists (training's). PyTorch, when installed, runs the same architecture built from our own definition
(`channels_for`, `gn_groups`, the eps constants) with our initial weights copied in, checked to give
the same logits before timing. The PyTorch child never imports MindSpore (the parent passes the
architecture as data), so its peak RSS is PyTorch's alone. Throughput is the median over `--steps` timed steps after
`--warmup` steps; "compile" is the wall time of the first call (graph build + first run). With
`--split N` an optimizer step is N micro-batches (bit-transfer's `train.batch_split`; in PyTorch N
backward passes of loss/N, then one optimizer step) and images/s counts all N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

# The environment before anything imports bit-transfer and MindSpore (arch_spec does, here): their
# imports set GLOG_v, LD_LIBRARY_PATH, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION and HCCL_CONNECT_TIMEOUT
# in os.environ. Once (an intermediate version of the oneDNN kernels) a child started with those
# trained R50x1 at 12.0 img/s against 16.9 with this snapshot; every child gets the snapshot.
CLEAN_ENV = dict(os.environ)

# --isa avx2: an AVX-512 machine standing in for an AVX2 one, every library of both sides capped at
# AVX2 (each by its own documented switch): oneDNN 3 (ours and PyTorch's) and MindSpore's oneDNN 2,
# our compiled kernels (cpu_kernels.target_flags follows oneDNN's cap), PyTorch's ATen kernels and
# inductor's vector ISA, inductor's -march, PyTorch's MKL and NumPy's OpenBLAS (the sgemm reference).
# MindSpore's own CPU kernels (the head, transposes, elementwise ops) still choose at run time.
ISA_ENV = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                    "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                    "OPENBLAS_CORETYPE": "Haswell"}}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def median_rate(fn, batch: int, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def first_call(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_data(args, batch: int):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, 3, args.size, args.size)).astype(np.float32)
    y = rng.integers(0, args.classes, batch).astype(np.int32)
    return x, y


def build_ours(args):
    from bit_transfer.system import device
    from bit_transfer.models import create_model

    device.setup("CPU")
    device.seed_everything(0)
    model = create_model(args.model, args.classes)
    rng = np.random.default_rng(1)
    for p in model.head.get_parameters():  # non-zero head so the logits say something
        device.assign(p, rng.standard_normal(p.shape).astype(np.float32) * 0.01)
    return model


def run_ours(args, batch: int, precision: str) -> dict:
    import mindspore as ms

    from bit_transfer.engine import step

    model = build_ours(args)
    x, y = make_data(args, batch)
    # As in fit: cast, build the train step, then the eval step; evaluation runs the training model.
    model = step.cast_model(model, precision)
    train = step.TrainStep(model, momentum=0.9, weight_decay=0.0, batch_split=args.split, precision=precision)
    ev = step.EvalStep(model, batch)
    layout = getattr(model, "layout", "nchw")  # nhwc / nchw8c on oneDNN (nchw8c on AVX2), nchw on MindSpore's ops
    out = {"framework": f"bit-transfer (mindspore {ms.__version__}, {layout})", "batch": batch, "precision": precision}
    model.set_train(True)
    x = np.round((x + 1) * 127.5).astype(np.uint8)  # what fit's pipeline hands the step (scaled on the device)
    call = lambda: train([(x, y, None)] * args.split, 0.003, 1.0).read()  # noqa: E731 (read: wait for the step)
    out["train_compile_s"] = first_call(call)
    out["train_img_s"] = median_rate(call, batch * args.split, args.steps, args.warmup)
    out["eval_compile_s"] = first_call(lambda: ev(x))
    out["eval_img_s"] = out["fit_eval_img_s"] = median_rate(lambda: ev(x), batch, args.steps, args.warmup)
    out["peak_rss_gb"] = peak_rss_gb()  # training's (as PyTorch's), before a folded copy of the weights exists
    if precision == "fp32":  # `eval`, `predict` and feature extraction run the folded model
        from bit_transfer.models.inference import fold

        folded = step.EvalStep(fold(model), batch)
        out["eval_compile_s"] = first_call(lambda: folded(x))
        out["eval_img_s"] = median_rate(lambda: folded(x), batch, args.steps, args.warmup)
    return out


def arch_spec(model_name: str) -> dict:
    """Our definition of the architecture as plain data, so the PyTorch child need not import
    MindSpore (its import alone adds ~0.33 GB to a process's peak RSS, measured)."""
    from bit_transfer.models import resnetv2 as r

    depths, width = r.MODELS[r.canonical_name(model_name)]
    root, mids = r.channels_for(width)
    return {"depths": list(depths), "root": root, "mids": mids, "strides": list(r.STAGE_STRIDES),
            "max_groups": r.MAX_GROUPS, "gn_eps": r.GN_EPS, "ws_eps": r.WS_EPS}


def train_gflop_per_image(spec: dict, size: int, classes: int) -> float:
    """Convolution and head FLOPs (2 per multiply-add) of one training image: forward, backward-data
    and backward-weights of every conv (the stem has no backward-data: its input needs no gradient),
    as PyTorch's FlopCounter counts them (7.93 GFLOP for R50x1 at 128 px, the issue's figure)."""
    def conv(cin, cout, k, stride, h):
        out = -(-h // stride)
        return 2.0 * cin * cout * k * k * out * out, out

    stem, h = conv(3, spec["root"], 7, 2, size)
    h = -(-h // 2)  # the max-pool
    total, cin = 2 * stem, spec["root"]
    for depth, mid, stride in zip(spec["depths"], spec["mids"], spec["strides"]):
        for u in range(depth):
            s = stride if u == 0 else 1
            f1, _ = conv(cin, mid, 1, 1, h)
            f2, h2 = conv(mid, mid, 3, s, h)
            f3, _ = conv(mid, 4 * mid, 1, 1, h2)
            proj = conv(cin, 4 * mid, 1, s, h)[0] if u == 0 else 0.0
            total += 3 * (f1 + f2 + f3 + proj)
            cin, h = 4 * mid, h2
    return (total + 3 * 2.0 * cin * classes) / 1e9


def sgemm_gflops(threads: int) -> float:
    """This machine's float32 GEMM rate through NumPy's BLAS (2048^3, best of 5): the ceiling the
    training step's GFLOP/s is set against (convolutions are GEMM-shaped work)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def torch_model(args, ours=None):
    """The official bit_pytorch architecture, sized from our definition (`args.arch`, see
    arch_spec); weights copied from `ours`."""
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    spec = json.loads(args.arch) if getattr(args, "arch", None) else arch_spec(args.model)

    class StdConv(nn.Conv2d):
        def forward(self, x):
            v, m = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
            w = (self.weight - m) / torch.sqrt(v + spec["ws_eps"])
            return F.conv2d(x, w, None, self.stride, self.padding)

    def gn(c):  # resnetv2.gn_groups: gcd(32, channels)
        return nn.GroupNorm(math.gcd(spec["max_groups"], c), c, eps=spec["gn_eps"])

    class Unit(nn.Module):
        def __init__(self, cin, cout, cmid, stride):
            super().__init__()
            self.norm1, self.norm2, self.norm3 = gn(cin), gn(cmid), gn(cmid)
            self.conv1 = StdConv(cin, cmid, 1, bias=False)
            self.conv2 = StdConv(cmid, cmid, 3, stride, 1, bias=False)
            self.conv3 = StdConv(cmid, cout, 1, bias=False)
            self.proj = StdConv(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

        def forward(self, x):
            out = F.relu(self.norm1(x))
            shortcut = self.proj(out) if self.proj is not None else x
            out = self.conv2(F.relu(self.norm2(self.conv1(out))))
            return self.conv3(F.relu(self.norm3(out))) + shortcut

    depths, root, mids = spec["depths"], spec["root"], spec["mids"]
    layers = {"root.conv": StdConv(3, root, 7, 2, 3, bias=False)}
    body, cin = [], root
    for s, (depth, cmid, stride) in enumerate(zip(depths, mids, spec["strides"])):
        for u in range(depth):
            body.append((f"stages.{s}.units.{u}", Unit(cin, 4 * cmid, cmid, stride if u == 0 else 1)))
            cin = 4 * cmid

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.root = nn.ModuleDict({"conv": layers["root.conv"]})
            self.units = nn.ModuleList([m for _, m in body])
            self.names = [n for n, _ in body]
            self.norm = gn(cin)
            self.head = nn.Linear(cin, args.classes)

        def forward(self, x):
            x = F.max_pool2d(F.pad(self.root["conv"](x), (1, 1, 1, 1)), 3, 2)
            for unit in self.units:
                x = unit(x)
            return self.head(F.relu(self.norm(x)).mean(dim=(2, 3)))

    net = Net()
    if ours is not None:
        mapping = {"root.conv.weight": net.root["conv"].weight, "norm.weight": net.norm.weight,
                   "norm.bias": net.norm.bias, "head.weight": net.head.weight, "head.bias": net.head.bias}
        for name, unit in zip(net.names, net.units):
            for k, v in unit.named_parameters():
                mapping[f"{name}.{k}"] = v
        with torch.no_grad():
            for p in ours.get_parameters():
                mapping.pop(p.name).copy_(torch.from_numpy(p.asnumpy()))
        assert not mapping, f"unmatched torch parameters: {sorted(mapping)}"
    return net


def run_torch(args, batch: int, precision: str, compiled: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    # Every CPU, as MindSpore uses: PyTorch's default is the physical cores (1 on this 2-vCPU VM;
    # importing MindSpore first had silently raised it to 2).
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = torch_model(args)
    if compiled:  # what timm's --torchcompile does: inductor, default mode
        model = torch.compile(model)
    x, y = make_data(args, batch)
    how = "torch.compile, " if compiled else ""
    out = {"framework": f"pytorch {torch.__version__} ({how}{torch.get_num_threads()} threads, "
                        f"{torch.backends.cpu.get_cpu_capability()})",
           "batch": batch, "precision": precision}
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    dtype = torch.bfloat16 if precision == "bf16" else None
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)

    def evaluate():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            model(xt).float()

    def train():
        opt.zero_grad(set_to_none=True)
        for _ in range(args.split):  # official bit_pytorch: (loss / batch_split).backward() per micro-batch
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits = model(xt).float()
            ((1.0 * F.cross_entropy(logits, yt) + 0.0 * F.cross_entropy(logits, yt)) / args.split).backward()
        opt.step()

    model.eval()
    out["eval_compile_s"] = first_call(evaluate)
    out["eval_img_s"] = median_rate(evaluate, batch, args.steps, args.warmup)
    model.train()
    out["train_compile_s"] = first_call(train)
    out["train_img_s"] = median_rate(train, batch * args.split, args.steps, args.warmup)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def run_check(args, batch: int, precision: str) -> dict:
    """Same logits from both builds (own process: keeps MindSpore out of torch's peak RSS)."""
    import mindspore as ms
    import torch

    ours = build_ours(args)
    model = torch_model(args, ours).eval()
    x, _ = make_data(args, batch)
    ours.set_train(False)
    want = ours(ms.Tensor(x)).asnumpy()
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    return {"max_logit_diff": float(np.abs(got - want).max()), "max_logit": float(np.abs(want).max())}


def child(args) -> None:
    if args.child in ("ours", "check"):  # first, as the CLI: it sets libgomp's spin count before MindSpore loads it
        import bit_transfer  # noqa: F401
    fn = {"torch": run_torch, "torchc": lambda *a: run_torch(*a, compiled=True), "ours": run_ours,
          "check": run_check, "sgemm": lambda *a: {"gflops": sgemm_gflops(os.cpu_count())}}[args.child]
    print("RESULT " + json.dumps(fn(args, args.batch[0], args.precision[0])), flush=True)


def spawn(args, which: str, batch: int, precision: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", which, "--batch", str(batch), "--precision", precision,
           "--model", args.model, "--size", str(args.size), "--classes", str(args.classes),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--split", str(args.split),
           "--arch", json.dumps(arch_spec(args.model))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**CLEAN_ENV, **ISA_ENV.get(args.isa, {})})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    usage = [ln for ln in proc.stderr.splitlines() if "UsageError:" in ln]  # e.g. bf16 on CPU: one line
    print(f"{which} batch {batch} {precision} failed: " + (usage[-1] if usage else "\n" + proc.stderr[-2000:]), file=sys.stderr)
    return None


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="BiT-M-R50x1")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="micro-batch sizes")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--split", type=int, default=1, help="micro-batches per optimizer step (train.batch_split)")
    ap.add_argument("--steps", type=int, default=7, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the torch logits cross-check")
    ap.add_argument("--torch-compile", action="store_true", help="also PyTorch with torch.compile (inductor; minutes)")
    ap.add_argument("--isa", choices=["native", *ISA_ENV], default="native",
                    help="avx2: cap every library of both sides at AVX2 (an AVX-512 machine standing in for an AVX2 one)")
    ap.add_argument("--child", choices=["ours", "torch", "torchc", "check", "sgemm"], help=argparse.SUPPRESS)
    ap.add_argument("--arch", help=argparse.SUPPRESS)  # arch_spec as JSON, for the children
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.machine()} {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.2f}, python {platform.python_version()}, instruction sets: {args.isa}"
          + "".join(f" {k}={v}" for k, v in ISA_ENV.get(args.isa, {}).items()))
    use_torch = not args.no_torch and have_torch()
    if use_torch and args.check:
        c = spawn(args, "check", 2, "fp32")
        if c is not None:
            print(f"# same model: max |logits ours - torch| = {c['max_logit_diff']:.1e} (max |logit| {c['max_logit']:.2f})")
    gemm = spawn(args, "sgemm", 1, "fp32")
    flop = train_gflop_per_image(arch_spec(args.model), args.size, args.classes)
    print(f"# one training image: {flop:.2f} GFLOP (convolutions and head, forward + backward); "
          f"this machine's sgemm (NumPy, 2048^3, {os.cpu_count()} threads): {gemm['gflops']:.0f} GFLOP/s")
    print("| framework | precision | micro-batch x split | train img/s | train GFLOP/s (of sgemm) | eval img/s | "
          "train compile s | peak RSS GB | ours / this (train / eval / RSS) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for precision in args.precision:
        for batch in args.batch:
            ref = spawn(args, "torch", batch, precision) if use_torch else None
            comp = spawn(args, "torchc", batch, precision) if use_torch and args.torch_compile else None
            ours = spawn(args, "ours", batch, precision)
            for r in (ours, ref, comp):
                if r is None:
                    continue
                ratio = ""
                if r is not ours and ours is not None:  # ours / this row
                    ratio = (f"{ours['train_img_s'] / r['train_img_s']:.2f}x / {ours['eval_img_s'] / r['eval_img_s']:.2f}x"
                             f" / {ours['peak_rss_gb'] / r['peak_rss_gb']:.2f}x")
                rate = r["train_img_s"] * flop
                print(f"| {r['framework']} | {precision} | {batch} x {args.split} | {r['train_img_s']:.1f} | "
                      f"{rate:.0f} ({rate / gemm['gflops']:.0%}) | {r['eval_img_s']:.1f} | "
                      f"{r['train_compile_s']:.1f} | {r['peak_rss_gb']:.2f} | {ratio} |", flush=True)
            if ours is not None and ours["eval_img_s"] != ours["fit_eval_img_s"]:
                print(f"|  | (bit-transfer eval above: the folded model of `eval`, `predict`, features; "
                      f"`fit`'s periodic evaluation runs the training graph: {ours['fit_eval_img_s']:.1f} img/s) |", flush=True)


if __name__ == "__main__":
    main()
