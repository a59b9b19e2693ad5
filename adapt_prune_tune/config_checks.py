"""Up-front checks of a recipe config, shared by the recipe and ``adapt-prune-tune plan``.

Everything here reads the config, not the weights: models are built on the meta
device, which is enough to know whether a target is reachable, whether a teacher
can teach the student and how long the run is. The recipe calls these before any
work (a bad config fails in seconds, not after loading an 8B checkpoint); the
planner calls the same functions, so a plan fails exactly where the run would,
with the same message.

Missing checkpoint files are the one difference: the recipe must refuse them,
while a plan is made on a machine that may not hold the model yet. The checks
that look for files take ``warn``: given a callable, a missing file is reported
through it instead of raising.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

import torch
from omegaconf import DictConfig
from torchtune import config

from adapt_prune_tune.distillation import DistillConfig
from adapt_prune_tune.models import DecoderArch, arch_from_model
from adapt_prune_tune.pruner import PruningConfig, resolve_target_sparsity

Warn = Optional[Callable[[str], None]]


def refuse_unsupported(cfg: DictConfig) -> None:
    """Recipe features a resize cannot carry yet: refuse before any work."""
    problems = []
    if cfg.get("optimizer_in_bwd", False):
        problems.append("optimizer_in_bwd=True (per-parameter optimizers cannot be resized); set it to False")
    if cfg.get("tensor_parallel_dim", 1) > 1:
        problems.append("tensor_parallel_dim > 1 (pruned layers have uneven head counts); use FSDP only")
    if cfg.get("enable_async_checkpointing", False):
        problems.append("enable_async_checkpointing=True (run checkpoints carry per-layer shapes); set it to False")
    for key in ("pruning", "adapt"):
        if key not in cfg:
            problems.append(f"missing `{key}:` section (see configs/smollm2/135M_adapt.yaml)")
    if "pruning" in cfg and "method" not in cfg.pruning:
        problems.append("missing `pruning.method:` (target_sparsity or target_params, amplitude, ...)")
    if "pruning" in cfg and "calibration" not in cfg.pruning:
        problems.append("missing `pruning.calibration:` (dataset, num_samples, seq_len, batch_size)")
    if problems:
        raise ValueError("adapt_prune_recipe cannot run this config:\n  - " + "\n  - ".join(problems))


def check_inputs(cfg: DictConfig, pruning: PruningConfig, distill: DistillConfig, warn: Warn = None) -> DecoderArch:
    """Model shape, pruning target, distillation, base checkpoint files and the ``adapt:`` section.

    The model is built on the meta device (no memory, no weights), which is
    enough to know whether the target is reachable at all. Returns its spec.
    """
    with torch.device("meta"):
        arch = arch_from_model(config.instantiate(cfg.model))
    resolve_target_sparsity(arch, pruning)
    if distill.enabled:
        check_distillation(cfg, arch, distill, warn)
    if not cfg.get("resume_from_checkpoint", False):
        check_checkpoint_files(cfg.checkpointer, "checkpointer", warn)
    check_adapt_section(cfg)
    return arch


def check_adapt_section(cfg: DictConfig) -> None:
    """Stage count, prune steps per stage, exactly one run length, optimizer-state mode."""
    adapt = cfg.adapt
    if int(adapt.stages) < 1 or int(adapt.get("steps_per_stage", 1)) < 1:
        raise ValueError("adapt.stages and adapt.steps_per_stage must be >= 1")
    if (adapt.get("total_tokens", None) is None) == (adapt.get("total_steps", None) is None):
        raise ValueError("adapt: set exactly one of total_tokens or total_steps (0 = prune only)")
    if adapt.get("optimizer_state", "slice") not in ("slice", "reset"):
        raise ValueError("adapt.optimizer_state must be 'slice' (carry AdamW moments) or 'reset'")


def check_checkpoint_files(node: DictConfig, key: str, warn: Warn = None) -> None:
    """Every ``checkpoint_files`` entry exists under ``checkpoint_dir`` (or ``warn`` is told)."""
    ckpt_dir = Path(node.checkpoint_dir)
    files = [ckpt_dir / f for f in node.checkpoint_files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        message = (
            f"{key}: checkpoint files not found: {', '.join(missing)}. Download the model first "
            "(the config's header has the `tune download ...` command; gated models need "
            "`huggingface-cli login` and network access) or set "
            f"{key}.checkpoint_dir. For the embedded SmolLM2 default run `adapt-prune-tune prepare`."
        )
        if warn is None:
            raise FileNotFoundError(message)
        warn(message)


# Checkpoint model types that share a tokenizer: a teacher must come from the student's family.
TOKENIZER_FAMILIES = {"LLAMA3": "llama3", "LLAMA3_2": "llama3", "QWEN2": "qwen2"}


def check_distillation(cfg: DictConfig, student: DecoderArch, distill: DistillConfig, warn: Warn = None) -> None:
    """A teacher the run can distil from, and a run that has something to distil into."""
    problems: List[str] = []
    adapt = cfg.get("adapt") or {}
    no_training = adapt.get("total_tokens", None) == 0 or adapt.get("total_steps", None) == 0
    if no_training and distill.calibration_loss == "ce":
        problems.append(
            "distill.enabled=True but adapt.total_tokens/total_steps is 0 (prune only): there is no "
            "training to distil into; set distill.enabled=False, give a token budget, or use "
            "distill.calibration_loss=kl to score groups against the teacher"
        )
    loss = config.instantiate(cfg.loss)
    if not hasattr(loss, "ignore_index"):
        problems.append(
            f"distill needs a cross-entropy `loss` with an ignore_index (got {cfg.loss._component_}); "
            "use torchtune.modules.loss.CEWithChunkedOutputLoss"
        )
    distill_node = cfg.distill
    with torch.device("meta"):
        teacher = config.instantiate(distill_node.get("teacher_model") or cfg.model)
    vocab = teacher.tok_embeddings.num_embeddings
    if vocab != student.vocab_size:
        problems.append(
            f"distill.teacher_model has a vocabulary of {vocab:,} tokens, the student {student.vocab_size:,}: "
            "distillation compares distributions token by token, so the teacher must share the "
            "student's tokenizer; pick a teacher of the same model family or drop distill.teacher_model"
        )
    if distill_node.get("teacher_checkpointer") is not None:
        mine = TOKENIZER_FAMILIES.get(str(cfg.checkpointer.get("model_type")), cfg.checkpointer.get("model_type"))
        theirs_type = distill_node.teacher_checkpointer.get("model_type")
        theirs = TOKENIZER_FAMILIES.get(str(theirs_type), theirs_type)
        if mine != theirs:
            problems.append(
                f"distill.teacher_checkpointer.model_type={theirs_type} is another architecture family than "
                f"checkpointer.model_type={cfg.checkpointer.get('model_type')}; its tokenizer differs, so its "
                "distributions cannot teach this student: use a teacher of the same family"
            )
        try:
            check_checkpoint_files(distill_node.teacher_checkpointer, "distill.teacher_checkpointer", warn)
        except FileNotFoundError as e:
            problems.append(str(e))
    elif cfg.get("resume_from_checkpoint", False):
        try:  # resuming still reads the base checkpoint, for the teacher
            check_checkpoint_files(cfg.checkpointer, "checkpointer (the distillation teacher)", warn)
        except FileNotFoundError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("distill: this run cannot distil:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- run length


def mean_sample_length(dataset, seed: int, probe: int = 64) -> float:
    """Mean token count of up to ``probe`` samples drawn in a seeded order (the token budget's unit)."""
    probe = min(len(dataset), probe)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:probe]
    return sum(len(dataset[int(i)]["tokens"]) for i in order) / max(1, probe)


def steps_for_tokens(total_tokens: int, samples_per_step: int, mean_sample_len: float) -> int:
    """Optimizer steps that consume ``total_tokens`` at ``samples_per_step`` samples of the mean length."""
    return round(int(total_tokens) / (samples_per_step * mean_sample_len))


def check_total_steps(total: int, num_stages: int) -> int:
    """The run's optimizer steps: none (prune only) or at least one per stage."""
    if total < 0:
        raise ValueError("adapt.total_tokens/total_steps must be >= 0")
    if 0 < total < num_stages:
        raise ValueError(
            f"The token budget gives {total} optimizer steps for {num_stages} stages; "
            "every stage needs at least one: raise adapt.total_tokens/total_steps or lower adapt.stages"
        )
    return total


# --------------------------------------------------------------------------- the stock recipe's


def check_stock_settings(cfg: DictConfig) -> None:
    """The config checks of torchtune 0.6.1's ``FullFinetuneRecipeDistributed.__init__``, same messages.

    The recipe runs them itself (through ``super().__init__``); the planner cannot construct
    the stock recipe (it opens a process group and checks the hardware), so they are
    repeated here. Only those that depend on the config alone.
    """
    from torchtune import training

    dtype = training.get_dtype(cfg.get("dtype", None), device=torch.device("cpu"))
    if dtype == torch.float16:
        raise ValueError(
            "full fp16 training is not supported with this recipe. Please use bf16 or fp32 instead."
        )
    if cfg.get("enable_activation_offloading", False):
        if cfg.get("device", "cuda") != "cuda":
            raise RuntimeError("enable_activation_offloading should only be True when training on CUDA")
        if not cfg.get("enable_activation_checkpointing", False):
            raise RuntimeError(
                "enable_activation_offloading should only be True when enable_activation_checkpointing is True"
            )
