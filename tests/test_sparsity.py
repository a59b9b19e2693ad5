"""Adaptive per-layer sparsity, exact budgets and the translation into whole-group widths."""

from typing import Dict, List

import pytest
import torch

from adapt_prune_tune.models import DecoderArch, LayerArch, arch_from_model
from adapt_prune_tune.pruner import (
    PruningConfig,
    minimum_arch,
    plan_step,
    prunable_per_layer,
    resolve_target_sparsity,
)
from adapt_prune_tune.sparsity import (
    _attention_params,
    allocate_mlp_widths,
    assign_layer_sparsity,
    choose_attention_widths,
    fit_to_budget,
    smallest_mlp_width,
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


# --------------------------------------------------------------------------- round_to


def _budgets(channels: List[float], attention=((2, 4),) * 4) -> List[float]:
    """Layer budgets (parameters) that leave ``channels`` MLP channels after ``attention``."""
    return [_attention_params(64, BASE.head_dim, kv, q, False) + c * 3 * BASE.embed_dim
            for (kv, q), c in zip(attention, channels)]


def test_smallest_mlp_width() -> None:
    assert smallest_mlp_width(1) == 1
    assert smallest_mlp_width(0) == 1  # never an empty MLP
    assert smallest_mlp_width(1, 64) == 64
    assert smallest_mlp_width(64, 64) == 64
    assert smallest_mlp_width(100, 64) == 128


def test_rounded_widths_are_multiples_and_meet_the_total_within_half_a_unit() -> None:
    base = DecoderArch.uniform(vocab_size=16, embed_dim=64, num_layers=4, num_heads=8, num_kv_heads=2,
                               intermediate_dim=1024, max_seq_len=16)
    attention = [(2, 4)] * 4
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        channels = (torch.rand(4, generator=g, dtype=F64) * 900 + 100).tolist()
        for round_to in (8, 64, 128):
            widths = allocate_mlp_widths(base, attention, _budgets(channels), [1024] * 4, round_to=round_to)
            assert all(w % round_to == 0 for w in widths)
            assert abs(sum(widths) - sum(channels)) <= round_to / 2 + 1e-9
            assert all(abs(w - c) < round_to + 1e-9 for w, c in zip(widths, channels))


def test_largest_remainders_get_the_units() -> None:
    # 90 + 88 + 92 + 35 = 305 channels: each layer's nearest multiple of 64 is 64, 256 in all,
    # 49 short (over half a unit); the unit goes to the layer furthest below its budget (92)
    widths = allocate_mlp_widths(BASE, [(2, 4)] * 4, _budgets([90.0, 88.0, 92.0, 35.0]), [200] * 4, round_to=64)
    assert widths == [64, 64, 128, 64]
    # 24 short is less than half a unit: no move would bring the total closer
    widths = allocate_mlp_widths(BASE, [(2, 4)] * 4, _budgets([80.0, 75.0, 90.0, 35.0]), [200] * 4, round_to=64)
    assert widths == [64] * 4
    # equal residuals: ties go to the first layers (deterministic); 384 is 24 from 360
    widths = allocate_mlp_widths(BASE, [(2, 4)] * 4, _budgets([90.0] * 4), [200] * 4, round_to=64)
    assert widths == [128, 128, 64, 64]


def test_rounding_keeps_the_order_of_layer_budgets() -> None:
    channels = [300.0, 180.0, 700.0, 520.0]  # adaptive budgets: layer 2 most important
    widths = allocate_mlp_widths(BASE, [(2, 4)] * 4, _budgets(channels), [1024] * 4, round_to=64)
    assert torch.argsort(torch.tensor(widths)).tolist() == torch.argsort(torch.tensor(channels)).tolist()


def test_base_width_that_is_not_a_multiple_stays_until_first_pruned() -> None:
    # 100 channels, round_to 64: the allowed widths are 100 and 64
    widths = allocate_mlp_widths(BASE, [(2, 4)] * 4, _budgets([95.0, 90.0, 70.0, 100.0]), [100] * 4, round_to=64)
    assert set(widths) <= {64, 100}
    assert widths[3] == 100 and widths[2] == 64
    assert abs(sum(widths) - 355) <= 32
    # never below the smallest width: min_width 3 still means one whole unit
    widths = allocate_mlp_widths(BASE, [(2, 4)] * 4, _budgets([1.0, 2.0, 100.0, 100.0]), [100] * 4, min_width=3,
                                 round_to=64)
    assert widths[:2] == [64, 64]


def test_widths_never_grow_and_narrow_layers_keep_their_width() -> None:
    current = [192, 256, 48, 100]
    widths = allocate_mlp_widths(BASE, [(2, 4)] * 4, _budgets([150.0, 200.0, 40.0, 10.0]), current, round_to=64)
    assert widths == [128, 192, 48, 64]  # 48: narrower than one unit, cannot be pruned; 100 drops to 64, not below
    # budgets above what the layers still have: every layer stays at its current width (the
    # 10-channel layer included, taking what the capped layers cannot), none grows
    widths = allocate_mlp_widths(BASE, [(2, 4)] * 4, _budgets([500.0, 300.0, 40.0, 10.0]), current, round_to=64)
    assert widths == current


def test_round_to_is_validated() -> None:
    with pytest.raises(ValueError, match="round_to"):
        allocate_mlp_widths(BASE, [(2, 4)] * 4, _budgets([50.0] * 4), [100] * 4, round_to=0)
    for bad in (0, -64, 1.5, True, "64"):
        with pytest.raises(ValueError, match=r"pruning\.method\.round_to must be an integer >= 1"):
            PruningConfig(target_sparsity=0.2, round_to=bad)


def test_minimum_arch_and_reachable_target_follow_round_to() -> None:
    cfg = PruningConfig(target_sparsity=0.2, min_mlp_channels=1, round_to=64)
    assert {layer.intermediate_dim for layer in minimum_arch(BASE, cfg).layers} == {64}
    narrow = DecoderArch.uniform(vocab_size=16, embed_dim=64, num_layers=4, num_heads=8, num_kv_heads=2,
                                 intermediate_dim=48, max_seq_len=16)
    assert {layer.intermediate_dim for layer in minimum_arch(narrow, cfg).layers} == {48}
    # 48-channel MLPs cannot be pruned at round_to 64: only attention is left to remove
    attention_share = narrow.layer_attention_params(0) / (narrow.layer_attention_params(0) + narrow.layer_mlp_params(0))
    with pytest.raises(ValueError, match="exceeds what the minimum widths"):
        resolve_target_sparsity(narrow, PruningConfig(target_sparsity=attention_share, round_to=64))
    assert resolve_target_sparsity(narrow, PruningConfig(target_sparsity=attention_share, round_to=16)) > 0


def _run_steps(base: DecoderArch, cfg: PruningConfig, importance: torch.Tensor, target: float, steps: int):
    """Plan ``steps`` steps on random scores as the pruner does (continuing from the planned sparsity)."""
    g = torch.Generator().manual_seed(0)
    current, planned = base, torch.zeros(base.num_layers, dtype=F64)
    history = [base]
    for k in range(steps):
        goal = target * (k + 1) / steps
        scores = [{"kv": torch.rand(la.num_kv_heads, generator=g, dtype=F64),
                   "q": torch.rand(la.num_heads, generator=g, dtype=F64),
                   "mlp": torch.rand(la.intermediate_dim, generator=g, dtype=F64)} for la in current.layers]
        plan = plan_step(cfg, base, current, planned, goal, importance, scores)
        current, planned = plan.arch, plan.planned
        history.append(current)
        unit = cfg.round_to * 3 * base.embed_dim
        expected = base.num_params() - goal * float(prunable_per_layer(base, cfg).sum())
        assert abs(current.num_params() - expected) <= unit / 2 + 1, f"step {k + 1}"
    return history, plan


@pytest.mark.parametrize("prune_attention", [True, False])
@pytest.mark.parametrize("target", [0.2, 0.4, 0.6])
def test_rounded_steps_meet_every_budget_and_keep_the_adaptive_order(target: float, prune_attention: bool) -> None:
    from adapt_prune_tune.models import SMOLLM2_135M as base

    importance = torch.linspace(1, -1, base.num_layers, dtype=F64)  # layer 0 most important
    cfg = PruningConfig(target_sparsity=target, steps=8, amplitude=0.03, round_to=64, prune_attention=prune_attention)
    history, plan = _run_steps(base, cfg, importance, target, 8)
    for before, after in zip(history, history[1:]):
        for b, a in zip(before.layers, after.layers):
            assert a.intermediate_dim <= b.intermediate_dim  # never grow back
            assert a.intermediate_dim % 64 == 0
    # rounding does not undo the adaptive rule: each layer ends within one unit (plus a layer's
    # coarse head steps) of the sparsity the rule planned, so the importance order survives
    achieved, planned = plan.sparsity, plan.planned
    mlp_unit = 64 * 3 * base.embed_dim / float(prunable_per_layer(base, cfg)[0])
    slack = 0.05 if prune_attention else 0.0
    assert float((achieved - planned).abs().max()) <= mlp_unit + slack + 1e-9
    widths = torch.tensor([layer.intermediate_dim for layer in plan.arch.layers], dtype=F64)
    thirds = widths.view(3, 10).mean(dim=1)
    assert thirds[0] > thirds[1] > thirds[2]


def test_rounding_at_amplitude_zero_stays_uniform_across_steps() -> None:
    """Many small steps against a coarse unit (12 channels a step, 64 a unit): each step's
    rounding must not be baked into the next step's start, or the same tie-broken layers
    would lose a unit every step."""
    from adapt_prune_tune.models import SMOLLM2_135M as base

    cfg = PruningConfig(target_sparsity=0.4, steps=20, amplitude=0.0, round_to=64, prune_attention=False)
    history, plan = _run_steps(base, cfg, torch.zeros(base.num_layers, dtype=F64), 0.4, 20)
    widths = [layer.intermediate_dim for layer in plan.arch.layers]
    assert max(widths) - min(widths) <= 64


@pytest.mark.parametrize("target", [376_100_000, 420_000_000, 460_000_000])
def test_param_targets_with_round_to(qwen05: DecoderArch, target: int) -> None:
    for steps in (1, 4):
        cfg = PruningConfig(target_params=target, steps=steps, amplitude=0.02, round_to=64)
        s = resolve_target_sparsity(qwen05, cfg)
        planned, current = torch.zeros(24, dtype=F64), qwen05
        importance = torch.linspace(-1, 1, 24, dtype=F64)
        for k in range(steps):
            plan = plan_step(cfg, qwen05, current, planned, s * (k + 1) / steps, importance,
                             _uniform_scores(current))
            current, planned = plan.arch, plan.planned
        assert abs(current.num_params() - target) <= 64 * 3 * qwen05.embed_dim / 2 + 1
        assert all(layer.intermediate_dim % 64 == 0 for layer in current.layers)
