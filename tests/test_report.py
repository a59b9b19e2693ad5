"""The run report: a synthetic record in, report.md and valid PNGs out."""

import json
import math
import os

import pytest

from adapt_prune_tune.models import DecoderArch, LayerArch, decoder_from_arch
from adapt_prune_tune.report import (
    HELDOUT_PNG,
    PRUNE_STEPS_PNG,
    TRAINING_PNG,
    WIDTHS_PNG,
    format_count,
    base_model_name,
    heldout_curve,
    moving_average,
    prune_points,
    smoothing_window,
    stage_starts,
    training_curves,
    worth_it_rows,
    write_report,
)
from adapt_prune_tune.speed import measure_throughput

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_LAYERS = 4


def _arch_pair():
    before = DecoderArch.uniform(
        vocab_size=1000,
        embed_dim=64,
        num_layers=NUM_LAYERS,
        num_heads=8,
        num_kv_heads=2,
        intermediate_dim=256,
        max_seq_len=128,
    )
    after = before.with_layers(
        [LayerArch(8, 2, 256), LayerArch(6, 2, 192), LayerArch(4, 1, 128), LayerArch(2, 1, 64)]
    )
    return before, after


def _record():
    before, after = _arch_pair()
    prune_steps = [
        {
            "step": step,
            "stage": step // 2,
            "layer_importance": [1.0 - 0.1 * i + 0.01 * step for i in range(NUM_LAYERS)],
            "layer_sparsity": [0.05 * i + 0.02 * step for i in range(NUM_LAYERS)],
            "calib_loss": 3.0 + 0.1 * step,
            "params": before.num_params() - 1000 * step,
            "seconds": 0.5,
        }
        for step in range(4)
    ]
    train_log = [
        {
            "step": step,
            "stage": step // 10,
            "loss": 4.0 / (1 + step),
            "lr": 1e-5,
            "tokens_per_second": 900.0,
        }
        for step in range(30)
    ]
    record = {
        "base_model": "tiny-test-model",
        "command": "tune run adapt_prune_recipe --config tiny.yaml",
        "config": {"pruning": {"target_sparsity": 0.5, "num_stages": 3}},
        "arch_before": before.to_dict(),
        "arch_after": after.to_dict(),
        "params_before": before.num_params(),
        "params_after": after.num_params(),
        "prunable_params_before": before.prunable_params(),
        "prunable_params_after": after.prunable_params(),
        "prune_steps": prune_steps,
        "stages": [
            {
                "stage": k,
                "tokens": 10_000 * (k + 1),
                "train_steps": 10,
                "params": after.num_params(),
                "calib_loss_before_prune": 3.0,
                "calib_loss_after_prune": 3.4,
                "train_loss_end": 2.9,
                "seconds_prune": 1.5,
                "seconds_train": 12.0,
                "heldout_ppl_after_prune": 30.0 + k,
                "heldout_ppl_after_train": 20.0 + k,
            }
            for k in range(3)
        ],
        "train_log": train_log,
        "evaluation": {
            "original": {
                "heldout_next_sentence": {"acc": 0.61, "acc_stderr": 0.02},
                "heldout_perplexity": {"word_perplexity": 25.3},
            },
            "pruned": {
                "heldout_next_sentence": {"acc": 0.55, "acc_stderr": 0.02},
                "heldout_perplexity": {"word_perplexity": 40.1},
            },
        },
        "throughput": {
            "original_tokens_per_second": 12000.0,
            "pruned_tokens_per_second": 20400.0,
            "seq_len": 256,
            "batch_size": 4,
        },
        "perplexity": {"original": 13.2, "pruned": 80.0, "recovered": 20.5},
    }
    # The record is what the recipe writes to disk: it must survive JSON.
    return json.loads(json.dumps(record))


def _assert_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 1000


def test_full_record_renders_every_section(tmp_path):
    report = write_report(_record(), tmp_path / "out")
    assert report == tmp_path / "out" / "report.md"
    text = report.read_text()

    assert text.startswith("# Pruning report: tiny-test-model")
    for section in (
        "## Run",
        "## Size and speed",
        "## Architecture",
        "## Prune steps",
        "## Stages",
        "## Held-out perplexity",
        "## Training",
        "## Evaluation",
    ):
        assert section in text
    for png in (WIDTHS_PNG, PRUNE_STEPS_PNG, TRAINING_PNG, HELDOUT_PNG):
        assert f"]({png})" in text
        _assert_png(tmp_path / "out" / png)

    before, after = _arch_pair()
    # Size table: the exact ratios of the counts, and the measured speed-up.
    assert f"{after.num_params() / before.num_params():.3f}×" in text
    assert "| tokens/s (forward) | 12,000 | 20,400 | 1.700× |" in text
    assert "batch 4 × 256 tokens" in text
    assert "| perplexity | 13.2 | 80 | 6.061× |" in text
    # Per-layer widths before → after, and the share of each layer's parameters kept.
    assert "| 3 | 8 → 2 | 2 → 1 | 256 → 64 |" in text
    assert "| 0 | 8 → 8 | 2 → 2 | 256 → 256 | 1.000 |" in text
    # One row per prune step and per stage; both models side by side in the evaluation.
    assert text.count("| 0.5 |") == 4
    assert "| heldout_next_sentence | acc | 0.6100 ± 0.0200 | 0.5500 ± 0.0200 |" in text
    assert "| heldout_perplexity | word_perplexity | 25.30 | 40.10 |" in text
    assert '"target_sparsity": 0.5' in text
    assert "`tune run adapt_prune_recipe --config tiny.yaml`" in text


def test_heldout_curve_follows_the_run_order():
    record = _record()
    curve = heldout_curve(record)
    assert curve[0] == ("original", 13.2)
    assert curve[1:3] == [("stage 0 pruned", 30.0), ("stage 0 trained", 20.0)]
    assert len(curve) == 1 + 2 * len(record["stages"])
    # A prune-only run has no "trained" points; a run without held-out data has no curve.
    for stage in record["stages"]:
        stage.pop("heldout_ppl_after_train")
    assert [label for label, _ in heldout_curve(record)][-1] == "stage 2 pruned"
    assert heldout_curve({"stages": [{"stage": 1}]}) == []


def test_minimal_record_has_only_architecture_sections(tmp_path):
    before, after = _arch_pair()
    report = write_report(
        {"arch_before": before.to_dict(), "arch_after": after.to_dict()}, tmp_path
    )
    text = report.read_text()
    assert text.startswith("# Pruning report\n")
    assert "## Size and speed" in text and "## Architecture" in text
    for absent in (
        "## Run",
        "## Prune steps",
        "## Stages",
        "## Training",
        "## Evaluation",
        "tokens/s",
    ):
        assert absent not in text
    # Parameter counts fall back to the exact counts of the architectures.
    assert format_count(before.num_params()) in text and format_count(after.num_params()) in text
    _assert_png(tmp_path / WIDTHS_PNG)
    assert not (tmp_path / TRAINING_PNG).exists()


def test_architectures_must_have_the_same_depth(tmp_path):
    before, _ = _arch_pair()
    shallow = DecoderArch.uniform(
        vocab_size=1000,
        embed_dim=64,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        intermediate_dim=256,
        max_seq_len=128,
    )
    with pytest.raises(ValueError, match="layers"):
        write_report({"arch_before": before.to_dict(), "arch_after": shallow.to_dict()}, tmp_path)


def test_stage_starts_mark_the_first_step_of_each_stage():
    log = [{"step": s, "stage": st} for s, st in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]]
    assert stage_starts(log) == [(1, 1), (3, 2), (5, 3)]


def test_format_count():
    assert format_count(134_515_008) == "134.52M"
    assert format_count(8_030_261_248) == "8.03B"
    assert format_count(999) == "999"


def test_measure_throughput_is_positive_and_restores_mode():
    arch = DecoderArch.uniform(
        vocab_size=64,
        embed_dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_dim=64,
        max_seq_len=64,
    )
    model = decoder_from_arch(arch)
    model.train()
    speed = measure_throughput(model, arch.vocab_size, seq_len=32, batch_size=2, steps=2)
    assert math.isfinite(speed) and speed > 0
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        measure_throughput(model, arch.vocab_size, steps=0)


# ----- what a person reads first: the worth-it table, speed, curves -----


def _speed(forward, generate, memory):
    return {
        "forward_tokens_per_second": forward,
        "generate_tokens_per_second": generate,
        "prefill_seconds": 0.01,
        "forward_peak_memory_bytes": 2 * memory,
        "generate_peak_memory_bytes": memory,
        "weights_bytes": memory - 1000,
        "memory_measure": "cuda max_memory_allocated",
        "device": "cuda (NVIDIA H200)",
        "dtype": "bfloat16",
        "seq_len": 512,
        "batch_size": 4,
        "new_tokens": 128,
        "prompt_len": 32,
    }


def _distillation_record():
    """A newer record: speed, per-text perplexity, held-out log, distillation losses."""
    record = _record()
    del record["throughput"]
    record["seconds_run"] = 600.0
    record["speed"] = {
        "original": _speed(10_000.0, 50.0, 600 * 2**20),
        "pruned": _speed(12_500.0, 60.0, 450 * 2**20),
        "device": "cuda (NVIDIA H200)",
    }
    record["perplexity_by_text"] = {
        "python_docs": {"original": 13.2, "pruned": 80.0, "recovered": 20.5},
        "austen": {"original": 30.0, "pruned": 120.0, "recovered": 45.25},
    }
    record["heldout"] = {"num_tokens": 8192, "window": 512, "texts": ["python_docs", "austen"]}
    log, seen = [], 0
    log.append({"step": 0, "tokens": 0, "stage": 0, "event": "original",
                "ppl": {"python_docs": 13.2, "austen": 30.0}})
    for k, stage in enumerate(record["stages"]):
        log.append({"step": 10 * k, "tokens": seen, "stage": k, "event": "pruned",
                    "ppl": {"python_docs": 30.0 + k, "austen": 60.0 + k}})
        seen += stage["tokens"]
        log.append({"step": 10 * k + 10, "tokens": seen, "stage": k, "event": "trained",
                    "ppl": {"python_docs": 20.0 + k, "austen": 40.0 + k}})
    record["heldout_log"] = log
    for row in record["train_log"]:
        row.update(ce_loss=2 * row["loss"], kd_loss=0.1, teacher_ce_loss=2.0)
        row["tokens_per_second_per_gpu"] = row.pop("tokens_per_second")
    return record


def test_worth_it_table_comes_first(tmp_path):
    text = write_report(_distillation_record(), tmp_path).read_text()
    head = text.split("## ")[0]  # everything before the first section
    assert head.startswith("# Pruning report: tiny-test-model\n\n| | | |\n")
    assert "| spent | wall time | 10.0 min |" in head
    # 3 stages × 1.5 s of 600 s; 10k + 20k + 30k tokens.
    assert "|  | pruning's share of it | 0.8% (4 s) |" in head
    assert "|  | training tokens | ≈ 60,000 |" in head
    before, after = _arch_pair()
    assert f"| got | parameters | {format_count(before.num_params())} → {format_count(after.num_params())}" in head
    assert "| held-out perplexity, python_docs (original → pruned → recovered) | 13.20 → 80.00 → 20.50 |" in head
    assert "| held-out perplexity, austen (original → pruned → recovered) | 30.00 → 120 → 45.25 |" in head
    assert "| forward speed, pruned ÷ original | 1.25× |" in head
    assert "| generation speed, pruned ÷ original | 1.20× |" in head
    assert "| peak memory (generation), pruned ÷ original | 0.75× |" in head


def test_worth_it_rows_of_an_old_record_use_what_it_has():
    record = _record()  # no seconds_run, perplexity of one text, forward throughput only
    before, after = _arch_pair()
    rows = {what: value for _, what, value in worth_it_rows(record, before, after)}
    assert "wall time" not in rows and "pruning's share of it" not in rows
    assert rows["training tokens"] == "≈ 60,000"
    assert rows["held-out perplexity, heldout (original → pruned → recovered)"] == "13.20 → 80.00 → 20.50"
    assert rows["forward speed, pruned ÷ original"] == "1.70×"
    assert "generation speed, pruned ÷ original" not in rows


def test_speed_rows_in_size_table(tmp_path):
    text = write_report(_distillation_record(), tmp_path).read_text()
    assert "| tokens/s (forward) | 10,000 | 12,500 | 1.250× |" in text
    assert "| tokens/s (generation) | 50 | 60 | 1.200× |" in text
    assert "| peak memory (generation) | 600.0 MiB | 450.0 MiB | 0.750× |" in text
    assert "| peak memory (forward) | 1.17 GiB | 900.0 MiB | 0.750× |" in text
    assert "Measured on cuda (NVIDIA H200) in bfloat16" in text
    assert "128 new tokens greedy" in text and "cuda max_memory_allocated" in text


def test_heldout_section_has_every_text_over_tokens(tmp_path):
    text = write_report(_distillation_record(), tmp_path).read_text()
    assert "| | training tokens | python_docs | austen |" in text.replace("|  |", "| |")
    assert "| stage 0 pruned | 0 | 30.00 | 60.00 |" in text
    assert "| stage 2 trained | 60,000 | 22.00 | 42.00 |" in text
    _assert_png(tmp_path / HELDOUT_PNG)


def test_moving_average_restarts_at_each_stage():
    values = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0]
    assert moving_average(values, 1) == values
    assert moving_average(values, 2) == [1.0, 1.5, 2.5, 6.5, 15.0, 25.0]
    # A new stage starts a new average: the cut's jump is not smeared backwards or forwards.
    assert moving_average(values, 2, [1, 1, 1, 2, 2, 2]) == [1.0, 1.5, 2.5, 10.0, 15.0, 25.0]
    assert moving_average(values, 3, [1, 1, 1, 2, 2, 2]) == [1.0, 1.5, 2.0, 10.0, 15.0, 20.0]
    with pytest.raises(ValueError):
        moving_average(values, 0)


def test_smoothing_window_grows_with_the_run():
    assert [smoothing_window(n) for n in (1, 12, 81, 1000, 100_000)] == [1, 1, 3, 40, 200]


def test_training_curves_of_a_distillation_log():
    log = _distillation_record()["train_log"]
    curves = training_curves(log)
    assert set(curves) == {"loss", "ce_loss", "teacher_ce_loss", "kd_loss"}
    loss = curves["loss"]
    assert loss.window == smoothing_window(30) == 1
    assert loss.steps == list(range(30)) and loss.smooth == pytest.approx(loss.raw)
    long_log = [{"step": s, "stage": s // 100, "loss": float(s % 2), "lr": 1.0} for s in range(300)]
    smooth = training_curves(long_log)["loss"]
    assert smooth.window == 12 and "ce_loss" not in training_curves(long_log)
    assert smooth.smooth[0] == 0.0 and smooth.smooth[50] == pytest.approx(0.5)
    assert smooth.smooth[100] == 0.0  # stage 1 begins: its average starts over
    # The cuts fall half a step before each stage's first training step.
    assert prune_points(long_log) == [(-0.5, 0), (99.5, 1), (199.5, 2)]


def test_training_section_reads_distillation_and_per_gpu_speed(tmp_path):
    text = write_report(_distillation_record(), tmp_path).read_text()
    assert "teacher's cross-entropy" in text
    assert "mean training throughput 900 tokens/s per device" in text
    _assert_png(tmp_path / TRAINING_PNG)


def test_real_tiny_records_render(tmp_path):
    """Records as the recipe wrote them before and after the held-out log existed."""
    before, after = _arch_pair()
    base = {"arch_before": before.to_dict(), "arch_after": after.to_dict(), "seconds_run": 31.6,
            "command": "/x/recipes/adapt_prune_recipe.py --config /tmp/kd1/config.yaml"}
    stages = [
        {"stage": 1, "tokens": 1004, "train_steps": 4, "seconds_prune": 4.2, "heldout_ppl_after_prune": 49188.7,
         "heldout_ppl_after_train": 17062.6},
        {"stage": 2, "tokens": 2007, "train_steps": 8, "seconds_prune": 4.2, "heldout_ppl_after_prune": 17078.1,
         "heldout_ppl_after_train": 2584.2},
    ]
    old = {**base, "stages": stages, "perplexity": {"original": 49249.8, "pruned": 17078.1, "recovered": 2584.2},
           "heldout": {"num_tokens": 576, "window": 64, "batch_size": 4}}
    text = write_report(old, tmp_path / "old").read_text()
    assert "| got | parameters |" in text
    assert "heldout (original → pruned → recovered) | 49,250 → 17,078 → 2,584 |" in text
    assert "| stage 2 trained | 3,011 | 2,584 |" in text  # tokens summed over the stages
    assert "`tune run adapt_prune_recipe --config /tmp/kd1/config.yaml`" in text
    _assert_png(tmp_path / "old" / HELDOUT_PNG)


def test_report_names_the_base_model_by_its_hub_id(tmp_path):
    # A download directory named after a known model, with no config.json naming it.
    local = tmp_path / "models" / "SmolLM2-135M-Instruct"
    local.mkdir(parents=True)
    assert base_model_name({"base_model": str(local)}) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_name({"base_model": "meta-llama/Llama-3.1-8B-Instruct"}) == "meta-llama/Llama-3.1-8B-Instruct"
    unknown = tmp_path / "my-own-model"
    unknown.mkdir()
    assert base_model_name({"base_model": str(unknown)}) == str(unknown)  # nothing identifies it: as recorded


def test_report_of_a_run_without_evaluation_needs_no_lm_eval(tmp_path):
    """The GPU check's machine trains and reports without lm-eval installed."""
    import subprocess
    import sys

    (tmp_path / "record.json").write_text(json.dumps({k: v for k, v in _record().items() if k != "evaluation"}))
    code = (
        "import json, sys; sys.modules['lm_eval'] = None\n"  # any lm_eval import now fails
        "from adapt_prune_tune.report import write_report\n"
        f"write_report(json.load(open({str(tmp_path / 'record.json')!r})), {str(tmp_path / 'out')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MPLBACKEND": "Agg"})
    assert (tmp_path / "out" / "report.md").is_file()
