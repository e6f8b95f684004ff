"""BiT models, pretrained weights (official .npz, Hugging Face, our .ckpt), download and export.

    from bit_transfer.models import create_model, load_weights, resolve_weights
    model = create_model("BiT-M-R50x1", num_classes=10)
    load_weights(model, resolve_weights("auto", "BiT-M-R50x1"))   # head="zero": fine-tuning

See docs/models.md for parameter names, padding modes and parameter counts.
"""

from bit_transfer.models.download import resolve_weights
from bit_transfer.models.resnetv2 import ResNetV2, create_model, list_models, model_config
from bit_transfer.models.weights import LoadReport, create_model_from_weights, load_weights, weights_padding

__all__ = [
    "LoadReport",
    "ResNetV2",
    "create_model",
    "create_model_from_weights",
    "list_models",
    "load_weights",
    "model_config",
    "resolve_weights",
    "weights_padding",
]
