"""``adapt-prune-tune compare``: two small run directories in, one table and one figure out."""

import json

import pytest

from adapt_prune_tune.cli import main
from adapt_prune_tune.compare import (
    COMPARE_MD,
    COMPARE_PNG,
    comparison_table,
    compare_runs,
    config_differences,
    run_labels,
)


def _stages(tokens):
    return [
        {"stage": k + 1, "tokens": t, "seconds_prune": 2.0, "heldout_ppl_after_prune": 20.0 + k,
         "heldout_ppl_after_train": 15.0 + k}
        for k, t in enumerate(tokens)
    ]


def _new_run(tmp_path):
    """A record with per-text perplexity and a held-out log (as the recipe writes now)."""
    log = [
        {"step": 0, "tokens": 0, "stage": 0, "event": "original", "ppl": {"python_docs": 14.0, "austen": 30.0}},
        {"step": 0, "tokens": 0, "stage": 1, "event": "pruned", "ppl": {"python_docs": 20.0, "austen": 40.0}},
        {"step": 5, "tokens": 1000, "stage": 1, "event": "trained", "ppl": {"python_docs": 15.0, "austen": 33.0}},
        {"step": 5, "tokens": 1000, "stage": 2, "event": "pruned", "ppl": {"python_docs": 21.0, "austen": 41.0}},
        {"step": 15, "tokens": 3000, "stage": 2, "event": "trained", "ppl": {"python_docs": 16.0, "austen": 34.0}},
    ]
    record = {
        "params_before": 134_515_008, "params_after": 113_300_000, "seconds_run": 660.0,
        "stages": _stages([1000, 2000]), "heldout_log": log,
        "perplexity_by_text": {
            "python_docs": {"original": 14.0, "pruned": 21.0, "recovered": 16.0},
            "austen": {"original": 30.0, "pruned": 41.0, "recovered": 34.0},
        },
        "config_name": "smollm2/135M_adapt", "overrides": ["distill.enabled=True"],
        "config": {"output_dir": str(tmp_path / "a"), "distill": {"enabled": True}, "adapt": {"stages": 2}},
    }
    return record


def _old_run(tmp_path):
    """A record from before the held-out log and per-text results."""
    return {
        "params_before": 134_515_008, "params_after": 107_600_000, "seconds_run": 120.0,
        "stages": _stages([500, 500, 1000]),
        "perplexity": {"original": 14.0, "pruned": 22.0, "recovered": 17.0},
        "heldout": {"num_tokens": 8192, "window": 512},
        "command": "adapt_prune_recipe --config /tmp/x.yaml",
        "config": {"output_dir": str(tmp_path / "b"), "distill": {"enabled": False}, "adapt": {"stages": 3}},
    }


@pytest.fixture
def runs(tmp_path):
    dirs = []
    for name, record in (("kd", _new_run(tmp_path)), ("plain", _old_run(tmp_path))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run_record.json").write_text(json.dumps(record))
        dirs.append(tmp_path / name)
    return dirs


def test_compare_writes_table_and_figure(runs, tmp_path):
    path = compare_runs(runs, tmp_path / "out")
    text = path.read_text()
    assert path == tmp_path / "out" / COMPARE_MD
    assert (tmp_path / "out" / COMPARE_PNG).read_bytes()[:4] == b"\x89PNG"
    assert f"]({COMPARE_PNG})" in text
    header = (
        "| run | parameters | python_docs: original → pruned → recovered | austen: original → pruned → recovered "
        "| heldout: original → pruned → recovered | training tokens | wall time | prune share |"
    )
    assert header in text
    assert "| kd | 134.52M → 113.30M (0.842×) | 14.00 → 21.00 → 16.00 | 30.00 → 41.00 → 34.00 | – | 3,000 | 11.0 min | 0.6% |" in text
    assert "| plain | 134.52M → 107.60M (0.800×) | – | – | 14.00 → 22.00 → 17.00 | 2,000 | 2.0 min | 5.0% |" in text
    # What makes the runs different, and how to redo each.
    assert "- kd: `adapt.stages=2`, `distill.enabled=True`" in text
    assert "- kd: `tune run adapt_prune_recipe --config smollm2/135M_adapt distill.enabled=True`" in text
    assert "- plain: `tune run adapt_prune_recipe --config /tmp/x.yaml`" in text


def test_comparison_table_and_differences_are_data():
    records = {"a": {"perplexity": {"original": 10.0}}, "b": {}}
    header, rows = comparison_table(records)
    assert header[2] == "heldout: original → pruned → recovered"
    assert rows[0][2] == "10.00 → – → –" and rows[1][2] == "–"
    assert rows[1][1:] == ["–", "–", "–", "–", "–"]
    differences = config_differences({
        "a": {"config": {"output_dir": "/a", "lr": 1e-4, "x": {"y": 1}}},
        "b": {"config": {"output_dir": "/b", "lr": 1e-4}},
    })
    assert differences == {"a": ["x.y=1"], "b": ["x.y=<unset>"]}
    # A section in one run, null in another: each run says it once, in its own terms.
    differences = config_differences({
        "a": {"config": {"heldout": {"window": 256, "texts": {"t": "f"}}}},
        "b": {"config": {"heldout": None}},
    })
    assert differences == {"a": ["heldout.texts.t=f", "heldout.window=256"], "b": ["heldout=None"]}


def test_run_labels_disambiguate_equal_names(tmp_path):
    assert run_labels([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]) == [
        str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "c"
    ]


def test_cli_compare_prints_and_writes(runs, tmp_path, capsys):
    main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert "| kd |" in out and "| plain |" in out
    assert (tmp_path / "cmp" / COMPARE_MD).is_file()
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "cmp2")])
