"""Adapt-Accel schedules on hand-made numbers."""

import pytest
import torch

from adapt_prune_tune.schedule import (
    get_wsd_schedule,
    split_by_shares,
    stage_targets,
    stage_token_shares,
    stage_train_steps,
    wsd_factor,
)


def test_token_shares_grow_linearly_and_sum_to_one():
    shares = stage_token_shares(4)
    assert shares == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert sum(stage_token_shares(7)) == pytest.approx(1.0)


def test_stage_steps_are_exact_integers():
    assert stage_train_steps(12, 2) == [4, 8]
    for total in (0, 1, 7, 100, 1001):
        steps = stage_train_steps(total, 5)
        assert sum(steps) == total
        assert steps == sorted(steps)


def test_split_by_shares_largest_remainder():
    assert split_by_shares(10, [1 / 3, 1 / 3, 1 / 3]) == [4, 3, 3]


def test_stage_targets():
    assert stage_targets(0.5, 5) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_wsd_shape():
    total = 100
    f = [wsd_factor(s, total, 0.05, 0.1, 0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)  # 5 warmup steps
    assert all(x == 1.0 for x in f[5:90])  # stable
    assert f[90] < 1.0 and f[-1] == pytest.approx(0.1)  # linear decay to min
    assert all(a >= b for a, b in zip(f[90:], f[91:]))


def test_wsd_scheduler_continues_across_optimizer_rebinding():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=2e-5)
    sched = get_wsd_schedule(opt, num_training_steps=20)
    for _ in range(10):
        opt.step()
        sched.step()
    # A resize swaps the parameters but keeps the optimizer (and so the schedule).
    opt.param_groups[0]["params"] = [torch.nn.Parameter(torch.zeros(1))]
    lr_before = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    assert sched.last_epoch == 11
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_before)  # still in the stable phase


def test_wsd_rejects_bad_ratios():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="warmup_ratio"):
        get_wsd_schedule(opt, 10, warmup_ratio=1.5)
    with pytest.raises(ValueError, match="must not exceed 1"):
        get_wsd_schedule(opt, 10, warmup_ratio=0.6, decay_ratio=0.6)
