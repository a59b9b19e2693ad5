"""Running a test body on several gloo ranks (CPU processes), as every multi-rank test does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def on_ranks(body: Callable[..., None], world: int, tmp_path: Path, *args: Any) -> None:
    """``body(rank, world, *args)`` in ``world`` spawned processes, each on one thread in one gloo
    group; a failure on any rank fails the caller. ``body`` must be a module-level function
    (spawn pickles it by name)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_rank, args=(body, world, str(tmp_path / "gloo_init"), args), nprocs=world, join=True)


def _rank(rank: int, body: Callable[..., None], world: int, init_file: str, args: Tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    finally:
        dist.destroy_process_group()
