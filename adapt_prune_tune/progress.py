"""One progress display for a whole Adapt-Accel run: stages, prune steps, training, ETA.

The stock training loop draws a fresh tqdm bar for every call of ``train()`` — here one per
checkpoint chunk of a stage, dozens per run, nested escape codes in a log file — and knows
nothing of the prune steps between them, so nobody can tell how far a run is or when it ends.
:class:`RunProgress` knows the whole plan (stages, prune steps, training steps per stage) and
renders one status on rank 0:

    stage 2/4 · prune 2/2 done · step 37/81 (~18.9k tok) · loss 2.910 · lr 2.0e-05 · 512 tok/s · 46% · ETA 6m12s

On a terminal it is one line redrawn in place (cleared before any log record, so log lines
stay intact); otherwise (a log file, CI) it is a plain line every ``interval_s`` seconds and
at every stage boundary, which :func:`parse_progress_line` reads back.

ETA. Remaining time = remaining prune steps × mean seconds per prune step so far + remaining
training steps × mean seconds per training step so far + remaining held-out evaluations ×
their mean time. Before a kind of work has been timed once, its rate is unknown and the ETA
says so (``ETA ?``) rather than guessing.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, TextIO

_LINE = re.compile(
    r"stage (?P<stage>\d+)/(?P<stages>\d+) · prune (?P<prune>\d+)/(?P<prunes>\d+)(?: done)? · "
    r"step (?P<step>\d+)/(?P<steps>\d+).*?· (?P<percent>\d+)% · ETA (?P<eta>\S+)"
)


def format_duration(seconds: Optional[float]) -> str:
    """``1h02m``, ``6m12s``, ``42s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _tokens(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def parse_progress_line(line: str) -> Optional[Dict[str, str]]:
    """The fields of one plain progress line (stage, stages, prune, prunes, step, steps, percent, eta)."""
    match = _LINE.search(line)
    return match.groupdict() if match else None


@dataclass
class _Rate:
    """Mean seconds per unit of one kind of work, from what has been timed so far."""

    seconds: float = 0.0
    count: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.seconds += seconds
        self.count += count

    def mean(self) -> Optional[float]:
        return self.seconds / self.count if self.count else None


@dataclass
class RunProgress:
    """Where a run stands and how long the rest will take (rank 0 only; see module doc).

    Args:
        prune_steps: adaptive prune steps of every stage (index k-1 for stage k).
        train_steps: optimizer steps of every stage.
        tokens_per_step: training tokens per optimizer step (an estimate is fine).
        evaluations_left: held-out evaluations still to come (0 if none configured).
        stream: where the display goes (default stdout).
        interval_s: seconds between plain lines when ``stream`` is not a terminal.
    """

    prune_steps: Sequence[int]
    train_steps: Sequence[int]
    tokens_per_step: float
    evaluations_left: int = 0
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    interval_s: float = 30.0
    clock: Callable[[], float] = time.perf_counter
    stage: int = 1
    prune_done: int = 0  # prune steps finished in the current stage
    step: int = 0  # optimizer steps finished in the whole run
    loss: Optional[float] = None
    lr: Optional[float] = None
    tokens_per_second: Optional[float] = None
    activity: Optional[str] = None  # what runs now when it is not a training step
    _prune: _Rate = field(default_factory=_Rate)
    _train: _Rate = field(default_factory=_Rate)
    _eval: _Rate = field(default_factory=_Rate)
    _last_step_at: Optional[float] = None
    _last_plain: float = float("-inf")
    _last_text: str = ""
    _live: bool = False

    def __post_init__(self) -> None:
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    # ------------------------------------------------------------------ what happened
    @property
    def total_steps(self) -> int:
        return int(sum(self.train_steps))

    def resume_at(self, stage: int, prune_done: int, step: int) -> None:
        """Continue the display of a resumed run (nothing timed yet in this process)."""
        self.stage, self.prune_done, self.step = stage, prune_done, step

    def start_stage(self, stage: int, pruned: bool) -> None:
        self.stage = stage
        self.prune_done = self.prune_steps[stage - 1] if pruned else 0
        self._last_step_at = None
        self.show(force=True)

    def doing(self, activity: Optional[str]) -> None:
        """Say what runs now (``calibrating + pruning``, ``held-out evaluation``, ...); None: training."""
        self.activity = activity
        self._last_step_at = None
        if activity is not None:
            self.show(force=True)

    def prune_step_done(self, seconds: float) -> None:
        self.activity = None
        self.prune_done += 1
        self._prune.add(seconds)
        self.show(force=True)

    def train_step_done(self, step: int, loss: Optional[float], lr: Optional[float], tokens_per_second: Optional[float]) -> None:
        """One optimizer step logged by the training loop (the first step after a pause is not timed).

        The stock loop's tokens/s for the first step after a checkpoint or an evaluation counts
        that work too (its timer runs across it: ~40 instead of ~70 tok/s on the demo), so the
        line keeps the last figure of a step that was only training.
        """
        now = self.clock()
        timed = self._last_step_at is not None and step > self.step
        if timed:
            self._train.add(now - self._last_step_at, step - self.step)
        self._last_step_at = now
        self.step, self.loss, self.lr = step, loss, lr
        if timed or self.tokens_per_second is None:
            self.tokens_per_second = tokens_per_second
        self.show()

    def evaluation_done(self, seconds: float) -> None:
        self.activity = None
        self._eval.add(seconds)
        self.evaluations_left = max(0, self.evaluations_left - 1)
        self._last_step_at = None  # the next step's time includes no evaluation
        self.show(force=True)

    def pause(self) -> None:
        """Work that is not a training step follows (checkpointing): do not time it as one."""
        self._last_step_at = None

    # ------------------------------------------------------------------ what is left
    def eta_seconds(self) -> Optional[float]:
        prunes_left = self.prune_steps[self.stage - 1] - self.prune_done + sum(self.prune_steps[self.stage :])
        steps_left = self.total_steps - self.step
        parts = [(prunes_left, self._prune.mean()), (steps_left, self._train.mean()), (self.evaluations_left, self._eval.mean())]
        if any(n > 0 and rate is None for n, rate in parts):
            return None
        return sum(n * rate for n, rate in parts if n > 0)

    def fraction_done(self) -> float:
        """Share of the run's work done, weighting prune steps and training steps by their measured cost."""
        prune_total, steps_total = sum(self.prune_steps), self.total_steps
        prune_done = sum(self.prune_steps[: self.stage - 1]) + self.prune_done
        p_rate = self._prune.mean() or 1.0
        t_rate = self._train.mean() or p_rate
        total = prune_total * p_rate + steps_total * t_rate
        return 1.0 if total <= 0 else (prune_done * p_rate + self.step * t_rate) / total

    def line(self) -> str:
        stages = len(self.train_steps)
        prunes = self.prune_steps[self.stage - 1]
        parts = [
            f"stage {self.stage}/{stages}",
            f"prune {self.prune_done}/{prunes}" + (" done" if self.prune_done >= prunes else ""),
            f"step {self.step}/{self.total_steps} (~{_tokens(self.step * self.tokens_per_step)} tok)",
        ]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.1e}")
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:,.0f} tok/s")
        parts.append(f"{100 * self.fraction_done():.0f}%")
        parts.append(f"ETA {format_duration(self.eta_seconds())}")
        if self.activity:
            parts.append(f"now: {self.activity}")
        return " · ".join(parts)

    # ------------------------------------------------------------------ drawing
    def show(self, force: bool = False) -> None:
        if self._tty:
            self.stream.write("\r\x1b[K" + self.line())
            self.stream.flush()
            self._live = True
            return
        now = self.clock()
        due = now - self._last_plain >= self.interval_s
        if not (due or force):
            return
        text = self.line()
        # A forced line that says nothing new (an evaluation ending right before a stage
        # starts) is skipped; the interval line repeats on purpose: the run is still alive.
        if due or text != self._last_text:
            self._last_plain, self._last_text = now, text
            self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        """Erase the live line (a terminal) so that a log record starts on a clean line."""
        if self._tty and self._live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._live = False

    def finish(self) -> None:
        if self._tty and self._live:
            self.stream.write("\n")
            self.stream.flush()
            self._live = False


class ClearLiveLine(logging.Filter):
    """Logging filter that erases the live progress line before a record is written."""

    def __init__(self, progress: RunProgress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


def attach_to_logger(progress: RunProgress, logger: logging.Logger) -> List[logging.Handler]:
    """Install :class:`ClearLiveLine` on the handlers that write ``logger``'s records."""
    handlers: List[logging.Handler] = []
    current: Optional[logging.Logger] = logger
    while current is not None:
        handlers.extend(current.handlers)
        current = current.parent if current.propagate else None
    for handler in handlers:
        handler.addFilter(ClearLiveLine(progress))
    return handlers
