"""The model card of an export: `README.md` in the Hugging Face convention (YAML front matter, then what
the model is, how it was made and how to load it), and the same facts as ONNX metadata.

`facts(run, meta, source)` reads what a run recorded (recipe.yaml, plan.json, metrics.json, the
checkpoint's meta); pretrained weights exported as they are (no run) have only their source.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# Official BiT weights (google-research/big_transfer, storage.googleapis.com/bit_models, google/bit-*
# on the Hugging Face Hub) are released under Apache 2.0.
APACHE_SOURCES = ("auto", "bit-s-", "bit-m-", "hf:google/bit-", "https://storage.googleapis.com/bit_models/")
PLAN_KEYS = ("crop", "precrop", "steps", "schedule", "mixup_alpha", "batch_size", "base_lr")


def facts(run: Path | None, meta: dict, source) -> dict:
    """Everything the card says, as plain data (also what the ONNX metadata gets)."""
    recipe = _read(run, "recipe.yaml", yaml.safe_load) if run else None
    plan = _read(run, "plan.json", json.loads) if run else None
    metrics = _read(run, "metrics.json", json.loads) if run else None
    model = (recipe or {}).get("model") or {}
    base = str(model.get("weights") or source) if run else str(source)
    if run and base.lower() == "auto":
        base = f"auto (the official {model.get('name', 'BiT')} weights)"
    out = {
        "model": (meta.get("model") or {}).get("name") or model.get("name"),
        "base_weights": base,
        "license": _license(base if run else str(source)),
        "class_names": meta.get("class_names"),
        "fine_tuned": run is not None,
    }
    if recipe:
        data = recipe.get("data") or {}
        out["dataset"] = {k: data.get(k) for k in ("source", "name", "path", "examples_per_class") if data.get(k)}
        out["freeze"] = "backbone" if (recipe.get("train") or {}).get("mode") == "linear" else \
            (recipe.get("train") or {}).get("freeze", "none")
    if plan:
        out["dataset_size"] = plan.get("dataset_size")
        out["plan"] = {k: plan.get(k) for k in PLAN_KEYS}
        out["origins"] = {k: _origin(plan.get("decisions") or {}, k) for k in PLAN_KEYS}
    if metrics:
        out["results"] = {k: metrics.get(k) for k in ("top1", "top5", "loss", "eval_images", "steps", "completed")}
    return out


def _origin(decisions: dict, key: str) -> str | None:
    """'user: rule.crop (rule: 128)': who decided a plan setting and why (steps: the schedule's decision)."""
    d = decisions.get("schedule" if key == "steps" else key)
    return f"{d.get('origin')}: {d.get('reason')}" if isinstance(d, dict) else None


def _read(run: Path, name: str, parse):
    try:
        return parse((run / name).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _license(base: str) -> str | None:
    b = base.lower()
    return "apache-2.0" if b.startswith(APACHE_SOURCES) or b.startswith("auto") else None


def front_matter(f: dict, library: str) -> dict:
    """The Hugging Face model-card metadata."""
    meta = {"library_name": library, "pipeline_tag": "image-classification",
            "tags": ["image-classification", "bit", "big-transfer", "bit-transfer", "mindspore"]}
    if f.get("license"):
        meta["license"] = f["license"]
    dataset = f.get("dataset") or {}
    if dataset.get("source") == "hf" and dataset.get("name"):
        meta["datasets"] = [dataset["name"]]
    if f.get("results"):
        meta["metrics"] = ["accuracy"]
    return meta


def markdown(f: dict, library: str, howto: list[str]) -> str:
    """README.md: the front matter, then the facts, then `howto` (the loading instructions)."""
    lines = ["---", yaml.safe_dump(front_matter(f, library), sort_keys=False).rstrip(), "---", "",
             f"# {f.get('model') or 'BiT'}{' fine-tuned with bit-transfer' if f['fine_tuned'] else ''}", ""]
    unknown = not f.get("license") and f["base_weights"].lower() != "none"
    lines += [f"- Base weights: `{f['base_weights']}`" + (" (license: that of the base weights)" if unknown else "")]
    if f.get("dataset"):
        d = f["dataset"]
        what = d.get("name") or d.get("path") or d.get("source")
        size = f" ({f['dataset_size']} training images)" if f.get("dataset_size") else ""
        few = f", {d['examples_per_class']} per class" if d.get("examples_per_class") else ""
        lines.append(f"- Dataset: {what} ({d.get('source')}){size}{few}")
    if f.get("class_names"):
        names = f["class_names"]
        lines.append(f"- Classes ({len(names)}): {', '.join(map(str, names[:20]))}{' ...' if len(names) > 20 else ''}")
    if f.get("freeze") and f["freeze"] != "none":
        lines.append(f"- Frozen while training (train.freeze): {f['freeze']}")
    if f.get("plan"):
        lines += ["", "## Training plan (BiT-HyperRule)", "", "| setting | value | decided by |", "|---|---|---|"]
        lines += [f"| {k} | {_value(v)} | {f['origins'].get(k) or ''} |" for k, v in f["plan"].items()]
    if f.get("results"):
        r = f["results"]
        lines += ["", "## Results", "", f"On {r.get('eval_images')} evaluation images after {r.get('steps')} steps"
                  + ("" if r.get("completed", True) else " (the run stopped before its last planned step)") + ":", "",
                  "| top-1 | top-5 | loss |", "|---|---|---|",
                  f"| {_pct(r.get('top1'))} | {_pct(r.get('top5'))} | {_num(r.get('loss'))} |"]
    return "\n".join(lines + [""] + howto).rstrip() + "\n"


def hf_howto(image_size: int | None) -> list[str]:
    """Loading the Hugging Face export: transformers, mindnlp, bit-transfer."""
    if image_size:
        prep = ['processor = AutoImageProcessor.from_pretrained(path)', 'inputs = processor(images=image, return_tensors="{t}")']
    else:  # no preprocessor_config.json: BiT's eval transform by hand (resize, [-1, 1])
        prep = ['import numpy as np', 'size = 128  # the resolution the model was trained at',
                'x = np.asarray(image.resize((size, size), Image.BILINEAR), np.float32) / 127.5 - 1',
                'inputs = {{"pixel_values": {tensor}(x.transpose(2, 0, 1)[None])}}']
    def snippet(lib: str, tensors: str, tensor: str, head: list[str], run: list[str]) -> list[str]:
        return ["```python", *head, "from PIL import Image", "", 'path = "."  # this directory, or its Hub id',
                'image = Image.open("image.jpg").convert("RGB")',
                *[p.format(t=tensors, tensor=tensor) for p in prep],
                "model = BitForImageClassification.from_pretrained(path)", *run,
                "print(model.config.id2label[int(logits.argmax(-1)[0])])", "```"]
    return [
        "## How to use", "", "With transformers (PyTorch):", "",
        *snippet("transformers", "pt", "torch.from_numpy",
                 ["import torch", "from transformers import AutoImageProcessor, BitForImageClassification"],
                 ["with torch.no_grad():", "    logits = model(**inputs).logits"]),
        "", "With mindnlp (MindSpore):", "",
        *snippet("mindnlp", "ms", "mindspore.Tensor",
                 ["import mindspore", "from mindnlp.transformers import AutoImageProcessor, BitForImageClassification"],
                 ["logits = model(**inputs).logits"]),
        "", "With bit-transfer: `bit-transfer predict . image.jpg` (top-5 classes), "
            "`bit-transfer embed . images/ --out features.npz` (pre-logit features).",
    ]


def onnx_howto(image_size: int) -> list[str]:
    return [
        "## How to use", "",
        f"`model.onnx`: input `images` float32 (batch, 3, H, W) in [-1, 1] (RGB resized to {image_size} x "
        f"{image_size}, x / 127.5 - 1), output `logits`; the class names and these facts are in its metadata.", "",
        "```python", "import json", "import numpy as np", "import onnxruntime as ort", "from PIL import Image", "",
        'session = ort.InferenceSession("model.onnx")',
        'names = json.loads(session.get_modelmeta().custom_metadata_map["class_names"] or "null")',
        f'x = np.asarray(Image.open("image.jpg").convert("RGB").resize(({image_size}, {image_size}), Image.BILINEAR), '
        "np.float32) / 127.5 - 1",
        'logits = session.run(None, {"images": x.transpose(2, 0, 1)[None]})[0]',
        "best = int(logits.argmax())", "print(names[best] if names else best)", "```", "",
        "Or `bit-transfer predict model.onnx image.jpg`.",
    ]


def onnx_metadata(f: dict) -> dict[str, str]:
    """The card's facts as ONNX metadata_props (strings; JSON where structured)."""
    keys = ("base_weights", "license", "dataset", "dataset_size", "plan", "origins", "results", "freeze")
    return {f"card_{k}": json.dumps(f[k]) for k in keys if f.get(k) is not None}


def _value(v) -> str:
    return "null" if v is None else (", ".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v))


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
