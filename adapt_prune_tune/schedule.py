"""Adapt-Accel schedules: how tokens, targets and the learning rate spread over stages.

* Stage k of N prunes toward k/N of the final target, then trains.
* Stage k trains on t_k = 2k / (N(N+1)) · T tokens: later stages, whose model
  has lost more, get more recovery (Σ t_k = T).
* One warmup-stable-decay LR schedule spans all stages: resizing the model
  never restarts it (the official scripts emulate this with a step offset).
"""

from __future__ import annotations

import math
from typing import List

import torch
from torch.optim.lr_scheduler import LambdaLR


def stage_token_shares(num_stages: int) -> List[float]:
    """t_k / T for k = 1..N (linear growth, sums to 1)."""
    if num_stages < 1:
        raise ValueError(f"adapt.stages must be >= 1, got {num_stages}")
    n = num_stages
    return [2 * k / (n * (n + 1)) for k in range(1, n + 1)]


def split_by_shares(total: int, shares: List[float]) -> List[int]:
    """Integer parts of ``total`` proportional to ``shares`` that sum to ``total`` exactly.

    Largest-remainder rounding, so no stage's allocation drifts by more than one.
    """
    raw = [total * s for s in shares]
    parts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def stage_train_steps(total_steps: int, num_stages: int) -> List[int]:
    """Optimizer steps per stage following the linear token schedule."""
    return split_by_shares(total_steps, stage_token_shares(num_stages))


def stage_targets(final_target: float, num_stages: int) -> List[float]:
    """Overall sparsity reached at the end of each stage's pruning."""
    return [final_target * k / num_stages for k in range(1, num_stages + 1)]


def wsd_factor(
    step: int,
    total_steps: int,
    warmup_ratio: float = 0.05,
    decay_ratio: float = 0.1,
    min_lr_ratio: float = 0.1,
) -> float:
    """LR multiplier of warmup-stable-decay at ``step`` (0-based).

    Linear warmup over the first ``warmup_ratio`` of steps, flat at 1, then a
    linear decay to ``min_lr_ratio`` over the last ``decay_ratio``.
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    decay = math.ceil(decay_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total_steps - decay
    if step < decay_start or decay == 0:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def get_wsd_schedule(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    warmup_ratio: float = 0.05,
    decay_ratio: float = 0.1,
    min_lr_ratio: float = 0.1,
    last_epoch: int = -1,
) -> LambdaLR:
    """Warmup-stable-decay as a torchtune ``lr_scheduler`` component.

    Paper setting: warmup 5%, decay over the last 10%, max LR 2e-5 (the
    optimizer's lr) down to 2e-6 (``min_lr_ratio=0.1``).
    """
    for name, value in (("warmup_ratio", warmup_ratio), ("decay_ratio", decay_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"lr_scheduler.{name} must be in [0, 1], got {value}")
    if warmup_ratio + decay_ratio > 1.0:
        raise ValueError("lr_scheduler.warmup_ratio + decay_ratio must not exceed 1")

    def factor(step: int) -> float:
        return wsd_factor(step, max(1, num_training_steps), warmup_ratio, decay_ratio, min_lr_ratio)

    return LambdaLR(optimizer, factor, last_epoch)
