"""The compiled training and evaluation steps: SGD with momentum, micro-batching, MixUp, all-reduce.

One optimizer step is one compiled graph that scales its uint8 micro-batch to [-1, 1], applies MixUp,
runs forward and backward, all-reduces the gradients over the ranks in a few buckets and applies the
momentum update with this step's lr. With `batch_split` > 1 the graph runs per micro-batch (loss
scaled by 1/batch_split) and adds the gradients into buffers; then the update reduces and applies
them. The maths is that of the full logical batch, as in the official PyTorch code
(bit_pytorch/train.py: `(c / batch_split).backward()`, `optim.step()` every `batch_split`
micro-batches). Nothing is read back from the device unless asked.
"""

from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from bit_transfer.data.pixels import unit_range
from bit_transfer.engine.buckets import BUCKET_BYTES, GradientBuckets
from bit_transfer.engine.mixup import mixup, mixup_loss
from bit_transfer.system import compile_cache
from bit_transfer.kernels import ops as kernel_ops
from bit_transfer.system import device

PRECISIONS = {"fp32": None, "fp16": ms.float16, "bf16": ms.bfloat16}


class SGDMomentum(nn.Cell):
    """PyTorch/TF SGD with momentum (no dampening, no Nesterov): v = mu*v + g (+ wd*p); p -= lr*v.

    `ApplyMomentum` is the fused kernel of exactly this update. The lr is an input of the compiled
    step (a scalar tensor), so setting it every step never recompiles the graph.
    """

    def __init__(self, params, momentum: float, weight_decay: float = 0.0):
        super().__init__()
        self.params = ParameterTuple(params)
        self.moments = ParameterTuple(
            Parameter(ops.zeros(p.shape, p.dtype), name=f"optimizer.moments.{p.name}", requires_grad=False)
            for p in self.params
        )
        self.momentum = Tensor(momentum, ms.float32)
        self.weight_decay = float(weight_decay)
        self.apply_momentum = ops.ApplyMomentum()

    def construct(self, grads, lr):
        for p, v, g in zip(self.params, self.moments, grads):
            if self.weight_decay:
                g = g + self.weight_decay * p
            self.apply_momentum(p, v, lr, g, self.momentum)
        return lr

    def state(self) -> dict[str, Parameter]:
        """The momentum buffers by name, as the Parameters themselves: a checkpoint writes them one by
        one (copying them all to numpy first added 0.1 GB to R50x1's peak at every save)."""
        return {v.name: v for v in self.moments}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for v in self.moments:
            if v.name not in state:
                raise KeyError(v.name)
            device.assign(v, state[v.name])


def all_finite(grads, kernel=None, amp: bool = False):
    """No inf/NaN in any gradient, as a scalar bool tensor.

    With `kernel` (kernel_ops.all_finite_primitive(), float32 gradients on CPU): one pass over the
    exponent bits. With `amp` (Ascend, GPU): `ms.amp.all_finite`, the documented check, which on Ascend
    reads the float status registers that saturation mode sets instead of inf (mindspore/python/mindspore/
    amp.py `_all_finite`: NPUGetFloatStatusV2 on 910A/910B; MindSpore 2.7-2.10). Otherwise (CPU without
    our kernel) one isfinite of the sum of per-tensor sums: `ms.amp.all_finite` launches IsFinite per
    tensor there, ~1 ms each (~20 % of an R50 step); the sums cost ~17 % (docs/performance.md).
    """
    if kernel is not None:  # float32 gradients only (TrainStep passes the kernel for float32 parameters)
        return kernel(*grads).reshape(())
    if amp:
        return ms.amp.all_finite(grads)
    return ops.isfinite(ops.addn([g.sum() for g in grads]))


class LossScale(nn.Cell):
    """fp16's dynamic loss scale, kept on the device: halved on overflow (never below 1), doubled after
    GROWTH_INTERVAL finite steps in a row. On the device so that no step waits to read its overflow
    flag; the checkpoint holds both values (`TrainStep.scale_state`)."""

    GROWTH_INTERVAL = 1000

    def __init__(self, init: float = 2.0**16):
        super().__init__(auto_prefix=False)
        self.scale = Parameter(Tensor(init, ms.float32), name="loss_scale.scale", requires_grad=False)
        self.good = Parameter(Tensor(0, ms.int32), name="loss_scale.good_steps", requires_grad=False)

    def construct(self, finite):
        good = ops.select(finite, self.good + 1, ops.zeros_like(self.good))
        grow = good >= self.GROWTH_INTERVAL
        shrunk = ops.maximum(self.scale / 2.0, ops.ones_like(self.scale))
        scale = ops.select(finite, ops.select(grow, self.scale * 2.0, self.scale), shrunk)
        ops.assign(self.good, ops.select(grow, ops.zeros_like(good), good))
        ops.assign(self.scale, scale)
        return scale


class StepOutput(NamedTuple):
    """One optimizer step's results, left on the device until read: (mean loss over its micro-batches
    and the ranks, 1 if the update was applied, > 0 if any rank asked to stop) as one float32 tensor,
    so that reading them is one wait for the device, made only when the loop needs the values."""

    stats: Tensor

    def read(self) -> tuple[float, bool, bool]:
        return read_steps([self])[0]


def read_steps(outputs: list[StepOutput]) -> list[tuple[float, bool, bool]]:
    """(loss, applied, stop) of several steps with one copy from the device (one wait, for the last)."""
    if not outputs:
        return []
    stats = outputs[0].stats if len(outputs) == 1 else ops.stack([o.stats for o in outputs])
    return [(float(loss), applied > 0, stop > 0) for loss, applied, stop in stats.asnumpy().reshape(-1, 3)]


class _StepCell(nn.Cell):
    """A step function as a Cell that holds every Parameter it touches, under their own names.

    A compile-cache load rebinds the graph's Parameters by name from the compiled object's
    `parameters_dict()`; compiled as a plain function, whose dict is empty, the cached step
    computed NaN (compile_cache.py). `auto_prefix=False` keeps the names the checkpoints use.
    """

    def __init__(self, fn, model: nn.Cell, optimizer: nn.Cell, extra: dict):
        super().__init__(auto_prefix=False)
        self.model, self.optimizer = model, optimizer
        for name, value in extra.items():
            setattr(self, name, value)
        self._fn = fn

    def construct(self, *inputs):
        return self._fn(*inputs)


class TrainStep:
    """Forward/backward per micro-batch, accumulation, all-reduce and the optimizer update, compiled with
    jit (with `batch_split` > 1 the update runs op by op after the compiled micro-batches). Its inputs
    are uint8 images and the MixUp partners; its outputs stay on the device (`StepOutput`), so the
    host never waits for a step it does not need to read."""

    def __init__(
        self,
        model: nn.Cell,
        *,
        momentum: float,
        weight_decay: float,
        batch_split: int,
        precision: str = "fp32",
        jit: bool = True,
        ranks: int = 1,
        mix: bool = True,
        compile_cache: bool = False,
        bucket_bytes: int = BUCKET_BYTES,
        log=print,
    ):
        """`mix`: blend images with their partners (MixUp); `compile_cache`: load the compiled step from,
        or save it to, the compile cache at the first call (compile_cache.py; `log` gets its one line)."""
        self.model, self.batch_split, self.precision = model, batch_split, precision
        params = [p for p in model.trainable_params()]
        self.optimizer = SGDMomentum(params, momentum, weight_decay)
        # fp16 gradients under- and overflow without loss scaling; bf16 has fp32's range.
        self.scaler = LossScale() if precision == "fp16" else None
        finite_kernel = kernel_ops.all_finite_primitive() if all(p.dtype == ms.float32 for p in params) else None
        amp_check = ms.get_context("device_target") in ("Ascend", "GPU")
        reduce = GradientBuckets(params, ranks, bucket_bytes) if ranks > 1 else None
        grad_fn = self._grad_fn(model, batch_split, mix)
        # micro-batching applies op by op (`_accumulating`): its all-reduce is then a compiled graph alone
        update = self._update_fn(ms.jit(reduce) if reduce is not None and batch_split > 1 and jit else reduce,
                                 finite_kernel, amp_check)
        extra = {"scaler": self.scaler} if self.scaler is not None else {}
        if reduce is not None:
            extra["buckets"] = reduce
        if batch_split == 1:
            fn = self._single(grad_fn, update)
        else:
            fn = self._accumulating(grad_fn, update, params, extra)
        self._cell = _StepCell(fn, model, self.optimizer, extra)
        self._micro = ms.jit(self._cell) if jit else self._cell
        self._cache_pending, self._log = compile_cache and jit, log
        self._settings = {"momentum": momentum, "weight_decay": weight_decay, "batch_split": batch_split,
                          "precision": precision, "ranks": ranks, "finite_kernel": finite_kernel is not None,
                          "finite_amp": amp_check, "mix": mix,
                          "buckets": len(reduce.bounds) if reduce is not None else 0}

    def _grad_fn(self, model, batch_split: int, mix: bool):
        """Loss and gradients of one micro-batch; each loss scaled by 1/batch_split (and the fp16 scale)."""
        inv_split = 1.0 / batch_split

        def forward(x, ya, perm, lam, scale):
            if mix:
                x, yb = mixup(x, ya, perm, lam)
            else:
                x, yb = (unit_range(x) if x.dtype == ms.uint8 else x), ya
            loss = mixup_loss(model(x), ya, yb, lam)
            return loss * (inv_split * scale), loss

        return ms.value_and_grad(forward, None, self.optimizer.params, has_aux=True)

    def _update_fn(self, reduce, finite_kernel, amp_check: bool):
        """The end of every optimizer step: check, all-reduce (with the loss, stop and finite flags),
        unscale (fp16), apply, adjust the loss scale; returns the step's (loss, applied, stop) as one
        tensor. The check comes first, on the scaled gradients: dividing by a scale >= 1 makes no inf."""
        optimizer, scaler = self.optimizer, self.scaler

        def update(grads, loss, stop, lr, compiled: bool = True):
            finite = all_finite(grads, finite_kernel, amp_check)  # this rank's (scaled) gradients
            if reduce is not None and compiled:
                grads, loss, stop, finite = reduce(grads, loss, stop, finite)  # finite: every rank's
            elif reduce is not None:  # a compiled graph of its own: a plain tuple of tensors would be
                # compiled in as constants (MindSpore's warning says so), hence `mutable`
                grads, loss, stop, finite = reduce(ms.mutable(tuple(grads)), loss, stop, finite)
            if scaler is not None:
                grads = tuple([g / scaler.scale for g in grads])
            if compiled:
                if finite:
                    optimizer(grads, lr)
            elif bool(finite.asnumpy()):  # op by op: the one wait of a micro-batched step (see _accumulating)
                optimizer(grads, lr)
            if scaler is not None:
                scaler(finite)
            return ops.stack([loss, finite.astype(ms.float32), stop])

        return update

    def _single(self, grad_fn, update):
        """batch_split 1: forward, backward and update in one compiled graph."""
        scaler = self.scaler

        def step(x, ya, perm, lam, lr, stop):
            scale = scaler.scale if scaler is not None else 1.0
            (_, loss), grads = grad_fn(x, ya, perm, lam, scale)
            return update(grads, loss, stop, lr)

        return step

    def _accumulating(self, grad_fn, update, params, extra: dict):
        """batch_split > 1: each micro-batch adds its gradients (and loss) into Parameter buffers inside
        one compiled graph; `apply` then reduces and applies them. The step's first micro-batch
        overwrites the buffers, so no zeroing pass (zeroing and reading them in one graph ran mis-ordered
        under jit in MindSpore 2.8); the branch on `first` also keeps MindSpore 2.8 off its slow CPU
        "graph pipeline" (docs/performance.md, micro-batching)."""
        sums = ParameterTuple(
            Parameter(ops.zeros(p.shape, p.dtype), name=f"grad_sum.{p.name}", requires_grad=False) for p in params
        )
        loss_sum = Parameter(Tensor(0.0, ms.float32), name="grad_sum.loss", requires_grad=False)
        extra.update(sums=sums, loss_sum=loss_sum)
        scaler, split = self.scaler, float(self.batch_split)

        def micro(x, ya, perm, lam, first):
            scale = scaler.scale if scaler is not None else 1.0
            (_, loss), grads = grad_fn(x, ya, perm, lam, scale)
            if first:
                for acc, g in zip(sums, grads):
                    ops.assign(acc, g)
                ops.assign(loss_sum, loss)
            else:
                for acc, g in zip(sums, grads):
                    ops.assign_add(acc, g)
                ops.assign_add(loss_sum, loss)
            return loss

        def apply(lr, stop):
            return update(tuple(sums), loss_sum / split, stop, lr, compiled=False)

        # The update runs op by op (PyNative), not compiled: compiled, inside this graph or beside it,
        # it kept memory of its own (R50x1 8 x 4: 2.47 GB peak against 1.33 GB, and 25 s to compile,
        # measured 2026-12-07; an apply graph of its own: +0.55 GB, 2026-12-01). Its all-reduce is the
        # one compiled graph of GradientBuckets (`reduce`), so no collective launches alone. It reads
        # the finite flag (one wait per step): updating without that read takes a masked gradient per
        # tensor, and `ops.where`/`nan_to_num` op by op cost 0.8 s a step at R50x1 (the update: 0.04 s).
        self._apply = apply
        return micro

    def __call__(self, micro_batches, lr: float, lam: float, stop: bool = False) -> StepOutput:
        """One optimizer step over `batch_split` micro-batches of (x, y, perm): uint8 images (or float
        inputs), labels and each image's MixUp partner (None: itself). `stop`: this rank asks to stop
        (the reduced flag comes back in the output). Returns without waiting for the device."""
        device.warn_slow_convolutions(self.model)
        if not self._cache_pending:
            return self._step(micro_batches, lr, lam, stop)
        self._cache_pending = False
        with compile_cache.first_call(self._cell, self._inputs(micro_batches[0], lr, lam, stop, 0)[:3],
                                      self._settings, self._log):
            out = self._step(micro_batches, lr, lam, stop)
            out.stats.asnumpy()  # the cache entry is published once the step has run
            return out

    def _inputs(self, batch, lr: float, lam: float, stop: bool, i: int) -> tuple:
        """The compiled graph's inputs for micro-batch i: (x, y, perm, lam) and (lr, stop) or (first,)."""
        x, y, perm = batch
        perm = np.arange(len(x), dtype=np.int32) if perm is None else perm
        inputs = (Tensor(x), Tensor(y), Tensor(perm.astype(np.int32)), Tensor(lam, ms.float32))
        if self.batch_split > 1:
            return inputs + (Tensor(i == 0),)
        return inputs + (Tensor(lr, ms.float32), Tensor(float(stop), ms.float32))

    def _step(self, micro_batches, lr: float, lam: float, stop: bool) -> StepOutput:
        if len(micro_batches) != self.batch_split:
            raise ValueError(f"{len(micro_batches)} micro-batches for batch_split {self.batch_split}")
        if self.batch_split == 1:
            return StepOutput(self._micro(*self._inputs(micro_batches[0], lr, lam, stop, 0)))
        for i, batch in enumerate(micro_batches):
            self._micro(*self._inputs(batch, lr, lam, stop, i))
        return StepOutput(self._apply(Tensor(lr, ms.float32), Tensor(float(stop), ms.float32)))

    def gradients_only(self, x: np.ndarray, y: np.ndarray) -> float:
        """Forward and backward of one micro-batch into the gradient sums, no update (batch_split > 1).

        For sizing probes (`train.batch_split: auto`): the memory of a real micro-step, weights untouched.
        """
        if self.batch_split == 1:
            raise ValueError("gradients_only needs a TrainStep with batch_split > 1")
        device.warn_slow_convolutions(self.model)
        loss = self._micro(*self._inputs((x, y, None), 0.0, 1.0, False, 0))
        return float(loss.asnumpy())  # waits for the step: an allocation failure surfaces here

    def scale_state(self) -> dict:
        """fp16's dynamic loss scale, for the checkpoint meta: a resume continues with it, not 2^16."""
        if self.scaler is None:
            return {}
        return {"loss_scale": float(self.scaler.scale.asnumpy()), "good_steps": int(self.scaler.good.asnumpy())}

    def load_scale_state(self, meta: dict) -> None:
        if self.scaler is not None and "loss_scale" in meta:
            device.assign(self.scaler.scale, np.float32(meta["loss_scale"]))
            device.assign(self.scaler.good, np.int32(meta.get("good_steps", 0)))


class _ForwardCell(nn.Cell):
    """Inference as a Cell holding the model's Parameters under their own names (see _StepCell):
    logits, or with `features` the pre-logits (`forward_features`)."""

    def __init__(self, model: nn.Cell, features: bool = False):
        super().__init__(auto_prefix=False)
        self.model, self.features = model, features

    def construct(self, x):
        y = self.model.forward_features(x) if self.features else self.model(x)
        return y.astype(ms.float32)


class EvalStep:
    """Compiled inference: logits for a batch (padded to a fixed size to avoid recompiles)."""

    def __init__(self, model: nn.Cell, batch_size: int, jit: bool = True, compile_cache: bool = False, log=None,
                 features: bool = False):
        """`compile_cache`: load the compiled graph from, or save it to, the compile cache at the first
        call (compile_cache.py; `log`, if given, gets its one line). `features`: the pre-logits, not logits."""
        self.model = model
        self.batch_size = batch_size
        self._cell = _ForwardCell(model, features)
        self._forward = ms.jit(self._cell) if jit else self._cell
        self._cache_pending, self._log = compile_cache and jit, log

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n < self.batch_size:  # pad the last batch: one graph for every batch
            pad = np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)
            x = np.concatenate([x, pad])
        self.model.set_train(False)
        device.warn_slow_convolutions(self.model)
        if not self._cache_pending:
            return self._forward(Tensor(x)).asnumpy()[:n]
        self._cache_pending = False
        settings = {"step": "features" if self._cell.features else "eval", "batch": self.batch_size}
        with compile_cache.first_call(self._cell, (x,), settings, self._log):
            return self._forward(Tensor(x)).asnumpy()[:n]


def cast_model(model: nn.Cell, precision: str) -> nn.Cell:
    """Mixed precision: compute in fp16/bf16, keep fp32 master weights (MindSpore amp level O2)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return model
    if hasattr(model, "set_layout"):  # the oneDNN layouts' CPU kernels are float32 kernels
        model.set_layout("nchw")
    device.check_precision(precision, ms.get_context("device_target"))  # device.PRECISIONS_BY_DEVICE
    return ms.amp.auto_mixed_precision(model, amp_level="O2", dtype=dtype)


def feature_step(folded, batch_size: int, *, jit: bool = True, compile_cache: bool = False):
    """The one computation of pre-logit features, for the linear probe's cache, `bit-transfer embed` and
    `Predictor.embed`: `forward_features` of the folded model (models/inference.py), compiled once, every
    batch padded to `batch_size` (EvalStep). Called with (N, 3, S, S) images, returns (N, F) float32."""
    return EvalStep(folded, batch_size, jit=jit, compile_cache=compile_cache, features=True)
