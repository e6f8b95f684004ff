"""Inference with weight standardisation folded: the eval, predict and feature-extraction model.

At inference a StdConv2d's standardised weight (w - mean) / sqrt(var + 1e-10) (per output channel)
is a fixed function of its raw weight, so it is computed once here, by the layer's own code (the
values the training graph computes, bit for bit), and the inference model convolves with it
directly (the training model's convolution, without the standardisation). The training model is untouched:
standardisation stays inside its graph, with gradients through it.

    from bit_transfer.models.inference import fold
    net = fold(model)          # a FoldedResNetV2: same config, logits, forward_features, head
    net(x)                     # NCHW float32 in [-1, 1] -> logits
    ... train model ...
    net.refresh()              # re-read every weight of `model` (in place: compiled graphs see it)

`fold` keeps only a weak reference to the model it was made from: a one-shot user (eval, predict,
export) can drop that model after folding and hold one copy of the weights, not two. The folded
model's parameters carry the training model's names (`root.conv.weight`, ...), holding the
standardised conv weights; GroupNorm and head values are copies. Folded models are float32.

`inference_arrays(model)` gives the same weights as numpy arrays (for the ONNX writer).
"""

from __future__ import annotations

import weakref

import numpy as np
from mindspore import Parameter, Tensor

from bit_transfer.kernels import layers as kernels, onednn as onednn_conv
from bit_transfer.models.resnetv2 import ResNetV2, StdConv2d


class FoldedConv2d(kernels.Conv):
    """StdConv2d at inference: a plain conv on an already standardised weight (not trainable).

    Same signature as StdConv2d (ResNetV2 builds either); the weight starts at zero and is written
    by FoldedResNetV2.refresh. On oneDNN the convolution keeps the weight in oneDNN's blocked layout
    between calls (`packed`), repacked after a refresh.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: str = "fixed"):
        super().__init__(kernel, stride, padding, standardise=False, packed=True)
        self.weight = Parameter(Tensor(np.zeros((cout, cin, kernel, kernel), np.float32)), requires_grad=False)


class FoldedResNetV2(ResNetV2):
    """A ResNetV2 whose convolutions use weights standardised once (see the module docstring)."""

    def __init__(self, source: ResNetV2):
        if isinstance(source, FoldedResNetV2):
            raise TypeError("fold() takes the training model (a ResNetV2 with StdConv2d layers), not a folded one")
        super().__init__(source.depths, source.width, source.num_classes, source.padding, source.model_name,
                         conv=FoldedConv2d)
        # Not a sub-cell (its parameters are not this model's) and not kept alive by it.
        object.__setattr__(self, "_source_ref", weakref.ref(source))
        # The convolutions' packed copies of these weights go with the model (they would outlive it
        # in the kernel library: 0.13-0.18 GB for an R50x1 with its Winograd weights, 3.7 GB and
        # more for an R152x4).
        weakref.finalize(self, onednn_conv.forget_packed)
        for p in self.get_parameters():
            p.requires_grad = False
        self.set_train(False)
        self.refresh()

    def refresh(self, model: ResNetV2 | None = None) -> None:
        """Re-read every weight from `model` (default: the model this was folded from): standardise the
        conv weights again, copy GroupNorm and head. Written in place with `device.assign`, so graphs
        compiled on this model (an EvalStep) use the new values. Call it after training steps, before
        evaluating; ~0.3 s for an R50x1 on CPU."""
        from bit_transfer.system import device

        source = model if model is not None else self._source_ref()
        if source is None:
            raise RuntimeError("the model this was folded from no longer exists; pass it: refresh(model)")
        params = {p.name: p for p in self.get_parameters()}
        for name, value in inference_arrays(source).items():
            device.assign(params[name], value)
        onednn_conv.forget_packed()  # the convolutions' blocked copies are of the old weights


def fold(model: ResNetV2) -> FoldedResNetV2:
    """The inference model of `model` (a ResNetV2): weight standardisation computed once, float32.

    Logits equal the training model's to ~1e-6 relative (tests/models/test_inference.py). After training
    steps, `folded.refresh()` follows the new weights.
    """
    return FoldedResNetV2(model)


def inference_arrays(model: ResNetV2) -> dict[str, np.ndarray]:
    """Every parameter of `model` by name as float32 numpy, conv weights standardised (a folded
    model's are already) by the layer's own code, `StdConv2d.standardised_weight`: the values the
    training graph convolves with (float64 statistics in the CPU kernel, else MindSpore's GroupNorm)."""
    convs = {cell.weight.name: cell for _, cell in model.cells_and_names() if isinstance(cell, StdConv2d)}
    out = {}
    for p in model.get_parameters():
        a = convs[p.name].standardised_weight() if p.name in convs else p
        out[p.name] = np.asarray(a.asnumpy(), np.float32)
    return out
