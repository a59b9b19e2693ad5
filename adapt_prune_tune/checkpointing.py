"""Run checkpoints of a resizing run: atomic, self-describing, resumable.

A stock torchtune checkpoint cannot describe a pruned model (its builder has
one width per model), so every checkpoint here carries the current per-layer
``arch.json`` next to the weights (torchtune key names, safetensors), the
optimizer state keyed by parameter name, and the recipe state (stage, position
in the token schedule, LR scheduler, pruner history, RNG).

Layout under ``<output_dir>/checkpoints/``::

    step_0000120_prune_0008/   one complete checkpoint (training step, prune step)
        arch.json  model.safetensors  optimizer.pt  recipe_state.pt  COMPLETE
    latest                  text file naming the newest complete checkpoint

A checkpoint is written into ``<name>.tmp`` and renamed only once all its
files are on disk; ``latest`` is replaced atomically afterwards. A kill at any
moment leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from adapt_prune_tune.models import DecoderArch

COMPLETE = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_fingerprint(base_arch: DecoderArch, settings: Dict[str, Any]) -> str:
    """Identifies the base model and method settings a run was started with.

    Resuming with another model or other pruning/schedule settings would
    silently produce a different run, so the recipe refuses mismatches.
    """
    payload = json.dumps({"arch": base_arch.to_dict(), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_run_checkpoint(
    root: Union[str, Path],
    tag: str,
    arch: DecoderArch,
    model_state: Dict[str, torch.Tensor],
    optimizer_state: Optional[Dict[str, Any]],
    recipe_state: Dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write one checkpoint atomically and drop old ones (rank 0 only).

    ``tag`` must sort in run order (e.g. zero-padded step numbers).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / tag
    tmp = root / f"{tag}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    arch.save(tmp / "arch.json")
    save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(recipe_state, tmp / "recipe_state.pt")
    (tmp / COMPLETE).write_text("ok\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a rerun of the same step (after resume) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    _drop_old(root, keep_last, final.name)
    return final


def _drop_old(root: Path, keep_last: int, newest: str) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last] if keep_last > 0 else []:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(root: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint, or None if the run has none yet."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file():
            return candidate
    complete = sorted(p.parent for p in root.glob(f"step_*/{COMPLETE}"))
    return complete[-1] if complete else None


def load_run_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Everything a resumed run needs, with clear errors for incomplete checkpoints."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    arch = DecoderArch.load(path / "arch.json")
    model_state = load_file(str(path / "model.safetensors"))
    optimizer_state = (
        torch.load(path / "optimizer.pt", weights_only=False) if (path / "optimizer.pt").is_file() else None
    )
    recipe_state = torch.load(path / "recipe_state.pt", weights_only=False)
    return {"arch": arch, "model": model_state, "optimizer": optimizer_state, "recipe": recipe_state}


def capture_rng() -> Dict[str, Any]:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: Dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
