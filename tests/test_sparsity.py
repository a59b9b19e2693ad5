"""Adaptive per-layer sparsity, exact budgets and the translation into whole-group widths."""

from typing import Dict, List

import pytest
import torch

from adapt_prune_tune.models import DecoderArch, LayerArch, arch_from_model
from adapt_prune_tune.pruner import PruningConfig, plan_step, prunable_per_layer, resolve_target_sparsity
from adapt_prune_tune.sparsity import (
    _attention_params,
    allocate_mlp_widths,
    assign_layer_sparsity,
    choose_attention_widths,
    fit_to_budget,
    sparsity_for_param_target,
    sparsity_schedule,
)


pytestmark = pytest.mark.usefixtures("one_thread")


F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def weighted_mean(s: torch.Tensor, w: torch.Tensor) -> float:
    return float((s * w).sum() / w.sum())


# --------------------------------------------------------------------------- fit_to_budget


def test_fit_without_clamping_is_a_plain_shift() -> None:
    out = fit_to_budget(t(0.1, 0.2, 0.3), t(1, 1, 1), 0.3, t(0, 0, 0), 0.9)
    assert torch.allclose(out, t(0.2, 0.3, 0.4), atol=1e-12)


def test_fit_with_clamping_still_hits_the_weighted_target() -> None:
    raw, w = t(0.0, 0.5, 1.2), t(1, 2, 1)
    out = fit_to_budget(raw, w, 0.5, t(0, 0, 0), 0.9)
    assert weighted_mean(out, w) == pytest.approx(0.5, abs=1e-12)
    assert float(out[2]) == pytest.approx(0.9)  # the clamped layer sits at the upper end
    # the free layers share one shift: 0.0 + c and 0.5 + c with (c + 2(0.5 + c) + 0.9) / 4 = 0.5
    c = (2.0 - 0.9 - 1.0) / 3
    assert out[:2].tolist() == pytest.approx([c, 0.5 + c], abs=1e-12)


def test_fit_lower_bound_holds_layers_that_would_shrink() -> None:
    lower = t(0.3, 0.0, 0.0)
    out = fit_to_budget(t(0.0, 0.4, 0.4), t(1, 1, 1), 0.3, lower, 0.9)
    assert bool((out >= lower - 1e-12).all())
    assert float(out[0]) == pytest.approx(0.3)
    assert weighted_mean(out, t(1, 1, 1)) == pytest.approx(0.3, abs=1e-12)


@pytest.mark.parametrize("target", [0.95, 0.05])
def test_fit_infeasible_targets_raise(target: float) -> None:
    with pytest.raises(ValueError, match="outside what the layers allow"):
        fit_to_budget(t(0.2, 0.2), t(1, 1), target, t(0.1, 0.1), 0.9)


# --------------------------------------------------------------------------- assign_layer_sparsity


def test_raw_rule_by_hand_when_nothing_clamps() -> None:
    new, clamped = assign_layer_sparsity(t(0.1, 0.1, 0.1), 0.2, t(-1, 1, 0), 0.05, 0.9)
    # s = current + Δ - A·Î = 0.1 + 0.1 - 0.05·Î
    assert new.tolist() == pytest.approx([0.25, 0.15, 0.2], abs=1e-12)
    assert clamped == 0


def test_amplitude_zero_is_uniform() -> None:
    new, clamped = assign_layer_sparsity(torch.zeros(4, dtype=F64), 0.3, t(1, -1, 0.5, -0.5), 0.0, 0.9)
    assert new.tolist() == pytest.approx([0.3] * 4, abs=1e-12)
    assert clamped == 0
    # from an uneven start A = 0 adds the same Δ to every layer
    new, _ = assign_layer_sparsity(t(0.1, 0.3), 0.3, t(1, -1), 0.0, 0.9)
    assert new.tolist() == pytest.approx([0.2, 0.4], abs=1e-12)


def test_important_layers_lag_and_the_weighted_budget_is_exact() -> None:
    w = t(100, 300, 50, 50)
    importance = t(1.0, -0.2, 0.4, -1.0)
    new, _ = assign_layer_sparsity(torch.zeros(4, dtype=F64), 0.25, importance, 0.1, 0.9, w)
    assert weighted_mean(new, w) == pytest.approx(0.25, abs=1e-12)
    order = torch.argsort(new)
    assert order.tolist() == torch.argsort(-importance).tolist()


def test_clamping_is_monotone_and_reported() -> None:
    current = t(0.5, 0.1, 0.1)
    # layer 0 is very important: the raw rule would give it back weights it already lost
    new, clamped = assign_layer_sparsity(current, 0.3, t(1.0, -0.5, -0.5), 0.5, 0.9)
    assert bool((new >= current - 1e-12).all())
    assert float(new[0]) == pytest.approx(0.5)
    assert weighted_mean(new, t(1, 1, 1)) == pytest.approx(0.3, abs=1e-12)
    assert clamped == 1
    # the upper clamp: unimportant layers pushed past max_layer_sparsity stop there
    new, clamped = assign_layer_sparsity(torch.zeros(3, dtype=F64), 0.5, t(-1.0, 0.0, 1.0), 1.0, 0.6)
    assert float(new.max()) <= 0.6 + 1e-12
    assert weighted_mean(new, t(1, 1, 1)) == pytest.approx(0.5, abs=1e-12)
    assert clamped == 2  # one past the top, one below its current 0


def test_schedule() -> None:
    assert sparsity_schedule(0.4, 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert sparsity_schedule(0.5, 2, start=0.3) == pytest.approx([0.4, 0.5])
    with pytest.raises(ValueError):
        sparsity_schedule(0.4, 0)


# --------------------------------------------------------------------------- parameter targets


@pytest.fixture(scope="module")
def qwen05() -> DecoderArch:
    from torchtune.models.qwen2_5 import qwen2_5_0_5b

    with torch.device("meta"):
        model = qwen2_5_0_5b()
    return arch_from_model(model)


def test_qwen25_05b_shape(qwen05: DecoderArch) -> None:
    assert qwen05.num_params() == 494_032_768  # 494.0M, tied embeddings counted once
    assert qwen05.attn_bias and qwen05.tie_word_embeddings
    assert qwen05.layers[0] == LayerArch(14, 2, 4864)


def _uniform_scores(arch: DecoderArch) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "kv": torch.rand(layer.num_kv_heads, generator=g, dtype=F64),
            "q": torch.rand(layer.num_heads, generator=g, dtype=F64),
            "mlp": torch.rand(layer.intermediate_dim, generator=g, dtype=F64),
        }
        for layer in arch.layers
    ]


def test_paper_param_target_376m_is_met_within_one_channel(qwen05: DecoderArch) -> None:
    target = 376_100_000
    cfg = PruningConfig(target_params=target, steps=1)
    s = resolve_target_sparsity(qwen05, cfg)
    assert s == pytest.approx(sparsity_for_param_target(qwen05, target))
    fixed = qwen05.num_params() - qwen05.prunable_params()
    assert fixed + (1 - s) * qwen05.prunable_params() == pytest.approx(target)
    for amplitude, importance in ((0.0, torch.zeros(24, dtype=F64)),
                                  (0.02, torch.linspace(-1, 1, 24, dtype=F64))):
        cfg = PruningConfig(target_params=target, steps=1, amplitude=amplitude)
        plan = plan_step(cfg, qwen05, qwen05, torch.zeros(24, dtype=F64), s, importance, _uniform_scores(qwen05))
        one_channel = 3 * qwen05.embed_dim
        assert abs(plan.arch.num_params() - target) <= one_channel / 2 + 1
        for layer in plan.arch.layers:
            assert layer.num_heads % layer.num_kv_heads == 0


def test_param_target_errors(qwen05: DecoderArch) -> None:
    with pytest.raises(ValueError, match="not below"):
        sparsity_for_param_target(qwen05, 500_000_000)
    with pytest.raises(ValueError, match="cannot remove"):
        sparsity_for_param_target(qwen05, 100_000_000)  # embeddings alone are 136M


# --------------------------------------------------------------------------- widths

BASE = DecoderArch.uniform(vocab_size=16, embed_dim=64, num_layers=4, num_heads=8, num_kv_heads=2,
                           intermediate_dim=100, max_seq_len=16)


def test_attention_widths_keep_gqa_and_never_grow() -> None:
    full = BASE.layers[0]
    current = LayerArch(6, 2, 100)
    for frac in (1.0, 0.8, 0.5, 0.3, 0.0):
        kv, qpk = choose_attention_widths(BASE, full, current, frac)
        assert 1 <= kv <= 2 and 1 <= qpk <= 3
    assert choose_attention_widths(BASE, full, current, 1.0) == (2, 3)  # cannot regrow to 4 per group
    assert choose_attention_widths(BASE, full, current, 0.0, min_kv_heads=2, min_q_per_kv=2) == (2, 2)


def test_mlp_widths_meet_the_total_budget_exactly() -> None:
    per_channel = 3 * BASE.embed_dim
    attention = [(2, 4), (2, 3), (1, 2), (2, 1)]
    attn = [_attention_params(64, BASE.head_dim, kv, q, False) for kv, q in attention]
    # budgets with awkward fractions of a channel
    mlp_channels = [70.4, 55.6, 90.5, 12.3]
    keep = [a + c * per_channel for a, c in zip(attn, mlp_channels)]
    widths = allocate_mlp_widths(BASE, attention, keep, [100] * 4)
    assert sum(widths) == round(sum(mlp_channels))
    assert all(abs(w - c) < 1 for w, c in zip(widths, mlp_channels))
    # a layer that cannot take its share (current width 50) passes the rest to others
    widths = allocate_mlp_widths(BASE, attention, keep, [100, 100, 50, 100])
    assert widths[2] == 50
    assert sum(widths) == round(sum(mlp_channels))
    # minimum widths hold even when a budget is below the attention alone
    widths = allocate_mlp_widths(BASE, attention, [attn[0] - 5000, *keep[1:]], [100] * 4, min_width=3)
    assert widths[0] >= 3


def test_plan_step_budget_counts_only_enabled_kinds() -> None:
    cfg = PruningConfig(target_sparsity=0.5, steps=1, prune_attention=False)
    weights = prunable_per_layer(BASE, cfg)
    assert weights.tolist() == [3 * 64 * 100] * 4
    plan = plan_step(cfg, BASE, BASE, torch.zeros(4, dtype=F64), 0.5, torch.zeros(4, dtype=F64),
                     _uniform_scores(BASE))
    assert [layer.intermediate_dim for layer in plan.arch.layers] == [50] * 4
    assert all(layer.num_heads == 8 and layer.num_kv_heads == 2 for layer in plan.arch.layers)


@pytest.mark.parametrize("allocation", ["proportional", "score"])
@pytest.mark.parametrize("amplitude", [0.0, 0.1])
def test_every_step_meets_the_budget_when_heads_drop(allocation: str, amplitude: float) -> None:
    """SmolLM2's shape (3 KV groups of 3 heads): with A = 0 every layer crosses a head boundary
    at once. Channels never come back, so attention may not shrink below what the current MLP
    can make up for; otherwise the whole model lands ~2% of its weights below the target."""
    from adapt_prune_tune.models import SMOLLM2_135M as base

    g = torch.Generator().manual_seed(0)
    cfg = PruningConfig(target_sparsity=0.4, steps=10, amplitude=amplitude, attention_allocation=allocation)
    current, sparsity = base, torch.zeros(base.num_layers, dtype=F64)
    importance = torch.linspace(-1, 1, base.num_layers, dtype=F64)
    for k in range(10):
        target = 0.4 * (k + 1) / 10
        scores = [{"kv": torch.rand(la.num_kv_heads, generator=g, dtype=F64),
                   "q": torch.rand(la.num_heads, generator=g, dtype=F64),
                   "mlp": torch.rand(la.intermediate_dim, generator=g, dtype=F64)} for la in current.layers]
        plan = plan_step(cfg, base, current, sparsity, target, importance, scores)
        current, sparsity = plan.arch, plan.sparsity
        goal = base.num_params() - target * base.prunable_params()
        assert abs(current.num_params() - goal) <= 3 * base.embed_dim / 2 + 1, f"step {k + 1}"
    assert min(layer.num_heads for layer in current.layers) < 9  # heads were pruned on the way
