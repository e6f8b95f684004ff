"""BiT models, pretrained weights (official .npz, Hugging Face, our .ckpt), download and export.

    from bit_transfer.models import create_model, load_weights, resolve_weights
    model = create_model("BiT-M-R50x1", num_classes=10)
    load_weights(model, resolve_weights("auto", "BiT-M-R50x1"))   # head="zero": fine-tuning

See docs/models.md for parameter names, padding modes and parameter counts.
"""

# Imported on first use (PEP 562), so `models.archs` (recipe checks, `plan`) never loads MindSpore.
_HOME = {
    "resolve_weights": "bit_transfer.models.weights.download",
    "ResNetV2": "bit_transfer.models.resnetv2", "create_model": "bit_transfer.models.resnetv2",
    "list_models": "bit_transfer.models.resnetv2", "model_config": "bit_transfer.models.resnetv2",
    "LoadReport": "bit_transfer.models.weights.load", "create_model_from_weights": "bit_transfer.models.weights.load",
    "load_weights": "bit_transfer.models.weights.load", "weights_padding": "bit_transfer.models.weights.load",
}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOME[name]), name)


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
