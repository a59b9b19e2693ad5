"""Smoke test of benchmarks/perf.py: its functions run on a tiny shape and report every key.

No timing assertions (the figures come from `python benchmarks/perf.py`); this only keeps the
benchmark code working as the package changes. Runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def perf():
    spec = importlib.util.spec_from_file_location("perf_bench", ROOT / "benchmarks" / "perf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = dict(num_samples=4, seq_len=16, batch_size=2)


def test_overhead_reports_ratio_and_parts(perf):
    r = perf.strip_private(perf.measure_overhead("micro", iterations=2, **SMALL))
    for key in ("fb_seconds", "iteration_seconds", "ratio", "parts_seconds", "rows", "calib_tokens",
                "params_before", "params_after"):
        assert key in r, key
    assert set(r["parts_seconds"]) == {"calibrate", "score", "plan", "surgery"}
    assert r["params_after"] < r["params_before"]
    assert r["calib_tokens"] == 4 * 16 and r["ratio"] > 0
    json.dumps(r)


def test_profile_and_scaling(perf):
    prof = perf.profile_iteration("micro", **SMALL)
    assert {"parts_seconds", "cprofile_top", "torch_ops_top"} <= set(prof)
    assert any(row["function"].endswith(":calibrate") for row in prof["cprofile_top"])
    scaling = perf.measure_scaling(["micro"], [32, 64], iterations=1, seq_len=16, batch_size=2, token_shape="micro")
    assert [r["calib_tokens"] for r in scaling["by_calib_tokens"]] == [32, 64]
    assert {"seconds_per_1k_tokens", "fixed_seconds"} <= set(scaling["calib_tokens_fit"])
    json.dumps(scaling)


def test_gpu_check_runs_cpu_sized(perf):
    res = perf.run_gpu_check("micro", "cpu", "fp32", iterations=2, target=0.2, calib_samples=4, calib_seq=16,
                             calib_batch=2, train_batch=2, train_seq=32, train_steps=1, log=lambda s: None)
    for key in ("overhead", "recovery", "peak_memory_gb", "scaling", "prune_total_seconds", "rebuild_seconds"):
        assert key in res, key
    assert {"ours_tokens_per_s", "stock_tokens_per_s", "ratio"} <= set(res["recovery"])
    json.dumps(res)


def test_log_parsing_and_targets(perf, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "log_1.txt").write_text(
        "".join(f"Step {i} | loss:2.5 lr:2e-05 tokens_per_second_per_gpu:{100 + i} grad_norm:tensor(1.2) \n"
                for i in range(1, 7))
    )
    rows = perf.parse_disk_log(logs)
    assert len(rows) == 6 and rows[0]["tokens_per_second_per_gpu"] == 101 and rows[0]["grad_norm"] == 1.2
    tps = perf.steady_tokens_per_second(rows, warmup=2)
    assert tps["median"] == 104.5 and tps["warmup_dropped"] == 2
    table = perf.targets_table({
        "overhead": {"tiny": {"ratio": 1.02}},
        "throughput": {"tiny": {"ratio": 0.99}},
        "memory": {"runs": [{"calib_batch_size": 8, "prune_extra_mb": -3.0}]},
    })
    assert [r["met"] for r in table] == [True, True, True]


def test_import_stubs_stand_in_for_missing_modules(perf):
    missing = perf.install_import_stubs(names=("perf_smoke_absent_module",))
    try:
        assert missing == ["perf_smoke_absent_module"]
        from perf_smoke_absent_module.sub import Thing  # noqa: F401

        assert isinstance(Thing.Attribute, type)
        with pytest.raises(RuntimeError):
            Thing()
    finally:
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_StubFinder"]
        for name in [m for m in sys.modules if m.startswith("perf_smoke_absent_module")]:
            del sys.modules[name]
