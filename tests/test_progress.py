"""The run's one progress display: plain lines a log file keeps, an ETA from measured rates."""

from __future__ import annotations

import io
import logging

from adapt_prune_tune.progress import RunProgress, attach_to_logger, format_duration, parse_progress_line


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(stream=None, **kwargs) -> tuple:
    clock = FakeClock()
    progress = RunProgress(
        prune_steps=[2, 2], train_steps=[4, 8], tokens_per_step=500.0,
        stream=stream or io.StringIO(), interval_s=10.0, clock=clock, **kwargs,
    )
    return progress, clock


def test_plain_lines_parse_and_eta_counts_remaining_work():
    progress, clock = make()
    progress.start_stage(1, pruned=False)
    assert progress.eta_seconds() is None  # nothing timed yet: no guess
    progress.prune_step_done(20.0)
    progress.prune_step_done(20.0)
    progress.start_stage(1, pruned=True)
    for step in range(1, 5):
        clock.now += 5.0
        progress.train_step_done(step, 3.0 - 0.1 * step, 2e-5, 100.0)
    # left: 2 prune steps × 20 s + 8 training steps × 5 s (the first step after a pause is not timed)
    assert progress.eta_seconds() == 2 * 20.0 + 8 * 5.0
    progress.start_stage(2, pruned=False)
    lines = [parse_progress_line(l) for l in progress.stream.getvalue().splitlines()]
    assert all(lines), progress.stream.getvalue()
    last = lines[-1]
    assert (last["stage"], last["stages"], last["prune"], last["prunes"]) == ("2", "2", "0", "2")
    assert (last["step"], last["steps"], last["eta"]) == ("4", "12", "1m20s")


def test_plain_lines_are_rate_limited_but_stage_events_always_print():
    progress, clock = make()
    progress.start_stage(1, pruned=True)
    progress.prune_done = 2
    for step in range(1, 4):
        clock.now += 1.0
        progress.train_step_done(step, 1.0, 1e-5, 10.0)
    assert len(progress.stream.getvalue().splitlines()) == 1  # the stage line; steps within 10 s of it
    clock.now += 10.0
    progress.train_step_done(4, 1.0, 1e-5, 10.0)
    assert len(progress.stream.getvalue().splitlines()) == 2
    assert "\x1b" not in progress.stream.getvalue() and "\r" not in progress.stream.getvalue()


def test_evaluations_count_in_the_eta_and_activity_is_shown():
    progress, clock = make(evaluations_left=3)
    progress.start_stage(1, pruned=False)
    progress.doing("held-out evaluation (original)")
    assert progress.stream.getvalue().splitlines()[-1].endswith("now: held-out evaluation (original)")
    progress.evaluation_done(7.0)
    progress.prune_step_done(10.0)
    progress.prune_step_done(10.0)
    assert progress.evaluations_left == 2 and progress.eta_seconds() is None  # training not timed yet
    progress.train_step_done(1, 1.0, 1e-5, 1.0)
    clock.now += 2.0
    progress.train_step_done(2, 1.0, 1e-5, 1.0)
    assert progress.eta_seconds() == 2 * 10.0 + 10 * 2.0 + 2 * 7.0


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_one_live_line_cleared_before_log_records():
    stream = TTY()
    progress, clock = make(stream=stream)
    logger = logging.getLogger("apt-progress-test")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    attach_to_logger(progress, logger)
    progress.start_stage(1, pruned=False)
    logger.warning("a log record")
    progress.prune_step_done(1.0)
    progress.finish()
    text = stream.getvalue()
    assert text.startswith("\r\x1b[Kstage 1/2")
    assert "\r\x1b[Ka log record\n" in text  # the live line was erased first
    assert text.endswith("\n")


def test_format_duration():
    assert [format_duration(s) for s in (None, 0, 42, 372, 3720)] == ["?", "0s", "42s", "6m12s", "1h02m"]
    assert 0.0 <= make()[0].fraction_done() <= 1.0


def test_a_forced_line_that_says_nothing_new_is_skipped_but_the_interval_line_repeats():
    progress, clock = make(evaluations_left=1)
    progress.doing("held-out evaluation (original)")
    progress.evaluation_done(3.0)
    progress.start_stage(1, pruned=False)  # the same status as the line before: not written again
    lines = progress.stream.getvalue().splitlines()
    assert len(lines) == 2 and "now: held-out evaluation" in lines[0] and "now:" not in lines[1]
    clock.now += 10.0
    progress.show()  # nothing changed for an interval: the line repeats (the run is alive)
    assert progress.stream.getvalue().splitlines()[-1] == lines[1]
    assert len(progress.stream.getvalue().splitlines()) == 3


def test_tokens_per_second_skips_the_step_that_followed_a_checkpoint():
    progress, clock = make()
    progress.start_stage(1, pruned=True)
    progress.train_step_done(1, 3.0, 2e-5, 40.0)  # nothing better known yet: shown
    clock.now += 1.0
    progress.train_step_done(2, 3.0, 2e-5, 70.0)
    progress.pause()  # a checkpoint: the stock timer runs across it
    clock.now += 6.0
    progress.train_step_done(3, 3.0, 2e-5, 40.0)
    assert progress.tokens_per_second == 70.0 and progress.step == 3
    clock.now += 1.0
    progress.train_step_done(4, 3.0, 2e-5, 72.0)
    assert progress.tokens_per_second == 72.0
