"""Layer importance: how much each decoder layer changes its input.

Adapt-Pruner ranks layers by *mapping preservation*: a layer whose output hidden
states are nearly its input contributes little and can lose more width. We
measure, for every layer, cosine similarity (default) or Euclidean/Manhattan
distance between the hidden state entering and leaving the block, averaged over
calibration tokens, then normalize to mean 0 and max |value| 1 so that the
amplitude A in the sparsity rule has the same meaning for every model.

Signs: for cosine, *more similar* means *less important* (I = -sim). For
distances a *larger* change means *more important* (I = +d). (The official
code negates the distances as well, which ranks layers backwards.)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn

SIMILARITY_METRICS = ("cosine", "euclidean", "manhattan")


def token_similarity(x: torch.Tensor, y: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Per-token similarity (cosine) or distance (euclidean/manhattan) of [..., H] states."""
    x, y = x.float(), y.float()
    if metric == "cosine":
        return nn.functional.cosine_similarity(x, y, dim=-1)
    if metric == "euclidean":
        return (x - y).norm(p=2, dim=-1)
    if metric == "manhattan":
        return (x - y).norm(p=1, dim=-1)
    raise ValueError(f"similarity metric must be one of {SIMILARITY_METRICS}, got {metric!r}")


def importance_from_similarity(mean_similarity: torch.Tensor, metric: str) -> torch.Tensor:
    """Raw importance I_i from the mean per-layer similarity/distance (see module doc)."""
    if metric == "cosine":
        return -mean_similarity
    if metric in ("euclidean", "manhattan"):
        return mean_similarity.clone()
    raise ValueError(f"similarity metric must be one of {SIMILARITY_METRICS}, got {metric!r}")


def normalize_importance(importance: torch.Tensor) -> torch.Tensor:
    """Î = (I - mean I) / max |I - mean I|: mean 0, largest magnitude 1.

    All-equal importances give all zeros (no layer deserves special treatment),
    which makes the adaptive rule fall back to uniform pruning.
    """
    centered = importance.double() - importance.double().mean()
    scale = centered.abs().max()
    if scale <= torch.finfo(torch.float64).tiny:
        return torch.zeros_like(importance, dtype=torch.float64)
    return centered / scale


class LayerSimilarityCollector:
    """Accumulates input/output similarity of every layer during forward passes.

    Hooks only reduce each layer's [B, T, H] states to two scalars (sum and
    token count), so no activations are kept and the same forward pass can also
    serve the Taylor gradients. ``enabled`` must be False during backward:
    activation checkpointing re-runs layer forwards there and would count twice.
    """

    def __init__(self, layers: Sequence[nn.Module], metric: str = "cosine") -> None:
        if metric not in SIMILARITY_METRICS:
            raise ValueError(f"similarity metric must be one of {SIMILARITY_METRICS}, got {metric!r}")
        self.metric = metric
        self.enabled = True
        self._mask: Optional[torch.Tensor] = None
        self._num_layers = len(layers)
        # Accumulated on the activations' device: no host sync inside the forward pass
        # (a per-layer .cpu() would stall the GPU queue once per layer and batch).
        self._sums: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None
        self._handles = [
            layer.register_forward_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            if not self.enabled:
                return
            x = args[0] if args else kwargs["x"]
            with torch.no_grad():
                sim = token_similarity(x.detach(), output.detach(), self.metric)
                if self._sums is None or self._sums.device != sim.device:
                    self._sums = self._accumulator(sim.device, self._sums)
                    self._counts = self._accumulator(sim.device, self._counts)
                dtype = self._sums.dtype
                if self._mask is not None:
                    mask = self._mask.to(sim.device)
                    self._sums[index] += (sim * mask).sum(dtype=dtype)
                    self._counts[index] += mask.sum(dtype=dtype)
                else:
                    self._sums[index] += sim.sum(dtype=dtype)
                    self._counts[index] += sim.numel()

        return hook

    def _accumulator(self, device: torch.device, previous: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        fresh = torch.zeros(self._num_layers, dtype=dtype, device=device)
        return fresh if previous is None else fresh + previous.to(device=device, dtype=dtype)

    @property
    def sums(self) -> torch.Tensor:
        """Per-layer similarity sums so far (float64, CPU; one transfer)."""
        if self._sums is None:
            return torch.zeros(self._num_layers, dtype=torch.float64)
        return self._sums.to(device="cpu", dtype=torch.float64)

    @property
    def counts(self) -> torch.Tensor:
        """Per-layer token counts so far (float64, CPU)."""
        if self._counts is None:
            return torch.zeros(self._num_layers, dtype=torch.float64)
        return self._counts.to(device="cpu", dtype=torch.float64)

    def set_token_mask(self, mask: Optional[torch.Tensor]) -> None:
        """Only count real tokens (a [B, T] 0/1 mask), not padding."""
        self._mask = None if mask is None else mask.float()

    def mean(self) -> torch.Tensor:
        """Mean similarity per layer over all tokens seen (summed across ranks by the caller)."""
        counts = self.counts
        if (counts == 0).any():
            raise RuntimeError("No calibration tokens reached some layers; run a forward pass first")
        return self.sums / counts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextmanager
def collect_layer_similarity(
    layers: Sequence[nn.Module], metric: str = "cosine"
) -> Iterator[LayerSimilarityCollector]:
    """Context manager around ``LayerSimilarityCollector`` that always removes its hooks."""
    collector = LayerSimilarityCollector(layers, metric)
    try:
        yield collector
    finally:
        collector.remove()


def layer_importance(mean_similarity: torch.Tensor, metric: str = "cosine") -> List[float]:
    """Normalized importance Î per layer from mean similarities, as a plain list."""
    return normalize_importance(importance_from_similarity(mean_similarity, metric)).tolist()
