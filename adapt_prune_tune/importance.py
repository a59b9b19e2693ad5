"""Layer importance: how much each decoder layer changes its input.

Adapt-Pruner ranks layers by *mapping preservation*: a layer whose output hidden
states are nearly its input contributes little and can lose more width. We
measure, for every layer, cosine similarity (default) or Euclidean/Manhattan
distance between the hidden state entering and leaving the block, averaged over
calibration tokens, then normalize to mean 0 and a common scale so that the
amplitude A in the sparsity rule has the same meaning for every model.

Normalization (``IMPORTANCE_NORMALIZATIONS``, ``pruning.method.importance_normalization``):
the paper's ``max`` divides by the largest deviation, so a single outlier layer
(layer 0 of SmolLM2 sits at 1.0 while 26 of its 30 layers stay within ±0.08)
sets the scale and the rule barely adapts among the rest. ``zscore``, ``mad``
and ``rank`` take the scale from all layers instead (see each function). All
are invariant to shifting and positively rescaling I, have mean 0, and map
all-equal importances to zeros (uniform pruning).

Signs: for cosine, *more similar* means *less important* (I = -sim). For
distances a *larger* change means *more important* (I = +d). (The official
code negates the distances as well, which ranks layers backwards.)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Dict, Iterator, List, Optional, Sequence

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


def _centered(importance: torch.Tensor) -> torch.Tensor:
    x = importance.double()
    return x - x.mean()


def _is_degenerate(scale: torch.Tensor) -> bool:
    return bool(scale <= torch.finfo(torch.float64).tiny)


def normalize_max(importance: torch.Tensor) -> torch.Tensor:
    """Î = (I - mean I) / max |I - mean I|: mean 0, largest magnitude 1 (the paper's).

    All-equal importances give all zeros (no layer deserves special treatment),
    which makes the adaptive rule fall back to uniform pruning.
    """
    centered = _centered(importance)
    scale = centered.abs().max()
    if _is_degenerate(scale):
        return torch.zeros_like(centered)
    return centered / scale


@lru_cache(maxsize=None)
def expected_max_abs_normal(n: int) -> float:
    """E[max_i |Z_i|] over ``n`` independent standard normal draws.

    ``∫_0^∞ 1 - P(|Z| <= x)^n dx`` with ``P(|Z| <= x) = erf(x/√2)``, by the
    trapezoid rule on [0, 12] (the integrand there is below n·1e-32). About
    0.80 for one draw (√(2/π)), 1.13 for two, 2.32 for 30 (SmolLM2), 2.35 for 32.
    """
    if n < 1:
        raise ValueError(f"need at least one draw, got {n}")
    x = torch.linspace(0.0, 12.0, 24_001, dtype=torch.float64)
    integrand = 1.0 - torch.special.erf(x / math.sqrt(2.0)) ** n
    return float(torch.trapezoid(integrand, x))


def normalize_zscore(importance: torch.Tensor) -> torch.Tensor:
    """Î = z / E[max |Z|] with z = (I - mean I) / std I (population std).

    Why this scale: under ``max`` the most extreme layer sits at ±1 and A is
    the largest per-step deviation of any layer. Dividing z by the largest |z|
    a normal sample of the same size has on average keeps that: when layer
    importances are spread like a normal sample, the two normalizations agree
    up to sampling noise (std 1/E ≈ 0.43 at 30 layers), so a tuned A carries
    over. They differ exactly when one layer is an outlier: it lands beyond ±1
    (at most √(n-1)/E by Samuelson's inequality: 2.3 for 30 layers) instead of
    pinning every other layer near 0. Not clipped: Î stays an affine map of I
    (same order, same ratios of differences as ``max``; only the scale
    differs), and an outlier's larger |Î| only protects (or prunes) it harder,
    which the rule's clamps bound (no layer regains width or passes
    max_layer_sparsity) while the overall budget stays exact. On SmolLM2 the
    other 29 layers get twice the spread they get under ``max``: the outlier
    still inflates the std; ``mad`` and ``rank`` are robust to it.
    """
    centered = _centered(importance)
    std = centered.pow(2).mean().sqrt()
    if _is_degenerate(std):
        return torch.zeros_like(centered)
    return centered / (std * expected_max_abs_normal(centered.numel()))


# Consistency constants: for normal data both scale estimates below equal the std.
_MAD_TO_STD = 1.0 / (math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(0.5, dtype=torch.float64))))
_MEAN_AD_TO_STD = math.sqrt(math.pi / 2.0)


def _median(x: torch.Tensor) -> torch.Tensor:
    """The median, averaging the two middle values of an even count (torch.median takes the lower)."""
    return torch.quantile(x, 0.5)


def normalize_mad(importance: torch.Tensor) -> torch.Tensor:
    """Robust z-score: center at the median, scale by the median absolute deviation.

    ``u = (I - median I) / (1.4826 · MAD)`` is the "modified z-score" of
    Iglewicz & Hoaglin (1993), recommended over mean/std for exactly this case
    by Leys et al. (2013, "Detecting outliers: do not use standard deviation
    around the mean, use absolute deviation around the median"): an outlier
    moves neither the median nor the MAD, so the bulk of the layers keeps its
    spread whatever layer 0 does. 1.4826 makes the MAD estimate the std of
    normal data; when half the layers or more tie (MAD = 0) the mean absolute
    deviation around the median (times √(π/2), likewise consistent) takes
    over, as in Iglewicz & Hoaglin.

    Scaled like ``zscore`` (divided by E[max |Z|] of a normal sample of this
    size, so normally spread importances reach about ±1), then clipped to
    [-1, 1]: with a robust scale an outlier's score is unbounded (layer 0 of
    SmolLM2 has a modified z-score near 100), and clipping (winsorizing)
    gives it the treatment of the most extreme layer of a normal sample, the
    most the rule's A means to give. SmolLM2's bulk is so tight that 5 of its
    30 layers reach the clip and the others spread over [-0.8, 0.8] (under
    ``max``: ±0.08). Finally shifted to mean 0 so the raw rule stays on the
    schedule (a common shift does not change the fitted sparsities); values
    may then exceed 1 by that shift.
    """
    x = importance.double()
    median = _median(x)
    deviation = (x - median).abs()
    scale = _MAD_TO_STD * _median(deviation)
    if _is_degenerate(scale):
        scale = _MEAN_AD_TO_STD * deviation.mean()
    if _is_degenerate(scale):
        return torch.zeros_like(x)
    robust = ((x - median) / (scale * expected_max_abs_normal(x.numel()))).clamp(-1.0, 1.0)
    return robust - robust.mean()


def normalize_rank(importance: torch.Tensor) -> torch.Tensor:
    """Centered ranks scaled to [-1, 1]: Î = (2 r - (n - 1)) / (n - 1), r from 0 to n-1.

    Only the order of the layers counts, so no outlier can compress the others:
    the least and most important layers sit at -1 and +1 (as under ``max``, so
    A is still the largest per-step deviation) and the rest are evenly spaced
    in between. The price: a layer far more important than the next gets no
    more than one rank's worth (2/(n-1)) of extra protection, and the mean |Î|
    (~0.5) is larger than under ``max`` for normally spread importances (~0.33
    at 30 layers), so the same A adapts more in total. Tied layers share their
    average rank, which keeps the mean exactly 0 and all-equal input at zeros.
    """
    x = importance.double()
    n = x.numel()
    if n < 2:
        return torch.zeros_like(x)
    below = (x[None, :] < x[:, None]).sum(dim=1).double()
    equal = (x[None, :] == x[:, None]).sum(dim=1).double()
    rank = below + (equal - 1.0) / 2.0
    return (2.0 * rank - (n - 1)) / (n - 1)


IMPORTANCE_NORMALIZATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max": normalize_max,
    "zscore": normalize_zscore,
    "mad": normalize_mad,
    "rank": normalize_rank,
}


def normalize_importance(importance: torch.Tensor, method: str = "max") -> torch.Tensor:
    """Normalized layer importance Î (float64, mean 0) by one of ``IMPORTANCE_NORMALIZATIONS``."""
    if method not in IMPORTANCE_NORMALIZATIONS:
        raise ValueError(
            f"importance normalization must be one of {tuple(IMPORTANCE_NORMALIZATIONS)}, got {method!r}"
        )
    return IMPORTANCE_NORMALIZATIONS[method](importance)


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


def layer_importance(
    mean_similarity: torch.Tensor, metric: str = "cosine", normalization: str = "max"
) -> List[float]:
    """Normalized importance Î per layer from mean similarities, as a plain list."""
    return normalize_importance(importance_from_similarity(mean_similarity, metric), normalization).tolist()
