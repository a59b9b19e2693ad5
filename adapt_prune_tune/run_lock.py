"""One run at a time in an output directory.

Two runs in one ``output_dir`` (a second ``tune run`` typed while the first still runs in
another terminal, a scheduler that requeues a job whose first copy is still alive) write the
same checkpoint directories. Tried here: the first run died at its next checkpoint write (the
second had removed its ``.tmp`` directory), with an error that blamed the disk, and the second
resumed from checkpoints the first was still writing. With ``overwrite_output_dir=True`` the
second would delete the first's checkpoints outright.

So global rank 0 takes an advisory ``flock`` on ``output_dir/.run.lock`` before the run writes
anything, and holds it for the life of its process. The kernel releases it when the process
ends, however it ends (an exception, ``kill -9``, out of memory, a reboot): there is never a
stale lock to clear by hand. The file keeps the holder's host, pid, start time and command, so
the refused run can say which run is in the way. On a filesystem without ``flock`` (some
Lustre and old NFS mounts) the run goes on unguarded, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO, Any, Dict, Optional

LOCK_NAME = ".run.lock"

log = logging.getLogger(__name__)


class OutputDirInUse(RuntimeError):
    """Another live process holds this output directory's run lock."""


def holder_record(command: str) -> Dict[str, Any]:
    """Who holds the lock, as the refused run will print it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": command,
    }


def in_use_message(output_dir: Path, holder: Optional[Dict[str, Any]]) -> str:
    """The refusal: which run holds ``output_dir``, why two cannot share it, and the ways out."""
    who = "another run"
    stop = "stop it (SIGTERM: it writes a checkpoint of its step and exits)"
    if holder:
        who = f"another run: pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
        if holder.get("command"):
            who += f" (`{holder['command']}`)"
        stop = f"stop it (kill {holder.get('pid')} on {holder.get('host')}: it writes a checkpoint of its step and exits)"
    return (f"output_dir {output_dir} is in use by {who}. Two runs in one output_dir overwrite each other's "
            f"checkpoints. Wait for it to end, or {stop} and continue it with resume_from_checkpoint=True, "
            "or give this run another output_dir")


def _read_holder(handle: IO[str]) -> Optional[Dict[str, Any]]:
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "null")
    except ValueError:  # written by a holder that died mid-write: name no one rather than fail
        return None
    return holder if isinstance(holder, dict) else None


def hold_output_dir(output_dir: Path, command: str) -> Optional[IO[str]]:
    """Take ``output_dir``'s run lock for this process, creating the directory.

    Returns the open lock file: keep a reference for as long as the run lasts (closing it
    releases the lock), or ``None`` where the filesystem has no ``flock``. Raises
    :class:`OutputDirInUse` naming the holder when another live process has it.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(handle)
        handle.close()
        raise OutputDirInUse(in_use_message(output_dir, holder)) from None
    except OSError as e:
        handle.close()
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            log.warning(f"{output_dir}: this filesystem has no flock ({e.strerror}); nothing stops a second run "
                        "from writing into this output_dir while this one runs")
            return None
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(holder_record(command)) + "\n")
    handle.flush()
    return handle
