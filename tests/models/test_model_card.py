"""The model card of `export --format hf` (README.md, Hugging Face front matter, the run's facts, loading
snippets that run) and of `export --format onnx` (the same facts in its metadata, a short README.md)."""

import json
import re

import numpy as np
import pytest
import yaml

from conftest import one_line_error, run_cli
from datagen import image_folder, tiny_folder_recipe

CROP = 16


def ok(out) -> str:
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    return out.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 3-step fit on class folders (width 0.5: Hugging Face can express it)."""
    root = tmp_path_factory.mktemp("card")
    data = image_folder(root / "data", counts={"cat": 4, "dog": 4}, eval_count=2)
    ok(run_cli("fit", tiny_folder_recipe(root, data, CROP), "--run-dir", root / "run", "--quiet"))
    return root


def front_matter(text: str) -> tuple[dict, str]:
    m = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert m, text[:300]
    return yaml.safe_load(m[1]), m[2]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.slow
def test_hf_export_has_a_model_card_whose_transformers_snippet_runs(run):
    ok(run_cli("export", run / "run", "--format", "hf", "--out", run / "hf"))
    meta, body = front_matter((run / "hf/README.md").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert {"image-classification", "bit"} <= set(meta["tags"]) and meta["metrics"] == ["accuracy"]
    assert "license" not in meta  # trained from scratch: no source to take a license from
    metrics = json.loads((run / "run/metrics.json").read_text())
    plan = json.loads((run / "run/plan.json").read_text())
    assert "Base weights: `none`" in body
    assert f"({plan['dataset_size']} training images)" in body and "(imagefolder)" in body
    crop, schedule = plan["decisions"]["crop"], plan["decisions"]["schedule"]
    assert f"| crop | {CROP} | {crop['origin']}: {crop['reason']} |" in body
    assert f"| steps | 3 | {schedule['origin']}: {schedule['reason']} |" in body
    for key in ("mixup_alpha", "batch_size", "schedule"):
        assert f"| {key} | " in body
    assert f"| {100 * metrics['top1']:.2f}% | {100 * metrics['top5']:.2f}% | {metrics['loss']:.4f} |" in body
    transformers_code, mindnlp_code = python_blocks(body)
    assert "from mindnlp.transformers import" in mindnlp_code and 'return_tensors="ms"' in mindnlp_code
    image = next((run / "data/val/dog").iterdir())
    code = transformers_code.replace('path = "."', f'path = "{run / "hf"}"').replace("image.jpg", str(image))
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        pytest.skip("transformers (with torch) is not installed: the model card's transformers snippet was not run; "
                    "pip install transformers torch to run it")
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().strip() in ("cat", "dog")


@pytest.mark.slow
def test_onnx_export_carries_the_cards_facts_and_its_snippet_runs(run, tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'bit-transfer[deploy]')")
    import onnxruntime as ort

    ok(run_cli("export", run / "run", "--format", "onnx", "--out", tmp_path / "onnx"))
    props = ort.InferenceSession(str(tmp_path / "onnx/model.onnx")).get_modelmeta().custom_metadata_map
    metrics = json.loads((run / "run/metrics.json").read_text())
    assert json.loads(props["card_results"])["top1"] == metrics["top1"]
    assert json.loads(props["card_plan"])["crop"] == CROP and json.loads(props["card_base_weights"]) == "none"
    assert json.loads(props["card_dataset"])["source"] == "imagefolder"
    meta, body = front_matter((tmp_path / "onnx/README.md").read_text())
    assert meta["library_name"] == "onnx" and "image-classification" in meta["tags"]
    (code,) = python_blocks(body)
    image = next((run / "data/val/cat").iterdir())
    code = code.replace('"model.onnx"', f'"{tmp_path / "onnx/model.onnx"}"').replace("image.jpg", str(image))
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"np": np})
    assert printed.getvalue().strip() in ("cat", "dog")
    # the graph ends in logits: embed says so in one line and writes nothing
    line = one_line_error(run_cli("embed", tmp_path / "onnx/model.onnx", image, "--out", tmp_path / "f.npz"), "embed")
    assert "ONNX" in line and "logits only" in line and not (tmp_path / "f.npz").exists()


def test_license_comes_from_the_weights_source():
    from bit_transfer.models.export.card import facts

    assert facts(None, {}, "hf:google/bit-50")["license"] == "apache-2.0"
    assert facts(None, {}, "BiT-M-R50x1")["license"] == "apache-2.0"
    assert facts(None, {}, "/home/me/weights.npz")["license"] is None
