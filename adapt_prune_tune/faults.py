"""Named fault points: a test kills the run at an exact place to prove it resumes from anywhere.

``ADAPT_PRUNE_TUNE_KILL_AT=<point>:<n>`` makes the process SIGKILL itself the ``n``-th time it
reaches ``point`` (1-based; rank 0 only unless ``<point>:<n>:all``). SIGKILL is what a lost node
or the kernel's OOM killer does: no cleanup, no ``finally``, half-written files left behind.
A signal's name after it sends that signal instead (``training_step:4:SIGTERM``: a scheduler's
stop reaching rank 0 alone); ``ENOSPC`` raises the error a full disk gives a write instead
(``final_write:1:ENOSPC``), and ``OOM`` the error a device out of memory gives
(``calibration:7:OOM``). Unset (always, outside tests), a point costs one dictionary lookup.

Points in the recipe: ``calibration`` (inside a prune step's calibration pass), ``before_resize``
(a cut decided, the model not yet rebuilt), ``checkpoint_write`` (shards on disk, the checkpoint
not yet complete), ``training_step`` (after an optimizer step, mid-chunk), ``final_write`` (the
final weights about to be written), ``export`` (the final weights written, the run record not yet),
``record_write`` (the run record about to be written).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

ENV = "ADAPT_PRUNE_TUNE_KILL_AT"
_seen: Counter = Counter()


def point(name: str, rank: int = 0) -> None:
    """Die here if the environment asks for it (see module doc)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, count, *rest = spec.split(":")
    if target != name or (rank != 0 and "all" not in rest):
        return
    _seen[name] += 1
    if _seen[name] == int(count):
        if "ENOSPC" in rest:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if "OOM" in rest:
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (fault point {name}). Tried to allocate 2.00 GiB.")
        names = [r for r in rest if r.startswith("SIG")]
        os.kill(os.getpid(), signal.Signals[names[0]] if names else signal.SIGKILL)
