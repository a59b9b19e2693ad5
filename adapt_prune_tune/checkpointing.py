"""Run checkpoints of a resizing run: sharded, atomic, pickle-free, resumable on any world size.

A stock torchtune checkpoint cannot describe a pruned model (its builder has one width per
model), so every checkpoint carries the current per-layer ``arch.json`` next to the weights.
What else it holds and how:

* **Tensors, sharded by the ranks that own them.** Every rank writes its own FSDP2 shards of
  the weights and of the optimizer moments to ``model-rank<r>-of-<w>.safetensors`` and
  ``optim-rank<r>-of-<w>.safetensors``, with each shard's global shape and offset in the file's
  safetensors header. Nothing is gathered: a save costs each rank its own shard, where
  gathering full weights and moments onto rank 0 costs one process the whole model, three
  times over (weights + two moments), at every save. Low-bit (torchao) moments are stored
  dequantized, so a checkpoint does not depend on the optimizer's block layout.
* **Everything else as JSON**: recipe position, LR scheduler, pruner history, optimizer
  scalars and hyper-parameters (``state.json``) and each rank's RNG streams
  (``rng-rank<r>.json``). Small tensors in them (RNG states, step counters) are encoded
  inline as dtype + shape + base64 bytes. Loading a checkpoint parses JSON and safetensors
  headers only: no pickle, so no code from the file can run. Checkpoints of older versions
  (``*.pt`` pickles) are refused, not opened.
* **Any world size on resume.** Reading assembles each full tensor from whichever shard files
  hold its pieces, one tensor at a time, and the recipe re-shards it like a base checkpoint
  (``load_from_full_model_state_dict``): a checkpoint from 2 processes resumes on 1 and back.

Layout under ``<output_dir>/checkpoints/``::

    step_0000120_prune_0008/   one complete checkpoint (training step, prune step)
        arch.json  state.json  rng-rank*.json  model-rank*.safetensors  optim-rank*.safetensors  COMPLETE
    latest                     names the newest complete checkpoint

Atomicity: all ranks write into ``<tag>.tmp`` (the output directory must be on a filesystem
every rank sees, as torchtune's own checkpoints require); after a barrier rank 0 syncs the
files, writes ``COMPLETE``, renames the directory and only then moves ``latest``. A kill at
any moment leaves the previous checkpoint intact; a half-written ``.tmp`` is never a
candidate, and is removed by the next save.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from adapt_prune_tune import faults
from adapt_prune_tune.errors import error_text, free_space_that_matters
from adapt_prune_tune.models import DecoderArch
from adapt_prune_tune.optimizer_state import flatten_quantized, is_quantized, unflatten_quantized, wrap_like
from adapt_prune_tune.resize import load_optimizer_state_, named_parameters

COMPLETE = "COMPLETE"
STATE_FILE = "state.json"
FORMAT_VERSION = 2
_TAG = re.compile(r"^step_(\d{7,})_prune_(\d{4,})$")
_SHARDS_KEY = "adapt_prune_tune.shards"
_LEGACY_PICKLES = ("optimizer.pt", "recipe_state.pt")


def checkpoint_tag(step: int, prunes: int) -> str:
    """The directory name of the checkpoint taken at training ``step`` after ``prunes`` prune steps:
    zero-padded so that names read in run order (``_checkpoint_dirs`` sorts by the numbers, so a
    run past 9,999,999 steps still finds its newest)."""
    return f"step_{step:07d}_prune_{prunes:04d}"


def tag_step(tag: str) -> int:
    """The training step a checkpoint directory name records (the inverse of ``checkpoint_tag``)."""
    return _tag_numbers(tag)[0]


def _tag_numbers(tag: str) -> Tuple[int, int]:
    match = _TAG.match(tag)
    if match is None:
        raise ValueError(f"{tag!r} is not a checkpoint name (step_<7+ digits>_prune_<4+ digits>)")
    step, prunes = match.groups()
    return int(step), int(prunes)


def _run_order(path: Path) -> Tuple[int, int]:
    return _tag_numbers(path.name)


class CheckpointError(RuntimeError):
    """A run checkpoint that cannot be used (incomplete, unreadable, of an old format)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint this rank could not write (a full disk, a quota, a lost mount)."""


# --------------------------------------------------------------------------- small files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or its old content: never a part (a failed write leaves no ``.tmp``)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_json(obj: Any) -> Any:
    """``obj`` with tensors, tuples and numpy arrays made JSON-able (see :func:`from_json`)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                               "data": base64.b64encode(raw).decode()}}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(v) for v in obj]}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state keys must be strings, got {list(obj)[:3]}")
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": {"dtype": str(obj.dtype), "data": obj.tolist()}}
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's JSON state")


def from_json(obj: Any) -> Any:
    """Inverse of :func:`to_json`: builds tensors and tuples from data, never runs code."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            spec = obj["__tensor__"]
            dtype = getattr(torch, spec["dtype"])
            raw = bytearray(base64.b64decode(spec["data"]))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            return flat.view(dtype).reshape(spec["shape"]).clone()
        if "__tuple__" in obj:
            return tuple(from_json(v) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            import numpy as np

            spec = obj["__ndarray__"]
            return np.array(spec["data"], dtype=spec["dtype"])
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


def run_fingerprint(base_arch: DecoderArch, settings: Dict[str, Any]) -> str:
    """Identifies the base model and method settings a run was started with.

    Resuming with another model or other pruning/schedule settings would
    silently produce a different run, so the recipe refuses mismatches.
    """
    payload = json.dumps({"arch": base_arch.to_dict(), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def settings_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> List[str]:
    """``key: checkpoint value -> config value`` for every (dotted) key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += settings_differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} in the checkpoint, {b!r} in this config")
    return out


# --------------------------------------------------------------------------- shards


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def unseen_ranks(root: Path, device: torch.device) -> List[int]:
    """Collective: the ranks whose files in ``root`` global rank 0 does not see (empty on one process).

    Every rank writes its shards into one checkpoint directory that rank 0 then completes, so
    ``output_dir`` must be one filesystem for all ranks. With a node-local path (``/tmp``, a local
    NVMe disk) in a multi-node run, the first checkpoint, after the first prune, failed on the other
    nodes with "No such file or directory": the ``.tmp`` directory rank 0 made is not there. Here
    each rank leaves an empty marker at start-up, rank 0 lists them, and every rank gets its answer.
    """
    rank, world = _rank_world()
    if world == 1:
        return []
    launch = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{os.environ.get('MASTER_PORT', '')}"
    marks = root / f".ranks-visible-{hashlib.sha1(launch.encode()).hexdigest()[:8]}"  # this launch's only
    marks.mkdir(parents=True, exist_ok=True)  # on every rank: a node-local root exists only where made
    mark = marks / f"rank{rank:05d}"
    mark.touch()
    _barrier()
    seen = torch.zeros(world, dtype=torch.int32, device=device)
    if rank == 0:
        present = {p.name for p in marks.iterdir()}
        seen = torch.tensor([f"rank{r:05d}" in present for r in range(world)], dtype=torch.int32, device=device)
    dist.broadcast(seen, src=0)
    mark.unlink(missing_ok=True)
    _barrier()
    with contextlib.suppress(OSError):  # another rank of the node may have removed it first
        marks.rmdir()
    return [r for r, ok in enumerate(seen.tolist()) if not ok]


def local_shard(t: torch.Tensor, rank: int) -> Optional[Tuple[torch.Tensor, List[int]]]:
    """This rank's piece of ``t`` and its offset in the full tensor; None if another rank writes it.

    Sharded DTensors: every rank its own non-empty shard. Plain or replicated tensors: rank 0.
    """
    if hasattr(t, "device_mesh"):
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if any(isinstance(p, Shard) for p in t.placements):
            local = t.to_local()
            if local.numel() == 0:
                return None
            _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            return local, list(offset)
        return (t.to_local(), [0] * t.dim()) if rank == 0 else None
    return (t, [0] * t.dim()) if rank == 0 else None


def write_shards(path: Path, tensors: Mapping[str, torch.Tensor], rank: int) -> None:
    """This rank's pieces of ``tensors`` in one safetensors file, with global shapes and offsets.

    A low-bit (torchao) optimizer state is written as its exact parts (codes, block scales, ...)
    under ``<name>@<part>``, with its class and context in the layout.
    """
    pieces: Dict[str, torch.Tensor] = {}
    layout: Dict[str, Dict[str, Any]] = {}
    for name, t in tensors.items():
        shard = local_shard(t, rank)
        if shard is None:
            continue
        local, offset = shard
        layout[name] = {"shape": list(t.shape), "offset": offset}
        if is_quantized(local):
            class_name, ctx, attrs = flatten_quantized(local)
            layout[name]["native"] = {"class": class_name, "ctx": to_json(ctx), "attrs": list(attrs)}
            for attr, value in attrs.items():
                pieces[f"{name}@{attr}"] = value.detach().to("cpu").contiguous()
        else:
            pieces[name] = local.detach().to("cpu").contiguous()
    save_file(pieces, str(path), metadata={_SHARDS_KEY: json.dumps(layout)})


def _read_piece(handle: Any, name: str, spec: Dict[str, Any], dense: bool = True) -> torch.Tensor:
    """One file's piece of ``name``: a plain tensor, or a rebuilt low-bit state (dequantized if ``dense``)."""
    native = spec.get("native")
    if native is None:
        return handle.get_tensor(name)
    attrs = {attr: handle.get_tensor(f"{name}@{attr}") for attr in native["attrs"]}
    local = unflatten_quantized(native["class"], from_json(native["ctx"]), attrs)
    return local.dequantize(torch.float32) if dense else local


class ShardedTensors(Mapping):
    """Full tensors of a checkpoint, each assembled on access from the shard files holding it.

    A read-only mapping name → tensor (CPU): iterating it streams one full tensor at a time,
    which is how the recipe loads weights and re-binds optimizer moments.
    """

    def __init__(self, files: List[Path]) -> None:
        self._pieces: Dict[str, List[Tuple[Path, Dict[str, Any]]]] = {}
        self._shapes: Dict[str, List[int]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                layout = json.loads((handle.metadata() or {}).get(_SHARDS_KEY, "{}"))
            for name, spec in layout.items():
                self._pieces.setdefault(name, []).append((f, spec))
                self._shapes[name] = spec["shape"]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._pieces:
            raise KeyError(name)
        out: Optional[torch.Tensor] = None
        covered = 0
        for f, spec in self._pieces[name]:
            with safe_open(str(f), framework="pt") as handle:
                piece = _read_piece(handle, name, spec)
            if out is None:
                out = torch.empty(self._shapes[name], dtype=piece.dtype)
            index = tuple(slice(o, o + n) for o, n in zip(spec["offset"], piece.shape))
            out[index] = piece
            covered += piece.numel()
        if out is None or covered != out.numel():
            raise CheckpointError(f"tensor {name!r}: the shard files cover {covered} of {out.numel() if out is not None else '?'} elements")
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)

    def shape(self, name: str) -> List[int]:
        return self._shapes[name]

    def is_native(self, name: str) -> bool:
        """Stored as a low-bit optimizer state's exact parts."""
        return any("native" in spec for _, spec in self._pieces.get(name, []))

    def native_piece(self, name: str, file: Path) -> Optional[torch.Tensor]:
        """The exact low-bit state ``file`` holds for ``name`` (a rank's own shard), or None."""
        for f, spec in self._pieces.get(name, []):
            if f == file and "native" in spec:
                with safe_open(str(f), framework="pt") as handle:
                    return _read_piece(handle, name, spec, dense=False)
        return None


class OptimizerState(Mapping):
    """Per-parameter optimizer state of a checkpoint: {name: {key: full tensor or scalar}}.

    Moments come from the shard files (streamed), scalars (step, ...) from the JSON state.
    ``pop`` lets a consumer free each entry once used. Low-bit states are dequantized here
    (for a resize or another world size), unless ``own_file`` names this rank's shard file of
    a checkpoint written by as many ranks: then they are left out, and :meth:`native` gives
    their exact parts (:func:`restore_optimizer_`).
    """

    def __init__(self, moments: ShardedTensors, scalars: Dict[str, Dict[str, Any]], own_file: Optional[Path] = None) -> None:
        self._moments = moments
        self._own_file = own_file
        self._keys: Dict[str, List[str]] = {}
        for flat in moments:
            name, key = flat.rsplit("/", 1)
            self._keys.setdefault(name, []).append(key)
        self._scalars = dict(scalars)
        self._names = list(dict.fromkeys([*self._scalars, *self._keys]))

    def __getitem__(self, name: str) -> Dict[str, Any]:
        if name not in self._names:
            raise KeyError(name)
        entry = dict(self._scalars.get(name, {}))
        for key in self._keys.get(name, []):
            flat = f"{name}/{key}"
            if self._own_file is None or not self._moments.is_native(flat):
                entry[key] = self._moments[flat]
        return entry

    def native(self, name: str) -> Dict[str, torch.Tensor]:
        """This rank's exact low-bit states of ``name`` (empty unless the world size is unchanged)."""
        if self._own_file is None:
            return {}
        out = {}
        for key in self._keys.get(name, []):
            piece = self._moments.native_piece(f"{name}/{key}", self._own_file)
            if piece is not None:
                out[key] = piece
        return out

    def pop(self, name: str, default: Any = None) -> Any:
        if name not in self._names:
            return default
        entry = self[name]
        self._names.remove(name)
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)


# --------------------------------------------------------------------------- save


def _optimizer_parts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Moments (dense, placed like their parameter) and the JSON-able rest of the optimizer."""
    params = named_parameters(model)
    names = {id(p): n for n, p in params.items()}
    moments: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for name, p in params.items():
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == p.shape:
                moments[f"{name}/{key}"] = value  # low-bit states are written as their exact parts
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    return moments, {"scalars": scalars, "param_groups": groups}


def _checkpoint_dirs(root: Path) -> List[Path]:
    return sorted((p for p in root.glob("step_*") if p.is_dir() and _TAG.match(p.name)), key=_run_order)


def save_run_checkpoint(
    root: Union[str, Path],
    tag: str,
    arch: DecoderArch,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    recipe_state: Dict[str, Any],
    rng_state: Dict[str, Any],
    keep_last: int = 2,
) -> Optional[Path]:
    """Write one checkpoint; a collective: every rank calls it (see module doc).

    ``tag`` is ``checkpoint_tag(step, prunes)``; ``recipe_state``
    is rank 0's, ``rng_state`` each rank's own. Returns the checkpoint's path on rank 0.
    """
    if not _TAG.match(tag):
        raise ValueError(f"checkpoint tag {tag!r} is not step_<7+ digits>_prune_<4+ digits>")
    root = Path(root)
    rank, world = _rank_world()
    final, tmp = root / tag, root / f"{tag}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    of = f"rank{rank:05d}-of-{world:05d}"
    own = [tmp / f"model-{of}.safetensors", tmp / f"optim-{of}.safetensors", tmp / f"rng-rank{rank:05d}.json",
           tmp / "arch.json", tmp / STATE_FILE]
    try:
        write_shards(own[0], named_parameters(model), rank)
        optimizer_json = None
        if optimizer is not None:
            moments, optimizer_json = _optimizer_parts(model, optimizer)
            write_shards(own[1], moments, rank)
        own[2].write_text(json.dumps(to_json(rng_state)))
        if rank == 0:
            arch.save(own[3])
            state = {"format": FORMAT_VERSION, "world_size": world, "recipe": recipe_state, "optimizer": optimizer_json}
            own[4].write_text(json.dumps(to_json(state)))
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
        for f in own:  # what this rank wrote of it: space a full disk needs back
            f.unlink(missing_ok=True)
        raise _write_error(root, tag, e) from e
    _barrier()
    if rank != 0:
        _barrier()
        return None
    try:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        faults.point("checkpoint_write")
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(root, tag, e) from e
    if final.exists():  # a rerun of the same step (after resume) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    _drop_old(root, keep_last, final.name)
    _barrier()
    return final


def _write_error(root: Path, tag: str, error: BaseException) -> CheckpointWriteError:
    """What a failed checkpoint write tells the user: the cause, the space there against what the
    last checkpoint took, and that the last complete one is intact (a write goes to ``.tmp``)."""
    from adapt_prune_tune.report import format_bytes  # an error path: the report's plotting stack is no cost here

    text = f"checkpoint {tag} could not be written to {root}: {error_text(error)}."
    last = latest_checkpoint(root)
    try:
        size = sum(f.stat().st_size for f in last.iterdir() if f.is_file()) if last is not None else 0
    except OSError:  # the mount itself is gone
        size = 0
    free = free_space_that_matters(root, error, size)
    if free is not None:
        text += f" {format_bytes(free)} free there"
        text += f"; the last checkpoint took {format_bytes(size)}." if last is not None else "."
    text += (f" The last complete checkpoint, {last.name}, is intact." if last is not None
             else " The run has no complete checkpoint yet.")
    return CheckpointWriteError(text)


def _drop_old(root: Path, keep_last: int, newest: str) -> None:
    done = [p for p in _checkpoint_dirs(root) if (p / COMPLETE).is_file()]
    for old in done[:-keep_last] if keep_last > 0 else []:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- load


def complete_checkpoints(root: Union[str, Path]) -> List[Path]:
    """Complete checkpoints, oldest first (half-written ``.tmp`` directories never count)."""
    return [p for p in _checkpoint_dirs(Path(root)) if (p / COMPLETE).is_file()]


def latest_checkpoint(root: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint, or None if the run has none yet."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _TAG.match(candidate.name) and (candidate / COMPLETE).is_file():
            complete = complete_checkpoints(root)
            # ``latest`` moves after the rename: a newer complete directory wins.
            return complete[-1] if complete and _run_order(complete[-1]) > _run_order(candidate) else candidate
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def load_run_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Everything a resumed run needs, read without unpickling anything.

    Returns ``{"arch", "model": ShardedTensors, "optimizer": {"state": OptimizerState,
    "param_groups"} or None, "recipe": dict, "rng": this rank's (or rank 0's) RNG state,
    "world_size"}``.

    Raises:
        CheckpointError: incomplete, unreadable, or written in the old pickled format.
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    legacy = [name for name in _LEGACY_PICKLES if (path / name).exists()]
    if legacy or not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{path} holds pickled state ({', '.join(legacy) or 'no ' + STATE_FILE}), from an older "
            "version of adapt-prune-tune or not written by it; it is not opened, because unpickling "
            "can run code from the file. Start the run afresh in a new output_dir"
        )
    try:
        state = from_json(json.loads((path / STATE_FILE).read_text()))
        if missing := _missing_files(path, state):
            raise CheckpointError(
                f"{path} lacks {len(missing)} of the files its {_ranks(state.get('world_size') or 1)} wrote "
                f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): a copy that left them out, "
                "or files deleted since"
            )
        arch = DecoderArch.load(path / "arch.json")
        model = ShardedTensors(sorted(path.glob("model-rank*.safetensors")))
        optim_files = sorted(path.glob("optim-rank*.safetensors"))
        rank, world = _rank_world()
        own = path / f"optim-rank{rank:05d}-of-{world:05d}.safetensors"
        optimizer = None
        if state.get("optimizer") is not None:
            optimizer = {
                "state": OptimizerState(
                    ShardedTensors(optim_files), state["optimizer"]["scalars"],
                    own if state.get("world_size") == world and own.is_file() else None,
                ),
                "param_groups": state["optimizer"]["param_groups"],
            }
        rng_file = path / f"rng-rank{rank:05d}.json"
        if state.get("world_size") != world or not rng_file.is_file():
            rng_file = path / "rng-rank00000.json"
        rng = from_json(json.loads(rng_file.read_text()))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage: say which checkpoint and what
        raise CheckpointError(f"{path} is unreadable: {type(e).__name__}: {e}") from e
    return {"path": path, "arch": arch, "model": model, "optimizer": optimizer, "recipe": state["recipe"],
            "rng": rng, "world_size": state.get("world_size")}


def restore_optimizer_(optimizer: torch.optim.Optimizer, model: torch.nn.Module, saved: Mapping[str, Any]) -> None:
    """Install a checkpoint's optimizer state: moments re-sharded like the parameters, low-bit
    states bit-exact when the world size is unchanged (re-quantized from their values otherwise)."""
    load_optimizer_state_(optimizer, model, saved)
    for name, p in named_parameters(model).items():
        for key, local in saved["state"].native(name).items():
            optimizer.state[p][key] = wrap_like(local.to(_local_device(p)), p)


def _local_device(p: torch.Tensor) -> torch.device:
    return p.to_local().device if hasattr(p, "device_mesh") else p.device


def _ranks(n: int) -> str:
    return "rank" if n == 1 else f"{n} ranks"


def _missing_files(path: Path, state: Mapping[str, Any]) -> List[str]:
    """The files of a checkpoint written by ``state["world_size"]`` ranks that are not in ``path``:
    every rank writes its weights, its RNG and (when training) its moments, shard or no shard."""
    world = int(state.get("world_size") or 1)
    names = ["arch.json"]
    for rank in range(world):
        of = f"rank{rank:05d}-of-{world:05d}"
        names += [f"model-{of}.safetensors", f"rng-rank{rank:05d}.json"]
        if state.get("optimizer") is not None:
            names.append(f"optim-{of}.safetensors")
    return [name for name in names if not (path / name).is_file()]


def load_latest(root: Union[str, Path]) -> Dict[str, Any]:
    """The newest complete checkpoint under ``root``; if it is unreadable, an error naming the
    previous complete one and how to resume from it. Nothing is deleted either way.

    Raises:
        FileNotFoundError: ``root`` holds no complete checkpoint.
        CheckpointError: the newest one cannot be used.
    """
    latest = latest_checkpoint(root)
    if latest is None:
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {root} holds no complete checkpoint; "
            "start without resume_from_checkpoint"
        )
    try:
        return load_run_checkpoint(latest)
    except CheckpointError as e:
        earlier = [p for p in complete_checkpoints(root) if _run_order(p) < _run_order(latest)]
        hint = (
            f"The previous complete checkpoint is {earlier[-1]}: move {latest.name} aside (e.g. "
            f"`mv {latest} {latest}.unreadable`) and rerun with resume_from_checkpoint=True to continue from it."
            if earlier
            else "There is no earlier complete checkpoint: start the run afresh in a new output_dir."
        )
        raise CheckpointError(f"Cannot resume: {e}\n{hint} Nothing was deleted.") from e


def capture_rng() -> Dict[str, Any]:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: Dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(tuple(state["numpy"]))
