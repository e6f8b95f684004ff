"""The compiled training and evaluation steps: SGD with momentum, micro-batching, MixUp loss.

One optimizer step is `batch_split` calls of `micro_step` (forward + backward of one micro-batch,
loss scaled by 1/batch_split, gradients summed into buffers) and one `apply` (the momentum
update with this step's lr). The maths is that of the full logical batch, as in the official
PyTorch code (bit_pytorch/train.py: `(c / batch_split).backward()`, `optim.step()` every
`batch_split` micro-batches).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

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


def mixup_loss(logits, ya, yb, lam):
    """lam*CE(y_a) + (1-lam)*CE(y_b); with lam = 1 it is plain cross-entropy."""
    logits = logits.astype(ms.float32)
    return lam * ops.cross_entropy(logits, ya) + (1.0 - lam) * ops.cross_entropy(logits, yb)


class _StepCell(nn.Cell):
    """A step function as a Cell that holds every Parameter it touches, under their own names.

    A compile-cache load rebinds the graph's Parameters by name from the compiled object's
    `parameters_dict()`; compiled as a plain function, whose dict is empty, the cached step
    computed NaN (compile_cache.py). `auto_prefix=False` keeps the names the checkpoints use.
    """

    def __init__(self, fn, model: nn.Cell, optimizer: nn.Cell, sums: ParameterTuple | None = None):
        super().__init__(auto_prefix=False)
        self.model, self.optimizer = model, optimizer
        if sums is not None:
            self.sums = sums
        self._fn = fn

    def construct(self, x, ya, yb, lam, scale, last):
        return self._fn(x, ya, yb, lam, scale, last)


class TrainStep:
    """Forward/backward per micro-batch, accumulation, and the optimizer update, compiled with jit."""

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
        compile_cache: bool = False,
        log=print,
    ):
        """`compile_cache`: load the compiled step from, or save it to, the compile cache at the first
        call (compile_cache.py; `log` gets its one line)."""
        self.model = model
        self.batch_split = batch_split
        self.precision = precision
        params = [p for p in model.trainable_params()]
        self.optimizer = SGDMomentum(params, momentum, weight_decay)
        # fp16 gradients under- and overflow without loss scaling; bf16 has fp32's range. The
        # scale, like the lr and lam, is an input of the compiled graphs, never captured state.
        self.loss_scale = 2.0**16 if precision == "fp16" else 1.0
        self._good_steps = 0
        finite_kernel = kernel_ops.all_finite_primitive() if all(p.dtype == ms.float32 for p in params) else None
        amp_check = ms.get_context("device_target") in ("Ascend", "GPU")
        grad_fn = self._grad_fn(model, batch_split)
        update = self._update_fn(ranks, precision == "fp16", finite_kernel, amp_check)
        if batch_split == 1:
            micro = self._single(grad_fn, update)
        else:
            micro = self._accumulating(grad_fn, update, params)
        self._micro = ms.jit(self._cell) if jit else micro
        self._cache_pending, self._log = compile_cache and jit, log
        self._settings = {"momentum": momentum, "weight_decay": weight_decay, "batch_split": batch_split,
                          "precision": precision, "ranks": ranks, "finite_kernel": finite_kernel is not None,
                          "finite_amp": amp_check}

    def _grad_fn(self, model, batch_split: int):
        """Loss and gradients of one micro-batch; each loss scaled by 1/batch_split (and the fp16 scale)."""
        inv_split = 1.0 / batch_split

        def forward(x, ya, yb, lam, scale):
            loss = mixup_loss(model(x), ya, yb, lam)
            return loss * (inv_split * scale), loss

        return ms.value_and_grad(forward, None, self.optimizer.params, has_aux=True)

    def _update_fn(self, ranks: int, unscale: bool, finite_kernel, amp_check: bool):
        """The end of every optimizer step: all-reduce, unscale (fp16), check, apply."""
        # Data parallel: the mean over ranks of each rank's (accumulated) gradient, once per
        # optimizer step, inside the compiled graph; every rank then applies the same update.
        all_reduce = ops.AllReduce() if ranks > 1 else None
        optimizer = self.optimizer

        def update(grads, scale, lr):
            if all_reduce is not None:
                grads = tuple([all_reduce(g) / ranks for g in grads])
            if unscale:  # the scale is 1.0 otherwise: skip a division per tensor
                grads = tuple([g / scale for g in grads])
            finite = all_finite(grads, finite_kernel, amp_check)
            if finite:
                optimizer(grads, lr)
            return finite

        return update

    def _single(self, grad_fn, update):
        """batch_split 1: forward, backward and update in one compiled graph."""
        def micro(x, ya, yb, lam, scale, lr):
            (_, loss), grads = grad_fn(x, ya, yb, lam, scale)
            return loss, update(grads, scale, lr)

        self._cell = _StepCell(micro, self.model, self.optimizer)
        return micro

    def _accumulating(self, grad_fn, update, params):
        """batch_split > 1: each micro-batch adds its gradients into Parameter buffers inside its own
        compiled graph; `apply` reads them. The step's first micro-batch overwrites the buffers, so no
        zeroing pass (zeroing and reading them in one graph ran mis-ordered under jit in MindSpore 2.8);
        the branch on `first` also keeps MindSpore 2.8 off its slow CPU "graph pipeline"
        (docs/performance.md, micro-batching)."""
        sums = ParameterTuple(
            Parameter(ops.zeros(p.shape, p.dtype), name=f"grad_sum.{p.name}", requires_grad=False) for p in params
        )

        def micro(x, ya, yb, lam, scale, first):
            (_, loss), grads = grad_fn(x, ya, yb, lam, scale)
            if first:
                for acc, g in zip(sums, grads):
                    ops.assign(acc, g)
            else:
                for acc, g in zip(sums, grads):
                    ops.assign_add(acc, g)
            return loss

        def apply(scale, lr):
            return update(tuple(sums), scale, lr)

        self._cell = _StepCell(micro, self.model, self.optimizer, sums)
        # The update runs op by op (PyNative), not compiled: a compiled apply graph read the sums as
        # copies (MindSpore 2.8 then silently applied no update inside `if finite`) and kept its own
        # memory pool (+0.55 GB peak at R50x1 8 x 4). Eager, it is ~2 launches per parameter per step.
        self._apply = apply
        return micro

    def __call__(self, micro_batches, lr: float, lam: float) -> tuple[float, bool]:
        """One optimizer step over `batch_split` micro-batches of (x, y_a, y_b).

        Returns the mean micro-batch loss and whether the update was applied (finite gradients).
        """
        device.warn_slow_convolutions(self.model)
        if not self._cache_pending:
            return self._step(micro_batches, lr, lam)
        self._cache_pending = False
        with compile_cache.first_call(self._cell, micro_batches[0], self._settings, self._log):
            return self._step(micro_batches, lr, lam)

    def _step(self, micro_batches, lr: float, lam: float) -> tuple[float, bool]:
        lr_t = Tensor(lr, ms.float32)
        lam_t = Tensor(lam, ms.float32)
        scale_t = Tensor(self.loss_scale, ms.float32)
        losses = []
        if self.batch_split == 1:
            (x, ya, yb), = micro_batches
            loss, finite = self._micro(Tensor(x), Tensor(ya), Tensor(yb), lam_t, scale_t, lr_t)
            losses.append(loss)
        else:
            for i, (x, ya, yb) in enumerate(micro_batches):
                losses.append(self._micro(Tensor(x), Tensor(ya), Tensor(yb), lam_t, scale_t, Tensor(i == 0)))
            finite = self._apply(scale_t, lr_t)
        finite = bool(finite.asnumpy()) if hasattr(finite, "asnumpy") else bool(finite)
        self._adjust_scale(finite)
        return float(np.mean([float(loss.asnumpy()) for loss in losses])), finite

    def gradients_only(self, x: np.ndarray, y: np.ndarray) -> float:
        """Forward and backward of one micro-batch into the gradient sums, no update (batch_split > 1).

        For sizing probes (`train.batch_split: auto`): the memory of a real micro-step, weights untouched.
        """
        if self.batch_split == 1:
            raise ValueError("gradients_only needs a TrainStep with batch_split > 1")
        device.warn_slow_convolutions(self.model)
        one = Tensor(1.0, ms.float32)
        loss = self._micro(Tensor(x), Tensor(y), Tensor(y), one, one, Tensor(True))
        return float(loss.asnumpy())  # waits for the step: an allocation failure surfaces here

    def scale_state(self) -> dict:
        """fp16's dynamic loss scale, for the checkpoint meta: a resume continues with it, not 2^16."""
        return {"loss_scale": self.loss_scale, "good_steps": self._good_steps} if self.precision == "fp16" else {}

    def load_scale_state(self, meta: dict) -> None:
        if self.precision == "fp16" and "loss_scale" in meta:
            self.loss_scale, self._good_steps = float(meta["loss_scale"]), int(meta.get("good_steps", 0))

    def _adjust_scale(self, finite: bool) -> None:
        """Dynamic loss scaling (fp16 only): halve on overflow, double after 1000 good steps."""
        if self.precision != "fp16":
            return
        if not finite:
            self.loss_scale = max(self.loss_scale / 2, 1.0)
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps >= 1000:
            self.loss_scale *= 2
            self._good_steps = 0


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
