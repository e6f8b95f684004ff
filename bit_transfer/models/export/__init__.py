"""Writers of exported models (ONNX) that take a model and a directory."""
