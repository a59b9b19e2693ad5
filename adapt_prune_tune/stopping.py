"""Stopping a run cleanly when its job is asked to end, instead of losing the steps since the last checkpoint.

Schedulers end jobs with a signal and a grace period before SIGKILL: Slurm sends SIGTERM at the
time limit or on preemption (30 s by default, ``KillWait``), or SIGUSR1 ahead of it when asked
(``--signal=USR1@120``); Kubernetes sends SIGTERM (30 s, ``terminationGracePeriodSeconds``);
torchrun forwards the signals it handles to its workers and waits ``--shutdown_timeout`` (30 s).
Without a handler the process dies on the spot and the run falls back to its last checkpoint:
up to ``adapt.checkpoint_every_n_steps`` optimizer steps, on an 8B model close to an hour of a
node's time.

The handler only records the signal: a checkpoint is a collective, and the run's state is whole
only between optimizer steps. The recipe asks :meth:`StopSignals.agreed` at those points, on every
rank at once: one all-reduce of the signal number, so all ranks stop at the same step even when
the signal reached them at different times, or reached only some of them (one node's processes).
The run then writes a checkpoint and exits with ``128 + signal``, the shell's convention for a
process ended by that signal; ``resume_from_checkpoint=True`` continues from that very step.

SIGINT is left alone: Ctrl-C is a person asking to stop now, and in a terminal every process of
the job gets it at once (torchrun then sends another), so a "second signal forces" rule could not
tell the two apart. The run stops where it is and says what survives instead
(:func:`interrupted_message`): the last checkpoint, the steps since it, and the command that
continues from it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from adapt_prune_tune.checkpointing import tag_step

STOP_SIGNALS: Tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Records the first stop signal received while the ``with`` block runs.

    Handlers can only be set from the main thread; elsewhere (a recipe driven from a helper
    thread) the block installs nothing and the signals keep their previous behaviour.
    """

    def __init__(self, signals: Tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {int(s): signal.signal(s, self._record) for s in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        # Nothing else here: a handler runs between any two bytecodes, possibly inside logging's
        # or the allocator's locks; the recipe reports the stop where it acts on it.
        if self.received is None:
            self.received = signum

    def agreed(self, device: torch.device) -> Optional[int]:
        """The signal some rank received, on every rank (``None``: none did).

        Collective under ``torch.distributed``: every rank must call it at the same point. Costs
        one all-reduce of one integer and a host sync; the stock loop already syncs every step.
        """
        mine = self.received or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([mine], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            mine = int(flag.item())
        return mine or None


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15 (the number itself for one Python does not name)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def interrupted_message(
    latest: Optional[Path], step: int, total_steps: int, stage: int, stages: int, continue_command: str
) -> str:
    """What a Ctrl-C'd run has kept: its last checkpoint (``latest``; ``None``: none yet) against
    the training step it reached, and how to go on, or how to stop without losing steps next time."""
    where = f"Interrupted (Ctrl-C) at training step {step:,} of {total_steps:,} (stage {stage} of {stages})"
    if latest is None:
        return f"{where}, before the run's first checkpoint: nothing to resume, start it again with the same command."
    saved = tag_step(latest.name)
    lost = f"the {step - saved:,} steps since are not saved" if step > saved else "nothing since is lost"
    return (f"{where}. The last checkpoint is {latest.name} (training step {saved:,}); {lost}. "
            f"Continue from it with: {continue_command}. To stop without losing steps, send SIGTERM or SIGUSR1 "
            "instead (kill -TERM on the process, as Slurm and Kubernetes do): the run finishes its step and "
            "checkpoints it.")
