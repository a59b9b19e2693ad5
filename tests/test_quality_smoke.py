"""Smoke tests of the quality benchmarks (benchmarks/quality.py, benchmarks/quality_torch_pruning.py)
on tiny random models and the first 256 tokens of both real held-out texts.

No quality assertions (the figures come from the long runs); this keeps the scripts working as
the package changes: every trajectory reports both texts, seeds aggregate, a killed run resumes
where it stopped, and Torch-Pruning's path reads the windows exactly as ours does. The
Torch-Pruning test is skipped when ``torch_pruning`` is not installed (a benchmark-only
dependency). About a minute on 2 busy cores.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    """The quality benchmark modules, imported the way the scripts import their helpers."""
    path = list(sys.path)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        names = ("_quality_eval", "quality", "quality_torch_pruning")
        yield SimpleNamespace(**{n: importlib.import_module(n) for n in names})
    finally:
        sys.path[:] = path


def test_plan_one_trajectory_per_key(bench):
    args = bench.quality.parse_args([
        "--schedule", "shared", "--steps", "40", "--targets", "0.2", "0.3", "0.4", "--seeds", "0", "1",
        "--normalizations", "max", "rank", "--sweep", "0", "0.01", "0.02", "--sweep-targets", "0.3", "0.4",
        "--no-mlp-only",
    ])
    runs = {r.key: r for r in bench.quality.plan_runs(args)}
    assert len(runs) == len(bench.quality.plan_runs(args))
    # The main adaptive run is also the sweep's A = 0.02 point; A = 0 under any normalization is uniform.
    main = runs["adaptive/max/A0.02/seed0/shared40"]
    assert (main.targets, main.steps, main.amplitude_per_step()) == ([0.2, 0.3, 0.4], 40, 0.02 * 50 / 40)
    assert runs["adaptive/rank/A0.02/seed1/shared40"].targets == [0.2, 0.3, 0.4]
    sweep = runs["adaptive/rank/A0.01/seed1/shared40"]
    assert (sweep.targets, sweep.steps, sweep.row) == ([0.3, 0.4], 40, "adaptive/rank/A0.01/shared40")
    assert [k for k in runs if k.startswith("uniform/")] == ["uniform/none/A0/seed0/shared40",
                                                             "uniform/none/A0/seed1/shared40"]
    assert [k for k in runs if k.startswith("magnitude/")] == ["magnitude/none/A0/seed0/shared40"]
    later = bench.quality.plan_runs(bench.quality.parse_args(["--seeds", "1", "2", "--methods", "magnitude",
                                                              "--sweep", "--no-mlp-only"]))
    assert {r.seed for r in later} == {0}  # calibration-free: one trajectory whatever the seeds
    assert len([k for k in runs if k.startswith("random/")]) == 2
    separate = bench.quality.plan_runs(bench.quality.parse_args(
        ["--targets", "0.2", "0.4", "--seeds", "0", "--methods", "uniform", "--sweep", "--no-mlp-only"]))
    assert [r.key for r in separate] == ["uniform/none/A0/seed0/separate50@0.20",
                                         "uniform/none/A0/seed0/separate50@0.40"]


def test_seed_statistics(bench):
    stats = bench._quality_eval.seed_stats([14.0, 10.0, 12.0], [2, 0, 1])
    assert (stats["mean"], stats["std"], stats["min"], stats["max"], stats["n"]) == (12.0, 2.0, 10.0, 14.0, 3)
    assert stats["values"] == [14.0, 10.0, 12.0] and stats["seeds"] == [2, 0, 1]
    assert bench._quality_eval.fmt_cell(stats) == "12.00 ± 2.00"
    assert bench._quality_eval.seed_stats([5.0], [0])["std"] == 0.0


def test_quality_smoke_reports_both_texts_and_resumes(bench, tmp_path, monkeypatch, python_docs_dir, novels_dir):
    out = tmp_path / "quality.json"
    argv = ["--smoke", "--seeds", "0", "1", "--methods", "adaptive", "uniform", "--normalizations", "max", "zscore",
            "--out", str(out)]
    doc = bench.quality.main(argv)
    texts = bench._quality_eval.TEXTS
    assert texts == ("python_tutorial", "austen_novels")
    assert set(doc["original"]["perplexity"]) == set(texts)
    assert sorted(doc["results"]) == sorted(
        f"{m}/seed{s}/shared2" for m in ("adaptive/max/A0.02", "adaptive/zscore/A0.02", "uniform/none/A0")
        for s in (0, 1))
    for res in doc["results"].values():
        assert set(res["at"]) == {"0.20", "0.40"}
        for at in res["at"].values():
            assert all(math.isfinite(at["perplexity"][t]) and at["perplexity"][t] > 1 for t in texts)
    cell = doc["aggregates"]["adaptive/zscore/A0.02/shared2"]["at"]["0.40"]
    for text in texts:
        assert cell[text]["seeds"] == [0, 1] and len(cell[text]["values"]) == 2
        assert cell[text]["min"] <= cell[text]["mean"] <= cell[text]["max"]
    assert "**python_tutorial**" in doc["table"] and "**austen_novels**" in doc["table"]
    assert "adaptive · zscore A=0.02 · shared2 | 0,1 |" in doc["table"] and " ± " in doc["table"]

    # A run killed after some trajectories: run again, only the missing one is measured.
    saved = json.loads(out.read_text())
    missing = "adaptive/zscore/A0.02/seed1/shared2"
    del saved["results"][missing]
    out.write_text(json.dumps(saved))
    measured = []
    real = bench.quality.run_trajectory
    monkeypatch.setattr(bench.quality, "run_trajectory", lambda run, *a: measured.append(run.key) or real(run, *a))
    again = bench.quality.main(argv)
    assert measured == [missing]
    assert {k: v for k, v in again["results"].items() if k != missing} == \
        {k: v for k, v in doc["results"].items() if k != missing}
    assert len(again["commands"]) == 2
    # A shared trajectory asked for a further target runs again to it and keeps its earlier targets.
    longer = bench.quality.main(["--smoke", "--methods", "uniform", "--targets", "0.6", "--out", str(out)])
    assert measured[-1] == "uniform/none/A0/seed0/shared2"
    assert set(longer["results"]["uniform/none/A0/seed0/shared2"]["at"]) == {"0.20", "0.40", "0.60"}

    # Other file-wide settings are refused; the older one-text layout too.
    with pytest.raises(SystemExit, match="calib_samples"):
        bench.quality.main(["--smoke", "--calib-samples", "2", "--out", str(out)])
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"settings": {}, "results": {"adaptive/seed0": {}}}))
    with pytest.raises(SystemExit, match="older layout"):
        bench.quality.main(["--smoke", "--out", str(old)])


def test_torch_pruning_arithmetic(bench):
    from adapt_prune_tune.models import SMOLLM2_135M

    m = bench.quality_torch_pruning
    counts = m.even_split(12288, 30)  # 409.6 channels a layer
    assert counts[:5] == [409, 410, 409, 410, 410] and counts.count(410) == 18 and sum(counts) == 12288
    # SmolLM2: 30% of the prunable projections = 18,432 MLP channels (40% of them).
    for sparsity, channels in ((0.2, 12288), (0.3, 18432), (0.4, 24576)):
        n = m.mlp_channels_to_remove(SMOLLM2_135M, sparsity)
        assert n == channels and n * 3 * 576 == pytest.approx(sparsity * SMOLLM2_135M.prunable_params())


def test_torch_pruning_smoke(bench, tmp_path, monkeypatch, python_docs_dir, novels_dir):
    pytest.importorskip("torch_pruning")
    m = bench.quality_torch_pruning
    out = tmp_path / "quality.json"
    doc = m.main(["--smoke", "--targets", "0.4", "--steps", "1", "--out", str(out)])
    section = doc["torch_pruning"]
    # The Hugging Face model read through CausalLMLogits gives our torchtune model's numbers.
    assert section["original"]["matches_ours"] and section["original"]["max_relative_difference"] < 1e-5
    res = section["results"]["taylor/local/seed0/steps1@0.40"]
    at = res["at"]["0.40"]
    assert set(at["perplexity"]) == set(bench._quality_eval.TEXTS)
    assert max(at["intermediate_dim"]) - min(at["intermediate_dim"]) <= 1 and res["tied_embeddings"] == "stayed tied"
    assert at["params"] == section["original"]["params"] - at["mlp_channels_removed"] * 3 * 64
    assert res["pruner_step_seconds_per_step"] > 0 and "Torch-Pruning taylor (local" in doc["table"]

    monkeypatch.setattr(m, "prune_trajectory", lambda *a, **k: pytest.fail("a finished trajectory ran again"))
    assert m.main(["--smoke", "--targets", "0.4", "--steps", "1", "--out", str(out)])["torch_pruning"]["results"]
    monkeypatch.undo()
    doc = m.main(["--smoke", "--importance", "magnitude", "--scope", "global", "--targets", "0.4", "--steps", "1",
                  "--out", str(out)])
    glob = doc["torch_pruning"]["results"]["magnitude/global/seed0/steps1@0.40"]["at"]["0.40"]
    assert glob["params"] == at["params"]  # model-wide ranking, same count
