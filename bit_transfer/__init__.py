"""bit-transfer: BiT-HyperRule fine-tuning of Big Transfer models on MindSpore."""

__version__ = "0.1.0"
