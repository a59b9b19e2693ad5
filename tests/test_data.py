"""Calibration windows and stage draws without replacement."""

import pytest
import torch

from adapt_prune_tune.data import (
    ChunkSampler,
    calibration_batches,
    changed_data_warning,
    data_passes,
    plan_chunks,
    rank_calibration_batch,
    repeated_data_warning,
)


class Docs(torch.utils.data.Dataset):
    def __init__(self, lengths):
        self.docs = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)]

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return {"tokens": self.docs[i]}


def test_calibration_windows_are_fixed_and_sharded():
    ds = Docs([50] * 20)
    full = calibration_batches(ds, num_samples=8, seq_len=16, batch_size=2, seed=3)
    again = calibration_batches(ds, num_samples=8, seq_len=16, batch_size=2, seed=3)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(full, again))
    assert len(full) == 4 and full[0]["tokens"].shape == (2, 16)
    r0 = calibration_batches(ds, 8, 16, 2, seed=3, rank=0, world_size=2)
    r1 = calibration_batches(ds, 8, 16, 2, seed=3, rank=1, world_size=2)
    assert [b["tokens"] for b in r0 + r1] != [] and len(r0) == len(r1) == 2
    together = torch.cat([b["tokens"] for b in r0 + r1]).sort(dim=0).values
    assert torch.equal(together, torch.cat([b["tokens"] for b in full]).sort(dim=0).values)


def test_calibration_batch_is_a_cap_that_splits_each_share_evenly():
    assert rank_calibration_batch(512, 64, 8) == 64
    assert rank_calibration_batch(512, 64, 16) == 32  # the share is below the cap: one batch
    assert rank_calibration_batch(96, 64, 1) == 48  # 96 = 2 × 48, not 64 + 32
    assert rank_calibration_batch(97, 64, 1) == 1  # a prime share: batches of one
    ds = Docs([50] * 40)
    shares = [calibration_batches(ds, 24, 16, 5, seed=1, rank=r, world_size=3) for r in range(3)]
    assert [[b["tokens"].shape[0] for b in share] for share in shares] == [[4, 4]] * 3  # 8 per rank: 4 + 4
    together = torch.cat([b["tokens"] for share in shares for b in share]).sort(dim=0).values
    whole = torch.cat([b["tokens"] for b in calibration_batches(ds, 24, 16, 24, seed=1)]).sort(dim=0).values
    assert torch.equal(together, whole)  # the same windows however they are batched and dealt


def test_calibration_errors():
    with pytest.raises(ValueError, match=r"multiple of the data-parallel ranks \(2\).*num_samples=2 or .*num_samples=4"):
        calibration_batches(Docs([50] * 4), 3, 8, 2, world_size=2)
    with pytest.raises(ValueError, match="Calibration data has"):
        calibration_batches(Docs([5] * 4), 4, 64, 2)


def test_chunks_cover_stages_and_positions():
    chunks = plan_chunks([4, 8], samples_per_step=6, checkpoint_every=3)
    assert [(c.stage, c.steps) for c in chunks] == [(1, 3), (1, 1), (2, 3), (2, 3), (2, 2)]
    assert [c.start for c in chunks] == [0, 18, 24, 42, 60]


def test_stages_draw_without_replacement_across_ranks():
    n, sps = 40, 4
    chunks = plan_chunks([3, 6], samples_per_step=sps, checkpoint_every=2)
    seen = []
    for rank in (0, 1):
        s = ChunkSampler(n, chunks, sps, seed=0, rank=rank, world_size=2)
        for e in range(len(chunks)):
            s.set_epoch(e)
            got = list(s)
            assert len(got) == len(s)
            seen += got
    assert len(seen) == 36 and len(set(seen)) == 36  # no sample twice within one pass


def test_a_run_stopped_inside_a_chunk_resumes_it_with_the_samples_it_had_left():
    """steps_done mid-chunk (on another world size too): each chunk yields exactly the tail the
    uninterrupted run would still have drawn; chunks before and after are unchanged."""
    n, sps = 40, 4
    chunks = plan_chunks([5, 6], samples_per_step=sps, checkpoint_every=3)  # steps 0-3, 3-5 | 5-8, 8-11

    def stream(world, steps_done=0):
        by_position = {}
        for rank in range(world):
            s = ChunkSampler(n, chunks, sps, seed=3, rank=rank, world_size=world, steps_done=steps_done)
            for e, chunk in enumerate(chunks):
                s.set_epoch(e)
                got = list(s)
                assert len(got) == len(s)
                begin = max(chunk.start, steps_done * sps)
                by_position.update(zip(range(begin + rank, chunk.start + chunk.steps * sps, world), got))
        return [by_position[p] for p in sorted(by_position)]

    whole = stream(2)
    for steps_done in (1, 3, 4, 7):  # inside chunk 0, at a boundary, inside chunks 1 and 2
        assert stream(2, steps_done) == whole[steps_done * sps:]
        assert stream(4, steps_done) == whole[steps_done * sps:]
    s = ChunkSampler(n, chunks, sps, seed=3, rank=0, world_size=2, steps_done=4)
    s.set_epoch(0)
    assert len(s) == 0 and list(s) == []  # a chunk finished before the stop: nothing left in it
    s.set_epoch(1)
    assert len(s) == 2  # one of its two steps left, 4 samples over 2 ranks


def test_stream_reshuffles_after_a_full_pass():
    chunks = plan_chunks([5], samples_per_step=4, checkpoint_every=5)  # 20 samples from 8
    s = ChunkSampler(8, chunks, 4, seed=0, rank=0, world_size=1)
    s.set_epoch(0)
    got = list(s)
    assert sorted(got[:8]) == list(range(8)) and sorted(got[8:16]) == list(range(8))


def test_without_shuffle_the_dataset_order_is_kept_across_ranks_and_passes():
    """shuffle=False (a curriculum): position p is sample p mod n, ranks dealt round-robin."""
    chunks = plan_chunks([3, 2], samples_per_step=4, checkpoint_every=2)  # 20 samples from 6
    order = {}
    for rank in (0, 1):
        s = ChunkSampler(6, chunks, 4, seed=0, rank=rank, world_size=2, shuffle=False)
        for e, chunk in enumerate(chunks):
            s.set_epoch(e)
            positions = range(chunk.start + rank, chunk.start + chunk.steps * 4, 2)
            order.update(zip(positions, s))
    assert [order[p] for p in sorted(order)] == [p % 6 for p in range(20)]


def test_data_passes_count_what_the_sampler_draws():
    """Past one pass the sampler starts a fresh permutation: the count the recipe warns with."""
    chunks = plan_chunks([5, 5], samples_per_step=4, checkpoint_every=5)
    sampler = ChunkSampler(15, chunks, samples_per_step=4, seed=0, rank=0, world_size=1)
    drawn = []
    for epoch in range(len(chunks)):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    assert data_passes(10, 4, 15) == len(drawn) / 15 == 40 / 15
    assert sorted(drawn[:15]) == list(range(15)) and sorted(drawn[15:30]) == list(range(15))
    assert data_passes(3, 4, 15) < 1
    assert repeated_data_warning(3, 4, 15) is None
    assert repeated_data_warning(10, 4, 15).startswith(
        "The run draws 40 training samples from a dataset of 15: each sample is trained on ~2.7 times")


def test_changed_data_is_named_against_the_checkpoints_record():
    recorded = {"samples": 300, "mean_sample_len": 63.0, "total_steps": 24}
    assert changed_data_warning(recorded, 300, 63.0) is None
    assert changed_data_warning(recorded, 900, 47.0) == (
        "The training data differs from the checkpoint's (300 samples of ~63.0 tokens then, 900 of ~47.0 now): the "
        "run keeps its plan of 24 steps; the remaining steps draw from the data as it is now, in a new order.")
