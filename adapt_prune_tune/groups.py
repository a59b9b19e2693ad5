"""Coupled groups: which rows and columns of which weights are removed together.

We know the architectures we prune, so instead of tracing a dependency graph
(Torch-Pruning, LLM-Pruner) the couplings are written down once per layer:

* MLP channel j: row j of w1 (gate) and w3 (up), column j of w2 (down).
* KV head g: rows g·d..(g+1)·d of k_proj and v_proj (and their biases).
* Query head h: rows h·d..(h+1)·d of q_proj (and bias), the same columns of
  output_proj. Query head h reads KV head h // q_per_kv (torchtune expands k/v
  with ``unsqueeze(2).expand(..., q_per_kv, ...)``, HF's ``repeat_kv`` likewise).

The hidden size (residual stream) is never pruned, so embeddings, norms and
the output projection never change. Scoring and surgery both read these
definitions, so every model family goes through one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from adapt_prune_tune.models import LayerArch


@dataclass(frozen=True)
class CoupledSlice:
    """One weight's share of a group set: units of ``unit`` elements along ``dim``."""

    param: str  # name relative to the layer, e.g. "mlp.w1.weight"
    dim: int
    unit: int = 1


@dataclass(frozen=True)
class GroupSet:
    """``count`` groups that share the same coupled slices (e.g. all MLP channels)."""

    kind: str
    count: int
    slices: Tuple[CoupledSlice, ...]


def mlp_channel_groups(layer: LayerArch) -> GroupSet:
    return GroupSet(
        "mlp",
        layer.intermediate_dim,
        (
            CoupledSlice("mlp.w1.weight", 0),
            CoupledSlice("mlp.w3.weight", 0),
            CoupledSlice("mlp.w2.weight", 1),
        ),
    )


def kv_head_groups(layer: LayerArch, head_dim: int, bias: bool) -> GroupSet:
    slices = [
        CoupledSlice("attn.k_proj.weight", 0, head_dim),
        CoupledSlice("attn.v_proj.weight", 0, head_dim),
    ]
    if bias:
        slices += [
            CoupledSlice("attn.k_proj.bias", 0, head_dim),
            CoupledSlice("attn.v_proj.bias", 0, head_dim),
        ]
    return GroupSet("kv", layer.num_kv_heads, tuple(slices))


def query_head_groups(layer: LayerArch, head_dim: int, bias: bool) -> GroupSet:
    slices = [
        CoupledSlice("attn.q_proj.weight", 0, head_dim),
        CoupledSlice("attn.output_proj.weight", 1, head_dim),
    ]
    if bias:
        slices.append(CoupledSlice("attn.q_proj.bias", 0, head_dim))
    return GroupSet("q", layer.num_heads, tuple(slices))


def layer_group_sets(layer: LayerArch, head_dim: int, bias: bool) -> Dict[str, GroupSet]:
    """All group sets of one decoder layer, keyed by kind ("mlp", "kv", "q")."""
    return {
        "mlp": mlp_channel_groups(layer),
        "kv": kv_head_groups(layer, head_dim, bias),
        "q": query_head_groups(layer, head_dim, bias),
    }


def unit_elements(keep: torch.Tensor, unit: int) -> torch.Tensor:
    """Element indices along a dim for kept group indices of ``unit`` elements each."""
    if unit == 1:
        return keep
    offsets = torch.arange(unit, device=keep.device)
    return (keep[:, None] * unit + offsets[None, :]).reshape(-1)
