"""Data for a resizing run: fixed calibration batches and per-stage training draws.

Calibration: the same token windows at every prune step (so step-to-step
changes in importance reflect the model, not the sample), cut from a
torchtune dataset's tokenized samples; each rank takes its own share.

Training: one seeded permutation of the dataset is consumed front to back, so
stages draw their samples *without replacement*; a stage is split into
checkpoint chunks, and a sampler whose ``set_epoch(e)`` selects chunk ``e``
lets the stock recipe's epoch loop train exactly one chunk per "epoch".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler


def rank_calibration_batch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """The batch a rank's calibration pass runs: the largest divisor of its windows up to ``batch_size``.

    ``batch_size`` is a memory cap, not part of the method: the Taylor scores use the gradient
    summed over a rank's batches of mean losses, which equal batches only scale (every group
    alike), so any divisor cuts the same groups. Every rank then runs the same number of
    batches (FSDP's collectives need it) without the user matching the batch to the ranks:
    512 windows on 16 ranks run as one batch of 32 each under a cap of 64. Raises if the
    windows do not split evenly over the ranks (the one thing a batch cannot fix).
    """
    if num_samples % world_size:
        lower, higher = num_samples // world_size * world_size, -(-num_samples // world_size) * world_size
        fixes = " or ".join(f"pruning.calibration.num_samples={n}" for n in (lower, higher) if n)
        raise ValueError(
            f"pruning.calibration.num_samples ({num_samples}) must be a multiple of the data-parallel ranks "
            f"({world_size}) so every rank scores the same number of windows: set {fixes}"
        )
    share = num_samples // world_size
    return max(d for d in range(1, min(batch_size, share) + 1) if share % d == 0)


def calibration_batches(
    dataset: Dataset,
    num_samples: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> List[Dict[str, torch.Tensor]]:
    """``num_samples`` windows of ``seq_len`` tokens, this rank's share, in batches of at most ``batch_size``.

    Samples are read in a seeded order and concatenated (documents are short
    and uneven; windows over the stream use every token). The batches are dealt to
    the ranks in turn, each of ``rank_calibration_batch`` windows. Raises if the
    data holds fewer tokens than requested or the windows do not split over the ranks.
    """
    batch = rank_calibration_batch(num_samples, batch_size, world_size)
    need = num_samples * seq_len
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    stream: List[int] = []
    for i in order:
        stream.extend(dataset[i]["tokens"])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(
            f"Calibration data has {len(stream):,} tokens but pruning.calibration asks for "
            f"{num_samples} × {seq_len} = {need:,}; lower num_samples/seq_len or add data"
        )
    windows = torch.tensor(stream[:need], dtype=torch.long).view(num_samples, seq_len)
    batches = windows.split(batch)
    return [{"tokens": b} for b in batches[rank::world_size]]


def data_passes(total_steps: int, samples_per_step: int, dataset_len: int) -> float:
    """How many times the run goes through its training data (past 1, samples repeat: the
    sampler draws a fresh permutation per pass)."""
    return total_steps * samples_per_step / max(1, dataset_len)


def repeated_data_warning(total_steps: int, samples_per_step: int, dataset_len: int) -> Optional[str]:
    """What a user with a small corpus should read before the run, not find in an over-fitted model."""
    passes = data_passes(total_steps, samples_per_step, dataset_len)
    if passes <= 1:
        return None
    return (f"The run draws {total_steps * samples_per_step:,} training samples from a dataset of {dataset_len:,}: "
            f"each sample is trained on ~{passes:.1f} times (a fresh shuffle per pass). Repeated data over-fits a "
            "small corpus; add data or lower adapt.total_tokens / adapt.total_steps.")


def changed_data_warning(recorded: Mapping[str, Any], dataset_len: int, mean_sample_len: float) -> Optional[str]:
    """A resumed run's data against the data its checkpoint recorded (``samples`` and
    ``mean_sample_len`` as the writing process found them; ``total_steps``, the plan): the run
    keeps its plan either way, but the user should know the rest of it trains on other data, in
    another order."""
    if recorded["samples"] == dataset_len and math.isclose(recorded["mean_sample_len"], mean_sample_len):
        return None
    return (f"The training data differs from the checkpoint's ({recorded['samples']:,} samples of "
            f"~{recorded['mean_sample_len']:.1f} tokens then, {dataset_len:,} of ~{mean_sample_len:.1f} now): the run "
            f"keeps its plan of {recorded['total_steps']:,} steps; the remaining steps draw from the data as it is "
            "now, in a new order.")


@dataclass(frozen=True)
class Chunk:
    """A run of optimizer steps that ends with a checkpoint."""

    stage: int  # 1-based
    steps: int
    start: int  # position of its first sample in the run's sample stream


def plan_chunks(
    stage_steps: Sequence[int], samples_per_step: int, checkpoint_every: int
) -> List[Chunk]:
    """Split every stage's steps into chunks of at most ``checkpoint_every`` steps."""
    if checkpoint_every < 1:
        raise ValueError(f"adapt.checkpoint_every_n_steps must be >= 1, got {checkpoint_every}")
    chunks, position = [], 0
    for stage, steps in enumerate(stage_steps, start=1):
        done = 0
        while done < steps:
            n = min(checkpoint_every, steps - done)
            chunks.append(Chunk(stage, n, position))
            position += n * samples_per_step
            done += n
    return chunks


class ChunkSampler(Sampler[int]):
    """Yields this rank's samples of chunk ``e`` after ``set_epoch(e)``.

    Positions are dealt round-robin to ranks, so the ranks together consume
    each chunk's samples exactly once, in the same global order whatever the
    world size. The order is a seeded permutation of the dataset per pass over
    it, or, with ``shuffle=False``, the dataset's own order (a curriculum).

    ``steps_done``: optimizer steps the run trained before this process (a resume). A run
    stopped inside a chunk resumes it from its next step: the chunk yields only the samples
    after ``steps_done`` steps' worth of the stream, and the stock loop ends the chunk when
    they run out.
    """

    def __init__(
        self, dataset_len: int, chunks: Sequence[Chunk], samples_per_step: int, seed: int, rank: int, world_size: int,
        shuffle: bool = True, steps_done: int = 0,
    ) -> None:
        self.dataset_len, self.chunks = dataset_len, list(chunks)
        self.samples_per_step, self.seed, self.shuffle = samples_per_step, seed, shuffle
        self.first_position = steps_done * samples_per_step
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._perms: Dict[int, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.dataset_len)
        if not self.shuffle:
            return offset
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(self.dataset_len, generator=g)
        return int(self._perms[epoch][offset])

    def __iter__(self) -> Iterator[int]:
        if not self.chunks:
            return iter(())
        begin, end = self._span()
        return iter(self._index(p) for p in range(begin + self.rank, end, self.world_size))

    def __len__(self) -> int:
        if not self.chunks:
            return 0
        begin, end = self._span()
        return (end - begin) // self.world_size

    def _span(self) -> Tuple[int, int]:
        """Stream positions of the current chunk still to train: [begin, end).

        ``first_position`` is a whole number of steps, each a multiple of the world size, so
        the ranks keep the round-robin they had from the chunk's start.
        """
        chunk = self.chunks[self.epoch]
        end = chunk.start + chunk.steps * self.samples_per_step
        return min(max(chunk.start, self.first_position), end), end
