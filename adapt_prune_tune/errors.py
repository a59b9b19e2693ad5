"""How an error raised inside a component the config names (a dataset, a builder, a text) is
shown to the user, under the key that names it.

Libraries wrap the error a user can act on: ``datasets`` raises "An error occurred while
generating the dataset" *from* the ``UnicodeDecodeError`` that says which byte of which file is
not UTF-8. Only the explicit cause chain (``raise ... from``) is followed; an exception's
implicit context is often an unrelated error handled on the way (``datasets`` again: a schema
inference error) and would mislead.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

from adapt_prune_tune.data import rank_calibration_batch


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s ``__cause__`` chain (``error`` itself without one)."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def error_text(error: BaseException, key: Optional[str] = None) -> str:
    """``Type: message`` of ``error``, with its root cause when that says something more, and
    for a file that is not UTF-8 the ``datasets`` option that reads it (``key``: the config
    section that loads the file)."""
    text = f"{type(error).__name__}: {error}"
    root = root_cause(error)
    if root is not error and str(root) not in text:
        text += f" (caused by {type(root).__name__}: {root})"
    if isinstance(root, UnicodeDecodeError):
        where = f"{key}.encoding" if key else "the loader's `encoding`"
        text += f"; the file is not UTF-8: give its encoding, e.g. {where}=latin-1"
    return text


class OutOfMemory(RuntimeError):
    """Memory ran out in a phase of a run; the message names the settings that lower it."""


# What the CPU allocators say where CUDA raises ``torch.OutOfMemoryError``.
_CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def _error_and_root(error: BaseException) -> Tuple[BaseException, ...]:
    """``error`` and, where another error wraps it (``raise ... from``), its root cause."""
    root = root_cause(error)
    return (error,) if root is error else (error, root)


def is_out_of_memory(error: BaseException) -> bool:
    """The device (CUDA, XPU, MPS: ``torch.OutOfMemoryError``) or the host allocator ran out,
    also where another error wraps it (a compiled region's backend failure)."""
    import torch

    for e in _error_and_root(error):
        if isinstance(e, torch.OutOfMemoryError):
            return True
        if isinstance(e, RuntimeError) and (any(text in str(e) for text in _CPU_OUT_OF_MEMORY)
                                            or str(e).startswith("MPS backend out of memory")):
            return True
    return False


# A full disk or quota: the errno, or its text where a library reports it as its own error
# (safetensors: "I/O error: No space left on device (os error 28)").
_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_OUT_OF_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def is_out_of_space(error: BaseException) -> bool:
    """A write failed because the disk (or the user's quota) is full, not for another reason
    (a directory removed under it, a lost mount, permissions): only then is "make room" the fix."""
    for e in _error_and_root(error):
        if isinstance(e, OSError) and e.errno in _OUT_OF_SPACE_ERRNOS:
            return True
        if any(text in str(e) for text in _OUT_OF_SPACE_TEXT):
            return True
    return False


def free_space_that_matters(path: Path, error: BaseException, need: int = 0) -> Optional[int]:
    """Bytes free at ``path`` when the space there explains a failed write: the write ran out of
    it (``is_out_of_space``) or less is free than the ``need``-byte write; ``None`` otherwise, and
    when ``path`` cannot be read (a mount that is gone). A figure beside a permission error or a
    directory removed under the run would point the user at the wrong fix."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    return free if is_out_of_space(error) or free < need else None


def memory_advice(
    phase: Optional[str],
    stage: int,
    *,
    batch_size: int,
    accumulation: int,
    calibration_batch: int,
    calibration_per_rank: int,
    heldout_batch: int,
    activation_checkpointing: bool,
) -> Tuple[str, Dict[str, int]]:
    """Where a run ran out of memory and which settings lower it there, and the changes (halved
    values) a continued run is given. ``phase``: ``calibration``, ``resize``, ``heldout``,
    ``training`` or ``None`` (elsewhere); ``calibration_per_rank``: windows per rank, which the
    calibration batch must divide."""
    checkpointing = "" if activation_checkpointing else ", or enable_activation_checkpointing=True"
    changes: Dict[str, int] = {}
    if phase == "calibration":
        smaller = rank_calibration_batch(calibration_per_rank, max(1, calibration_batch // 2))  # half, or below
        if smaller < calibration_batch:
            changes["pruning.calibration.batch_size"] = smaller
        return (f"stage {stage}'s calibration pass: lower pruning.calibration.batch_size (now {calibration_batch}; "
                f"a divisor of {calibration_per_rank} windows per rank; the cut stays the same, the same windows are "
                f"only batched differently){checkpointing}"), changes
    if phase == "heldout":
        if heldout_batch > 1:
            changes["heldout.batch_size"] = heldout_batch // 2
        return f"a held-out evaluation: lower heldout.batch_size (now {heldout_batch})", changes
    if phase == "training":
        if batch_size > 1 and batch_size % 2 == 0:
            changes.update({"batch_size": batch_size // 2, "gradient_accumulation_steps": accumulation * 2})
        return (f"stage {stage}'s training: lower batch_size (now {batch_size}) and raise "
                f"gradient_accumulation_steps (now {accumulation}) to keep their product{checkpointing}"), changes
    if phase == "resize":
        return (f"stage {stage}'s resize, which holds the old and the new weights and optimizer state at once: run "
                "on more ranks (FSDP shards them; keep batch_size × gradient_accumulation_steps × ranks)"), changes
    return "this run: lower batch_size or pruning.calibration.batch_size", changes
