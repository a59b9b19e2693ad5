"""Stop signals: recorded, not acted on, inside the block; agreed on by every rank."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from adapt_prune_tune.stopping import StopSignals, interrupted_message, signal_name
from _gloo import on_ranks


def test_the_first_signal_is_recorded_and_the_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.received is None and stop.agreed(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGUSR1  # the first one; the process is still here
        assert stop.agreed(torch.device("cpu")) == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal_name(signal.SIGTERM) == "SIGTERM" and signal_name(99) == "99"


def _agree(rank: int, world: int) -> None:
    stop = StopSignals()
    assert stop.agreed(torch.device("cpu")) is None  # nobody asked
    if rank == 1:
        stop.received = int(signal.SIGTERM)  # the signal reached one rank only
    assert stop.agreed(torch.device("cpu")) == signal.SIGTERM


def test_every_rank_learns_of_a_signal_that_reached_one(tmp_path):
    on_ranks(_agree, 2, tmp_path)


def test_ctrl_c_message_names_the_last_checkpoint_and_the_steps_lost():
    command = "tune run adapt_prune_recipe --config c.yaml resume_from_checkpoint=True"
    said = interrupted_message(Path("/r/checkpoints/step_0000100_prune_0002"), 120, 400, 1, 2, command)
    assert said.startswith("Interrupted (Ctrl-C) at training step 120 of 400 (stage 1 of 2). The last checkpoint is "
                           "step_0000100_prune_0002 (training step 100); the 20 steps since are not saved. "
                           f"Continue from it with: {command}. To stop without losing steps, send SIGTERM")
    assert "nothing since is lost" in interrupted_message(Path("step_0000120_prune_0004"), 120, 400, 2, 2, command)
    assert interrupted_message(None, 0, 400, 1, 2, command).endswith(
        "before the run's first checkpoint: nothing to resume, start it again with the same command.")
