"""BiT models: the ResNet-v2 family and its registry (see docs/models.md)."""

from bit_transfer.models.resnetv2 import ResNetV2, create_model, list_models, model_config

__all__ = ["ResNetV2", "create_model", "list_models", "model_config"]
