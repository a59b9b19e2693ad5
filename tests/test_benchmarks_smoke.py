"""Smoke tests of the performance benchmarks (benchmarks/perf*.py) and the GPU check's sections
(benchmarks/gpu_*.py): their functions run on tiny shapes on the CPU and report every key.

No timing assertions (the figures come from `python benchmarks/perf.py` and
`bash benchmarks/gpu_check.sh`); this only keeps the benchmark code working as the package
changes. Well under a minute on 2 cores. The GPU check's recipe section (a whole `tune run`)
is exercised by `bash benchmarks/gpu_check.sh --dry-run`, not here; its config and checks are.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    """The benchmark modules, imported the way their scripts import each other."""
    path = list(sys.path)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        names = ("_harness", "_runs", "perf", "perf_overhead", "perf_profile", "perf_scaling", "gpu_check",
                 "gpu_assets", "gpu_prune_loop", "gpu_compile", "gpu_fp8", "gpu_recipe_run", "gpu_recipe_fp8",
                 "gpu_recipe_distill", "lowbit_optimizer", "lowbit_compile",
                 "checkpoint_save", "calibration_loss")
        yield SimpleNamespace(**{n: importlib.import_module(n) for n in names})
    finally:
        sys.path[:] = path


SMALL = dict(num_samples=4, seq_len=16, batch_size=2)


def test_perf_entry_point_keeps_every_section(bench):
    assert list(bench.perf.SECTIONS) == ["overhead", "recipe", "profile", "scaling", "memory", "memory_small",
                                         "throughput", "compile", "share"]
    assert bench.perf.SECTIONS["memory_small"].key == "memory_small_activations"
    with pytest.raises(SystemExit):
        bench.perf.main(["--only", "overhead,nonsense"])


def test_overhead_reports_ratio_and_parts(bench):
    r = bench._harness.strip_private(bench.perf_overhead.measure_overhead("micro", iterations=2, **SMALL))
    for key in ("fb_seconds", "iteration_seconds", "ratio", "parts_seconds", "rows", "calib_tokens",
                "params_before", "params_after"):
        assert key in r, key
    assert set(r["parts_seconds"]) == {"calibrate", "score", "plan", "surgery"}
    assert r["params_after"] < r["params_before"]
    assert r["calib_tokens"] == 4 * 16 and r["ratio"] > 0
    for row in r["rows"]:  # the parts add up to the iteration, measured around measure_and_plan
        parts = row["calibrate"] + row["score"] + row["plan"] + row["surgery"]
        assert parts == pytest.approx(row["total"], rel=1e-6) and min(row["calibrate"], row["plan"]) > 0
    json.dumps(r)


def test_timed_calls_times_and_restores(bench):
    from adapt_prune_tune import pruner

    class Thing:
        def method(self):
            return 1

    thing, original = Thing(), pruner.calibrate
    with bench._harness.timed_calls((pruner, "calibrate"), (thing, "method")) as seconds:
        assert pruner.calibrate is not original and thing.method() == 1
    assert pruner.calibrate is original and "method" not in vars(thing)
    assert seconds["calibrate"] == 0.0 and seconds["method"] > 0.0


def test_profile_and_scaling(bench):
    prof = bench.perf_profile.profile_iteration("micro", **SMALL)
    assert {"parts_seconds", "cprofile_top", "torch_ops_top"} <= set(prof)
    assert any(row["function"].endswith(":calibrate") for row in prof["cprofile_top"])
    scaling = bench.perf_scaling.measure_scaling(["micro"], [32, 64], iterations=1, seq_len=16, batch_size=2,
                                                 token_shape="micro")
    assert [r["calib_tokens"] for r in scaling["by_calib_tokens"]] == [32, 64]
    assert {"seconds_per_1k_tokens", "fixed_seconds"} <= set(scaling["calib_tokens_fit"])
    json.dumps(scaling)


def test_log_parsing_and_targets(bench, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "log_1.txt").write_text(
        "".join(f"Step {i} | loss:2.5 lr:2e-05 tokens_per_second_per_gpu:{100 + i} grad_norm:tensor(1.2) \n"
                for i in range(1, 7))
    )
    rows = bench._runs.parse_disk_log(logs)
    assert len(rows) == 6 and rows[0]["tokens_per_second_per_gpu"] == 101 and rows[0]["grad_norm"] == 1.2
    tps = bench._runs.steady_tokens_per_second(rows, warmup=2)
    assert tps["median"] == 104.5 and tps["warmup_dropped"] == 2
    table = bench._harness.targets_table({
        "overhead": {"tiny": {"ratio": 1.02}},
        "throughput": {"tiny": {"ratio": 0.99}},
        "memory": {"runs": [{"calib_batch_size": 8, "prune_extra_mb": -3.0}]},
    })
    assert [r["met"] for r in table] == [True, True, True]


def test_results_merge_keeps_other_sections(bench, tmp_path):
    path = tmp_path / "perf.json"
    path.write_text(json.dumps({"command": "old", "sections": ["profile"], "machine": {}, "profile": {"x": 1}}))
    result = bench._harness.open_results(path, True, "new", ["overhead"], quick=True)
    result["overhead"] = {"tiny": {"ratio": 1.0}}
    bench._harness.save_results(result, path, started=0.0)
    saved = json.loads(path.read_text())
    assert saved["profile"] == {"x": 1} and saved["overhead"]["tiny"]["ratio"] == 1.0
    assert saved["merged_runs"][0]["command"] == "old" and saved["command"] == "new"


def test_gpu_prune_loop_cpu_sized(bench, tmp_path, monkeypatch):
    sizes = dict(bench.gpu_prune_loop.SIZES["dry_run"], shape="micro", iterations=2, calib=(4, 16), calib_batch=2,
                 train=(2, 16), train_steps=1)
    monkeypatch.setitem(bench.gpu_prune_loop.SIZES, "dry_run", sizes)
    res = bench.gpu_prune_loop.run("cpu", "fp32", True, tmp_path, tmp_path, lambda s: None)
    for key in ("overhead", "recovery", "peak_memory_gb", "planned_peak_gib", "loop_seconds", "rebuild_seconds",
                "targets", "summary"):
        assert key in res, key
    assert {"ours", "stock", "ratio"} <= set(res["recovery"]) and res["recovery"]["ratio"] > 0
    assert all(v > 0 for v in res["planned_peak_gib"].values())
    json.dumps(res)


def test_gpu_compile_sequence_cpu_sized(bench, tmp_path, monkeypatch):
    # The recipe's compile sequence with dynamo's graph capture but no inductor (seconds, not minutes);
    # each trajectory runs in a process of its own, which reads the backend from the environment.
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "eager")
    res = bench.gpu_compile.run("cpu", "fp32", True, tmp_path, tmp_path, lambda s: None)
    assert (tmp_path / "partial.json").is_file()  # kept as each trajectory ends, for a timeout
    static, dynamic = res["static"], res["dynamic"]
    assert static["uniform"]["graphs"] >= 1 and dynamic["uniform"]["graphs"] >= 1
    # static: every resize traces its widths anew; dynamic: the first stage (dynamo reset after the
    # stock baseline, as the recipe's first training step) traces the symbolic-width graph, and the
    # second resize reuses it: nothing is traced.
    assert all(st["graphs"] >= 1 for st in static["stages"])
    assert dynamic["stages"][0]["graphs"] >= 1 and dynamic["stages"][1]["graphs"] == 0
    assert all(st["distinct_layer_shapes"] >= 2 for st in static["stages"] + dynamic["stages"])
    # The default runs first and last; its figure is the median of both trajectories' ratios.
    both = [dynamic["compile_ratio_after_resize"], res["dynamic_repeats"][0]["compile_ratio_after_resize"]]
    assert res["compile_ratio_after_resize_runs"] == both
    assert res["compile_ratio_after_resize"] == pytest.approx(sum(both) / 2)
    json.dumps(res)


def test_gpu_fp8_skips_without_a_recent_gpu(bench, tmp_path):
    res = bench.gpu_fp8.run("cpu", "fp32", True, tmp_path, tmp_path, lambda s: None)
    assert res["status"] == "skipped" and "8.9" in res["reason"]
    res = bench.gpu_recipe_fp8.run("cpu", "fp32", True, tmp_path, tmp_path, lambda s: None)
    assert res["status"] == "skipped" and "8.9" in res["reason"]


def test_gpu_recipe_overrides_and_checks(bench, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from adapt_prune_tune import configs

    m = bench.gpu_recipe_run
    monkeypatch.setenv("ADAPT_PRUNE_TUNE_CACHE", str(tmp_path))  # where the section lays out its cache
    packaged = OmegaConf.load(configs.resolve("smollm2/135M_adapt"))
    s = m.SETTINGS["gpu"]
    cfg = OmegaConf.merge(packaged, OmegaConf.from_dotlist(m.recipe_overrides(s, dry_run=False)))
    assert (cfg.device, cfg.dtype, cfg.compile) == ("cuda", "bf16", True)
    assert cfg.model._component_ == packaged.model._component_  # the real SmolLM2 builder
    assert cfg.adapt.stages == 2 and cfg.adapt.total_tokens is None and cfg.adapt.total_steps == s["total_steps"]
    assert cfg.pruning.method.round_to == 64
    assert cfg.checkpointer.checkpoint_dir == str(tmp_path / "models" / "SmolLM2-135M-Instruct")
    assert cfg.heldout.texts.austen_novels.data_dir == str(tmp_path / "data" / "austen-novels")
    fp8 = m.recipe_overrides(s, dry_run=False, extra=bench.gpu_recipe_fp8.OVERRIDES)
    assert fp8[-3:] == list(bench.gpu_recipe_fp8.OVERRIDES)  # last: they win over the section's own
    kd = m.recipe_overrides(s, dry_run=False, extra=bench.gpu_recipe_distill.OVERRIDES)
    kd_cfg = OmegaConf.merge(packaged, OmegaConf.from_dotlist([o for o in kd if not o.startswith("~")]))
    assert kd_cfg.distill.enabled and kd_cfg.optimizer._component_ == "torchao.optim.AdamW8bit"
    assert "~optimizer.fused" in kd  # AdamW8bit takes no `fused`
    dry = OmegaConf.merge(packaged, OmegaConf.from_dotlist(m.recipe_overrides(m.SETTINGS["dry_run"], True)))
    assert (dry.device, dry.model.path) == ("cpu", dry.model_dir)
    stage = {"params": 10, "seconds_prune": 1.0, "calib_loss_before_prune": 9.0, "calib_loss_after_prune": 9.5}
    record = {
        "stages": [{**stage, "stage": 1, "heldout_ppl_after_prune": 900.0, "heldout_ppl_after_train": 500.0},
                   {**stage, "stage": 2, "heldout_ppl_after_prune": 600.0, "heldout_ppl_after_train": 700.0}],
        "train_log": [{"stage": k, "loss": loss, "tokens_per_second_per_gpu": tps}
                      for k in (1, 2) for loss, tps in ((9.0, 10.0), (8.0, 100.0), (7.0, 100.0), (6.0, 100.0))],
    }
    checks = m.stage_checks(record, tokens_per_step=100)
    assert [c["recovers"] for c in checks] == [True, False]  # stage 2's held-out perplexity went up
    assert checks[0]["first_step_excess_s"] == pytest.approx(9.0)


def test_gpu_assets_are_small_and_readable(bench, tmp_path, smollm2_dir, python_docs_dir, novels_dir):
    from adapt_prune_tune import corpus, novels
    from adapt_prune_tune.perplexity import text_windows
    from adapt_prune_tune.tokenizer import smollm2_tokenizer

    sizes = bench.gpu_assets.prepare(tmp_path, smollm2_dir, python_docs_dir, novels_dir)
    assert sum(sizes.values()) < 8 * 2**20
    assert {"smollm2/config.json", "smollm2/tokenizer.json", "python-docs/train.jsonl",
            "python-docs/calibration.jsonl", "python-docs/eval.jsonl", "austen-novels/eval.jsonl"} <= set(sizes)
    tok = smollm2_tokenizer(str(tmp_path / "smollm2"))
    need = bench.gpu_recipe_run.SETTINGS["gpu"]["heldout_tokens"]
    for text in (corpus.heldout_text(data_dir=tmp_path / "python-docs"),
                 novels.heldout_text(data_dir=tmp_path / "austen-novels")):
        assert text_windows(tok, text, need, 256).shape == (need // 256, 256)


def test_gpu_check_driver_records_each_section(bench, tmp_path):
    args = SimpleNamespace(dry_run=True, assets=tmp_path)
    done = bench.gpu_check.run_section("fp8", 120, args, tmp_path)  # a process of its own, skipped on CPU
    assert done["status"] == "skipped" and "8.9" in done["summary"]
    late = bench.gpu_check.run_section("prune_loop", 0.5, args, tmp_path)  # killed at its timeout
    assert late["status"] == "timeout" and late["returncode"] is None
    out = tmp_path / "gpu_check.json"
    record = bench.gpu_check.open_record(out, "cpu_dry_run")
    record["sections"]["fp8"] = done
    bench.gpu_check.write_record(record, out)
    again = bench.gpu_check.open_record(out, "cpu_dry_run")
    assert again["sections"]["fp8"]["status"] == "skipped"
    assert bench.gpu_check.open_record(out, "gpu")["sections"] == {}  # a dry run never merges into GPU results


def test_peak_rss_is_the_commands_own(bench):
    code = "import sys; b = bytearray(300 * 1024 * 1024); print('done'); sys.exit(0)"
    proc, peak, seconds = bench._harness.run_with_peak_rss([sys.executable, "-c", code], threads=1)
    assert proc.stdout.strip() == "done" and "PEAK_RSS_KB" not in proc.stdout
    assert 300 * 1024 * 1024 <= peak < 600 * 1024 * 1024 and seconds > 0
    with pytest.raises(RuntimeError, match="failed \\(3\\)"):
        bench._harness.run_with_peak_rss([sys.executable, "-c", "import sys; sys.exit(3)"], threads=1)


def test_low_bit_state_is_counted_by_its_parts(bench):
    import torch
    from torchao.optim import AdamW8bit

    weights = [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(2)]
    sizes = {}
    for name, optimizer in (("fp32", torch.optim.AdamW(weights)), ("8bit", AdamW8bit(weights))):
        for w in weights:
            w.grad = torch.randn_like(w)
        optimizer.step()
        sizes[name] = sum(bench.lowbit_optimizer.tensor_bytes(v) for st in optimizer.state.values() for v in st.values())
    assert sizes["fp32"] >= 2 * 2 * 256 * 256 * 4  # two fp32 moments per weight
    assert sizes["fp32"] / 4.5 < sizes["8bit"] < sizes["fp32"] / 3.5  # one byte per value plus block scales


def test_checkpoint_projection_scales_with_the_ranks(bench):
    def sample(seconds, growth):
        return [{"seconds": seconds, "peak_growth_bytes": growth}]

    per_rank = [{"samples": {"sharded": sample(1.0, 1e6), "gather": sample(3.0, 5e8)}} for _ in range(2)]
    summary = bench.checkpoint_save.summarize(per_rank, SimpleNamespace(dtype="bf16"))
    assert summary["ratios"]["rank0_seconds_sharded_over_gather"] == pytest.approx(1 / 3)
    eight, thirty_two = (summary["projection_llama3_1_8b_bf16"][k] for k in ("8_gpus", "32_gpus"))
    assert eight["gather_rank0_GB"] == thirty_two["gather_rank0_GB"] == pytest.approx(8_030_261_248 * 6 / 1e9)
    assert eight["sharded_per_rank_GB"] == pytest.approx(4 * thirty_two["sharded_per_rank_GB"])


def test_calibration_loss_compares_finished_runs(bench, tmp_path):
    def record(python, austen, widths):
        stage = {"heldout_after_prune": {"python_tutorial": python, "austen_novels": austen},
                 "calib_loss_before_prune": 3.2, "calib_loss_after_prune": 3.5, "seconds_prune": 60.0,
                 "layers": [{"intermediate_dim": w} for w in widths]}
        return {"params_after": 100, "prune_steps": [{}] * 8, "stages": [stage],
                "heldout_log": [{"event": "original", "ppl": {"python_tutorial": 14.0, "austen_novels": 35.0}}]}

    for loss, ppl in (("ce", (20.0, 80.0)), ("kl", (22.0, 60.0))):
        (tmp_path / f"{loss}_0.20").mkdir()
        (tmp_path / f"{loss}_0.20" / "run_record.json").write_text(json.dumps(record(*ppl, [7, 9])))
    out = tmp_path / "calibration_loss.json"
    result = bench.calibration_loss.main(["--targets", "0.2", "--work", str(tmp_path), "--out", str(out)])
    [row] = result["ratios"]
    assert row["python_tutorial"] == pytest.approx(1.1) and row["austen_novels"] == pytest.approx(0.75)
    assert row["same_layer_widths"]
    assert "adapt.steps_per_stage=8" in result["runs"]["kl"]["0.20"]["command"]
    assert "distill.calibration_loss=kl" in result["runs"]["kl"]["0.20"]["command"]
    assert json.loads(out.read_text())["table"] == result["table"] and "kl ÷ ce" in result["table"]
    with pytest.raises(SystemExit):
        bench.calibration_loss.main(["--targets", "1.5", "--work", str(tmp_path), "--out", str(out)])


def test_lowbit_compile_rounds_are_all_new_widths_and_the_candidate_compiles_dynamic(bench):
    m = bench.lowbit_compile
    rounds = [m.widths(r, 6) for r in range(3)]
    flat = [w for ws in rounds for w in ws]
    assert len(set(flat)) == len(flat) and min(flat) > 0  # every round's shapes are new, as after a cut
    seen = {}
    fake = SimpleNamespace(compile=lambda fn, **kw: seen.update(kw) or fn, float32="f32")
    proxy = m._DynamicCompile(fake)
    assert proxy.compile(len, fullgraph=True, dynamic=False) is len
    assert seen == {"fullgraph": True, "dynamic": True} and proxy.float32 == "f32"
