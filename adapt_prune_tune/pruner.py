"""Adapt-Pruner's iteration: measure, decide, cut — many small steps.

Each step runs one calibration pass that serves both signals (forward hooks
reduce every layer's input/output to a similarity; the same forward's loss is
back-propagated for Taylor scores), then

1. normalizes layer importance and moves every layer's sparsity by the step's
   share minus A·Î (``sparsity.assign_layer_sparsity``),
2. turns sparsities into whole-group widths (GQA-consistent heads, MLP
   channels in multiples of ``round_to``; the model-wide parameter budget is
   settled to within half a rounding unit),
3. keeps the best-scoring groups and removes the rest physically.

The measuring and planning functions work on plain and FSDP2-sharded models
alike (each rank scores its own shards; only per-channel totals are summed
across ranks), so the
single-process ``prune`` driver below and the distributed recipe share them;
only how the cut is applied differs.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn

from adapt_prune_tune.groups import layer_group_sets
from adapt_prune_tune.importance import (
    collect_layer_similarity,
    importance_from_similarity,
    normalize_importance,
)
from adapt_prune_tune.models import DecoderArch, LayerArch, arch_from_model
from adapt_prune_tune.scoring import (
    coupled_param_names,
    layer_scores,
    needs_gradients,
    scores_from_totals,
    select_attention,
    select_channels,
    slice_totals,
)
from adapt_prune_tune.sparsity import (
    _attention_params,
    allocate_mlp_widths,
    assign_layer_sparsity,
    choose_attention_by_score,
    choose_attention_widths,
    smallest_mlp_width,
    sparsity_for_param_target,
    sparsity_schedule,
)
from adapt_prune_tune.resize import full_tensor, local_rows, named_parameters, reshard
from adapt_prune_tune.surgery import LayerKeep, prune_decoder_

LossFn = Callable[[nn.Module, Dict[str, torch.Tensor]], Tuple[torch.Tensor, int]]

log = logging.getLogger(__name__)


@dataclass
class PruningConfig:
    """The method's knobs (paper / official-code defaults noted)."""

    # Exactly one of the two: fraction of prunable (attention + MLP projection)
    # parameters to remove, or a whole-model parameter count to stop at.
    target_sparsity: Optional[float] = None
    target_params: Optional[int] = None
    steps: int = 50  # paper: 50 iterations to the target
    amplitude: float = 0.02  # A; paper's best 0.02 at 50 steps; 0 = uniform (LLM-Pruner)
    similarity: str = "cosine"  # or "euclidean" / "manhattan"
    # How layer importance is scaled before A multiplies it: "max" (paper: mean 0,
    # max |Î| = 1), "zscore", "mad" (robust: median/MAD) or "rank"; see importance.py.
    importance_normalization: str = "max"
    scorer: str = "taylor"  # |W·∂L/∂W| element-wise, summed per group
    max_layer_sparsity: float = 0.9  # official clamp is 0.99; 0.9 keeps every layer alive
    prune_attention: bool = True
    prune_mlp: bool = True
    min_kv_heads: int = 1
    min_q_per_kv: int = 1
    min_mlp_channels: int = 1
    # MLP widths kept at multiples of this (tensor-core / FP8 friendly shapes); the
    # model-wide budget is then met to within half of round_to channels of one layer.
    round_to: int = 1
    # How a layer's budget is split between heads and MLP channels: "proportional"
    # (same fraction of each, LLM-Pruner's practice) or "score" (the split that keeps
    # the most Taylor score; GQA head steps are coarse).
    attention_allocation: str = "score"
    seed: int = 0

    def __post_init__(self) -> None:
        # Types, ranges and rules live in the config table (which takes its defaults from here).
        from adapt_prune_tune.config_schema import PRUNING_METHOD

        problems = PRUNING_METHOD.problems(asdict(self))
        if problems:
            raise ValueError("; ".join(problems))


def prunable_per_layer(arch: DecoderArch, cfg: PruningConfig) -> torch.Tensor:
    """Parameters per layer in the enabled group kinds (the sparsity denominators)."""
    out = []
    for i in range(arch.num_layers):
        n = arch.layer_attention_params(i) if cfg.prune_attention else 0
        n += arch.layer_mlp_params(i) if cfg.prune_mlp else 0
        out.append(n)
    return torch.tensor(out, dtype=torch.float64)


def resolve_target_sparsity(arch: DecoderArch, cfg: PruningConfig) -> float:
    """Overall sparsity of the enabled parameters that meets the configured target.

    Also checks the target is reachable given the per-layer minimum widths and
    clamp, so a bad target fails before any calibration work.
    """
    prunable = int(prunable_per_layer(arch, cfg).sum())
    if cfg.target_sparsity is not None:
        target = cfg.target_sparsity
    else:
        target = sparsity_for_param_target(arch, cfg.target_params, prunable)
    floor = minimum_arch(arch, cfg)
    reachable = 1.0 - float(prunable_per_layer(floor, cfg).sum()) / prunable
    reachable = min(reachable, cfg.max_layer_sparsity)
    if target > reachable + 1e-9:
        raise ValueError(
            f"pruning target ({target:.1%} of prunable parameters) exceeds what the minimum "
            f"widths and max_layer_sparsity allow ({reachable:.1%}); lower the target or "
            "raise pruning.method.max_layer_sparsity / lower pruning.method.min_* widths"
        )
    return target


def minimum_arch(arch: DecoderArch, cfg: PruningConfig) -> DecoderArch:
    """The narrowest architecture the configured minimum widths (and ``round_to``) allow."""
    smallest = smallest_mlp_width(cfg.min_mlp_channels, cfg.round_to)
    layers = []
    for layer in arch.layers:
        kv, qpk = layer.num_kv_heads, layer.num_heads // layer.num_kv_heads
        if cfg.prune_attention:
            kv, qpk = min(kv, cfg.min_kv_heads), min(qpk, cfg.min_q_per_kv)
        mlp = min(layer.intermediate_dim, smallest) if cfg.prune_mlp else layer.intermediate_dim
        layers.append(LayerArch(kv * qpk, kv, mlp))
    return arch.with_layers(layers)


# --------------------------------------------------------------------------- measuring


def next_token_nll(model: nn.Module, tokens: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of ``tokens`` [B, T] and the number of predictions.

    With chunked output (CEWithChunkedOutputLoss setups) the sum is taken chunk by chunk:
    concatenating the chunks would hold a second copy of the full logits during the pass.
    """
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    chunks = logits if isinstance(logits, list) else [logits]
    bounds = [0]
    for chunk in chunks:
        bounds.append(bounds[-1] + chunk.size(1))
    total = sum(
        nn.functional.cross_entropy(
            chunk.float().reshape(-1, chunk.size(-1)), targets[:, a:b].reshape(-1), reduction="sum"
        )
        for chunk, a, b in zip(chunks, bounds[:-1], bounds[1:])
    )
    return total, targets.numel()


def next_token_loss(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy of a ``{"tokens": [B, T]}`` batch."""
    total, count = next_token_nll(model, batch["tokens"])
    return total / count, count


@dataclass
class Calibration:
    """What one calibration pass measured (identical on every rank)."""

    mean_similarity: torch.Tensor
    loss: float
    tokens: int
    # Summed gradients in fp32 by parameter name, when the model trains in lower precision
    # (bf16 ``.grad`` would round the sum at every batch); None: they are in ``.grad``.
    grads: Optional[Dict[str, torch.Tensor]] = None


def scored_parameters(arch: DecoderArch) -> Set[str]:
    """Model-level names of the parameters whose gradients the Taylor scores read: the
    projections (and attention biases) of every layer; never the embeddings, norms or output."""
    return {
        f"layers.{i}.{name}"
        for i, layer in enumerate(arch.layers)
        for name in coupled_param_names(layer_group_sets(layer, arch.head_dim, arch.attn_bias))
    }


@contextmanager
def gradients_only_for(model: nn.Module, names: Optional[Collection[str]]) -> Iterator[None]:
    """Turn ``requires_grad`` off, for the block, on every parameter not in ``names`` (None:
    leave all), and back on after it, whatever happens inside.

    A calibration backward needs the gradients of the scored projections only. Without the
    rest, autograd skips the output projection's weight gradient (a tokens x dim x vocab
    matmul: a fifth of SmolLM2-135M's forward FLOPs, a quarter of Qwen2.5-0.5B's), the
    embedding's scatter into a vocab x dim buffer, and FSDP2 leaves both out of the
    gradient reduce-scatter (2 GB per calibration batch on Llama-3.1-8B). FSDP2 copies a
    sharded parameter's flag to its unsharded one at every all-gather, so setting it on the
    registered (sharded) parameters between passes is enough. Prune steps run eager, so no
    compiled graph is guarded on these flags."""
    frozen = [] if names is None else [
        p for n, p in named_parameters(model).items() if n not in names and p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def calibrate(
    model: nn.Module,
    batches: Iterable[Dict[str, torch.Tensor]],
    similarity: str = "cosine",
    with_gradients: bool = True,
    loss_fn: LossFn = next_token_loss,
    gradients_of: Optional[Collection[str]] = None,
) -> Calibration:
    """One pass over the calibration batches: layer similarity, loss, and gradients.

    Gradients accumulate in ``.grad`` across batches (the Taylor scores use the
    summed gradient); for parameters below fp32 (bf16 training) they are summed in
    fp32 buffers instead (``Calibration.grads``), one batch's ``.grad`` at a time.
    ``gradients_of`` names the parameters whose gradients the caller reads (None: all);
    the others get none (``gradients_only_for``). Under torch.distributed, statistics
    are summed across ranks, so every rank plans the same cut from the same numbers.
    """
    model.zero_grad(set_to_none=True)
    total_loss, total_tokens = 0.0, 0
    params = named_parameters(model)
    low_precision = with_gradients and any(p.dtype != torch.float32 for p in params.values())
    grads32: Optional[Dict[str, torch.Tensor]] = {} if low_precision else None
    frozen_outside = gradients_only_for(model, gradients_of if with_gradients else None)
    with collect_layer_similarity(list(model.layers), similarity) as collector, frozen_outside:
        for batch in batches:
            collector.enabled = True
            with torch.set_grad_enabled(with_gradients):
                loss, n = loss_fn(model, batch)
            collector.enabled = False
            if with_gradients:
                loss.backward()
            if grads32 is not None:
                for name, p in params.items():
                    if p.grad is not None:
                        g = p.grad.to(torch.float32)
                        grads32[name] = g if name not in grads32 else grads32[name] + g
                        p.grad = None
            total_loss += float(loss.detach()) * n
            total_tokens += n
        sums, counts = collector.sums, collector.counts
    if not with_gradients:
        reshard(model)  # no backward resharded the units (fsdp_reshard_after_forward: False)
    stats = torch.cat([sums, counts, torch.tensor([total_loss, float(total_tokens)], dtype=torch.float64)])
    if dist.is_available() and dist.is_initialized():
        device = next(model.parameters()).device
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu()
    L = len(sums)
    if stats[L : 2 * L].min() <= 0:
        raise ValueError("Calibration data is empty: pruning.calibration needs at least one batch")
    mean = stats[:L] / stats[L : 2 * L]
    return Calibration(mean, float(stats[-2] / stats[-1]), int(stats[-1]), grads32)


def score_layers(
    model: nn.Module,
    arch: DecoderArch,
    scorer: str,
    generator: Optional[torch.Generator] = None,
    summed_grads: Optional[Dict[str, torch.Tensor]] = None,
) -> List[Dict[str, torch.Tensor]]:
    """Group scores of every layer.

    Every score is a sum of an element-wise salience over its group's rows or columns,
    so it is built from per-row and per-column totals (``scoring.slice_totals``). Under
    FSDP2 each rank reduces its own rows of every weight and gradient and one all-reduce
    of those totals (a few numbers per channel, for the whole model) completes them:
    no layer's weights or gradients are gathered, which on a multi-node run would move
    the whole model twice per prune iteration. Tensors placed otherwise (one process, a
    2-D mesh) are scored whole. Gradients come from ``.grad`` or, when given,
    ``summed_grads`` (model-level names, e.g. ``Calibration.grads``). Scores stay on the
    model's device until all layers are done, then move to the host in one transfer.
    """
    sets = [layer_group_sets(layer, arch.head_dim, arch.attn_bias) for layer in arch.layers]
    if scorer == "random":
        return [layer_scores({}, s, scorer, generator) for s in sets]
    grads = needs_gradients(scorer)
    totals: List[Dict[Tuple[str, int], torch.Tensor]] = [{} for _ in sets]  # per layer, by (param, dim)
    partial: List[Tuple[Tuple[int, Tuple[str, int]], torch.Tensor, object]] = []  # summed across ranks
    for i, layer in enumerate(model.layers):
        named = named_parameters(layer)
        for key in sorted({(s.param, s.dim) for gs in sets[i].values() for s in gs.slices}):
            name, dim = key
            weight, grad = named[name].detach(), None
            if grads:
                grad = summed_grads.get(f"layers.{i}.{name}") if summed_grads is not None else named[name].grad
                if grad is None:
                    raise RuntimeError(f"layers.{i}.{name} has no gradient; run the calibration backward first")
            rows = local_rows(weight)
            if rows is None or (grad is not None and local_rows(grad) != rows):
                totals[i][key] = slice_totals(
                    full_tensor(weight), None if grad is None else full_tensor(grad), dim, scorer
                )
                continue
            part = slice_totals(weight.to_local(), None if grad is None else grad.to_local(), dim, scorer)
            if dim == 0:  # this rank's rows, in place among all rows
                placed = part.new_zeros(weight.shape[0])
                placed[rows[0] : rows[1]] = part
                part = placed
            partial.append(((i, key), part, weight.device_mesh))
    for (i, key), summed in _sum_across_ranks(partial).items():
        totals[i][key] = summed
    out = [{kind: scores_from_totals(t, gs, scorer) for kind, gs in s.items()} for s, t in zip(sets, totals)]
    flat = [(d, k) for d in out for k in d]
    if any(d[k].device.type != "cpu" for d, k in flat):
        device = next(d[k].device for d, k in flat if d[k].device.type != "cpu")
        host = torch.cat([d[k].to(device).reshape(-1) for d, k in flat]).cpu()
        for (d, k), t in zip(flat, host.split([d[k].numel() for d, k in flat])):
            d[k] = t
    return out


def _sum_across_ranks(partial: Sequence[Tuple[object, torch.Tensor, object]]) -> Dict[object, torch.Tensor]:
    """Sum each (key, tensor, mesh) over its mesh's ranks: one all-reduce per mesh.

    Every rank calls it with the same keys and sizes in the same order (they follow
    global shapes), so the flat buffers line up.
    """
    by_mesh: Dict[int, List[Tuple[object, torch.Tensor, object]]] = {}
    for item in partial:
        by_mesh.setdefault(id(item[2]), []).append(item)
    out = {}
    for items in by_mesh.values():
        mesh = items[0][2]
        device = _mesh_device(mesh)
        flat = torch.cat([t.to(device) for _, t, _ in items])
        dist.all_reduce(flat, group=mesh.get_group())
        for (key, t, _), summed in zip(items, flat.split([t.numel() for _, t, _ in items])):
            out[key] = summed
    return out


def _mesh_device(mesh) -> torch.device:
    """Where a mesh's collectives run (a CPU-offloaded shard's totals move there first)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


# --------------------------------------------------------------------------- planning


@dataclass
class StepPlan:
    """A decided cut: per-layer keeps, the resulting spec, and why."""

    keeps: List[Optional[LayerKeep]]
    arch: DecoderArch
    sparsity: torch.Tensor  # achieved per-layer sparsity after the cut
    importance: torch.Tensor  # normalized Î used for the decision
    clamped_layers: int
    planned: torch.Tensor  # the adaptive rule's per-layer sparsity, before rounding to whole groups


def plan_step(
    cfg: PruningConfig,
    original: DecoderArch,
    current: DecoderArch,
    sparsity: torch.Tensor,
    target: float,
    importance: torch.Tensor,
    scores: Sequence[Dict[str, torch.Tensor]],
) -> StepPlan:
    """Decide one step's cut from measured importance and group scores (no model needed).

    ``sparsity`` is the rule's state: the previous step's ``StepPlan.planned``
    (``AdaptivePruner`` passes it). Achieved sparsities also work, but then
    every step's rounding to whole groups is baked into the next step's start:
    with coarse units (``round_to`` = 64 against a per-step share of a dozen
    channels) the same tie-broken layers would lose a unit step after step.
    Planned sparsities keep the rounding error of each layer within one unit.
    """
    weights = prunable_per_layer(original, cfg)
    new_sparsity, clamped = assign_layer_sparsity(
        sparsity, target, importance, cfg.amplitude, cfg.max_layer_sparsity, weights
    )
    keep_params = ((1.0 - new_sparsity) * weights).tolist()
    dim, hd, bias = original.embed_dim, original.head_dim, original.attn_bias

    # Per layer: the preferred head widths, and the smallest ones the layer's current
    # MLP can make up for (removed channels never come back, so a layer whose heads
    # drop by more than its share of this step ends below its budget).
    preferred: List[Tuple[int, int]] = []
    feasible: List[Tuple[int, int]] = []
    retained_at: List[Callable[[Tuple[int, int]], float]] = []
    for i, (orig, cur) in enumerate(zip(original.layers, current.layers)):
        cur_qpk = cur.num_heads // cur.num_kv_heads
        if not cfg.prune_attention:
            preferred.append((cur.num_kv_heads, cur_qpk))
            feasible.append(preferred[-1])
            retained_at.append(lambda choice: 0.0)
            continue
        frac = 1.0 - float(new_sparsity[i])
        kv_s, q_s = scores[i]["kv"], scores[i]["q"]
        retained = lambda kv, qpk, kv_s=kv_s, q_s=q_s: select_attention(kv_s, q_s, kv, qpk)[2]
        retained_at.append(lambda choice, retained=retained: retained(*choice))
        min_attention = keep_params[i] - 3 * dim * cur.intermediate_dim if cfg.prune_mlp else 0.0
        if cfg.attention_allocation == "score" and cfg.prune_mlp:
            mlp_cum = scores[i]["mlp"].sort(descending=True).values.cumsum(0)
            choose = lambda m, cur=cur, i=i, retained=retained, mlp_cum=mlp_cum: choose_attention_by_score(
                original, cur, keep_params[i], retained, mlp_cum,
                cfg.min_kv_heads, cfg.min_q_per_kv, cfg.min_mlp_channels, min_params=m, round_to=cfg.round_to,
            )
        else:
            choose = lambda m, orig=orig, cur=cur, frac=frac, retained=retained: choose_attention_widths(
                original, orig, cur, frac, cfg.min_kv_heads, cfg.min_q_per_kv, retained, min_params=m
            )
        preferred.append(choose(0.0))
        feasible.append(choose(min_attention) if min_attention > 0 else preferred[-1])
    attention = _settle_attention(original, current, keep_params, preferred, feasible, retained_at, cfg.prune_mlp)

    current_mlp = [layer.intermediate_dim for layer in current.layers]
    if cfg.prune_mlp:
        # Budgets below count enabled kinds only; add attention back when it is fixed.
        mlp_budget = [
            k + (0 if cfg.prune_attention else _attention_params(dim, hd, kv, qpk, bias))
            for k, (kv, qpk) in zip(keep_params, attention)
        ]
        widths = allocate_mlp_widths(
            original, attention, mlp_budget, current_mlp, cfg.min_mlp_channels, cfg.round_to
        )
    else:
        widths = current_mlp

    keeps: List[Optional[LayerKeep]] = []
    layers: List[LayerArch] = []
    for i, cur in enumerate(current.layers):
        kv, qpk = attention[i]
        new = LayerArch(kv * qpk, kv, widths[i])
        layers.append(new)
        if new == cur:
            keeps.append(None)
            continue
        kv_keep, q_keep, _ = select_attention(scores[i]["kv"], scores[i]["q"], kv, qpk)
        keeps.append(LayerKeep(q_keep, kv_keep, select_channels(scores[i]["mlp"], widths[i])))
    new_arch = current.with_layers(layers)
    achieved = 1.0 - prunable_per_layer(new_arch, cfg) / weights
    return StepPlan(keeps, new_arch, achieved, importance, clamped, new_sparsity)


def _settle_attention(
    original: DecoderArch,
    current: DecoderArch,
    keep_params: Sequence[float],
    preferred: Sequence[Tuple[int, int]],
    feasible: Sequence[Tuple[int, int]],
    retained_at: Sequence[Callable[[Tuple[int, int]], float]],
    prune_mlp: bool,
) -> List[Tuple[int, int]]:
    """Preferred head widths, with just enough head drops undone to meet the model budget.

    When every layer crosses a head boundary in the same step (uniform sparsity
    does this), their MLPs cannot grow back to absorb the overshoot and the model
    would land below its parameter target. Layers then keep their heads one at a
    time, the one whose dropped heads score highest first, until the current MLP
    widths can carry the rest of the budget; the others still drop theirs.
    """
    attention = list(preferred)
    if not prune_mlp:
        return attention
    dim, hd, bias = original.embed_dim, original.head_dim, original.attn_bias
    size = lambda choice: _attention_params(dim, hd, choice[0], choice[1], bias)
    capacity = sum(size(a) + 3 * dim * cur.intermediate_dim for a, cur in zip(attention, current.layers))
    shortfall = sum(keep_params) - capacity
    if shortfall <= 1e-6:
        return attention
    candidates = [i for i in range(len(attention)) if size(feasible[i]) > size(preferred[i])]
    candidates.sort(key=lambda i: retained_at[i](feasible[i]) - retained_at[i](preferred[i]), reverse=True)
    for i in candidates:
        if shortfall <= 1e-6:
            break
        shortfall -= size(feasible[i]) - size(preferred[i])
        attention[i] = feasible[i]
    return attention


# --------------------------------------------------------------------------- driver


@dataclass
class StepRecord:
    """One step's numbers for the run report."""

    step: int
    stage: int
    target: float
    layer_importance: List[float]
    layer_sparsity: List[float]
    calib_loss: float
    params: int
    seconds: float
    clamped_layers: int = 0

    def to_dict(self) -> Dict:
        return asdict(self)


@dataclass
class AdaptivePruner:
    """Stateful side of the method: per-layer sparsity so far and the step history.

    ``sparsity`` is what the cuts achieved; ``planned`` is the adaptive rule's
    own, unrounded state, which the next step continues from (see ``plan_step``).
    """

    cfg: PruningConfig
    original: DecoderArch
    sparsity: torch.Tensor = field(init=False)
    planned: torch.Tensor = field(init=False)
    records: List[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sparsity = torch.zeros(self.original.num_layers, dtype=torch.float64)
        self.planned = torch.zeros(self.original.num_layers, dtype=torch.float64)
        self.final_target = resolve_target_sparsity(self.original, self.cfg)
        self._generator = torch.Generator().manual_seed(self.cfg.seed)

    def measure_and_plan(
        self,
        model: nn.Module,
        arch: DecoderArch,
        batches: Sequence[Dict[str, torch.Tensor]],
        target: float,
        loss_fn: LossFn = next_token_loss,
    ) -> Tuple[StepPlan, Calibration]:
        """Calibrate, score and decide one step toward overall sparsity ``target``."""
        calib = calibrate(
            model, batches, self.cfg.similarity, needs_gradients(self.cfg.scorer), loss_fn, scored_parameters(arch)
        )
        if not math.isfinite(calib.loss) or not bool(torch.isfinite(calib.mean_similarity).all()):
            # Scores and widths computed from NaN would fail deep in the plan, naming nothing.
            raise FloatingPointError(
                f"the calibration pass is not finite (loss {calib.loss}): the model's weights or activations "
                "have diverged. If training ran before this prune, its loss log shows when: lower "
                "optimizer.lr or set clip_grad_norm; a loss of nan from the first step on means optimizer "
                "steps without a single label token (instruction data whose responses tokenizer.max_seq_len "
                "cuts off)"
            )
        importance = normalize_importance(
            importance_from_similarity(calib.mean_similarity, self.cfg.similarity),
            self.cfg.importance_normalization,
        )
        scores = score_layers(model, arch, self.cfg.scorer, self._generator, calib.grads)
        model.zero_grad(set_to_none=True)
        plan = plan_step(self.cfg, self.original, arch, self.planned, target, importance, scores)
        return plan, calib

    def commit(self, plan: StepPlan, calib: Calibration, target: float, stage: int, seconds: float) -> StepRecord:
        """Record a step whose cut has been applied."""
        self.sparsity = plan.sparsity.clone()
        self.planned = plan.planned.clone()
        record = StepRecord(
            step=len(self.records) + 1,
            stage=stage,
            target=target,
            layer_importance=plan.importance.tolist(),
            layer_sparsity=plan.sparsity.tolist(),
            calib_loss=calib.loss,
            params=plan.arch.num_params(),
            seconds=seconds,
            clamped_layers=plan.clamped_layers,
        )
        self.records.append(record)
        if plan.clamped_layers and not any(r.clamped_layers for r in self.records[:-1]):
            log.warning(
                f"Prune step {record.step}: the adaptive rule pushed {plan.clamped_layers} layer(s) past a "
                f"clamp (a layer never regains width and none passes max_layer_sparsity="
                f"{self.cfg.max_layer_sparsity}); they were held at the clamp and the other layers took "
                f"their share, so the overall budget is still exact. This happens when A·importance "
                f"(A={self.cfg.amplitude}) exceeds a step's increment, and it is how the most important "
                f"layers get protected; to avoid it, lower pruning.method.amplitude or prune in fewer, "
                f"larger steps. Said once; clamped_layers per step is in the run record."
            )
        return record

    def state_dict(self) -> Dict:
        return {
            "sparsity": self.sparsity.tolist(),
            "planned_sparsity": self.planned.tolist(),
            "records": [r.to_dict() for r in self.records],
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Dict) -> None:
        self.sparsity = torch.tensor(state["sparsity"], dtype=torch.float64)
        # States saved before the rule kept its own: continue from the achieved sparsities.
        self.planned = torch.tensor(state.get("planned_sparsity", state["sparsity"]), dtype=torch.float64)
        self.records = [StepRecord(**r) for r in state["records"]]
        self._generator.set_state(state["generator"])


def check_model_matches(model: nn.Module, arch: DecoderArch) -> None:
    """Fail before any work if ``model`` cannot be pruned or is not shaped like ``arch``.

    ``arch_from_model`` rejects modules surgery would mishandle (LoRA or
    quantized projections, non-gated MLPs, q/k norms); a spec of another shape
    would slice the wrong rows.
    """
    found = arch_from_model(model)
    shared = ("embed_dim", "head_dim", "attn_bias", "vocab_size")
    if found.layers != arch.layers or any(getattr(found, k) != getattr(arch, k) for k in shared):
        raise ValueError(
            "The architecture spec does not match the model: spec layers "
            f"{[tuple(vars(l).values()) for l in arch.layers]} vs model "
            f"{[tuple(vars(l).values()) for l in found.layers]}"
        )


def prune(
    model: nn.Module,
    arch: DecoderArch,
    batches: Sequence[Dict[str, torch.Tensor]],
    cfg: PruningConfig,
    log: Optional[Callable[[str], None]] = None,
) -> Tuple[DecoderArch, AdaptivePruner]:
    """Prune a plain (single-process) model in place to the configured target.

    Returns the final spec and the pruner (its ``records`` describe every step).
    """
    check_model_matches(model, arch)
    pruner = AdaptivePruner(cfg, arch)
    for target in sparsity_schedule(pruner.final_target, cfg.steps):
        t0 = time.perf_counter()
        plan, calib = pruner.measure_and_plan(model, arch, batches, target)
        arch = prune_decoder_(model, arch, plan.keeps)
        record = pruner.commit(plan, calib, target, stage=1, seconds=time.perf_counter() - t0)
        if log:
            log(
                f"step {record.step}/{cfg.steps}: target {target:.3f}, calib loss "
                f"{calib.loss:.4f}, params {record.params:,}, {record.seconds:.2f}s"
            )
    return arch, pruner
