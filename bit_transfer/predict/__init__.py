"""`Predictor`, the Python API behind `bit-transfer predict`: the top-k classes of images, from any model bit-transfer reads.

MODEL: a run directory (its latest checkpoint) or a `.ckpt`, a Hugging Face directory or `hf:org/name`,
an official BiT `.npz` (its own head), or an `.onnx` written by `bit-transfer export --format onnx`
(run by ONNX Runtime). Class names come from the checkpoint's meta, `config.json`'s `id2label` or the
ONNX metadata; a model without them (BiT-M's 21843-class head) answers with class indices.

Images go through the evaluation pipeline (`data.pipeline.eval_batches`: decode in worker threads,
square resize to the model's resolution, [-1, 1]), so a folder in the image-folder layout (its
sub-folders named like the model's classes) gives the numbers `bit-transfer eval` gives, and its
report (metrics.json, per_class.json, confusion.json) is written as eval writes it.

The resolution: `--image-size`, else the one the model records (a run's plan.json crop or its
checkpoint's meta, our Hugging Face export's preprocessor_config.json, the ONNX input shape), else
the rule's crop for `--recipe`'s data, else 128; the summary line says which.

The package, module by module (the command itself is bit_transfer/commands/predict.py) (nothing here imports MindSpore until a model loads or images stream):

    model    LoadedModel, load_model: the MindSpore and ONNX Runtime loaders, the image size
    inputs   Inputs, collect_inputs, label_folders, files_split: what INPUT names, labelled by folders
    running  stream, Unreadable, best_k: logits batch by batch through the eval pipeline
    api      Predictor, Prediction: the Python API
    output   OutFile, Table: the --out file and the stdout table
"""

from bit_transfer.predict.api import API_FIX, Prediction, Predictor
from bit_transfer.predict.inputs import GLOB_CHARS, Inputs, collect_inputs, files_split, label_folders
from bit_transfer.predict.model import DEFAULT_BATCH, DEFAULT_SIZE, DEVICES, TAKES, LoadedModel, load_model, onnx_info
from bit_transfer.predict.output import OUT_SUFFIXES, OutFile, Table
from bit_transfer.predict.running import Unreadable, best_k, softmax, stream, unreadable_reason

# The public classes keep the name they had when this package was one module (reprs, pickles).
Prediction.__module__ = Predictor.__module__ = __name__

__all__ = [
    "API_FIX",
    "DEFAULT_BATCH",
    "DEFAULT_SIZE",
    "DEVICES",
    "GLOB_CHARS",
    "Inputs",
    "LoadedModel",
    "OUT_SUFFIXES",
    "OutFile",
    "Prediction",
    "Predictor",
    "TAKES",
    "Table",
    "Unreadable",
    "best_k",
    "collect_inputs",
    "files_split",
    "label_folders",
    "load_model",
    "onnx_info",
    "softmax",
    "stream",
    "unreadable_reason",
]
