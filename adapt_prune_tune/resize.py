"""Carrying a training run across a resize: weights and AdamW state, FSDP2 or not.

FSDP2 shards every parameter along dim 0 and owns its storage, so a pruned
model is *rebuilt* (meta init, activation checkpointing, compile, sharding:
the recipe's own ``_setup_model``) and filled from the old one, parameter by
parameter, and so are the optimizer moments. Only rows that change rank move:

* a parameter that is not cut, or cut along columns (``w2``, ``output_proj``),
  keeps its rows, so each rank narrows its own shard: no communication;
* a parameter cut along rows (``q/k/v``, ``w1``/``w3``) needs rows other ranks
  hold: all such parameters of one decoder layer are gathered by a single
  all-gather (:func:`full_tensors`), sliced, and each rank keeps its new shard.

So a resize costs one collective per layer for the weights and one for the
moments, not one or two per tensor, and peak extra memory is one layer's
row-cut parameters, not a full state dict. Every rank walks the same names in
the same order and decides from global shapes and placements alone, which
keeps the collectives matched.
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
    """A DTensor split along dim 0 over a 1-D mesh: how FSDP2 places every parameter."""
    if not hasattr(t, "device_mesh") or t.dim() == 0:
        return False
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh  # (a DTensor's device is its local tensor's: CPU when FSDP2 offloads)
    return mesh.ndim == 1 and tuple(t.placements) == (Shard(0),) and t.device.type == mesh.device_type


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
    """``layers.3`` for ``layers.3.mlp.w1.weight``: the unit whose tensors are gathered together."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


@torch.no_grad()
def full_tensors(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``full_tensor`` of each, batched: one all-gather per (mesh, dtype) for row-sharded DTensors.

    FSDP2 splits dim 0 in ``torch.chunk`` pieces (the first ranks hold ceil(n / world) rows,
    the last ones fewer or none). Each rank packs its pieces, each padded to that ceiling,
    into one flat buffer; after one ``all_gather_into_tensor`` every rank cuts every piece
    back out by the same arithmetic. Plain tensors are returned as they are; DTensors placed
    otherwise take their own ``full_tensor``. A collective on every rank: call it with the
    same list (same shapes, dtypes, placements) everywhere.
    """
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    batches: Dict[Tuple[int, torch.dtype], List[int]] = {}  # by id: hashing a DeviceMesh is slow
    for i, t in enumerate(tensors):
        if _row_sharded(t):
            batches.setdefault((id(t.device_mesh), t.dtype), []).append(i)
        else:
            out[i] = full_tensor(t)
    for index in batches.values():
        batch = [tensors[i] for i in index]
        for i, full in zip(index, _all_gather_rows(batch, batch[0].device_mesh)):
            out[i] = full
    return out


def _all_gather_rows(tensors: Sequence[torch.Tensor], mesh) -> List[torch.Tensor]:
    import torch.distributed as dist

    world, rank = mesh.size(), mesh.get_local_rank()
    locals_ = [t.to_local() for t in tensors]
    layout = []  # per tensor: rows held by each rank, elements per row, padded piece size
    for t, local in zip(tensors, locals_):
        n, row = t.shape[0], math.prod(t.shape[1:])
        chunk = -(-n // world)
        rows = _chunk_rows(n, world)
        if local.shape[0] != rows[rank]:
            raise RuntimeError(f"unexpected shard of {tuple(t.shape)}: {tuple(local.shape)} on rank {rank}")
        layout.append((rows, row, chunk * row))
    size = sum(padded for _, _, padded in layout)
    send = torch.empty(size, dtype=locals_[0].dtype, device=locals_[0].device)  # padding is never read
    offset = 0
    for local, (rows, row, padded) in zip(locals_, layout):
        send[offset : offset + rows[rank] * row].copy_(local.reshape(-1))
        offset += padded
    del locals_
    recv = torch.empty(world * size, dtype=send.dtype, device=send.device)
    dist.all_gather_into_tensor(recv, send, group=mesh.get_group())
    recv = recv.view(world, size)
    out, offset = [], 0
    for t, (rows, row, padded) in zip(tensors, layout):
        pieces = [recv[k, offset : offset + rows[k] * row] for k in range(world)]
        out.append(torch.cat(pieces).view(t.shape))
        offset += padded
    return out


def _narrow_shard(t: torch.Tensor, sl: Optional[Tuple[int, torch.Tensor]]) -> torch.Tensor:
    """A row-sharded tensor cut along a dimension other than rows (or not cut): each rank's own rows.

    A fresh tensor (never the old storage), placed like ``t`` at its new global shape.
    """
    from torch.distributed.tensor import DTensor

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
    """A lazily gathered, sliced "full state dict" of a (sharded) model.

    torchtune's ``load_from_full_model_state_dict`` iterates a full state dict
    item by item and keeps only shards; handing it this view instead of a real
    dict makes the rebuild stream the model. Plain parameters come back sliced.
    FSDP2 parameters come back as DTensors already placed like the old parameter
    (``Shard(0)`` on the same mesh, as ``_setup_model`` places the new one), which
    torchtune's ``distribute_tensor`` passes through unscattered: columns are cut
    on each rank's own rows, and the row-cut parameters of a layer are gathered
    together the first time one of them is asked for.
    """

    def __init__(self, model: nn.Module, slices: SliceMap) -> None:
        self._params = named_parameters(model)
        self._slices = slices
        # Row-sharded parameters cut along rows, by layer: gathered together.
        self._row_cut: Dict[str, List[str]] = defaultdict(list)
        self._sharded = {n: _row_sharded(p) for n, p in self._params.items()}
        for n, sharded in self._sharded.items():
            if sharded and _cuts_rows(slices.get(n)):
                self._row_cut[_layer_key(n)].append(n)
        self._gathered: Dict[str, torch.Tensor] = {}  # one layer's row-cut parameters, new shards

    @torch.no_grad()
    def __getitem__(self, name: str) -> torch.Tensor:
        p, sl = self._params[name], self._slices.get(name)
        if not self._sharded[name]:
            full = full_tensor(p.detach())
            return slice_tensor(full, *sl) if sl is not None else full
        if not _cuts_rows(sl):
            return _narrow_shard(p, sl)
        if name not in self._gathered:
            names = self._row_cut[_layer_key(name)]
            fulls = full_tensors([self._params[n] for n in names])
            self._gathered = {
                n: like(slice_tensor(f, *self._slices[n]), self._params[n]) for n, f in zip(names, fulls)
            }
        return self._gathered.pop(name)

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
    are (see the module docstring: one all-gather per layer for the moments whose
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
        # One layer at a time: its old entries (consumed), one gather for all its moments whose
        # rows change rank, then every entry in the original order; the rest of the moments are
        # cut on each rank's own shard.
        entries = {n: state_source.pop(n, None) if consume else state_source.get(n) for n in names}
        items = [(n, key, value) for n in names for key, value in sorted((entries[n] or {}).items())]
        del entries
        dense = [dense_moment(v) if _is_moment(v, old_shapes.get(n)) else None for n, _, v in items]
        local = [d is not None and _row_sharded(d) and not _cuts_rows(slices.get(n))
                 for (n, _, _), d in zip(items, dense)]
        fulls = iter(full_tensors([d for d, own in zip(dense, local) if d is not None and not own]))
        for (name, key, value), d, own in zip(items, dense, local):
            p, sl = new_params[name], slices.get(name)
            if d is None:
                new_state[p][key] = value
            elif own:  # cut on this rank's rows, already placed like the new parameter
                new_state[p][key] = new_moment(optimizer, p, key, _narrow_shard(d, sl))
            else:
                full = next(fulls)
                new_state[p][key] = new_moment(optimizer, p, key, slice_tensor(full, *sl) if sl is not None else full)
        del items, dense, fulls
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
