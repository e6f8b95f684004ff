"""Few-shot sweeps: the grid, the summary, resume, the feature cache and linear probes.

A tiny BiT on a generated 4-class task whose class is the image's colour (plus noise): every
(shots, seed) gets a different subset, so seeds give different numbers.
"""

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

import datagen
from bit_transfer import cli
from bit_transfer.commands.fewshot import features
from bit_transfer.commands.fewshot import sweep as fewshot
from bit_transfer.commands.fewshot import summary as sweep_summary
from bit_transfer.config import recipe as recipes
from bit_transfer.errors import UsageError
from conftest import write_recipe

PER_CLASS, EVAL_PER_CLASS = 8, 8


def tiny_recipe(data_dir: Path, runs: Path, *sets: str) -> recipes.Recipe:
    """datagen's tiny recipe with the HyperRule's own steps and learning rate (a sweep's schedule is
    what these tests check), logging every 50 steps; `sets` as `--set` takes them."""
    r = datagen.tiny_recipe(data_dir, runs, rule__steps=None, rule__base_lr=None, log__every=50)
    return r.with_overrides(list(sets))


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = tmp_path_factory.mktemp("colours") / "cifar-10-batches-py"
    return datagen.colour_cifar(path, per_class=PER_CLASS, eval_per_class=EVAL_PER_CLASS)


# ----------------------------------------------------------------------------- the grid and the statistics
@pytest.mark.parametrize("text,minimum,expected", [
    ("1,2,5,10", 1, [1, 2, 5, 10]),
    ("10, 1,5,1", 1, [1, 5, 10]),
    ("0-3", 0, [0, 1, 2, 3]),
    ("0,5-6", 0, [0, 5, 6]),
])
def test_parse_ints(text, minimum, expected):
    assert cli.parse_ints(text, "--x", minimum) == expected


@pytest.mark.parametrize("text,minimum,match", [
    ("1,x", 1, "'x' is not an integer"),
    ("", 1, "'' is not an integer"),
    ("0,1", 1, "0 is below 1"),
    ("-1,2", 0, "-1 is below 0"),
    ("5-2", 0, "runs backwards"),
    ("1.5", 1, "not an integer"),
])
def test_parse_ints_rejects_with_one_line(text, minimum, match):
    with pytest.raises(UsageError, match=match) as e:
        cli.parse_ints(text, "--shots", minimum)
    assert "\n" not in str(e.value)


def test_summarise_mean_and_sample_std():
    rows = [
        {"shots": 1, "seed": 0, "top1": 0.50, "top5": 0.9},
        {"shots": 1, "seed": 1, "top1": 0.60, "top5": 1.0},
        {"shots": 1, "seed": 2, "top1": 0.80, "top5": 1.0},
        {"shots": 5, "seed": 0, "top1": 0.70, "top5": 1.0},
    ]
    one, five = sweep_summary.summarise(rows, [1, 5])
    assert one["n"] == 3 and one["top1_mean"] == pytest.approx(19 / 30)
    assert one["top1_std"] == pytest.approx(statistics.stdev([0.5, 0.6, 0.8]))  # ddof=1
    assert one["top1_std"] != pytest.approx(float(np.std([0.5, 0.6, 0.8])))  # not the population std
    assert five == {"shots": 5, "n": 1, "top1_mean": 0.7, "top1_std": None, "top5_mean": 1.0, "top5_std": None}
    md = sweep_summary.summary_markdown("t", [one, five])
    assert "| 1 | 3 | 63.33 ± 15.28 |" in md and "| 5 | 1 | 70.00 |" in md and "ddof=1" in md


def test_without_matplotlib_the_plot_is_skipped_and_said(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    base = tiny_recipe(tmp_path, tmp_path)
    said = []
    rows = [{"shots": 1, "seed": 0, "top1": 0.5, "top5": 1.0, "steps": 500, "seconds": 1.0, "run": "shots1-seed0"}]
    paths = sweep_summary.write_summary(tmp_path, base, [1], [0], rows, log=said.append)
    assert "png" not in paths and not (tmp_path / "summary.png").exists()
    assert any("matplotlib is not installed" in s for s in said)
    assert (tmp_path / "summary.md").is_file()


# ----------------------------------------------------------------------------- linear probes on cached features
SHOTS, SEEDS = [1, 2], [0, 1]


@pytest.fixture(scope="module")
def linear(task, tmp_path_factory):
    """One linear sweep (4 runs, the rule's 500 steps each); its feature-computation counts."""
    root = tmp_path_factory.mktemp("linear")
    base = tiny_recipe(task, root / "runs", "rule.base_lr=0.1")
    before = features.COMPUTED.copy()
    result = fewshot.sweep(base, SHOTS, SEEDS, mode="linear", sweep_dir=root / "sweep",
                           feature_root=root / "features", log=quiet)
    computed = features.COMPUTED - before
    return base, root, result, computed


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_linear_sweep_makes_every_run_with_the_rule_on_the_subset(linear):
    base, root, result, _ = linear
    assert result.complete
    assert [(r["shots"], r["seed"]) for r in result.rows] == [(k, s) for k in SHOTS for s in SEEDS]
    for k in SHOTS:
        for s in SEEDS:
            run = root / "sweep" / f"shots{k}-seed{s}"
            m = metrics_of(run)
            assert m["completed"] and m["steps"] == 500 and m["mode"] == "linear"
            plan = json.loads((run / "plan.json").read_text())
            # the HyperRule saw the subset: 4k images -> the small-task schedule, no MixUp
            assert plan["dataset_size"] == 4 * k
            assert plan["schedule"] == [100, 200, 300, 400, 500] and plan["mixup_alpha"] == 0.0
            assert plan["linear_probe"]["batch"] == min(16, 4 * k)
            saved = recipes.load(run / "recipe.yaml")
            assert (saved.data.examples_per_class, saved.data.seed, saved.train.mode) == (k, s, "linear")
            assert list((run / "checkpoints").glob("step-000500.ckpt"))
            assert m["eval_images"] == 4 * EVAL_PER_CLASS


def test_linear_probe_learns_the_task(linear):
    _, _, result, _ = linear
    two_shot = [r["top1"] for r in result.rows if r["shots"] == 2]
    assert min(two_shot) >= 0.75, result.rows  # chance is 0.25; a head that never moved gives 0.25


def test_summary_files_agree_with_the_runs(linear):
    _, root, _, _ = linear
    sweep = root / "sweep"
    per_run = {(k, s): metrics_of(sweep / f"shots{k}-seed{s}") for k in SHOTS for s in SEEDS}
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["mode"] == "linear" and summary["shots"] == SHOTS and summary["seeds"] == SEEDS
    for row in summary["runs"]:
        m = per_run[(row["shots"], row["seed"])]
        assert (row["top1"], row["top5"], row["steps"]) == (m["top1"], m["top5"], m["steps"])
    for entry in summary["by_shots"]:
        top1 = [per_run[(entry["shots"], s)]["top1"] for s in SEEDS]
        assert entry["n"] == len(SEEDS)
        assert entry["top1_mean"] == pytest.approx(statistics.mean(top1))
        assert entry["top1_std"] == pytest.approx(statistics.stdev(top1))
    lines = (sweep / "summary.csv").read_text().splitlines()
    assert lines[0] == "shots,seed,top1,top5,steps,seconds,run" and len(lines) == 1 + len(SHOTS) * len(SEEDS)
    md = (sweep / "summary.md").read_text()
    for entry in summary["by_shots"]:
        mean, std = 100 * entry["top1_mean"], 100 * entry["top1_std"]
        assert f"| {entry['shots']} | {len(SEEDS)} | {mean:.2f} ± {std:.2f} |" in md


def test_sweep_plot_and_tensorboard(linear):
    _, root, _, _ = linear
    sweep = root / "sweep"
    summary = json.loads((sweep / "summary.json").read_text())
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(sweep / "summary"))
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("fewshot/top1")]
    assert [p[0] for p in points] == SHOTS
    assert [p[1] for p in points] == pytest.approx([e["top1_mean"] for e in summary["by_shots"]])
    run_acc = event_accumulator.EventAccumulator(str(sweep / "shots1-seed0"))
    run_acc.Reload()
    assert {"train/loss", "train/lr", "val/top1"} <= set(run_acc.Tags()["scalars"])
    pytest.importorskip("matplotlib")
    assert (sweep / "summary.png").stat().st_size > 1000


@pytest.mark.slow
def test_features_are_computed_once_per_image(linear, task):
    from bit_transfer import data

    base, root, _, computed = linear
    # the union of the subsets' images, once, and the eval split, once
    full = data.load(base.data, fewshot=False)
    union = set()
    for k in SHOTS:
        for s in SEEDS:
            union |= set(full.fewshot(k, s).train.rows.tolist())
    assert computed == {"cifar10:train": len(union), "cifar10:test": 4 * EVAL_PER_CLASS}
    # a second sweep (new directory, same backbone and crop) reuses every feature
    before = features.COMPUTED.copy()
    again = fewshot.sweep(base, [1, 2], [1], mode="linear", sweep_dir=root / "again",
                          feature_root=root / "features", log=quiet)
    assert features.COMPUTED - before == {}
    first = {(r["shots"], r["seed"]): r["top1"] for r in linear[2].rows}
    assert all(r["top1"] == first[(r["shots"], r["seed"])] for r in again.rows)


def test_subsets_are_those_fit_would_train_on(linear):
    from bit_transfer import data

    base, _, _, _ = linear
    pools = fewshot.Pools(base)
    for k in SHOTS:
        for s in SEEDS:
            run = fewshot.Run(k, s, Path("x"), fewshot.run_recipe(base, k, s))
            assert np.array_equal(pools.subset(run).train.rows, data.load(run.recipe.data).train.rows)


def test_eval_command_reproduces_a_linear_run(linear, tmp_path):
    from bit_transfer.commands.eval import eval_checkpoint

    _, root, _, _ = linear
    run = root / "sweep" / "shots2-seed1"
    m = metrics_of(run)
    out = eval_checkpoint(recipes.load(run / "recipe.yaml"), run, out_dir=tmp_path / "ev")
    assert out["top1"] == pytest.approx(m["top1"])
    assert out["loss"] == pytest.approx(m["loss"], rel=1e-4)


def test_rerun_skips_finished_linear_runs(linear):
    base, root, result, _ = linear
    stamps = {p: p.stat().st_mtime_ns for p in (root / "sweep").glob("shots*/metrics.json")}
    said = []
    again = fewshot.sweep(base, SHOTS, SEEDS, mode="linear", sweep_dir=root / "sweep",
                          feature_root=root / "features", log=said.append)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sum("finished earlier" in s for s in said) == len(SHOTS) * len(SEEDS)
    assert [r["top1"] for r in again.rows] == [r["top1"] for r in result.rows]


# ----------------------------------------------------------------------------- the feature cache
@pytest.fixture(scope="module")
def backbone():
    from bit_transfer.system import device
    from bit_transfer.models import create_model

    device.setup("auto")
    device.seed_everything(0)
    model = create_model("custom", 3, depths=[1, 1, 1, 1], width=0.125)
    model.set_train(False)
    return model


@pytest.fixture(scope="module")
def arrays_dataset():
    from bit_transfer import data

    rng = np.random.default_rng(1)
    labels = np.arange(12) % 3
    images = rng.integers(0, 256, (12, 24, 24, 3), dtype=np.uint8)
    return data.from_arrays(images, labels, ["a", "b", "c"], images[:6], labels[:6], name="arrays:test")


def direct_features(model, split, crop):
    import mindspore as ms

    from bit_transfer.data import pipeline

    batches = pipeline.eval_batches(split, crop=crop, batch_size=4)
    return np.concatenate([model.forward_features(ms.Tensor(x)).asnumpy() for x, _ in batches])


def test_cache_returns_features_in_split_order(backbone, arrays_dataset, tmp_path):
    cache = features.FeatureCache(backbone, 16, root=tmp_path, batch_size=4, log=quiet)
    train = arrays_dataset.train
    x, y = cache.features("arrays:test", train.subset([0, 2, 4, 6]))
    shuffled = train.subset([9, 2, 11, 0, 5])  # partly cached, out of order
    before = features.COMPUTED.copy()
    x2, y2 = cache.features("arrays:test", shuffled)
    assert features.COMPUTED - before == {train.name: 3}  # only 9, 11 and 5 were new
    # The reference runs batches of 4 and 1: oneDNN rounds other batch sizes differently. Measured max
    # abs diff 0 with AVX-512, 2.5e-6 with AVX2 kernels (DNNL_MAX_CPU_ISA=AVX2, kernels -march=haswell).
    np.testing.assert_allclose(x2, direct_features(backbone, shuffled, 16), rtol=1e-4, atol=1e-5)
    assert np.array_equal(y2, shuffled.labels)
    # a new FeatureCache on the same directory (another process, a later sweep) reads them from disk
    again = features.FeatureCache(backbone, 16, root=tmp_path, batch_size=4, log=quiet)
    before = features.COMPUTED.copy()
    x3, _ = again.features("arrays:test", shuffled)
    assert features.COMPUTED - before == {}
    assert np.array_equal(x3, x2)


def test_the_feature_log_calls_a_holdout_eval_split_eval(backbone, arrays_dataset, tmp_path):
    """A holdout eval split is rows of the training split (named '...:train'); the log says what it is."""
    from bit_transfer import data

    rng = np.random.default_rng(2)
    held = data.from_arrays(rng.integers(0, 256, (10, 24, 24, 3), dtype=np.uint8), np.arange(10) % 2,
                            holdout=0.2, name="held")
    said = []
    cache = features.FeatureCache(backbone, 16, root=tmp_path, batch_size=4, log=said.append)
    cache.features(held.name, held.eval, features.split_about(held, "eval"))
    cache.features(held.name, held.train, features.split_about(held, "train"))
    assert said[0].startswith("features: 2 eval images (a seeded holdout of held:train) through the backbone")
    assert said[2].startswith("features: 8 training images of held:train through the backbone")
    assert features.split_about(arrays_dataset, "eval") == "eval images of arrays:test:eval"


def test_cache_is_invalidated_by_new_weights_or_resolution(backbone, arrays_dataset, tmp_path):
    import mindspore as ms

    split = arrays_dataset.eval
    base = features.FeatureCache(backbone, 16, root=tmp_path, batch_size=4, log=quiet)
    base.features("arrays:test", split)

    def computed(cache):
        before = features.COMPUTED.copy()
        cache.features("arrays:test", split)
        return sum((features.COMPUTED - before).values())

    assert computed(features.FeatureCache(backbone, 16, root=tmp_path, batch_size=4, log=quiet)) == 0
    assert computed(features.FeatureCache(backbone, 12, root=tmp_path, batch_size=4, log=quiet)) == len(split)
    w = backbone.root.conv.weight
    old = w.asnumpy()
    try:
        w.set_data(ms.Tensor(old * 1.5))
        assert computed(features.FeatureCache(backbone, 16, root=tmp_path, batch_size=4, log=quiet)) == len(split)
    finally:
        w.set_data(ms.Tensor(old))
    # the head does not change features: a new head keeps the cache
    backbone.reset_head(3)
    assert computed(features.FeatureCache(backbone, 16, root=tmp_path, batch_size=4, log=quiet)) == 0


def test_cache_recomputes_images_whose_label_or_origin_changed(backbone, arrays_dataset, tmp_path):
    from bit_transfer.data import Split

    split = arrays_dataset.eval
    cache = features.FeatureCache(backbone, 16, root=tmp_path, batch_size=4, log=quiet)
    cache.features("arrays:test", split)
    relabelled = Split(split.store, split.rows, (split.labels + 1) % 3, split.name)
    before = features.COMPUTED.copy()
    _, y = cache.features("arrays:test", relabelled)
    assert features.COMPUTED - before == {split.name: len(split)}
    assert np.array_equal(y, relabelled.labels)


def test_cache_leaves_out_unreadable_images_with_skip_corrupt(backbone, tmp_path):
    from datagen import corrupt, data_cfg, image_folder

    from bit_transfer import data

    root = image_folder(tmp_path / "images", {"a": 2, "b": 2, "c": 2}, eval_count=3)
    corrupt(root / "val" / "b" / "001.png")
    ds = data.load(data_cfg(source="imagefolder", path=str(root), skip_corrupt=True, cache_dir=str(tmp_path / "dc")))
    cache = features.FeatureCache(backbone, 16, root=tmp_path / "features", batch_size=4, log=quiet)
    x, y = cache.features(ds.name, ds.eval)
    keep = np.array([not ds.eval.where(i).endswith("b/001.png") for i in range(len(ds.eval))])
    assert len(x) == len(ds.eval) - 1 and np.array_equal(y, ds.eval.labels[keep])
    expected = direct_features(backbone, ds.eval.subset(np.flatnonzero(keep)), 16)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-5)
    before = features.COMPUTED.copy()
    x2, _ = cache.features(ds.name, ds.eval)  # the unreadable image is remembered, not retried
    assert features.COMPUTED - before == {} and np.array_equal(x2, x)


def test_default_feature_cache_is_under_bit_transfer_home(home):
    assert features.default_root() == home / "features"


# ----------------------------------------------------------------------------- fine-tuning sweeps: resume
@pytest.mark.slow
def test_finetune_sweep_resumes_an_interrupted_run_and_skips_finished_ones(task, tmp_path, monkeypatch):
    from bit_transfer.commands import fit as train

    base = tiny_recipe(task, tmp_path, "rule.steps=3", "log.every=1", "train.jit=false")  # PyNative: no compiles
    real_fit = train.fit
    calls = []

    def fit(recipe, run_dir=None, **kw):
        calls.append(Path(run_dir).name)
        if interrupt and Path(run_dir).name == "shots2-seed0":
            kw["stop_after"] = 1  # as if Ctrl-C after step 1
        return real_fit(recipe, run_dir=run_dir, **kw)

    monkeypatch.setattr(train, "fit", fit)
    sweep = tmp_path / "sweep"
    interrupt = True
    first = fewshot.sweep(base, [1, 2], [0], mode="finetune", sweep_dir=sweep, log=quiet)
    assert not first.complete and calls == ["shots1-seed0", "shots2-seed0"]
    assert not (sweep / "summary.json").exists()
    assert metrics_of(sweep / "shots2-seed0")["steps"] == 1

    interrupt, calls[:] = False, []
    second = fewshot.sweep(base, [1, 2], [0], mode="finetune", sweep_dir=sweep, log=quiet)
    assert second.complete and calls == ["shots2-seed0"]  # shots 1 was finished: skipped
    m = metrics_of(sweep / "shots2-seed0")
    assert m["completed"] and m["steps"] == 3
    steps = [json.loads(line)["step"] for line in (sweep / "shots2-seed0/metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2, 3]  # step 1 from the first attempt; the resume continued, it did not restart
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(r["shots"], r["steps"]) for r in summary["runs"]] == [(1, 3), (2, 3)]

    calls[:] = []
    fewshot.sweep(base, [1, 2], [0], mode="finetune", sweep_dir=sweep, log=quiet)
    assert calls == []


# ----------------------------------------------------------------------------- usage errors
def test_too_many_shots_fails_before_any_run(task, tmp_path):
    base = tiny_recipe(task, tmp_path)
    with pytest.raises(UsageError, match=f"class '.+' .* has only {PER_CLASS} training images") as e:
        fewshot.sweep(base, [1, PER_CLASS + 1], [0], mode="linear", sweep_dir=tmp_path / "s", log=quiet)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists()


def test_a_sweep_directory_refuses_another_recipe(task, tmp_path):
    sweep = tmp_path / "s"
    fewshot.claim_sweep_dir(sweep, tiny_recipe(task, tmp_path).with_overrides(["train.mode=linear"]))
    with pytest.raises(UsageError, match=r"different recipe: rule.crop \(16 there, 12 now\)"):
        fewshot.sweep(tiny_recipe(task, tmp_path, "rule.crop=12"), [1], [0], mode="linear", sweep_dir=sweep, log=quiet)
    with pytest.raises(UsageError, match=r"train.mode \('linear' there, 'finetune' now\)"):
        fewshot.sweep(tiny_recipe(task, tmp_path), [1], [0], mode="finetune", sweep_dir=sweep, log=quiet)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds files but is not a bit-transfer run"):
        fewshot.sweep(tiny_recipe(task, tmp_path), [1], [0], sweep_dir=tmp_path / "other", log=quiet)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "other").iterdir())) == 1


@pytest.mark.parametrize("argv,message", [
    (["--shots", "1,x"], "--shots '1,x': 'x' is not an integer"),
    (["--shots", "0"], "--shots '0': 0 is below 1"),
    (["--shots", "1", "--seeds", "a"], "--seeds 'a': 'a' is not an integer"),
])
def test_cli_usage_errors_are_one_line_with_exit_code_2(task, tmp_path, capsys, argv, message):
    from bit_transfer import cli

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(task, tmp_path))
    with pytest.raises(SystemExit) as e:
        cli.main(["fewshot", str(recipe), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("bit-transfer fewshot: error: ") and message in err, err
