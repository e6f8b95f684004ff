"""Micro-benchmark of the BiT model alone: forward and forward+backward images/s, peak RSS.

    .venv/bin/python benchmarks/model_speed.py                      # R50x1, batch 8, 128 px, graph mode
    .venv/bin/python benchmarks/model_speed.py --gn composite       # GroupNorm as reshape/mean/var
    .venv/bin/python benchmarks/model_speed.py --ws composite       # weight standardisation as mean/var/rsqrt
    .venv/bin/python benchmarks/model_speed.py --torch              # official-style PyTorch, same shapes

"fwd+bwd" is a jitted value_and_grad of the cross-entropy over all parameters (no optimiser);
"train" adds a Momentum(0.9) update, i.e. one BiT-HyperRule SGD step. Peak RSS is the process
maximum so far (ru_maxrss), reported after each phase.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from train_step import peak_rss_gb  # benchmarks/ is on sys.path when run as a script


def timed(fn, iters: int, warmup: int, batch: int) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return batch * iters / (time.perf_counter() - start)


def composite_group_norm():
    """Swap in a reshape/mean/var GroupNorm, to compare with the fused ops.group_norm."""
    from mindspore import ops

    from bit_transfer.models import resnetv2

    def construct(self, x):
        n, c, h, w = x.shape
        g = x.reshape(n, self.groups, -1)
        mean = g.mean(axis=2, keep_dims=True)
        d = g - mean
        var = (d * d).mean(axis=2, keep_dims=True)
        y = (d * ops.rsqrt(var + resnetv2.GN_EPS)).reshape(n, c, h, w)
        y = y * self.weight.reshape(1, c, 1, 1) + self.bias.reshape(1, c, 1, 1)
        return ops.relu(y) if self.act else y

    resnetv2.GroupNormAct.construct = construct


def composite_weight_standardisation():
    """Swap in WS as explicit mean/var/rsqrt over axes (1, 2, 3), to compare with the GroupNorm form."""
    from mindspore import ops

    from bit_transfer.models import resnetv2

    def construct(self, x):
        w = self.weight
        w = w - w.mean(axis=(1, 2, 3), keep_dims=True)
        w = w * ops.rsqrt((w * w).mean(axis=(1, 2, 3), keep_dims=True) + resnetv2.WS_EPS)
        return ops.conv2d(x, w, None, self.stride, "pad", self.pad)

    resnetv2.StdConv2d.construct = construct


def bench_mindspore(args) -> None:
    import bit_transfer  # noqa: F401  (first, as the CLI: libgomp's spin count, bit_transfer/__init__.py)
    import mindspore as ms
    from mindspore import nn, ops

    from bit_transfer.models import create_model

    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    if args.gn == "composite":
        composite_group_norm()
    if args.ws == "composite":
        composite_weight_standardisation()
    model = create_model(args.model, args.classes)
    rng = np.random.default_rng(0)
    for p in model.head.get_parameters():  # non-zero head so gradients reach the backbone
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.01))
    x = ms.Tensor(rng.uniform(-1, 1, (args.batch, 3, args.size, args.size)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, args.classes, args.batch).astype(np.int32))
    params = model.trainable_params()
    opt = nn.Momentum(params, learning_rate=0.003, momentum=0.9)

    def loss_fn(inp, labels):
        return ops.cross_entropy(model(inp), labels)

    grad_fn = ms.value_and_grad(loss_fn, None, params)

    def forward(inp):
        return model(inp)

    def train_step(inp, labels):
        loss, grads = grad_fn(inp, labels)
        opt(grads)
        return loss

    jit = ms.jit if args.mode == "graph" else (lambda f: f)
    forward, grad_fn_j, train_step = jit(forward), jit(grad_fn), jit(train_step)

    model.set_train(False)
    t = time.perf_counter()
    forward(x).asnumpy()
    compile_fwd = time.perf_counter() - t
    fwd = timed(lambda: forward(x).asnumpy(), args.iters, args.warmup, args.batch)
    rss_fwd = peak_rss_gb()
    model.set_train(True)
    bwd = timed(lambda: grad_fn_j(x, y)[0].asnumpy(), args.iters, args.warmup, args.batch)
    rss_bwd = peak_rss_gb()
    train = timed(lambda: train_step(x, y).asnumpy(), args.iters, args.warmup, args.batch)
    print(f"mindspore {ms.__version__} {args.mode} {args.model} batch {args.batch} {args.size}px "
          f"gn={args.gn} ws={args.ws}: "
          f"forward {fwd:.1f} img/s (first call {compile_fwd:.1f} s), fwd+bwd {bwd:.1f} img/s, "
          f"train step {train:.1f} img/s; peak RSS {rss_fwd:.2f} GB after forward, {rss_bwd:.2f} GB after fwd+bwd, "
          f"{peak_rss_gb():.2f} GB after train")


def bench_torch(args) -> None:
    """The authors' bit_pytorch model (train_step.torch_model: the one definition), same shapes."""
    import torch
    import torch.nn.functional as F

    from train_step import torch_model

    model = torch_model(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    y = torch.randint(0, args.classes, (args.batch,))

    def forward():
        with torch.no_grad():
            model(x)

    def fwd_bwd():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def train():
        fwd_bwd()
        opt.step()

    model.eval()
    fwd = timed(forward, args.iters, args.warmup, args.batch)
    rss_fwd = peak_rss_gb()
    model.train()
    bwd = timed(fwd_bwd, args.iters, args.warmup, args.batch)
    tr = timed(train, args.iters, args.warmup, args.batch)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads) {args.model} batch {args.batch} {args.size}px: "
          f"forward {fwd:.1f} img/s, fwd+bwd {bwd:.1f} img/s, train step {tr:.1f} img/s; "
          f"peak RSS {rss_fwd:.2f} GB after forward, {peak_rss_gb():.2f} GB after train")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="BiT-M-R50x1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    ap.add_argument("--gn", choices=["fused", "composite"], default="fused")
    ap.add_argument("--ws", choices=["fused", "composite"], default="fused")
    ap.add_argument("--torch", action="store_true", help="time the official-style PyTorch model instead")
    args = ap.parse_args()
    bench_torch(args) if args.torch else bench_mindspore(args)


if __name__ == "__main__":
    main()
