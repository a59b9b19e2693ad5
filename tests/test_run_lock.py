"""One run at a time in an output directory: the lock, its refusal and its release."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest

from adapt_prune_tune.run_lock import LOCK_NAME, OutputDirInUse, hold_output_dir


def test_a_second_holder_is_refused_naming_the_first_until_it_lets_go(tmp_path):
    out = tmp_path / "runs" / "a"  # created by the first holder
    first = hold_output_dir(out, "tune run adapt_prune_recipe --config my.yaml")
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "tune run adapt_prune_recipe --config my.yaml"
    with pytest.raises(OutputDirInUse) as refused:  # another open file: flock tells them apart
        hold_output_dir(out, "tune run adapt_prune_recipe --config other.yaml")
    message = str(refused.value)
    assert f"output_dir {out} is in use by another run: pid {os.getpid()} on {holder['host']}" in message
    assert "(`tune run adapt_prune_recipe --config my.yaml`)" in message
    assert f"kill {os.getpid()} on {holder['host']}" in message and "another output_dir" in message
    assert json.loads((out / LOCK_NAME).read_text()) == holder  # the refused one wrote nothing
    first.close()
    second = hold_output_dir(out, "tune run adapt_prune_recipe --config other.yaml")
    assert json.loads((out / LOCK_NAME).read_text())["command"].endswith("other.yaml")
    second.close()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """kill -9 runs no cleanup; the kernel drops the lock with the process."""
    script = (f"import sys, time; sys.path.insert(0, {str(os.getcwd())!r}); from pathlib import Path; "
              "from adapt_prune_tune.run_lock import hold_output_dir; "
              f"h = hold_output_dir(Path({str(tmp_path)!r}), 'first'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirInUse, match=f"pid {proc.pid} "):
            hold_output_dir(tmp_path, "second")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    hold_output_dir(tmp_path, "second").close()


def test_a_filesystem_without_flock_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level("WARNING"):
        assert hold_output_dir(tmp_path, "first") is None
    assert "this filesystem has no flock" in caplog.text


def test_a_lock_file_without_a_readable_holder_still_refuses(tmp_path):
    first = hold_output_dir(tmp_path, "first")
    (tmp_path / LOCK_NAME).write_text("{half")  # a holder that died mid-write, then a live one
    with pytest.raises(OutputDirInUse, match=r"is in use by another run\. Two runs"):
        hold_output_dir(tmp_path, "second")
    first.close()
