"""Adaptive per-layer sparsity and its translation into whole-group widths.

The rule (Adapt-Pruner, as the official code applies it at every step):

    s_i(k+1) = clamp(s_i(k) + Δ - A · Î_i(k), s_i(k), s_max)

Δ is the step's share of the target, Î the freshly normalized layer importance
and A the amplitude (A = 0 is uniform, LLM-Pruner-style pruning). Clamping
alone would let the mean drift from the schedule, so we shift all layers by a
common offset that makes the parameter-weighted mean hit the step's target
exactly (``fit_to_budget``). Sparsities never decrease: removed weights are gone.

Sparsity here is the fraction of a layer's *prunable* parameters (attention and
MLP projections) removed relative to the unpruned model.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from adapt_prune_tune.models import DecoderArch, LayerArch


def fit_to_budget(
    raw: torch.Tensor,
    weights: torch.Tensor,
    target: float,
    lower: torch.Tensor,
    upper: float,
    iters: int = 200,
) -> torch.Tensor:
    """Shift ``raw`` by one constant so the clamped weighted mean equals ``target``.

    The clamped mean is monotone in the shift, so bisection finds it; infeasible
    targets (outside [mean(lower), upper]) raise instead of silently missing.
    """
    raw, weights, lower = raw.double(), weights.double(), lower.double()
    wsum = weights.sum()

    def mean_at(shift: float) -> float:
        s = torch.minimum(torch.maximum(raw + shift, lower), torch.full_like(raw, upper))
        return float((s * weights).sum() / wsum)

    lo_mean = float((lower * weights).sum() / wsum)
    if target < lo_mean - 1e-12 or target > upper + 1e-12:
        raise ValueError(
            f"Sparsity target {target:.4f} is outside what the layers allow "
            f"[{lo_mean:.4f}, {upper:.4f}] (already pruned / max_layer_sparsity)"
        )
    span = float(raw.abs().max()) + 2.0
    lo, hi = -span, span
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    shift = 0.5 * (lo + hi)
    return torch.minimum(torch.maximum(raw + shift, lower), torch.full_like(raw, upper))


def assign_layer_sparsity(
    current: torch.Tensor,
    target: float,
    importance: torch.Tensor,
    amplitude: float,
    max_layer_sparsity: float,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, int]:
    """One adaptive step: new per-layer sparsities whose weighted mean is ``target``.

    Args:
        current: per-layer sparsity so far (fraction of each layer's original
            prunable parameters already removed).
        target: overall sparsity after this step (the schedule's value).
        importance: normalized layer importance Î (mean 0, about [-1, 1]; see
            ``importance.normalize_importance``). A constant offset would not
            change the result: the common shift absorbs it.
        amplitude: A; 0 reproduces uniform pruning.
        max_layer_sparsity: the clamp's upper end.
        weights: original prunable parameters per layer (equal if None).

    Returns:
        (new sparsities, number of layers the raw rule pushed past a clamp).
    """
    current = current.double()
    weights = torch.ones_like(current) if weights is None else weights.double()
    increment = target - float((current * weights).sum() / weights.sum())
    raw = current + increment - amplitude * importance.double()
    clamped = int(((raw < current - 1e-12) | (raw > max_layer_sparsity + 1e-12)).sum())
    return fit_to_budget(raw, weights, target, current, max_layer_sparsity), clamped


def sparsity_schedule(target: float, steps: int, start: float = 0.0) -> List[float]:
    """Overall sparsity after each of ``steps`` equal increments from ``start``."""
    if steps < 1:
        raise ValueError(f"pruning steps must be >= 1, got {steps}")
    return [start + (target - start) * (k + 1) / steps for k in range(steps)]


def sparsity_for_param_target(arch: DecoderArch, target_params: int, prunable: Optional[int] = None) -> float:
    """Overall prunable-parameter sparsity that brings the whole model to ``target_params``.

    Embeddings and norms are never pruned, so they are subtracted first; so are
    group kinds a configuration leaves alone (``prunable``: the parameters it may
    prune, all attention + MLP projections by default).
    """
    total = arch.num_params()
    prunable = arch.prunable_params() if prunable is None else prunable
    fixed = total - prunable
    if target_params >= total:
        raise ValueError(
            f"pruning.method.target_params={target_params:,} is not below the model's {total:,} parameters"
        )
    if target_params <= fixed:
        raise ValueError(
            f"pruning.method.target_params={target_params:,} is below the {fixed:,} parameters this "
            "configuration cannot prune (embeddings, norms, disabled group kinds): pruning cannot "
            "remove them; raise it"
        )
    return 1.0 - (target_params - fixed) / prunable


def _attention_params(embed_dim: int, head_dim: int, kv: int, qpk: int, bias: bool) -> int:
    q, k = kv * qpk * head_dim, kv * head_dim
    return embed_dim * (2 * q + 2 * k) + ((q + 2 * k) if bias else 0)


def choose_attention_widths(
    base: DecoderArch,
    orig: LayerArch,
    current: LayerArch,
    keep_fraction: float,
    min_kv_heads: int = 1,
    min_q_per_kv: int = 1,
    retained_score: Optional[Callable[[int, int], float]] = None,
    min_params: float = 0.0,
) -> Tuple[int, int]:
    """Pick (num_kv_heads, q_per_kv) whose size is closest to ``keep_fraction`` of the original.

    GQA granularity: a layer keeps whole KV groups (k/v heads with their query
    heads) and, inside every kept group, the same number of query heads, so
    ``num_heads % num_kv_heads == 0`` always holds and the stock attention
    forward runs unchanged. Among equally close sizes, the one retaining the
    highest group score wins (``retained_score(kv, qpk)``).

    ``min_params``: smallest attention size allowed. The caller passes the
    layer's budget minus its current MLP size: removed channels never come
    back, so a smaller attention would leave the layer (and, when every layer
    rounds the same way, the model) below its parameter budget.
    """
    hd, dim, bias = base.head_dim, base.embed_dim, base.attn_bias
    orig_params = _attention_params(dim, hd, orig.num_kv_heads, orig.num_heads // orig.num_kv_heads, bias)
    goal = keep_fraction * orig_params
    cur_qpk = current.num_heads // current.num_kv_heads
    best, best_key = (current.num_kv_heads, cur_qpk), None
    for kv in range(min(min_kv_heads, current.num_kv_heads), current.num_kv_heads + 1):
        for qpk in range(min(min_q_per_kv, cur_qpk), cur_qpk + 1):
            params = _attention_params(dim, hd, kv, qpk, bias)
            if params < min_params - 1e-6 and (kv, qpk) != (current.num_kv_heads, cur_qpk):
                continue
            score = retained_score(kv, qpk) if retained_score else 0.0
            key = (abs(params - goal), -score, -kv)
            if best_key is None or key < best_key:
                best, best_key = (kv, qpk), key
    return best


def choose_attention_by_score(
    base: DecoderArch,
    current: LayerArch,
    keep_params: float,
    retained_attention: Callable[[int, int], float],
    mlp_retained: torch.Tensor,
    min_kv_heads: int = 1,
    min_q_per_kv: int = 1,
    min_mlp_channels: int = 1,
    min_params: float = 0.0,
    round_to: int = 1,
) -> Tuple[int, int]:
    """Split one layer's budget between attention and MLP to keep the most group score.

    Taylor scores of heads and channels are both first-order estimates of the
    loss change their removal causes, so they can be added: every feasible
    (KV groups, queries per group) is paired with the MLP width the rest of the
    budget buys, and the pair retaining the highest total score wins. Unlike a
    fixed equal ratio, a layer whose heads matter more than its channels keeps
    its heads (GQA head steps are coarse: one KV group of SmolLM2 is a third of
    its attention).

    Args:
        mlp_retained: cumulative sum of the layer's channel scores sorted in
            descending order (retained score of the best ``w`` channels at ``w-1``).
        min_params: smallest attention size allowed (see ``choose_attention_widths``).
        round_to: MLP widths are multiples of it (or the current width), as in
            ``allocate_mlp_widths``; each choice is scored with the widest such MLP
            its remaining budget buys.
    """
    dim, hd, bias = base.embed_dim, base.head_dim, base.attn_bias
    per_channel = 3 * dim
    cur_qpk = current.num_heads // current.num_kv_heads
    best, best_key = (current.num_kv_heads, cur_qpk), None
    for kv in range(min(min_kv_heads, current.num_kv_heads), current.num_kv_heads + 1):
        for qpk in range(min(min_q_per_kv, cur_qpk), cur_qpk + 1):
            attn = _attention_params(dim, hd, kv, qpk, bias)
            if attn < min_params - 1e-6 and (kv, qpk) != (current.num_kv_heads, cur_qpk):
                continue
            width = math.floor((keep_params - attn) / per_channel)
            if width < current.intermediate_dim:
                width = round_to * (width // round_to)
            width = min(current.intermediate_dim, width)
            if width < min(smallest_mlp_width(min_mlp_channels, round_to), current.intermediate_dim):
                continue
            score = retained_attention(kv, qpk) + float(mlp_retained[width - 1])
            key = (-score, abs(attn + width * per_channel - keep_params))
            if best_key is None or key < best_key:
                best, best_key = (kv, qpk), key
    return best


def smallest_mlp_width(min_channels: int, round_to: int = 1) -> int:
    """Narrowest MLP a pruned layer may have: ``min_channels`` rounded up to a multiple of ``round_to``.

    At least one unit (``round_to`` channels, so never an empty MLP). A layer
    that is already narrower (a base width below it) simply keeps its width.
    """
    return round_to * max(1, math.ceil(min_channels / round_to))


def _nearest_allowed_width(ideal: float, current: int, lowest: int, round_to: int) -> int:
    """The allowed width nearest ``ideal``: ``current`` or a multiple of ``round_to`` in [lowest, current]."""
    if ideal >= current:
        return current
    if ideal <= lowest:
        return lowest
    down = round_to * math.floor(ideal / round_to)  # >= lowest: lowest is a multiple below ideal
    up = min(current, down + round_to)
    return up if up - ideal <= ideal - down else down


def _next_width(width: int, grow: bool, current: int, round_to: int) -> int:
    """The allowed width next to ``width``: one unit up (at most ``current``) or down.

    Down from a base width that is not a multiple of ``round_to``, the next is
    the multiple below it (a step of less than a unit).
    """
    if grow:
        return min(current, round_to * (width // round_to + 1))
    return round_to * ((width - 1) // round_to)


def allocate_mlp_widths(
    base: DecoderArch,
    attention: Sequence[Tuple[int, int]],
    keep_params: Sequence[float],
    current: Sequence[int],
    min_width: int = 1,
    round_to: int = 1,
) -> List[int]:
    """MLP widths, multiples of ``round_to``, whose model-wide sum meets the budget.

    Allowed widths of a layer: its current width (removed channels never come
    back, and a base width that is not a multiple of ``round_to`` may stay
    until first pruned) and the multiples of ``round_to`` between
    ``smallest_mlp_width(min_width, round_to)`` and it. A layer already at or
    below that smallest width keeps its width.

    Largest remainder, in whole units: every layer first takes the allowed
    width nearest its own budget, ``(budget - attention) / (3·dim)``
    channels; the rounding leftover of the whole model is then settled by
    moving one allowed step (a unit of ``round_to`` channels, or the remainder
    of a non-multiple base width) at a time, up for the layers furthest below
    their budgets first, down for those furthest above, while a move brings the
    total closer. Unless bounds (current or smallest widths) bind, every layer
    ends within one unit of its own budget, so the ranking the adaptive
    sparsity chose survives, and the model's MLP channels end within half a
    unit of the model's budget: |Σ widths - Σ budgets| <= round_to / 2
    channels, i.e. at most round_to · 3 · dim / 2 parameters (half of
    ``round_to`` channels of one layer; round_to = 1: within half a channel).
    Where bounds bind, the other layers absorb the difference (several units
    each if need be) and the total stays that close if they can.
    """
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    dim, hd, bias = base.embed_dim, base.head_dim, base.attn_bias
    per_channel = 3 * dim
    ideal = [
        (keep - _attention_params(dim, hd, kv, qpk, bias)) / per_channel
        for keep, (kv, qpk) in zip(keep_params, attention)
    ]
    smallest = smallest_mlp_width(min_width, round_to)
    lo = [min(smallest, c) for c in current]
    widths = [_nearest_allowed_width(x, c, l, round_to) for x, c, l in zip(ideal, current, lo)]
    deficit = sum(ideal) - sum(widths)  # channels still to give (> 0) or take (< 0)
    while True:
        grow = deficit > 0
        candidates = [i for i in range(len(widths)) if (widths[i] < current[i] if grow else widths[i] > lo[i])]
        # furthest below its budget first when growing, furthest above first when shrinking
        candidates.sort(key=lambda i: ideal[i] - widths[i], reverse=grow)
        moved = False
        for i in candidates:
            new = _next_width(widths[i], grow, current[i], round_to)
            step = new - widths[i]
            if abs(deficit - step) >= abs(deficit):  # would not bring the total closer
                continue
            widths[i], deficit, moved = new, deficit - step, True
            if grow != (deficit > 0):
                break
        if not moved:
            return widths
