"""Group scores: how much the calibration loss depends on each coupled group.

Default is the first-order Taylor estimate of the loss change when a group is
zeroed (LeCun's OBD without the Hessian term), summed element-wise:

    score(g) = Σ_{w ∈ g} |w · ∂L/∂w|

with ∂L/∂w accumulated over all calibration batches. Alternatives: "vector"
Taylor |Σ w·∂L/∂w| (LLM-Pruner's "vectorize"), magnitude (L1/L2 of the
weights, no gradients needed) and random (a floor every method must beat).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from adapt_prune_tune.groups import GroupSet

SCORERS = ("taylor", "taylor_vector", "magnitude_l1", "magnitude_l2", "random")


def needs_gradients(method: str) -> bool:
    if method not in SCORERS:
        raise ValueError(f"pruning.scorer must be one of {SCORERS}, got {method!r}")
    return method.startswith("taylor")


def _salience(weight: torch.Tensor, grad: Optional[torch.Tensor], method: str) -> torch.Tensor:
    w = weight.float()
    if method == "taylor":
        return (w * grad.float()).abs()
    if method == "taylor_vector":
        return w * grad.float()
    if method == "magnitude_l1":
        return w.abs()
    if method == "magnitude_l2":
        return w * w
    raise ValueError(f"pruning.scorer must be one of {SCORERS}, got {method!r}")


def slice_totals(weight: torch.Tensor, grad: Optional[torch.Tensor], dim: int, method: str) -> torch.Tensor:
    """Salience summed over every axis but ``dim``: one float64 total per index along ``dim``.

    Why the split: these sums add up over any partition of the other axes, so a rank
    holding only some rows of a weight (FSDP2) contributes its part and one all-reduce
    completes them (``pruner.score_layers``); nothing needs gathering. Summed in fp32
    along a row, as the weights' own matmuls do, then kept in float64.
    """
    if method not in SCORERS or method == "random":
        raise ValueError(f"slice_totals needs a salience method, one of {SCORERS[:-1]}, got {method!r}")
    if needs_gradients(method) and grad is None:
        raise RuntimeError("a Taylor score needs the weight's gradient; run the calibration backward first")
    sal = _salience(weight, grad, method)
    moved = sal.movedim(dim, 0) if dim != 0 else sal
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:])).sum(dim=1).double()


def scores_from_totals(totals: Mapping[Tuple[str, int], torch.Tensor], groups: GroupSet, method: str) -> torch.Tensor:
    """Group scores of a set from the ``slice_totals`` of its coupled slices, keyed by (param, dim)."""
    total: Optional[torch.Tensor] = None
    for s in groups.slices:
        per_group = totals[(s.param, s.dim)].view(groups.count, s.unit).sum(dim=1)
        total = per_group if total is None else total + per_group.to(total.device)
    if total is None:
        total = torch.zeros(groups.count, dtype=torch.float64)
    return total.abs() if method == "taylor_vector" else total


def group_scores(
    params: Mapping[str, Tuple[torch.Tensor, Optional[torch.Tensor]]],
    groups: GroupSet,
    method: str = "taylor",
    generator: Optional[torch.Generator] = None,
    to_host: bool = True,
) -> torch.Tensor:
    """Score every group of a set from its coupled weights.

    Args:
        params: layer-relative name -> (full weight, full accumulated gradient or None).
        groups: the coupled slices to score.
        method: one of ``SCORERS``.
        generator: randomness for ``"random"`` (seeded by the caller for repeatability).
        to_host: return a CPU tensor (else it stays on the weights' device, so a caller
            scoring many layers can move everything to the host in one transfer).

    Returns:
        float64 tensor [groups.count]; higher means more important.
    """
    if method == "random":
        return torch.rand(groups.count, generator=generator, dtype=torch.float64)
    if method not in SCORERS:
        raise ValueError(f"pruning.scorer must be one of {SCORERS}, got {method!r}")
    totals = {}
    for s in groups.slices:
        weight, grad = params[s.param]
        if needs_gradients(method) and grad is None:
            raise RuntimeError(f"{s.param} has no gradient; run the calibration backward first")
        totals[(s.param, s.dim)] = slice_totals(weight, grad, s.dim, method)
    total = scores_from_totals(totals, groups, method)
    return total.cpu() if to_host else total


def select_attention(
    kv_scores: torch.Tensor, q_scores: torch.Tensor, num_kv: int, q_per_kv: int
) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Which KV groups and query heads to keep, GQA-consistently.

    Inside every KV group the best ``q_per_kv`` query heads survive; a group's
    score is its k/v score plus those heads' scores; the best ``num_kv`` groups
    survive. Returns (kept kv indices, kept q indices in the new head order,
    retained score). Kept indices keep their original relative order.
    """
    cur_kv = kv_scores.numel()
    cur_qpk = q_scores.numel() // cur_kv
    per_group = q_scores.view(cur_kv, cur_qpk)
    top_q = per_group.topk(q_per_kv, dim=1).indices.sort(dim=1).values
    group_total = kv_scores + per_group.gather(1, top_q).sum(dim=1)
    kv_keep = group_total.topk(num_kv).indices.sort().values
    q_keep = (kv_keep[:, None] * cur_qpk + top_q[kv_keep]).reshape(-1)
    return kv_keep, q_keep, float(group_total[kv_keep].sum())


def select_channels(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the ``width`` best MLP channels, in original order."""
    return scores.topk(width).indices.sort().values


def layer_scores(
    layer_params: Mapping[str, Tuple[torch.Tensor, Optional[torch.Tensor]]],
    sets: Dict[str, GroupSet],
    method: str,
    generator: Optional[torch.Generator] = None,
    to_host: bool = True,
) -> Dict[str, torch.Tensor]:
    """Scores of every group set of one layer, keyed like ``sets``."""
    return {kind: group_scores(layer_params, gs, method, generator, to_host) for kind, gs in sets.items()}


def coupled_param_names(sets: Dict[str, GroupSet]) -> List[str]:
    """Every layer-relative parameter name that appears in some group set."""
    return sorted({s.param for gs in sets.values() for s in gs.slices})
