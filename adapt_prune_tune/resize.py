"""Carrying a training run across a resize: weights and AdamW state, FSDP2 or not.

FSDP2 shards every parameter along dim 0 and owns its storage, so a pruned
model is *rebuilt* (meta init, activation checkpointing, compile, sharding:
the recipe's own ``_setup_model``) and filled from the old one. Both the
weights and the optimizer moments are streamed one parameter at a time: each
old parameter is all-gathered, narrowed to the kept rows/columns and
re-sharded into the new model, so peak extra memory is one full parameter per
rank, not a full state dict. Every rank gathers in the same (state-dict)
order, which keeps the collectives matched.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Iterator, Mapping, Optional

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
    """Place a full tensor the way ``reference`` is placed (sharded or plain), in its dtype or ``dtype``."""
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


class PrunedStateView(Mapping):
    """A lazily gathered, sliced "full state dict" of a (sharded) model.

    torchtune's ``load_from_full_model_state_dict`` iterates a full state dict
    item by item and keeps only shards; handing it this view instead of a real
    dict makes the rebuild stream one parameter at a time.
    """

    def __init__(self, model: nn.Module, slices: SliceMap) -> None:
        self._params = named_parameters(model)
        self._slices = slices

    def __getitem__(self, name: str) -> torch.Tensor:
        full = full_tensor(self._params[name].detach())
        return slice_tensor(full, *self._slices[name]) if name in self._slices else full

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
    full tensors); moments shaped like their parameter are gathered, sliced
    like the parameter and re-sharded like the new parameter (low-bit torchao
    moments are dequantized first and re-quantized with the optimizer's block
    size: see ``optimizer_state``). An empty source
    resets the state (the official code's behaviour, kept for comparison).
    With ``consume`` (a mutable ``state_source`` the caller no longer needs), each
    old entry is removed once re-bound, so old moments are freed as new ones
    are made instead of both sets living until the end.
    """
    if len(optimizer.param_groups) != 1:
        raise NotImplementedError(
            "Resizing supports optimizers with one parameter group (torchtune's recipes build one)"
        )
    new_params = named_parameters(new_model)
    new_state: Dict[torch.Tensor, Dict[str, Any]] = defaultdict(dict)
    for name, p in new_params.items():
        entry = state_source.pop(name, None) if consume else state_source.get(name)
        if not entry:
            continue
        for key, value in sorted(entry.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == old_shapes[name]:
                full = full_tensor(dense_moment(value))
                if name in slices:
                    full = slice_tensor(full, *slices[name])
                new_state[p][key] = new_moment(optimizer, p, key, full)
            else:
                new_state[p][key] = value
    optimizer.param_groups[0]["params"] = list(new_params.values())
    optimizer.state = new_state


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
