"""Pretrained and trained weights: file formats and names, download, and the one route from weights to a model."""
