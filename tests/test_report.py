"""The run report: a synthetic record in, report.md and valid PNGs out."""

import json
import math

import pytest

from adapt_prune_tune.models import DecoderArch, LayerArch, decoder_from_arch
from adapt_prune_tune.report import (
    HELDOUT_PNG,
    PRUNE_STEPS_PNG,
    TRAINING_PNG,
    WIDTHS_PNG,
    format_count,
    heldout_curve,
    measure_throughput,
    stage_starts,
    write_report,
)

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
