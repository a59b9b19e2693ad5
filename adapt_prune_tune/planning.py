"""``adapt-prune-tune plan``: a run's stages, sizes, token budgets and memory, before it runs.

    adapt-prune-tune plan llama3_1/8B_adapt --world-size 8
    adapt-prune-tune plan smollm2/135M_adapt adapt.total_tokens=2_000_000 --json

The config is resolved and overridden exactly like ``tune run adapt_prune_recipe``,
the model is built on the meta device (no weights, no download) and every
up-front check of the recipe runs (``config_checks``, the calibration split,
the run length, the optimizer and LR-schedule components), so a plan fails where
the run would, with its message. File problems (missing checkpoint, tokenizer and
data files; an output directory that holds a run or lacks room for a checkpoint) are
reported as warnings instead: a plan is made before the model is downloaded.

What each figure is:

* **Parameters after a stage's prune** are exact whatever the adaptive rule
  does: the rule's per-layer sparsities are fitted so their parameter-weighted
  mean is the schedule's target (``sparsity.fit_to_budget``), and the MLP
  widths settle the model-wide sum to within half a rounding unit
  (``round_to`` channels, 3·dim parameters each; ``allocate_mlp_widths``).
  So the count is ``base - target_k · prunable``, and what the rule changes is
  how the remaining width is spread over the layers.
* **Per-layer widths.** Uniform pruning (A = 0) leaves every layer at the
  target. Under the adaptive rule a layer's sparsity after K prune steps lies in
  ``[target - A·M·K, target + A·M·K]`` clamped to ``[0, min(max_layer_sparsity,
  floor)]`` (``floor``: what the minimum widths leave). Why: each step moves
  layer i by ``Δ - A·Î_i + c`` with mean(Î) = 0, |Î| <= M (M = 1 for the ``max``
  and ``rank`` normalizations, 2(n-1)/n for ``mad``, √(n-1)/E[max|Z|] for
  ``zscore``) and c the common shift of ``fit_to_budget``. Without clamps
  c = 0 (layers of equal size); when the lower clamp binds (no layer regains
  width) c <= 0, which keeps every step within [Δ - A·M, Δ + A·M] as well. A
  layer held at ``max_layer_sparsity`` passes its share to the others, which
  can then move faster than A·M per step; the range shown is still capped at
  that clamp. The narrowest and widest layer shown are these extremes: one
  layer can reach either, not all at once (the budget holds). Whole-group
  rounding moves a layer by at most one unit more.
* **Tokens and steps.** Stage k trains ``2k/(N(N+1))`` of the run's optimizer
  steps (``schedule.stage_train_steps``). A token budget becomes steps through the
  mean sample length, which the recipe measures on 64 samples of the dataset:
  packed datasets have exactly ``max_seq_len`` tokens per sample; otherwise the
  plan reads the dataset when it is local (as the recipe does), takes
  ``--mean-sample-len``, or assumes ``max_seq_len`` (an upper bound on the
  mean, so a lower bound on steps) and says so. Calibration tokens count every
  prune step's pass (forward + backward) over the same ``num_samples × seq_len``
  windows.
* **Memory per rank** (a planning figure, not a measurement; GiB = 2^30 bytes),
  the sum of what is alive at the step's peak, FSDP2 fully sharded over
  ``world_size`` ranks, ``d`` = bytes of the config's dtype:

  - weights and gradients: ``P·d / W`` each (FSDP2 keeps both sharded);
  - optimizer state: ``P·b / W`` with b from the optimizer the config names:
    torch AdamW/Adam keep two moments *in the parameter dtype* (``zeros_like``),
    b = 2d (3d with amsgrad); SGD with momentum d; torchao AdamW8bit/Fp8 two
    1-byte codes plus an fp32 scale per ``block_size`` elements (b = 2·(1 +
    4/block)), AdamW4bit two half-byte codes (b = 2·(0.5 + 4/block)). AdamW
    state appears at the first optimizer step, so stage 1's prune has none;
  - FSDP working set: the root unit's unsharded weights and gradients (alive
    through the step), the largest other unit and the largest layer unsharded
    (computing one while prefetching the next) and one unit's unsharded gradients
    (in a calibration pass a layer's: the root unit, embeddings and output get none);
    with ``fsdp_reshard_after_forward: False`` every unit's unsharded weights instead
    of the two (all of them are alive between the end of forward and backward);
  - activations per token and layer, counted from the tensors autograd saves in
    torchtune's layer (two RMSNorms with fp32 copies, SDPA's q/k/v/out at the
    query width since k/v are expanded for GQA, SwiGLU's four MLP-wide tensors):
    ``2·(8h + d·h) + 5·d·q + 4·d·I`` bytes (h hidden, q = heads·head_dim, I MLP
    width; within ~6 % of ``saved_tensors_hooks`` in the tests). With activation
    checkpointing each layer keeps only its input (``d·h``) and one layer is
    recomputed at a time; with offloading those inputs go to host memory;
  - logits: chunked cross-entropy keeps fp32 log-probabilities of every chunk
    until backward, next to the d-byte logits: ``tokens·V·(d + 4)``; the
    distillation loss keeps the student's logits and their precomputed
    gradients (``2·tokens·V·d``) plus ~5 fp32 chunk temporaries;
  - distillation teacher: its sharded weights all run, and during its forward
    the unsharded embedding + output projection (its root unit), two layers and
    its final hidden state.

  Training peak = all of the above at the stage's widths. Prune peak = the
  larger of the calibration pass (weights, *accumulated* gradients of the scored
  projections only, ``S`` of them — below fp32 an fp32 sum ``S·4 / W`` beside the
  batch's own ``S·d / W`` —, no root-unit gradient, the optimizer state
  of earlier training, activations and logits of one calibration batch) and the
  resize (old + new weights, the optimizer state, and what is in flight: one sliced
  parameter in one process, under FSDP2 one layer's row-cut moments exchanged).
  With ``fsdp_cpu_offload`` the sharded weights, gradients and optimizer state
  live in host memory and are left out of the device peak.
  Held-out evaluation (forward only) and allocator fragmentation are not counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig

from adapt_prune_tune import configs as packaged_configs
from adapt_prune_tune.config_checks import (
    DTYPE_BYTES,
    ConfigError,
    check_inputs,
    check_total_steps,
    checkpoint_bytes,
    checkpoint_element_bytes,
    expand_home,
    mean_sample_length,
    merge_overrides,
    steps_for_tokens,
)
from adapt_prune_tune.data import rank_calibration_batch
from adapt_prune_tune.data_checks import dataset_location, dataset_problems, run_datasets, whole_corpus_packings
from adapt_prune_tune.models import DecoderArch
from adapt_prune_tune.optimizer_state import uses_quantized_state
from adapt_prune_tune.schedule import stage_targets, stage_train_steps

GIB = float(1 << 30)


# --------------------------------------------------------------------------- config


def load_config(name: str, overrides: Sequence[str] = ()) -> Tuple[DictConfig, Path]:
    """A config by packaged name or path, with ``key=value`` overrides applied like ``tune run``."""
    path = packaged_configs.resolve(name)
    return expand_home(merge_overrides(path, overrides)), path


# --------------------------------------------------------------------------- widths


def importance_bound(normalization: str, num_layers: int) -> float:
    """Largest |Î| a normalization can produce for ``num_layers`` layers (M in the module doc)."""
    n = max(num_layers, 2)
    if normalization == "mad":  # clipped to [-1, 1], then shifted to mean 0
        return 2.0 * (n - 1) / n
    if normalization == "zscore":  # Samuelson: |z| <= √(n-1), scaled by E[max |Z|]
        from adapt_prune_tune.importance import expected_max_abs_normal

        return math.sqrt(n - 1) / expected_max_abs_normal(n)
    return 1.0  # max, rank


def adaptive_sparsity_range(
    target: float, amplitude: float, steps: int, bound: float, ceiling: float
) -> Tuple[float, float]:
    """Lowest and highest per-layer sparsity the adaptive rule can reach after ``steps`` steps."""
    spread = amplitude * bound * steps
    return max(0.0, target - spread), min(ceiling, target + spread)


# --------------------------------------------------------------------------- memory


def layer_activation_bytes(embed_dim: int, q_dim: int, intermediate_dim: int, dtype_bytes: int) -> int:
    """Bytes autograd saves per token in one torchtune decoder layer (see the module doc)."""
    h, d = embed_dim, dtype_bytes
    return 2 * (8 * h + d * h) + 5 * d * q_dim + 4 * d * intermediate_dim


def optimizer_state_bytes(optimizer: Any, dtype_bytes: int) -> Tuple[float, str]:
    """Optimizer-state bytes per parameter element, and what they are."""
    name = type(optimizer).__name__
    module = type(optimizer).__module__
    defaults = getattr(optimizer, "defaults", {})
    if module.startswith("torchao"):
        block = getattr(optimizer, "block_size", None)
        if isinstance(block, (int, float)) and math.isfinite(block):
            code = 0.5 if "4bit" in name else 1.0
            return 2 * (code + 4.0 / block), f"{name}: 2 moments × {code:g} byte + fp32 scale per {int(block)}"
        return 2.0 * dtype_bytes, f"{name}: 2 moments in the parameter dtype"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        moments = 3 if defaults.get("amsgrad") else 2
        return moments * dtype_bytes, f"{name}: {moments} moments in the parameter dtype"
    if isinstance(optimizer, torch.optim.SGD):
        if defaults.get("momentum", 0):
            return float(dtype_bytes), "SGD: momentum buffer in the parameter dtype"
        return 0.0, "SGD without momentum: no state"
    return 2.0 * dtype_bytes, f"{name}: unknown to the planner, assumed 2 moments in the parameter dtype"


def lowbit_recompile_notes(optimizer: Any, num_stages: int, total_steps: Optional[int]) -> List[str]:
    """What a torchao low-bit optimizer's first step of each stage costs (a note, or none).

    torchao compiles its per-parameter update with static shapes, one graph per distinct
    parameter shape, and a resize gives every layer's MLP weights shapes no earlier step saw:
    each training stage's first step compiles again (``benchmarks/lowbit_compile.py``).
    """
    if not uses_quantized_state(optimizer) or total_steps == 0:
        return []
    return [
        f"{type(optimizer).__name__} compiles its update once per parameter shape: the first optimizer step "
        f"of each of the {num_stages} stages compiles again for the new widths (about two shapes a layer; "
        f"~8 s a shape on a 2-core CPU, benchmarks/lowbit_compile.py); pruning.method.round_to lets layers "
        f"share shapes"
    ]


@dataclass
class MemoryModel:
    """Per-rank memory of one training or prune step (formulas in the module doc)."""

    dtype_bytes: int
    world_size: int
    batch_size: int
    seq_len: int
    calib_batch_size: int
    calib_seq_len: int
    activation_checkpointing: bool
    activation_offloading: bool
    fsdp_cpu_offload: bool
    separate_units: Tuple[str, ...]
    optimizer_bytes: float
    chunked_loss: bool
    num_output_chunks: int
    distill: bool = False
    distill_calibration_kl: bool = False
    teacher: Optional[DecoderArch] = None
    reshard_after_forward: bool = True

    # ----- pieces
    def _units(self, arch: DecoderArch) -> Tuple[int, List[int]]:
        """Parameters of the root FSDP unit and of every other unit (layers, separately sharded modules)."""
        h, v = arch.embed_dim, arch.vocab_size
        others = [
            arch.layer_attention_params(i) + arch.layer_mlp_params(i) + 2 * h for i in range(arch.num_layers)
        ]
        root = h  # final norm
        for name in ("tok_embeddings", "output"):
            if name == "output" and arch.tie_word_embeddings:
                continue
            if name in self.separate_units:
                others.append(v * h)
            else:
                root += v * h
        return root, others

    def working_set(self, arch: DecoderArch, calibration: bool = False) -> float:
        """Unsharded units at a step's peak; a ``calibration`` pass has unsharded gradients of
        the layers only (the embeddings, norms and output get none)."""
        root, others = self._units(arch)
        d = self.dtype_bytes
        largest_layer = max(others[: arch.num_layers])
        root_alive = root if calibration else 2 * root
        gradients = largest_layer if calibration else max(others)
        if not self.reshard_after_forward and self.world_size > 1:
            # Every unit stays unsharded from its forward to its backward: all of them at the turn.
            return d * (root_alive + sum(others) + gradients)
        return d * (root_alive + max(others) + largest_layer + gradients)

    def activations(self, arch: DecoderArch, tokens: int, checkpointing: bool) -> float:
        d, h = self.dtype_bytes, arch.embed_dim
        per_layer = [
            layer_activation_bytes(h, layer.num_heads * arch.head_dim, layer.intermediate_dim, d)
            for layer in arch.layers
        ]
        final_norm = 8 * h + d * h
        if not checkpointing:
            return tokens * (sum(per_layer) + final_norm)
        kept_inputs = (2 if self.activation_offloading else arch.num_layers) * d * h
        return tokens * (kept_inputs + max(per_layer) + final_norm)

    def logits(self, arch: DecoderArch, tokens: int, distill: bool, chunked: bool) -> float:
        v, d = arch.vocab_size, self.dtype_bytes
        if distill:
            chunk = math.ceil(tokens / max(1, self.num_output_chunks))
            return tokens * v * 2 * d + 5 * chunk * v * 4
        return tokens * v * ((d + 4) if chunked else 2 * d)

    def teacher_resident(self) -> float:
        if not self.distill or self.teacher is None:
            return 0.0
        return 0.0 if self.fsdp_cpu_offload else self.teacher.num_params() * self.dtype_bytes / self.world_size

    def teacher_forward(self, tokens: int) -> float:
        if self.teacher is None:
            return 0.0
        t, d = self.teacher, self.dtype_bytes
        root = (1 if t.tie_word_embeddings else 2) * t.vocab_size * t.embed_dim + t.embed_dim
        layer = max(t.layer_attention_params(i) + t.layer_mlp_params(i) for i in range(t.num_layers))
        return d * (root + 2 * layer + tokens * t.embed_dim)

    def sharded(self, params: int) -> Tuple[float, float, float]:
        """Weights, gradients and optimizer state of one rank's shard (host memory with CPU offload)."""
        p = params / self.world_size
        return p * self.dtype_bytes, p * self.dtype_bytes, p * self.optimizer_bytes

    # ----- steps
    def _step(self, arch: DecoderArch, params: Optional[int], tokens: int, optimizer_state: bool,
              teacher_logits: bool, chunked: bool, calibration: bool = False) -> Dict[str, float]:
        """What is alive at a step's peak at ``arch``'s widths (bytes), before the peak is summed.
        A ``calibration`` pass has gradients of the scored projections only (``pruner.calibrate``)."""
        params = arch.num_params() if params is None else params
        weights, grads, optim = self.sharded(params)
        if calibration:
            grads = self.sharded(params - (arch.num_params() - arch.prunable_params()))[1]
        return {
            "weights": weights,
            "gradients": grads,
            "optimizer_state": optim if optimizer_state else 0.0,
            "fsdp_working_set": self.working_set(arch, calibration),
            "activations": self.activations(arch, tokens, self.activation_checkpointing),
            "activations_checkpointing_on": self.activations(arch, tokens, True),
            "activations_checkpointing_off": self.activations(arch, tokens, False),
            "logits_and_loss": self.logits(arch, tokens, teacher_logits, chunked),
            "teacher": self.teacher_resident() + (self.teacher_forward(tokens) if teacher_logits else 0.0),
        }

    def training(self, arch: DecoderArch, params: Optional[int] = None) -> Dict[str, float]:
        """Breakdown of a training step's peak at ``arch``'s widths (bytes); ``params``: exact count."""
        tokens = self.batch_size * self.seq_len
        return self._with_peak(self._step(arch, params, tokens, True, self.distill, self.chunked_loss))

    def pruning(self, arch: DecoderArch, optimizer_state: bool, params: Optional[int] = None) -> Dict[str, float]:
        """Breakdown of a prune step's peak, ``arch`` being the model before the cut (bytes)."""
        tokens = self.calib_batch_size * self.calib_seq_len
        kl = self.distill and self.distill_calibration_kl
        parts = self._step(arch, params, tokens, optimizer_state, kl, True, calibration=True)
        if self.dtype_bytes < 4:
            # Below fp32 the pass sums gradients in fp32 buffers (``pruner.calibrate``), alive
            # beside each batch's own gradients: an H200 run measured the 8B prune peak 15 GiB
            # above the estimate that left them out.
            parts["gradients"] += parts["gradients"] * 4.0 / self.dtype_bytes
        weights, optim = parts["weights"], parts["optimizer_state"]
        out = self._with_peak(parts)
        if self.world_size > 1:
            # One layer's row-cut moments (q/k/v and w1/w3 rows; two moments, dense fp32 at most)
            # leave and arrive in one all-to-all: about a 1/world share of them each way.
            row_cut = max((l.num_heads + 2 * l.num_kv_heads) * arch.head_dim + 2 * l.intermediate_dim
                          for l in arch.layers) * arch.embed_dim
            moving = 2 * 2 * row_cut / self.world_size * 4.0
        else:  # the state dict view slices one parameter at a time
            moving = max(
                [arch.vocab_size * arch.embed_dim]
                + [max(l.num_heads * arch.head_dim, l.intermediate_dim) * arch.embed_dim for l in arch.layers]
            ) * self.dtype_bytes
        resize = (0.0 if self.fsdp_cpu_offload else 2 * weights + optim) + moving
        out["resize"] = resize + self.teacher_resident()
        out["peak"] = max(out["peak"], out["resize"])
        return out

    def _with_peak(self, parts: Dict[str, float]) -> Dict[str, float]:
        host = ("weights", "gradients", "optimizer_state") if self.fsdp_cpu_offload else ()
        counted = (
            "weights", "gradients", "optimizer_state", "fsdp_working_set", "activations", "logits_and_loss", "teacher"
        )
        parts["peak"] = sum(parts[k] for k in counted if k not in host)
        parts["host"] = sum(parts[k] for k in host)
        return parts


# --------------------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    stage: int
    target_sparsity: float  # overall, of the prunable parameters, after this stage's prune
    prune_steps_so_far: int
    params_after_prune: int
    layer_params_uniform: int  # prunable parameters a layer keeps under uniform pruning (largest base layer)
    layer_params_narrowest: int  # the adaptive rule's extremes (see the module doc)
    layer_params_widest: int
    layer_sparsity_range: Tuple[float, float]
    calibration_tokens: int  # forward + backward over the calibration windows, all prune steps
    train_steps: int
    train_tokens: int  # estimated from the mean sample length unless packed
    memory_prune_peak: float  # bytes per rank
    memory_train_peak: Optional[float]  # None: the stage does not train


@dataclass
class RunPlan:
    config: str
    config_path: str
    world_size: int
    model: str
    device: str
    dtype: str
    num_layers: int
    params_before: int
    prunable_params: int  # of the enabled group kinds
    prunable_per_layer: int  # largest base layer
    final_sparsity: float
    params_after: int
    params_tolerance: int  # +- around params_after_prune from whole-group rounding
    stages: List[StagePlan]
    num_stages: int
    prune_steps_per_stage: int
    amplitude: float
    importance_bound: float
    max_layer_sparsity: float
    samples_per_step: int
    mean_sample_len: Optional[float]
    mean_sample_len_source: str  # packed | dataset | given | assumed | unknown
    total_steps: Optional[int]
    total_tokens: Optional[int]
    calibration: Dict[str, int]
    optimizer: str
    memory: Dict[str, Dict[str, float]]  # "prune_stage_1" / "train_stage_1" breakdowns (bytes)
    activation_checkpointing: bool
    distill: bool
    checkpoint_bytes: int  # one run checkpoint, all ranks together (the base model's size: the largest)
    checkpoint_every: int  # training steps between checkpoints (and one after every stage's prune)
    keep_last_checkpoints: int
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def plan_run(
    cfg: DictConfig,
    world_size: int = 1,
    mean_sample_len: Optional[float] = None,
    read_data: bool = True,
    config_name: str = "",
    config_path: str = "",
) -> RunPlan:
    """Check ``cfg`` as the recipe would and work out its stages, budgets and memory.

    Config errors raise with the recipe's messages; missing files become ``warnings``.
    ``mean_sample_len`` replaces the dataset's measured mean (non-packed datasets);
    ``read_data=False`` never opens local data (then ``max_seq_len`` is assumed).
    """
    from torchtune import config

    from adapt_prune_tune.pruner import minimum_arch, prunable_per_layer, resolve_target_sparsity

    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    warnings: List[str] = []
    notes: List[str] = []

    # The recipe's own checks (AdaptPruneRecipe.__init__ and the stock __init__'s config checks).
    checked = check_inputs(cfg, world_size=world_size, warn=warnings.append)
    pruning, distill, arch = checked.pruning, checked.distill, checked.arch
    if cfg.get("resume_from_checkpoint", False):
        notes.append("resume_from_checkpoint=True: the plan shows the whole run from its start")

    adapt = cfg.adapt
    num_stages = int(adapt.stages)
    steps_per_stage = int(adapt.get("steps_per_stage", 1))
    total_tokens_cfg = adapt.get("total_tokens", None)
    total_steps_cfg = adapt.get("total_steps", None)
    seed = int(cfg.seed) if cfg.get("seed", None) is not None else 0

    _note_hub_sources(cfg, notes)
    tokenizer = _local_tokenizer(cfg) if read_data else None
    if tokenizer is not None:
        # The data as the recipe reads it before the weights load (local data only here): columns,
        # label tokens, token ids, and the calibration windows counted (their split over the ranks
        # is check_inputs').
        data = dataset_problems(cfg, hub=False, vocab_size=arch.vocab_size, tokenizer=tokenizer, warn=notes.append)
        if data:
            raise ConfigError(data)
    calib = cfg.pruning.calibration
    num_samples, calib_len = int(calib.num_samples), int(calib.seq_len)
    calib_bs = rank_calibration_batch(num_samples, int(calib.batch_size), world_size)  # the batch the ranks run

    # Run length, as the recipe's _resolve_total_steps computes it.
    batch_size, accumulation = int(cfg.batch_size), int(cfg.gradient_accumulation_steps)
    samples_per_step = batch_size * accumulation * world_size
    max_seq_len = cfg.tokenizer.get("max_seq_len", None)
    mean_len, source = _mean_sample_len(cfg, tokenizer, seed, mean_sample_len)
    if total_steps_cfg is not None:
        total_steps: Optional[int] = check_total_steps(int(total_steps_cfg), num_stages)
    elif mean_len is not None:
        total_steps = check_total_steps(steps_for_tokens(total_tokens_cfg, samples_per_step, mean_len), num_stages)
    else:
        total_steps = None
    stage_steps = stage_train_steps(total_steps, num_stages) if total_steps is not None else [None] * num_stages
    # The optimizer the recipe will build (check_inputs has built it once already), for its state size.
    optimizer = config.instantiate(cfg.optimizer, [torch.nn.Parameter(torch.zeros(8))])

    # Sizes.
    dtype_bytes = DTYPE_BYTES.get(str(cfg.get("dtype", "fp32")), 4)
    final = resolve_target_sparsity(arch, pruning)
    per_layer = prunable_per_layer(arch, pruning)
    floor = prunable_per_layer(minimum_arch(arch, pruning), pruning)
    prunable = int(per_layer.sum())
    base_params = arch.num_params()
    bound = importance_bound(getattr(pruning, "importance_normalization", "max"), arch.num_layers)
    round_to = int(getattr(pruning, "round_to", 1))
    tolerance = round_to * 3 * arch.embed_dim // 2 if pruning.prune_mlp else 0
    if not pruning.prune_mlp:
        notes.append(
            "prune_mlp=False: layers keep whole heads and no MLP width absorbs the rounding, so the parameter "
            "counts are the budget up to each layer's nearest head size"
        )
    if len(set(per_layer.tolist())) > 1:
        notes.append("layers of unequal size: the adaptive range is approximate (the bound assumes equal layers)")

    notes += lowbit_recompile_notes(optimizer, num_stages, total_steps)
    memory = _memory_model(cfg, arch, distill, optimizer, dtype_bytes, world_size, max_seq_len, calib_bs, calib_len, notes)
    opt_bytes_desc = optimizer_state_bytes(optimizer, dtype_bytes)[1]

    stages: List[StagePlan] = []
    before, params_before = arch, base_params
    trained_before = False  # AdamW state exists from the first optimizer step on
    breakdown: Dict[str, Dict[str, float]] = {}
    widest_layer = int(per_layer.max())
    for k, target in enumerate(stage_targets(final, num_stages), start=1):
        steps_so_far = k * steps_per_stage
        lo, hi = adaptive_sparsity_range(target, pruning.amplitude, steps_so_far, bound, pruning.max_layer_sparsity)
        ceilings = [min(hi, 1.0 - float(f) / float(p)) if p > 0 else 0.0 for f, p in zip(floor, per_layer)]
        params_after = base_params - round(target * prunable)
        after = _stand_in(arch, pruning, target)
        prune_mem = memory.pruning(before, optimizer_state=trained_before, params=params_before)
        steps_k = stage_steps[k - 1]
        train_mem = memory.training(after, params=params_after) if steps_k else None
        if k == 1:
            breakdown["prune_stage_1"] = prune_mem
            if train_mem is not None:
                breakdown["train_stage_1"] = train_mem
        stages.append(
            StagePlan(
                stage=k,
                target_sparsity=target,
                prune_steps_so_far=steps_so_far,
                params_after_prune=params_after,
                layer_params_uniform=round((1.0 - target) * widest_layer),
                layer_params_narrowest=min(round((1.0 - c) * float(p)) for c, p in zip(ceilings, per_layer)),
                layer_params_widest=round((1.0 - lo) * widest_layer),
                layer_sparsity_range=(lo, max(ceilings)),
                calibration_tokens=steps_per_stage * num_samples * calib_len,
                train_steps=-1 if steps_k is None else steps_k,
                train_tokens=-1 if steps_k is None or mean_len is None else round(steps_k * samples_per_step * mean_len),
                memory_prune_peak=prune_mem["peak"],
                memory_train_peak=None if train_mem is None else train_mem["peak"],
            )
        )
        before, params_before = after, params_after
        trained_before = trained_before or bool(steps_k)

    return RunPlan(
        config=config_name,
        config_path=config_path,
        world_size=world_size,
        model=str(cfg.model.get("_component_", "")),
        device=str(cfg.get("device", "cuda")),
        dtype=str(cfg.get("dtype", "fp32")),
        num_layers=arch.num_layers,
        params_before=base_params,
        prunable_params=prunable,
        prunable_per_layer=int(per_layer.max()),
        final_sparsity=final,
        params_after=base_params - round(final * prunable),
        params_tolerance=tolerance,
        stages=stages,
        num_stages=num_stages,
        prune_steps_per_stage=steps_per_stage,
        amplitude=float(pruning.amplitude),
        importance_bound=bound,
        max_layer_sparsity=float(pruning.max_layer_sparsity),
        samples_per_step=samples_per_step,
        mean_sample_len=mean_len,
        mean_sample_len_source=source,
        total_steps=total_steps,
        total_tokens=int(total_tokens_cfg) if total_tokens_cfg is not None else None,
        calibration={"num_samples": num_samples, "seq_len": calib_len, "batch_size": calib_bs,
                     "batch_size_cap": int(calib.batch_size)},
        optimizer=opt_bytes_desc,
        memory=breakdown,
        activation_checkpointing=memory.activation_checkpointing,
        distill=distill.enabled,
        checkpoint_bytes=checkpoint_bytes(arch, *checkpoint_element_bytes(cfg), trains=total_steps != 0),
        checkpoint_every=int(adapt.get("checkpoint_every_n_steps", 50)),
        keep_last_checkpoints=int(adapt.get("keep_last_checkpoints", 2)),
        warnings=warnings,
        notes=notes,
    )


def _stand_in(arch: DecoderArch, pruning, target: float) -> DecoderArch:
    """Widths like those after a uniform cut to ``target``, for the activation and unit sizes.

    Memory depends on totals (exact from the budget) and on the widths the
    activations scale with; every layer here keeps KV groups and about
    (1 - target) of its query heads per group, and the MLP width that brings the
    layer to (1 - target) of its prunable parameters.
    """
    from adapt_prune_tune.models import LayerArch

    keep = 1.0 - target
    heads = []
    for layer in arch.layers:
        kv, qpk = layer.num_kv_heads, layer.num_heads // layer.num_kv_heads
        if pruning.prune_attention:
            qpk = max(1, round(qpk * keep))
        heads.append(LayerArch(kv * qpk, kv, layer.intermediate_dim))
    narrower = arch.with_layers(heads)
    layers = []
    for i, layer in enumerate(heads):
        mlp = layer.intermediate_dim
        if pruning.prune_mlp:
            budget = keep * arch.layer_mlp_params(i)
            if pruning.prune_attention:
                budget += keep * arch.layer_attention_params(i) - narrower.layer_attention_params(i)
            mlp = max(1, min(mlp, round(budget / (3 * arch.embed_dim))))
        layers.append(LayerArch(layer.num_heads, layer.num_kv_heads, mlp))
    return arch.with_layers(layers)


def _memory_model(cfg, arch, distill, optimizer, dtype_bytes, world_size, max_seq_len, calib_bs, calib_len, notes):
    from torchtune import config

    seq_len = max_seq_len
    if seq_len is None:
        seq_len = arch.max_seq_len
        notes.append(
            f"tokenizer.max_seq_len is not set: samples are not truncated; activations assume the model's "
            f"max_seq_len ({seq_len:,})"
        )
    loss = config.instantiate(cfg.loss)
    chunks = int(getattr(loss, "num_output_chunks", 1))
    teacher = None
    if distill.enabled:
        node = cfg.distill.get("teacher_model") or cfg.model
        if cfg.distill.get("teacher_model") is None:
            teacher = arch
        else:
            from adapt_prune_tune.models import arch_from_model

            with torch.device("meta"):
                teacher = arch_from_model(config.instantiate(node))
    if cfg.get("fsdp_cpu_offload", False):
        notes.append("fsdp_cpu_offload=True: sharded weights, gradients and optimizer state are in host memory")
    reshard = bool(cfg.get("fsdp_reshard_after_forward", True))
    if not reshard and world_size > 1:
        notes.append("fsdp_reshard_after_forward=False: every FSDP unit stays unsharded from its forward to its "
                     "backward, so the working set holds the whole model's weights")
    return MemoryModel(
        dtype_bytes=dtype_bytes,
        world_size=world_size,
        batch_size=int(cfg.batch_size),
        seq_len=int(seq_len),
        calib_batch_size=calib_bs,
        calib_seq_len=calib_len - 1,
        activation_checkpointing=bool(cfg.get("enable_activation_checkpointing", False)),
        activation_offloading=bool(cfg.get("enable_activation_offloading", False)),
        fsdp_cpu_offload=bool(cfg.get("fsdp_cpu_offload", False)),
        separate_units=tuple(cfg.get("custom_sharded_layers", None) or ()),
        optimizer_bytes=optimizer_state_bytes(optimizer, dtype_bytes)[0],
        chunked_loss=hasattr(loss, "num_output_chunks"),
        num_output_chunks=chunks,
        distill=distill.enabled,
        distill_calibration_kl=distill.enabled and distill.calibration_loss == "kl",
        teacher=teacher,
        reshard_after_forward=reshard,
    )


# --------------------------------------------------------------------------- data on this machine


def _local_files_exist(node: Any) -> bool:
    kind, files = dataset_location(node)
    return kind == "local" and all(f.expanduser().exists() for f in files)


def _local_tokenizer(cfg: DictConfig):
    """The config's tokenizer when its files are on this machine, else None."""
    from torchtune import config

    path = cfg.tokenizer.get("path", None)
    if path is None or not Path(str(path)).expanduser().exists():
        return None
    return config.instantiate(cfg.tokenizer)


def _note_hub_sources(cfg: DictConfig, notes: List[str]) -> None:
    """Training / calibration data from the Hub (missing local files are ``check_inputs``'s warnings)."""
    hub: Dict[str, List[str]] = {}
    for name, node in run_datasets(cfg):
        if dataset_location(node)[0] == "hub":
            hub.setdefault(str(node.source), []).append(name)
    for source, names in hub.items():
        notes.append(
            f"{' and '.join(names)}: {source} from the Hugging Face Hub: needs network or the HF cache where "
            "the run starts (not checked here)"
        )
    notes += whole_corpus_packings(cfg)


def _mean_sample_len(cfg: DictConfig, tokenizer, seed: int, given: Optional[float]) -> Tuple[Optional[float], str]:
    """Mean tokens per training sample and where the figure comes from."""
    from torchtune import config

    node = cfg.dataset
    max_seq_len = cfg.tokenizer.get("max_seq_len", None)
    packed = any(bool(n.get("packed", False)) for n in ([node] if isinstance(node, DictConfig) else node))
    if packed and max_seq_len is not None:
        return float(max_seq_len), "packed"
    if given is not None:
        if given <= 0:
            raise ValueError(f"--mean-sample-len must be > 0, got {given}")
        return float(given), "given"
    if tokenizer is not None and isinstance(node, DictConfig) and _local_files_exist(node):
        dataset = config.instantiate(node, tokenizer)
        return mean_sample_length(dataset, seed), "dataset"
    if max_seq_len is not None:
        return float(max_seq_len), "assumed"
    return None, "unknown"


# --------------------------------------------------------------------------- text


def _params(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}" if unit == "B" else f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def format_plan(plan: RunPlan) -> str:
    """The plan as plain-text tables with numbered footnotes."""
    foot: List[str] = []

    def note(text: str) -> str:
        foot.append(text)
        return f"[{len(foot)}]"

    lines = [f"adapt-prune-tune plan: {plan.config or plan.config_path}  (world size {plan.world_size})", ""]
    lines.append(f"  model     {plan.model}: {plan.num_layers} layers, {plan.params_before:,} params, {plan.dtype} on {plan.device}")
    lines.append(
        f"  prunable  {plan.prunable_params:,} params (attention + MLP projections; "
        f"{_params(plan.prunable_per_layer)} per layer)"
    )
    lines.append(
        f"  target    {plan.final_sparsity:.1%} of prunable -> {plan.params_after:,} params "
        f"({plan.params_after / plan.params_before:.1%} of the base), "
        f"{plan.num_stages} stage{'s' if plan.num_stages != 1 else ''} x {plan.prune_steps_per_stage} prune steps, "
        f"A = {plan.amplitude:g}"
    )
    source_note = {
        "packed": "packed dataset: every sample is exactly max_seq_len tokens, so tokens and steps are exact",
        "dataset": (
            f"mean sample length {plan.mean_sample_len:.1f} tokens, measured on the local dataset as the "
            "recipe does (64 seeded samples)"
        ),
        "given": f"mean sample length {plan.mean_sample_len:g} tokens, as given (--mean-sample-len)",
        "assumed": (
            f"ASSUMED mean sample length = max_seq_len = {plan.mean_sample_len:g} tokens (the dataset is not on "
            "this machine): an upper bound on the mean, so the steps are a lower bound; pass --mean-sample-len "
            "or plan where the data is"
        ),
        "unknown": "mean sample length unknown (no max_seq_len, no local data): pass --mean-sample-len",
    }[plan.mean_sample_len_source]
    if plan.total_tokens is not None:
        steps = "?" if plan.total_steps is None else f"{plan.total_steps:,}"
        length = f"{plan.mean_sample_len:,.0f}" if plan.mean_sample_len is not None else "?"
        lines.append(
            f"  training  {plan.total_tokens:,} tokens = {steps} optimizer steps x {plan.samples_per_step} samples "
            f"x {length} tokens {note(source_note)}"
        )
    elif plan.total_steps == 0:
        lines.append("  training  none: prune only (adapt.total_steps = 0)")
    else:
        if plan.mean_sample_len_source == "assumed":
            source_note = (
                f"ASSUMED mean sample length = max_seq_len = {plan.mean_sample_len:g} tokens (the dataset is not on "
                "this machine): the steps are the config's, the tokens an upper bound"
            )
        exact = "tokens exact" if plan.mean_sample_len_source == "packed" else "tokens estimated " + note(source_note)
        lines.append(f"  training  {plan.total_steps:,} optimizer steps (config) x {plan.samples_per_step} samples; {exact}")
    c = plan.calibration
    lines.append(
        f"  calib     {c['num_samples']} samples x {c['seq_len']} tokens per prune step, batches of {c['batch_size']} per rank"
        + (f" (the largest divisor of {c['num_samples'] // plan.world_size} up to pruning.calibration.batch_size="
           f"{c['batch_size_cap']})" if c["batch_size"] < c["batch_size_cap"] else "")
    )
    kept = (f"keep_last_checkpoints={plan.keep_last_checkpoints} keeps up to {plan.keep_last_checkpoints + 1} at once"
            if plan.keep_last_checkpoints else "keep_last_checkpoints=0 keeps all of them")
    trains = plan.total_steps != 0
    contents = "weights + 2 AdamW moments" if trains else "weights (prune only)"
    when = f" and every {plan.checkpoint_every:,} training steps" if trains else ""
    lines.append(
        f"  ckpt      ~{_gib(plan.checkpoint_bytes)} GiB each ({_gib(plan.checkpoint_bytes / plan.world_size)} GiB "
        f"per rank) after every stage's prune{when} " + note(
            f"{contents} of the base model, the largest the run holds; {kept}. On SIGTERM or SIGUSR1 "
            "the run finishes its step and writes one: the grace period before SIGKILL (Slurm's KillWait, "
            "Kubernetes' terminationGracePeriodSeconds, torchrun's --shutdown_timeout: 30 s by default) must hold "
            "a training step plus this write"
        )
    )
    lines.append("")

    tol = f" ±{plan.params_tolerance:,}" if plan.params_tolerance else ""
    exact_note = note(
        "the stage's budget, whatever the adaptive rule does: the per-layer sparsities are fitted to it"
        + (f"; MLP widths settle it to ± half a rounding unit ({plan.params_tolerance:,} params)" if tol else "")
    )
    rng = note(
        f"per-layer prunable parameters: uniform pruning (A = 0) keeps every layer at the stage's target; the "
        f"adaptive rule keeps each layer's sparsity within target ± A·M·K (A = {plan.amplitude:g}, M = "
        f"{plan.importance_bound:.2f} for the importance normalization, K = prune steps so far), within "
        f"[0, max_layer_sparsity = {plan.max_layer_sparsity:g}] and the minimum widths; one layer can reach "
        "each extreme, not all (the budget holds)"
    )
    calib_note = note(
        "forward + backward passes over the same calibration windows, every prune step of the stage "
        "(plus one forward-only pass for the stage's after-prune loss)"
    )
    mem_note = note(
        f"peak GiB per rank at world size {plan.world_size}: the stage's prune step (model before the cut) and "
        "training step (after it); breakdown below"
    )
    header = [
        "stage", "sparsity", f"params after prune {exact_note}", "per layer: uniform",
        f"adaptive: narrowest - widest {rng}", f"calib tokens {calib_note}", "train steps", "train tokens",
        f"GiB prune / train {mem_note}",
    ]
    rows = []
    for s in plan.stages:
        lo, hi = s.layer_sparsity_range
        rows.append([
            str(s.stage),
            f"{s.target_sparsity:.1%}",
            f"{s.params_after_prune:,}",
            f"{_params(s.layer_params_uniform)} ({1 - s.target_sparsity:.0%})",
            f"{_params(s.layer_params_narrowest)} - {_params(s.layer_params_widest)} ({1 - hi:.0%} - {1 - lo:.0%})",
            f"{s.calibration_tokens:,}",
            "?" if s.train_steps < 0 else f"{s.train_steps:,}",
            "?" if s.train_tokens < 0 else f"{s.train_tokens:,}",
            f"{_gib(s.memory_prune_peak)} / {_gib(s.memory_train_peak)}",
        ])
    total_steps = sum(max(0, s.train_steps) for s in plan.stages)
    total_tokens = sum(max(0, s.train_tokens) for s in plan.stages)
    rows.append([
        "total", "", f"{plan.params_after:,}{tol}", "", "",
        f"{sum(s.calibration_tokens for s in plan.stages):,}",
        f"{total_steps:,}" if plan.total_steps is not None else "?",
        f"{total_tokens:,}" if plan.total_steps is not None else "?", "",
    ])
    lines += _table(header, rows, right=(0, 1, 2, 5, 6, 7))
    lines.append("")

    prune, train = plan.memory.get("prune_stage_1", {}), plan.memory.get("train_stage_1")
    ac = "on" if plan.activation_checkpointing else "off"
    mem_rows = [
        ("weights (FSDP-sharded)", "weights"),
        ("gradients (sharded)", "gradients"),
        (f"optimizer state {note(plan.optimizer + '; none before the first optimizer step')}", "optimizer_state"),
        ("FSDP working set (unsharded units)", "fsdp_working_set"),
        (f"activations (checkpointing {ac}, config)", "activations"),
        ("  with checkpointing", "activations_checkpointing_on"),
        ("  without checkpointing", "activations_checkpointing_off"),
        ("logits + loss", "logits_and_loss"),
        ("resize (old + new weights, state)", "resize"),
        ("peak", "peak"),
    ]
    if plan.distill:
        mem_rows.insert(-2, ("distillation teacher", "teacher"))
    if prune.get("host"):
        mem_rows.append(("host memory (CPU offload)", "host"))
    lines.append(f"Memory per rank, stage 1 (the largest model), world size {plan.world_size}, GiB {note(_MEMORY_NOTE)}")
    body = []
    for label, key in mem_rows:
        body.append([label, _gib(prune.get(key)), "-" if train is None or key == "resize" else _gib(train.get(key))])
    lines += _table(["", "prune", "train"], body, right=(1, 2))

    if plan.notes:
        lines += ["", "Notes:"] + [f"  - {n}" for n in plan.notes]
    if plan.warnings:
        lines += ["", "Warnings (the run would stop here; the plan goes on):"] + [f"  ! {w}" for w in plan.warnings]
    lines += [""] + [f"[{i}] {text}" for i, text in enumerate(foot, start=1)]
    return "\n".join(lines)


_MEMORY_NOTE = (
    "a planning estimate, the sum of what is alive at the step's peak (formulas in adapt_prune_tune/planning.py): "
    "weights, gradients and optimizer state sharded over the ranks; the FSDP units being computed and "
    "prefetched unsharded; activations counted from what autograd saves per layer (checkpointing: each "
    "layer's input plus one recomputed layer); fp32 log-probabilities of the chunked loss; prune = the "
    "calibration pass (the scored projections' gradients accumulated over its batches, in fp32 beside each "
    "batch's own below fp32) or "
    "the resize, whichever is larger. Held-out evaluation and allocator fragmentation are not counted; "
    "autograd frees activations as gradients appear, so the sum errs high (one H200 check: ~20 %)"
)


def _table(header: List[str], rows: List[List[str]], right: Sequence[int] = ()) -> List[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(
        (c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(r, widths))
    ).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
