"""Carrying a training run across a resize: weights and AdamW state, FSDP2 or not.

FSDP2 shards every parameter along dim 0 and owns its storage, so a pruned
model is *rebuilt* (meta init, activation checkpointing, compile, sharding:
the recipe's own ``_setup_model``) and filled from the old one, parameter by
parameter, and so are the optimizer moments. Only rows that change rank move:

* a parameter that is not cut, or cut along columns (``w2``, ``output_proj``),
  keeps its rows, so each rank narrows its own shard: no communication;
* a parameter cut along rows (``q/k/v``, ``w1``/``w3``) is re-sharded over its
  kept rows: each rank sends every other rank exactly the kept rows it holds
  that land in that rank's new shard, for all such parameters of one decoder
  layer in a single all-to-all (:func:`cut_rows`).

So a resize costs one collective per cut layer for the weights and one for the
moments, not one or two per tensor; a rank receives about its own new shard,
not the whole layer, and peak extra memory is one layer's row-cut shards. Every
rank walks the same names in the same order and decides from global shapes,
placements and the (shared) kept indices alone, which keeps the collectives
matched.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from adapt_prune_tune.optimizer_state import dense_moment, new_moment
from adapt_prune_tune.surgery import SliceMap, slice_tensor

_AC_PREFIX = "_checkpoint_wrapped_module."
_COMPILE_PREFIX = "_orig_mod."


def clean_name(name: str) -> str:
    """State-dict name of a parameter (without activation-checkpoint/compile wrappers)."""
    return name.replace(_AC_PREFIX, "").replace(_COMPILE_PREFIX, "")


def named_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    return {clean_name(n): p for n, p in model.named_parameters()}


def reshard(model: nn.Module) -> None:
    """Register every FSDP2 unit's sharded parameters again, after a pass without backward.

    With ``fsdp_reshard_after_forward: False`` a unit keeps its parameters unsharded from its
    forward until its backward. A pass that runs no backward (a loss or perplexity measurement)
    would leave them so: a full copy of the model on every rank, and module parameters that are
    no longer the ones the optimizer holds, which a checkpoint or a resize looks up by identity.
    Without FSDP2 (one process) nothing happens.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Whole tensor of a possibly sharded DTensor (a collective on every rank)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(full: torch.Tensor, reference: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Place a full tensor the way ``reference`` is placed (sharded or plain), in its dtype or ``dtype``.

    A DTensor already placed like ``reference`` (same mesh and placements) is kept as it is.
    """
    dtype = dtype or reference.dtype
    if hasattr(reference, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        local = reference.to_local()
        return distribute_tensor(
            full.to(device=local.device, dtype=dtype),
            reference.device_mesh,
            reference.placements,
            src_data_rank=None,  # every rank holds the same full tensor
        )
    return full.to(device=reference.device, dtype=dtype)


def _row_sharded(t: torch.Tensor) -> bool:
    """Split along dim 0 over a 1-D mesh (FSDP2's placement, :func:`local_rows`) and on the mesh's
    device: what a collective can move as it is (FSDP2 keeps offloaded shards on the CPU)."""
    return local_rows(t) is not None and t.device.type == t.device_mesh.device_type


def _chunk_rows(n: int, world: int) -> List[int]:
    """Rows each rank holds of ``n`` split FSDP2's way (``torch.chunk``: ceil(n / world) each,
    the last ranks fewer or none)."""
    chunk = -(-n // world)
    return [max(0, min(chunk, n - k * chunk)) for k in range(world)]


def local_rows(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(first, stop) of the global rows this rank holds of a DTensor split along dim 0
    over a 1-D mesh (FSDP2's placement, on the device or offloaded); None otherwise."""
    if not hasattr(t, "device_mesh") or t.dim() == 0:
        return None
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        return None
    rank = mesh.get_local_rank()
    rows = _chunk_rows(t.shape[0], mesh.size())
    first = sum(rows[:rank])
    if t.to_local().shape[0] != rows[rank]:
        raise RuntimeError(f"unexpected shard of {tuple(t.shape)}: {tuple(t.to_local().shape)} on rank {rank}")
    return first, first + rows[rank]


def _layer_key(name: str) -> str:
    """``layers.3`` for ``layers.3.mlp.w1.weight``: the unit whose tensors move together."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


@torch.no_grad()
def cut_rows(tensors: Sequence[torch.Tensor], indices: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Row-sharded DTensors cut to the given (sorted, global) rows and re-sharded FSDP2's way.

    FSDP2 splits dim 0 in ``torch.chunk`` pieces (the first ranks hold ceil(n / world)
    rows, the last ones fewer or none), before and after the cut. The new shard of rank r
    is ``index[new rows of r]``; as the index is sorted, the part of it that rank q holds is
    one contiguous run, found by ``searchsorted`` on both sides from shapes and indices
    alone. Each rank sends those runs in one ``all_to_all_single`` per (mesh, dtype) and
    concatenates what it receives in rank order, which is the new shard in row order. A
    collective on every rank: call it with the same tensors (shapes, dtypes, placements)
    and indices everywhere.
    """
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    batches: Dict[Tuple[int, torch.dtype], List[int]] = {}  # by id: hashing a DeviceMesh is slow
    for i, t in enumerate(tensors):
        if not _row_sharded(t):
            raise ValueError(f"cut_rows needs tensors split along dim 0 over a 1-D mesh, got {type(t).__name__}")
        batches.setdefault((id(t.device_mesh), t.dtype), []).append(i)
    for members in batches.values():
        moved = _exchange_rows([tensors[i] for i in members], [indices[i] for i in members])
        for i, t in zip(members, moved):
            out[i] = t
    return out


class _RowRuns:
    """Where a row cut's kept rows come from and go to, over ``world`` ranks.

    Positions in the sorted ``index``: rank q's old rows are ``[pos[q], pos[q + 1])`` of it,
    rank r's new shard is ``[new[r], new[r + 1])``; rank r's new shard takes from rank q the
    overlap of the two (one run, as the index is sorted).
    """

    def __init__(self, index: torch.Tensor, n: int, world: int) -> None:
        old, new = _chunk_rows(n, world), _chunk_rows(int(index.numel()), world)
        old_bounds = torch.tensor([sum(old[:q]) for q in range(world + 1)], dtype=index.dtype)
        self.pos = torch.searchsorted(index, old_bounds).tolist()
        self.new = [sum(new[:r]) for r in range(world + 1)]

    def run(self, r: int, q: int) -> Tuple[int, int]:
        lo, hi = max(self.pos[q], self.new[r]), min(self.pos[q + 1], self.new[r + 1])
        return lo, max(lo, hi)

    def count(self, r: int, q: int) -> int:
        lo, hi = self.run(r, q)
        return hi - lo


def _exchange_rows(tensors: Sequence[torch.Tensor], indices: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    mesh = tensors[0].device_mesh
    world, me = mesh.size(), mesh.get_local_rank()
    locals_ = [t.to_local() for t in tensors]
    cpu_indices = [ix.detach().to("cpu", torch.int64) for ix in indices]
    runs = [_RowRuns(ix, t.shape[0], world) for t, ix in zip(tensors, cpu_indices)]
    row_elems = [math.prod(t.shape[1:]) for t in tensors]
    old_first = [local_rows(t)[0] for t in tensors]  # (checks each shard is FSDP2's)
    # The kept rows this rank holds, in index order, which is also destination order: one
    # index_select per tensor, then each destination's run is a view of it.
    kept = []
    for local, ix, run, first in zip(locals_, cpu_indices, runs, old_first):
        mine = ix[run.pos[me] : run.pos[me + 1]] - first
        kept.append(local.index_select(0, mine.to(local.device)).reshape(-1))
    send_parts, send_sizes, recv_sizes = [], [], []
    for r in range(world):
        for rows, run, e in zip(kept, runs, row_elems):
            lo, hi = run.run(r, me)
            start = (lo - run.pos[me]) * e
            send_parts.append(rows[start : start + (hi - lo) * e])
        send_sizes.append(sum(run.count(r, me) * e for run, e in zip(runs, row_elems)))
        recv_sizes.append(sum(run.count(me, r) * e for run, e in zip(runs, row_elems)))
    send = torch.cat(send_parts)
    del send_parts, kept
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=mesh.get_group())
    del send
    pieces: List[List[torch.Tensor]] = [[] for _ in tensors]
    offset = 0
    for q in range(world):  # from each rank, its rows of every tensor, in the order sent
        for k, (run, e) in enumerate(zip(runs, row_elems)):
            count = run.count(me, q) * e
            pieces[k].append(recv[offset : offset + count])
            offset += count
    out = []
    for t, ix, parts in zip(tensors, cpu_indices, pieces):
        shape = (int(ix.numel()), *t.shape[1:])
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        local = torch.cat(parts).view(-1, *t.shape[1:])
        out.append(DTensor.from_local(local, mesh, t.placements, run_check=False,
                                      shape=torch.Size(shape), stride=stride))
    return out


def _narrow_shard(t: torch.Tensor, sl: Optional[Tuple[int, torch.Tensor]], copy: bool = True) -> torch.Tensor:
    """A row-sharded tensor cut along a dimension other than rows (or not cut): each rank's own rows.

    Placed like ``t`` at its new global shape; a fresh tensor, except an uncut ``t`` with
    ``copy=False`` (a caller that owns ``t`` and drops it), which comes back as it is.
    """
    from torch.distributed.tensor import DTensor

    if sl is None and not copy:
        return t
    local = t.to_local()
    shape = list(t.shape)
    if sl is None:
        local = local.clone()
    else:
        dim, index = sl
        local = slice_tensor(local, dim, index)
        shape[dim] = int(index.numel())
    stride = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return DTensor.from_local(
        local, t.device_mesh, t.placements, run_check=False, shape=torch.Size(shape), stride=tuple(stride)
    )


def _cuts_rows(sl: Optional[Tuple[int, torch.Tensor]]) -> bool:
    return sl is not None and sl[0] == 0


class PrunedStateView(Mapping):
    """A lazily computed, sliced "full state dict" of a (sharded) model.

    torchtune's ``load_from_full_model_state_dict`` iterates a full state dict
    item by item and keeps only shards; handing it this view instead of a real
    dict makes the rebuild stream the model. Plain parameters come back sliced.
    FSDP2 parameters come back as DTensors already placed like the old parameter
    (``Shard(0)`` on the same mesh, as ``_setup_model`` places the new one), which
    torchtune's ``distribute_tensor`` passes through unscattered: columns are cut
    on each rank's own rows, and the row-cut parameters of a layer are re-sharded
    together (one all-to-all, :func:`cut_rows`) the first time one of them is asked for.
    """

    def __init__(self, model: nn.Module, slices: SliceMap) -> None:
        self._params = named_parameters(model)
        self._slices = slices
        # Row-sharded parameters cut along rows, by layer: moved together.
        self._row_cut: Dict[str, List[str]] = defaultdict(list)
        self._sharded = {n: _row_sharded(p) for n, p in self._params.items()}
        for n, sharded in self._sharded.items():
            if sharded and _cuts_rows(slices.get(n)):
                self._row_cut[_layer_key(n)].append(n)
        self._moved: Dict[str, torch.Tensor] = {}  # one layer's row-cut parameters, new shards

    @torch.no_grad()
    def __getitem__(self, name: str) -> torch.Tensor:
        p, sl = self._params[name], self._slices.get(name)
        if not self._sharded[name]:
            full = full_tensor(p.detach())
            return slice_tensor(full, *sl) if sl is not None else full
        if not _cuts_rows(sl):
            return _narrow_shard(p, sl)
        if name not in self._moved:
            names = self._row_cut[_layer_key(name)]
            cut = cut_rows([self._params[n] for n in names], [self._slices[n][1] for n in names])
            self._moved = dict(zip(names, cut))
        return self._moved.pop(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        raise TypeError("PrunedStateView is read-only")


def gather_full_state(model: nn.Module, rank0_only: bool = True) -> Dict[str, torch.Tensor]:
    """Full CPU state dict (kept on rank 0 only by default: checkpoint writers)."""
    import torch.distributed as dist

    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for name, p in named_parameters(model).items():
        t = full_tensor(p.detach())
        if keep:
            out[name] = t.cpu()
    return out


@torch.no_grad()
def rebind_optimizer_(
    optimizer: torch.optim.Optimizer,
    new_model: nn.Module,
    state_source: Mapping[str, Mapping[str, Any]],
    slices: SliceMap,
    old_shapes: Mapping[str, torch.Size],
    consume: bool = False,
) -> None:
    """Point ``optimizer`` at ``new_model``'s parameters and install sliced state.

    The optimizer object (and so the LR scheduler bound to it) survives the
    resize. ``state_source`` maps names to the *old* state entries (sharded or
    full tensors); moments shaped like their parameter are sliced like the
    parameter and placed like the new parameter, layer by layer as the weights
    are (see the module docstring: one all-to-all per layer for the moments whose
    rows change rank; low-bit torchao moments are dequantized first and
    re-quantized with the optimizer's block size: see ``optimizer_state``). An
    empty source resets the state (the official code's behaviour, kept for
    comparison). With ``consume`` (a mutable ``state_source`` the caller no longer
    needs), each layer's old entries are removed once re-bound, so old moments are
    freed as new ones are made instead of both sets living until the end.
    """
    if len(optimizer.param_groups) != 1:
        raise NotImplementedError(
            "Resizing supports optimizers with one parameter group (torchtune's recipes build one)"
        )
    new_params = named_parameters(new_model)
    new_state: Dict[torch.Tensor, Dict[str, Any]] = defaultdict(dict)
    layers: Dict[str, List[str]] = defaultdict(list)
    for name in new_params:
        layers[_layer_key(name)].append(name)
    for names in layers.values():
        # One layer at a time: its old entries (consumed), one all-to-all for all its moments
        # whose rows change rank, then every entry in the original order; the rest of the
        # moments are cut on each rank's own shard.
        entries = {n: state_source.pop(n, None) if consume else state_source.get(n) for n in names}
        items = [(n, key, value) for n in names for key, value in sorted((entries[n] or {}).items())]
        del entries
        dense = [dense_moment(v) if _is_moment(v, old_shapes.get(n)) else None for n, _, v in items]
        sharded = [d is not None and _row_sharded(d) for d in dense]
        row_cut = [s and _cuts_rows(slices.get(n)) for (n, _, _), s in zip(items, sharded)]
        moved = iter(cut_rows([d for d, cut in zip(dense, row_cut) if cut],
                              [slices[n][1] for (n, _, _), cut in zip(items, row_cut) if cut]))
        for (name, key, value), d, own, cut in zip(items, dense, sharded, row_cut):
            p, sl = new_params[name], slices.get(name)
            if d is None:
                new_state[p][key] = value
            elif cut:  # re-sharded over the kept rows, placed like the new parameter
                new_state[p][key] = new_moment(optimizer, p, key, next(moved))
            elif own:  # cut on this rank's rows (an uncut moment consumed is kept, not copied)
                new_state[p][key] = new_moment(optimizer, p, key, _narrow_shard(d, sl, copy=not consume))
            else:  # plain (one process, a checkpoint's full tensors) or placed otherwise
                full = full_tensor(d)
                new_state[p][key] = new_moment(optimizer, p, key, slice_tensor(full, *sl) if sl is not None else full)
        del items, dense, moved
    optimizer.param_groups[0]["params"] = list(new_params.values())
    optimizer.state = new_state


def _is_moment(value: Any, param_shape: Optional[torch.Size]) -> bool:
    """A state tensor shaped like its parameter (AdamW's moments), which follows the parameter's cut."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param_shape


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Dict[str, Any]]:
    """The optimizer's live state entries keyed by parameter name (no gathering)."""
    names = {id(p): n for n, p in named_parameters(model).items()}
    return {names[id(p)]: entry for p, entry in optimizer.state.items()}


def parameter_shapes(model: nn.Module) -> Dict[str, torch.Size]:
    """Global (unsharded) shapes of every parameter."""
    return {n: p.shape for n, p in named_parameters(model).items()}


def load_optimizer_state_(
    optimizer: torch.optim.Optimizer, model: nn.Module, full: Mapping[str, Any]
) -> None:
    """Install a checkpoint's optimizer state (``{"state": {name: {key: full tensor or scalar}},
    "param_groups": [...]}``, e.g. ``checkpointing.OptimizerState``) into an optimizer over ``model``."""
    shapes = parameter_shapes(model)
    rebind_optimizer_(optimizer, model, full["state"], {}, shapes)
    for key, value in full["param_groups"][0].items():
        if key != "params":
            optimizer.param_groups[0][key] = value
