"""Adapt-Accel: adaptive structured pruning interleaved with recovery training.

    tune run adapt_prune_recipe --config llama3_1/8B_adapt
    tune run --nproc_per_node 8 adapt_prune_recipe --config llama3_1/8B_adapt
    tune run adapt_prune_recipe --config smollm2/135M_prune      # prune only

``AdaptPruneRecipe`` subclasses torchtune's ``FullFinetuneRecipeDistributed``
and keeps one process alive through every stage. Stage k of N prunes toward
k/N of the target in several adaptive steps (importance and sparsity measured
afresh each step), then trains on its share of the token budget using the
stock training loop unchanged. At every resize the model is rebuilt through
the stock ``_setup_model`` (so FSDP2, activation checkpointing and compile are
reapplied) and filled parameter by parameter from the old one; the optimizer
object, its AdamW moments (sliced to the kept channels) and the LR schedule
carry over.

Distributed design: every rank runs the calibration pass on its own share of
the calibration batches (similarity sums are all-reduced, Taylor gradients are
reduced by FSDP), reduces its own shards to per-channel score totals that one
all-reduce completes (no weights or gradients gathered), and rank 0's decision
is broadcast so all ranks cut identically.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections import defaultdict
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set

import torch
import torch.distributed as dist
import torchtune
from omegaconf import DictConfig, OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtune import config, training, utils

from adapt_prune_tune import checkpointing as ckpt
from adapt_prune_tune import faults
from adapt_prune_tune import configs as packaged_configs
from adapt_prune_tune.config_checks import (
    ConfigError,
    check_inputs as _check_inputs,
    check_total_steps,
    clear_previous_run as _clear_previous_run,
    device_problems as _device_problems,
    expand_home,
    mean_sample_length,
    merge_overrides,
    steps_for_tokens,
)
from adapt_prune_tune.data import (
    ChunkSampler,
    calibration_batches,
    changed_data_warning,
    plan_chunks,
    rank_calibration_batch,
    repeated_data_warning,
)
from adapt_prune_tune.data_checks import (
    dataset_problems as _dataset_problems,
    run_tokenizer as _run_tokenizer,
    whole_corpus_packings,
)
from adapt_prune_tune.distillation import (
    DistillationLoss,
    Teacher,
    kl_calibration_loss,
    own_storage_,
)
from adapt_prune_tune.empty_labels import EmptyLabelsSafeLoss
from adapt_prune_tune.errors import (
    OutOfMemory,
    error_text,
    free_space_that_matters,
    is_out_of_memory,
    is_out_of_space,
    memory_advice,
)
from adapt_prune_tune.models import DecoderArch, arch_differences, arch_from_model
from adapt_prune_tune.packing import TextPacks, sized_by_the_run
from adapt_prune_tune.perplexity import heldout_windows, perplexity
from adapt_prune_tune.fp8 import wrap_component
from adapt_prune_tune.progress import RunProgress, attach_to_logger
from adapt_prune_tune.pruner import AdaptivePruner, calibrate, next_token_loss
from adapt_prune_tune.resize import (
    PrunedStateView,
    gather_full_state,
    optimizer_state_by_name,
    parameter_shapes,
    rebind_optimizer_,
)
from adapt_prune_tune.run_lock import OutputDirInUse, hold_output_dir
from adapt_prune_tune.run_record import launcher_prefix, reproduce_command
from adapt_prune_tune.schedule import stage_targets, stage_train_steps
from adapt_prune_tune.sparsity import sparsity_schedule
from adapt_prune_tune.stopping import StopSignals, interrupted_message, signal_name
from adapt_prune_tune.surgery import LayerKeep, full_slice_map

log = utils.get_logger("INFO")


def _load_stock_recipe():
    """torchtune's full_finetune_distributed module, loaded from its file.

    torchtune installs its recipes as a package ``recipes`` that refuses
    imports, so the file is loaded under a private name. Two names in *our
    copy's* namespace are then swapped (torchtune itself is untouched):
    ``training`` for a view whose memory helpers are no-ops off CUDA (the stock
    recipe calls CUDA-only memory stats and cache resets even on CPU), and
    ``init_device_mesh`` for a cached one (every resize calls ``_setup_model``
    again and must not create new process groups each time).
    """
    path = Path(torchtune.__file__).resolve().parent.parent / "recipes" / "full_finetune_distributed.py"
    if not path.is_file():
        raise FileNotFoundError(f"torchtune's full_finetune_distributed.py not found at {path}")
    spec = importlib.util.spec_from_file_location("_torchtune_full_finetune_distributed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.training = _DeviceAwareTraining(module.training)
    module.tqdm = _NoBar  # one RunProgress display for the whole run instead of a bar per chunk
    module.init_device_mesh = lru_cache(maxsize=None)(module.init_device_mesh)
    return module


class _NoBar:
    """Stands in for the stock loop's per-``train()`` tqdm bar (see ``RunProgress``)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class _DeviceAwareTraining:
    """``torchtune.training`` with memory stats / cache resets guarded for CPU."""

    def __init__(self, wrapped) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name: str):
        return getattr(self._wrapped, name)

    def get_memory_stats(self, device: torch.device, reset_stats: bool = True) -> Dict[str, float]:
        return self._wrapped.get_memory_stats(device, reset_stats) if device.type == "cuda" else {}

    def log_memory_stats(self, stats: Dict[str, float], *args, **kwargs) -> None:
        if stats:
            self._wrapped.log_memory_stats(stats, *args, **kwargs)

    def cleanup_before_training(self) -> None:
        if torch.cuda.is_available():
            self._wrapped.cleanup_before_training()
        else:
            import gc

            gc.collect()


_stock = _load_stock_recipe()
FullFinetuneRecipeDistributed = _stock.FullFinetuneRecipeDistributed


class _RecordingLogger:
    """Forwards to torchtune's metric logger and keeps the per-step rows for the report."""

    def __init__(self, inner, recipe: "AdaptPruneRecipe") -> None:
        self._inner, self._recipe = inner, recipe

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def log_dict(self, payload: Dict[str, Any], step: int) -> None:
        loss_fn = self._recipe._loss_fn.inner  # inside EmptyLabelsSafeLoss
        if "loss" in payload and isinstance(loss_fn, DistillationLoss):
            payload = {**payload, **loss_fn.pop_stats()}  # CE / KL / teacher CE parts
        progress = self._recipe._progress
        if "loss" in payload and progress is not None:
            progress.train_step_done(
                step, float(payload["loss"]), float(payload.get("lr", 0.0)),
                float(payload.get("tokens_per_second_per_gpu", 0.0)) * self._recipe.world_size,
            )
            eta = progress.eta_seconds()
            payload = {**payload, "progress": progress.fraction_done(), **({"eta_seconds": eta} if eta is not None else {})}
        if "loss" in payload:
            faults.point("training_step")
        if "loss" in payload:  # training steps (stage summaries go to the stage log)
            row = {k: float(v) for k, v in payload.items() if isinstance(v, (int, float, torch.Tensor))}
            self._recipe._train_log.append({"step": step, "stage": self._recipe._stage, **row})
        self._inner.log_dict(payload, step=step)


class _RunCheckpointClient:
    """Stands in for torchtune's CheckpointClient inside the stock training loop.

    The stock loop saves at the end of every "epoch"; here an epoch is one
    checkpoint chunk of a stage, and the save writes a full resumable run
    checkpoint (arch, weights, optimizer, recipe state) atomically.
    """

    def __init__(self, inner, recipe: "AdaptPruneRecipe") -> None:
        self._inner, self._recipe = inner, recipe
        self.base_state: Optional[Dict[str, Any]] = None  # kept for the teacher, then dropped

    def load_base_checkpoint(self) -> Dict[str, Any]:
        resumed = self._recipe._resume_state
        if resumed:
            return {training.MODEL_KEY: resumed["model"]}
        state = self._inner.load_base_checkpoint()
        if self._recipe._distill.enabled:
            self.base_state = state[training.MODEL_KEY]
        return state

    def pop_base_state(self) -> Optional[Dict[str, Any]]:
        """The base weights this run loaded for the student, if still held (not on resume)."""
        state, self.base_state = self.base_state, None
        return state

    def save_checkpoint(self, **kwargs) -> None:
        self._recipe.end_of_chunk()


class _Stopped(Exception):
    """A stop signal every rank agreed on; ``saved``: the checkpoint of this step is written."""

    def __init__(self, signum: int, saved: bool) -> None:
        super().__init__(signal_name(signum))
        self.signum, self.saved = signum, saved


class _AfterOptimizerStep:
    """Stands in for the stock loop's profiler, whose ``step()`` the loop calls on every rank
    right after each optimizer step (weights, LR schedule and logs done, gradients cleared): the
    one place inside the stock loop where the run's state is whole and a stop can be taken."""

    def __init__(self, inner, after_step) -> None:
        self._inner, self._after_step = inner, after_step

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def step(self) -> None:
        self._inner.step()
        self._after_step()


class AdaptPruneRecipe(FullFinetuneRecipeDistributed):
    """Interleaves Adapt-Pruner stages with recovery training (see module doc)."""

    def __init__(self, cfg: DictConfig) -> None:
        self._t_start = time.perf_counter()
        # Wall time of the processes before this one (a resumed run), up to the checkpoint it
        # resumes from, and how many there were: the record counts the run, not this process.
        self._seconds_before, self._resumes = 0.0, 0
        # Rank 0's hold on output_dir (run_lock) until the process exits; False where the
        # filesystem has no flock, None before it is taken.
        self._output_lock: Optional[Any] = None
        output_dir = Path(str(cfg.output_dir)).expanduser()
        if output_dir.is_dir():  # a live run there must not be taken for a finished one by the checks
            self._hold_output_dir(output_dir, early=True)
        # Every problem of the config, its files and output_dir in one message, before any work.
        checked = _check_inputs(cfg)
        # This machine's device, and the data, read before the weights load.
        tokenizer, tokenizer_problems = _run_tokenizer(cfg)
        data_problems = _device_problems(cfg) + tokenizer_problems
        if tokenizer is not None:
            data_problems += _dataset_problems(
                cfg, vocab_size=checked.arch.vocab_size, tokenizer=tokenizer,
                warn=lambda warning: utils.log_rank_zero(log, warning, level=logging.WARNING),
            )
            try:  # and the held-out texts, tokenized once, here
                self._heldout_windows = heldout_windows(cfg.get("heldout", None), tokenizer)
            except Exception as e:  # noqa: BLE001 - the component's or the text's own words, under the key
                data_problems.append(str(e) if isinstance(e, ValueError) else f"heldout: {error_text(e)}")
        if data_problems:
            raise ConfigError(data_problems)
        self._pruning_cfg, self._distill = checked.pruning, checked.distill
        self._hold_output_dir(output_dir)
        _clear_previous_run(cfg)  # overwrite_output_dir=True only, now that every check has passed
        adapt = cfg.adapt
        self._num_stages = int(adapt.stages)
        self._steps_per_stage = int(adapt.get("steps_per_stage", 1))
        self._total_tokens = adapt.get("total_tokens", None)
        self._total_steps_cfg = adapt.get("total_steps", None)
        self._checkpoint_every = int(adapt.get("checkpoint_every_n_steps", 50))
        self._keep_last = int(adapt.get("keep_last_checkpoints", 2))
        self._optimizer_state_mode = adapt.get("optimizer_state", "slice")
        super().__init__(cfg)
        if unseen := ckpt.unseen_ranks(output_dir, self._device):
            raise ConfigError([_unshared_output_dir(output_dir, unseen, self.world_size)])
        self._cfg = cfg
        self._ckpt_root = Path(cfg.output_dir) / "checkpoints"
        self._stage = 0
        self._train_log: List[Dict[str, float]] = []
        self._stage_log: List[Dict[str, Any]] = []
        self._heldout_original: Optional[float] = None
        self._heldout_log: List[Dict[str, Any]] = []
        self._progress: Optional[RunProgress] = None
        self._resume_state: Optional[Dict[str, Any]] = None
        self._stop = StopSignals()
        self._train_t0: Optional[float] = None  # inside the stock loop: when its time was last counted
        self.stopped_by: Optional[int] = None  # the signal that stopped the run before its end
        # The global batch fixes the data order and the schedule; how it is split over ranks and
        # micro-batches does not, so a run may resume on another world size.
        self._settings = {
            "pruning": OmegaConf.to_container(cfg.pruning, resolve=True),
            "adapt": OmegaConf.to_container(cfg.adapt, resolve=True),
            # absent or null: off
            "distill": OmegaConf.to_container(cfg.distill, resolve=True) if cfg.get("distill") else {},
            "samples_per_step": cfg.batch_size * self._gradient_accumulation_steps * self.world_size,
        }
        self._choices = self._recorded_choices(cfg)
        if self._resume_from_checkpoint:
            self._resume_state = ckpt.load_latest(self._ckpt_root)
            _check_same_run(self._resume_state, self._settings, checked.arch, self._choices)
            utils.log_rank_zero(log, f"Resuming from {self._resume_state['path']}")
            # The stock setup must not try to read torchtune recipe state.
            self._resume_from_checkpoint = False

    def _hold_output_dir(self, output_dir: Path, early: bool = False) -> None:
        """Global rank 0 takes ``output_dir``'s run lock before the run writes anything there
        (``run_lock``); a second run into it is refused, naming the first. ``early``: the
        directory may still prove unwritable, which the config checks then report."""
        if self._output_lock is not None or int(os.environ.get("RANK", "0")) != 0:
            return
        try:
            self._output_lock = hold_output_dir(output_dir, _launch_command()) or False
        except OutputDirInUse as e:
            raise ConfigError([str(e)]) from None
        except OSError:
            if not early:
                raise

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        self._checkpoint_client = _RunCheckpointClient(self._checkpoint_client, self)
        self._fp8 = bool(cfg.get("enable_fp8_training", False))
        if self._resume_state or self._fp8:
            # Replace (not merge) the model node: the checkpoint's per-layer spec builds it, and
            # with FP8 every build goes through the float8 conversion.
            node = _arch_component(self._resume_state["arch"]) if self._resume_state else cfg.model
            cfg = cfg.copy()
            OmegaConf.update(cfg, "model", self._build_node(node), merge=False)
        self._compile_widths = cfg.get("compile_widths", "dynamic")
        # Set before the stock setup compiles the model, whatever torch.compile reads when.
        _configure_compile_widths(bool(cfg.get("compile", False)), self._compile_widths)
        super().setup(cfg)
        if self._is_rank_zero:
            self._metric_logger = _RecordingLogger(self._metric_logger, self)
        self._profiler = _AfterOptimizerStep(self._profiler, self._stop_mid_chunk_if_asked)
        self._teacher: Optional[Teacher] = None
        if self._distill.enabled:
            self._setup_distillation(self._cfg)
        self._loss_fn = EmptyLabelsSafeLoss(self._loss_fn)
        self._model_cfg_kwargs = dict(
            enable_activation_checkpointing=self._enable_activation_checkpointing,
            enable_activation_offloading=self._enable_activation_offloading,
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
            fsdp_cpu_offload=self.fsdp_cpu_offload,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            ac_mode=cfg.get("ac_mode", None),
            ac_option=cfg.get("ac_option", None),
        )
        state = self._resume_state
        if state is None:
            # Provenance travels with every spec (arch.json of checkpoints and exports).
            meta = {"base_model": str(cfg.checkpointer.checkpoint_dir), "model_type": cfg.checkpointer.get("model_type")}
            self._arch = replace(arch_from_model(self._model), meta=meta)
            self._base_arch = self._arch
        else:
            self._base_arch = DecoderArch.from_dict(state["recipe"]["base_arch"])
            self._arch = replace(arch_from_model(self._model), meta=self._base_arch.meta)
        _fit_compile_caches(self._compile, self._arch, self._teacher is not None)
        self._heldout = self._setup_heldout(cfg.get("heldout", None))
        self._pruner = AdaptivePruner(self._pruning_cfg, self._base_arch)
        self._targets = stage_targets(self._pruner.final_target, self._num_stages)
        self._fingerprint = ckpt.run_fingerprint(self._base_arch, self._settings)
        self._stage_pruned = [False] * self._num_stages
        if state is not None:
            self._restore(state["recipe"], state["optimizer"])
            ckpt.restore_rng(state["rng"])
        self._resume_state = None
        if self._is_rank_zero:
            log.info(
                f"Adapt-Accel: {self._num_stages} stages × {self._steps_per_stage} prune steps to "
                f"{self._pruner.final_target:.1%} of prunable parameters "
                f"({self._base_arch.num_params():,} params now); training steps per stage: {self._stage_steps}"
            )
            self._progress = self._setup_progress()

    def _setup_progress(self) -> RunProgress:
        """The run's one progress display (rank 0), continuing where a resumed run stands."""
        evaluations = 0
        if self._heldout:
            evaluations = 1 + self._num_stages + sum(1 for n in self._stage_steps if n > 0)
            if self._heldout_at_checkpoints:
                stage_chunks = [sum(1 for c in self._chunks if c.stage == k + 1) for k in range(self._num_stages)]
                evaluations += sum(max(0, n - 1) for n in stage_chunks)
            evaluations = max(0, evaluations - len(self._heldout_log))
        progress = RunProgress(
            prune_steps=[self._steps_per_stage] * self._num_stages,
            train_steps=self._stage_steps,
            tokens_per_step=self._samples_per_step * self._mean_sample_len,
            evaluations_left=evaluations,
        )
        done = sum(self._stage_pruned)
        stage = min(self._num_stages, max(1, done))
        progress.resume_at(stage, self._steps_per_stage if self._stage_pruned[stage - 1] else 0, self.global_step)
        attach_to_logger(progress, log)
        return progress

    def _setup_distillation(self, cfg: DictConfig) -> None:
        """The frozen base model as teacher, sharded like the student; the distillation loss.

        The teacher is built by the stock ``_setup_model`` (same dtype, FSDP2 sharding, compile)
        without activation checkpointing (it never runs backward) and with its output
        projection in the root FSDP unit: the distillation pass calls it once per output chunk
        inside one forward, which must not all-gather it once per chunk.
        """
        distill = cfg.distill
        ctx = self.activations_handling_ctx  # _setup_model sets it for the model it builds
        model = self._setup_model(
            cfg_model=distill.get("teacher_model") or cfg.model,
            enable_activation_checkpointing=False,
            enable_activation_offloading=False,
            custom_sharded_layers=None,
            fsdp_cpu_offload=self.fsdp_cpu_offload,
            # It never runs backward: without resharding after forward it would stay whole on every rank.
            reshard_after_forward=True,
            model_state_dict=self._teacher_state(distill),
        )
        self.activations_handling_ctx = ctx
        own_storage_(model, self._model)  # one process: both were loaded from the same tensors
        self._teacher = Teacher(model)
        self._teacher_hook = self._teacher.watch(self._model)
        ce = self._loss_fn
        self._loss_fn = DistillationLoss(
            self._teacher,
            alpha=self._distill.alpha,
            temperature=self._distill.temperature,
            num_output_chunks=getattr(ce, "num_output_chunks", 8),
            ignore_index=ce.ignore_index,
        )
        self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
        utils.log_rank_zero(
            log,
            f"Distilling from {'distill.teacher_model' if distill.get('teacher_model') else 'the base model'}: "
            f"loss = {1 - self._distill.alpha:g}·CE + "
            f"{self._distill.alpha:g}·T²·KL (T={self._distill.temperature:g}); "
            f"calibration loss: {self._distill.calibration_loss}",
        )

    def _teacher_state(self, distill: DictConfig) -> Dict[str, Any]:
        """Teacher weights: the run's base checkpoint (already in memory unless resuming: the
        student then loads its pruned weights), or ``distill.teacher_checkpointer``."""
        if distill.get("teacher_checkpointer") is None:
            state = self._checkpoint_client.pop_base_state()
            if state is not None:
                return state
        node = distill.get("teacher_checkpointer") or self._cfg.checkpointer
        checkpointer = config.instantiate(node, should_load_recipe_state=False)
        return checkpointer.load_checkpoint()[training.MODEL_KEY]

    def _setup_heldout(self, cfg_heldout: Optional[DictConfig]) -> Dict[str, torch.Tensor]:
        """Token windows of each held-out text (read in ``__init__``), identical on every rank."""
        if cfg_heldout is None:
            return {}
        self._heldout_batch_size = int(cfg_heldout.get("batch_size", 4))
        self._heldout_at_checkpoints = bool(cfg_heldout.get("at_checkpoints", False))
        return self._heldout_windows

    def _heldout_ppl(self, event: str) -> Optional[Dict[str, float]]:
        """Held-out perplexity of the current model on every text (all ranks), or None.

        Logged as ``heldout_ppl`` (the first text) and ``heldout_ppl/<name>``, and appended to
        the run's held-out log with the training step, estimated tokens seen and ``event``
        (original, pruned, trained, checkpoint).
        """
        if not self._heldout:
            return None
        t0 = time.perf_counter()
        if self._progress is not None:
            self._progress.doing(f"held-out evaluation ({event})")
        with _eager_if(self._compile), self._phase("heldout"):  # no graphs for an eval-only shape and grad mode
            values = {
                name: perplexity(self._model, windows, self._heldout_batch_size)
                for name, windows in self._heldout.items()
            }
        self._heldout_log.append(
            {"step": self.global_step, "tokens": self._tokens_seen(), "stage": self._stage, "event": event, "ppl": values}
        )
        if self._is_rank_zero:
            primary = next(iter(values.values()))
            payload = {"heldout_ppl": primary, **{f"heldout_ppl/{k}": v for k, v in values.items()}}
            self._metric_logger.log_dict(payload, step=self.global_step)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
            log.info(f"held-out perplexity ({event}): {shown} ({time.perf_counter() - t0:.1f}s)")
            if self._progress is not None:
                self._progress.evaluation_done(time.perf_counter() - t0)
        return values

    def _tokens_seen(self) -> int:
        """Training tokens so far, estimated from optimizer steps and the mean sample length."""
        return round(self.global_step * self._samples_per_step * self._mean_sample_len)

    def end_of_chunk(self) -> None:
        """After each checkpoint chunk of training: optional held-out evaluation, then checkpoint.

        The evaluation comes first so that it is part of the checkpoint (a resumed run does not
        repeat it); the stage's last chunk is evaluated by the stage loop itself.
        """
        finished = self._chunks[self.epochs_run - 1]
        nxt = self._chunks[self.epochs_run] if self.epochs_run < len(self._chunks) else None
        if self._heldout and self._heldout_at_checkpoints and nxt is not None and nxt.stage == finished.stage:
            self._heldout_ppl("checkpoint")
        if self._progress is not None:
            self._progress.pause()
        self.save_run_checkpoint()
        self._stop_if_asked(saved=True)

    def _setup_data(self, cfg_dataset, shuffle, batch_size, collate_fn, dataloader_state_dict=None):
        """Stock dataset/collate, then our stage-chunk sampler and calibration batches."""
        for packing in whole_corpus_packings(self._cfg):  # said before the wait, not after
            utils.log_rank_zero(log, packing, level=logging.WARNING)
        stock = super()._setup_data(sized_by_the_run(cfg_dataset), shuffle, batch_size, collate_fn)
        dataset = stock.dataset
        samples_per_step = batch_size * self._gradient_accumulation_steps * self.dp_size
        self._samples_per_step = samples_per_step
        self._stage_steps = stage_train_steps(self._resolve_total_steps(dataset, samples_per_step), self._num_stages)
        self._chunks = plan_chunks(self._stage_steps, samples_per_step, self._checkpoint_every)
        steps_done = self._resume_state["recipe"]["global_step"] if self._resume_state else 0
        sampler = ChunkSampler(
            len(dataset), self._chunks, samples_per_step, self.seed, self.dp_rank, self.dp_size, bool(shuffle),
            steps_done=steps_done,
        )
        calib = self._cfg.pruning.calibration
        calib_data = config.instantiate(calib.dataset, self._tokenizer)
        self._calib_batch = rank_calibration_batch(int(calib.num_samples), int(calib.batch_size), self.dp_size)
        if self._is_rank_zero and self._calib_batch < int(calib.batch_size):
            share = int(calib.num_samples) // self.dp_size
            log.info(
                f"calibration: {share} windows per rank in batches of {self._calib_batch}, the largest divisor of "
                f"{share} up to pruning.calibration.batch_size={int(calib.batch_size)}"
            )
        # On the training device once: a few thousand token ids, read at every prune step.
        self._calib_batches = [
            {k: v.to(self._device) for k, v in batch.items()}
            for batch in calibration_batches(
                calib_data, int(calib.num_samples), int(calib.seq_len), int(calib.batch_size),
                seed=self.seed, rank=self.dp_rank, world_size=self.dp_size,
            )
        ]
        return StatefulDataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=stock.collate_fn, drop_last=True
        )

    def _resolve_total_steps(self, dataset, samples_per_step: int) -> int:
        """Optimizer steps for the whole run, from a step count or a token budget.

        The plan is the run's: a resumed run keeps the one its checkpoint recorded. Recomputed
        from data that changed since (rows added, another ``max_seq_len``), a token budget
        would give another step count, and with it other stage lengths, checkpoint chunks and
        LR schedule than the ones the checkpoint's position and scheduler state belong to.
        Packed text (``packing.TextPacks``) is topped up here to the packs the steps consume.
        """
        mean_len = mean_sample_length(dataset, self.seed)
        recorded = (self._resume_state or {}).get("recipe", {}).get("data")
        if recorded is not None:
            total, planned_len = int(recorded["total_steps"]), float(recorded["planned_mean_sample_len"])
        else:
            planned_len = mean_len
            total = self._planned_total_steps(samples_per_step, mean_len)
        if isinstance(dataset, TextPacks):  # packed as far as its max_tokens: on to what the steps consume
            dataset.grow_to(total * samples_per_step)
            utils.log_rank_zero(
                log, f"training text: {len(dataset):,} packs of {dataset.max_seq_len} tokens"
                + (f", {dataset.cached:,} of them read from {dataset.cache}" if dataset.cached else ""),
            )
            if self._is_rank_zero:
                try:  # for a resume (every rank packed the same; one writes)
                    dataset.save()
                except OSError as e:  # a cache: the run goes on without it
                    log.warning(f"the packed training text could not be kept in {dataset.cache} ({error_text(e)}); "
                                "a resumed run packs it again")
        if recorded is not None:
            warning = changed_data_warning(recorded, len(dataset), mean_len)
        else:
            warning = repeated_data_warning(total, samples_per_step, len(dataset))
        if warning:
            utils.log_rank_zero(log, warning, level=logging.WARNING)
        self._mean_sample_len = planned_len  # token estimates follow the plan
        # The plan, and the data as this process found it: a later resume compares with that.
        self._data_record = {"samples": len(dataset), "mean_sample_len": mean_len, "total_steps": total,
                             "planned_mean_sample_len": planned_len}
        return total

    def _planned_total_steps(self, samples_per_step: int, mean_len: float) -> int:
        """The configured step count, or the token budget in steps of ``samples_per_step`` samples."""
        if self._total_steps_cfg is not None:
            total = int(self._total_steps_cfg)
        else:
            total = steps_for_tokens(self._total_tokens, samples_per_step, mean_len)
            utils.log_rank_zero(
                log,
                f"adapt.total_tokens={int(self._total_tokens):,} ≈ {total} steps "
                f"({samples_per_step} samples × ~{mean_len:.0f} tokens per step)",
            )
        return check_total_steps(total, self._num_stages)

    def _setup_lr_scheduler(self, cfg_lr_scheduler, num_training_steps, last_epoch):
        """One schedule over all stages' steps, not over one "epoch" of the stock loop."""
        return super()._setup_lr_scheduler(cfg_lr_scheduler, max(1, sum(self._stage_steps)), -1)

    # ------------------------------------------------------------------ run
    def train(self) -> None:
        """Stage loop: prune (adaptive steps), then the stock loop over the stage's chunks.

        A stop signal (``stopping``) ends the run at the next optimizer step or checkpoint,
        with a checkpoint of that step; ``stopped_by`` names the signal.
        """
        with self._stop:
            try:
                self._train_stages()
            except _Stopped as stop:
                self._stopped(stop)
            except KeyboardInterrupt:
                self._interrupted()
                raise
            except Exception as e:  # noqa: BLE001 - only running out of memory is turned into advice
                if not is_out_of_memory(e):
                    raise
                raise OutOfMemory(self._out_of_memory_advice(e)) from e

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """What the run is doing, for the advice if memory runs out in it. An error leaves the
        phase it was raised in set (no ``finally``): ``train`` reads it after the unwinding."""
        outer, self._memory_phase = getattr(self, "_memory_phase", None), name
        yield
        self._memory_phase = outer

    def _out_of_memory_advice(self, error: BaseException) -> str:
        """Which settings lower the memory of the phase that ran out, and the command that goes on with them."""
        cfg, world = self._cfg, self.world_size
        what, changes = memory_advice(
            getattr(self, "_memory_phase", None), self._stage,
            batch_size=int(cfg.batch_size), accumulation=self._gradient_accumulation_steps,
            calibration_batch=getattr(self, "_calib_batch", int(cfg.pruning.calibration.batch_size)),
            calibration_per_rank=int(cfg.pruning.calibration.num_samples) // world,
            heldout_batch=getattr(self, "_heldout_batch_size", 0),
            activation_checkpointing=bool(cfg.get("enable_activation_checkpointing", False)),
        )
        latest = ckpt.latest_checkpoint(self._ckpt_root)
        if latest is None:
            then = ("No checkpoint of this run is complete yet: run it again with the lower setting"
                    + (f": {_continue_command(changes, resume=False)}" if changes else "."))
        else:
            then = (f"The last complete checkpoint, {latest.name}, is intact; continue with: "
                    f"{_continue_command(changes)}" + ("" if changes else " (and the new setting)"))
        text = str(error).strip()
        cause = text.splitlines()[0][:300] if text else type(error).__name__
        return (f"out of memory on rank {self.rank} ({self._device}) in {what}. What each stage needs: "
                f"{_plan_command(world)}. {then}\n({cause})")

    def _train_stages(self) -> None:
        if self._heldout_original is None and not any(self._stage_pruned):
            values = self._heldout_ppl("original")
            self._heldout_original = None if values is None else next(iter(values.values()))
        for stage in range(1, self._num_stages + 1):
            self._stage = stage
            if not self._stage_pruned[stage - 1]:
                self._prune_stage(stage)
                self._stop_if_asked(saved=True)
            chunk_ids = [i for i, c in enumerate(self._chunks) if c.stage == stage]
            remaining = [i for i in chunk_ids if i >= self.epochs_run]
            if remaining:
                if self._progress is not None:
                    self._progress.start_stage(stage, pruned=True)
                self.total_epochs = remaining[-1] + 1
                self.max_steps_per_epoch = self._chunks[remaining[0]].steps
                self._steps_per_epoch = self.max_steps_per_epoch
                self._train_t0 = time.perf_counter()
                try:
                    with self._phase("training"):
                        super().train()
                except _Stopped:
                    # The stock loop stops its profiler only when it ends: keep the trace taken so far.
                    self._profiler.stop()
                    raise
                self._count_training_time()
                self._train_t0 = None
                self._stage_entry(stage)["train_loss_end"] = self._last_loss()
            # By number, not the log's last entry: a resumed run walks the finished stages first,
            # and the last entry is then the stage it resumes into, not yet trained.
            entry = self._stage_entry(stage)
            if self._stage_steps[stage - 1] > 0 and self._heldout and entry.get("heldout_ppl_after_train") is None:
                values = self._heldout_ppl("trained")
                entry["heldout_ppl_after_train"] = next(iter(values.values()))
                entry["heldout_after_train"] = values
        if self._progress is not None:
            self._progress.finish()
        self._finish()

    def _count_training_time(self) -> None:
        """Add the time trained since the last count to the stage's ``seconds_train``.

        Counted at every checkpoint too, so that a resumed stage's time includes what the
        processes before it trained up to their checkpoint, not only this process's part.
        """
        if self._train_t0 is not None:
            now = time.perf_counter()
            entry = self._stage_entry(self._stage)
            entry["seconds_train"] = entry.get("seconds_train", 0.0) + now - self._train_t0
            self._train_t0 = now

    def _stop_if_asked(self, saved: bool) -> None:
        """End the run here if a stop signal reached any rank (collective: every rank calls it)."""
        signum = self._stop.agreed(self._device)
        if signum is not None:
            raise _Stopped(signum, saved)

    def _stop_mid_chunk_if_asked(self) -> None:
        """After every optimizer step. A chunk's last step is left to its own checkpoint, which
        checks after it is written: stopping here would write that step's checkpoint twice."""
        chunk = self._chunks[self.epochs_run]
        if self.global_step < chunk.start // self._samples_per_step + chunk.steps:
            self._stop_if_asked(saved=False)

    def _stopped(self, stop: _Stopped) -> None:
        """Write the stopping step's checkpoint, unless it is the one just written, and say how to go on."""
        if self._progress is not None:
            self._progress.pause()
        if not stop.saved:
            self.save_run_checkpoint()
        self.stopped_by = stop.signum
        if self._is_rank_zero:
            message = (
                f"Stopped on {signal_name(stop.signum)} after {self.global_step:,} of {sum(self._stage_steps):,} "
                f"training steps (stage {self._stage} of {self._num_stages}), checkpoint written. "
                f"Continue with: {_continue_command()}"
            )
            log.warning(message)
            _tell_the_launcher(message)

    def _interrupted(self) -> None:
        """Ctrl-C stops at once (see ``stopping``): say what survives and how to go on from it."""
        if self._progress is not None:
            self._progress.pause()
        if not self._is_rank_zero:
            return
        log.warning(interrupted_message(ckpt.latest_checkpoint(self._ckpt_root), self.global_step,
                                        sum(self._stage_steps), self._stage, self._num_stages, _continue_command()))

    def _stage_entry(self, stage: int) -> Dict[str, Any]:
        """The stage log's entry of ``stage`` (written by its prune)."""
        return next(e for e in reversed(self._stage_log) if e["stage"] == stage)

    def _last_loss(self) -> Optional[float]:
        rows = [r for r in self._train_log if r["stage"] == self._stage and "loss" in r]
        return rows[-1]["loss"] if rows else None

    def _prune_stage(self, stage: int) -> None:
        """Adaptive steps from the current sparsity to this stage's target; then checkpoint."""
        t0 = time.perf_counter()
        start = float(self._pruner.records[-1].target) if self._pruner.records else 0.0
        goal = self._targets[stage - 1]
        # The stage's before/after calibration losses are next-token CE whatever scores the cut.
        loss_before = None
        if self._teacher is not None and self._distill.calibration_loss == "kl" and self._pruner.records:
            with _eager_if(self._compile):
                loss_before = calibrate(self._model, self._calib_batches, with_gradients=False).loss
        if self._compile and self._compile_widths == "static":
            import torch._dynamo

            # Graphs of the previous widths can never match again after the cut.
            torch._dynamo.reset()
        # With compile: True, every resize changes the layers' shapes; compiling the calibration
        # passes would build graphs for widths that live for one step. Prune steps run eager and
        # only the stage's final widths are compiled, by its first training step.
        if self._progress is not None:
            self._progress.start_stage(stage, pruned=False)
        with _eager_if(self._compile):
            for j, target in enumerate(sparsity_schedule(goal, self._steps_per_stage, start), start=1):
                t_step = time.perf_counter()
                if self._progress is not None:
                    self._progress.doing(f"calibration pass + cut, prune step {j}/{self._steps_per_stage}")
                with self._phase("calibration"):
                    plan, calib = self._pruner.measure_and_plan(
                        self._model, self._arch, self._calib_batches, target, **self._calibration_loss()
                    )
                loss_before = calib.loss if loss_before is None else loss_before
                keeps = _broadcast_keeps(plan.keeps, self._device)
                faults.point("before_resize", self.rank)
                with self._phase("resize"):
                    self._resize(keeps, plan.arch)
                record = self._pruner.commit(plan, calib, target, stage, time.perf_counter() - t_step)
                if self._progress is not None:
                    self._progress.prune_step_done(record.seconds)
                utils.log_rank_zero(
                    log,
                    f"stage {stage} prune step {j}/{self._steps_per_stage}: target {target:.3f}, "
                    f"params {record.params:,}, calib loss {calib.loss:.4f}, {record.seconds:.2f}s",
                )
            with self._phase("calibration"):
                loss_after = calibrate(self._model, self._calib_batches, with_gradients=False).loss
        seconds_prune = time.perf_counter() - t0
        heldout = self._heldout_ppl("pruned")
        self._stage_pruned[stage - 1] = True
        entry = {
            "stage": stage,
            "tokens": round(self._stage_steps[stage - 1] * self._samples_per_step * self._mean_sample_len),
            "train_steps": self._stage_steps[stage - 1],
            "params": self._arch.num_params(),
            "calib_loss_before_prune": loss_before,
            "calib_loss_after_prune": loss_after,
            "seconds_prune": seconds_prune,
            "heldout_ppl_after_prune": None if heldout is None else next(iter(heldout.values())),
            "heldout_after_prune": heldout,
            "layers": [vars(layer) for layer in self._arch.layers],
        }
        self._stage_log.append(entry)
        if self._is_rank_zero:
            self._metric_logger.log_dict(
                {
                    "stage": stage,
                    "params": entry["params"],
                    "calib_loss_before_prune": loss_before,
                    "calib_loss_after_prune": loss_after,
                    "prune_seconds": entry["seconds_prune"],
                },
                step=self.global_step,
            )
            log.info(
                f"stage {stage}: {entry['params']:,} params, calib loss {loss_before:.4f} -> {loss_after:.4f}; "
                f"widths (heads/kv/mlp): {[(l.num_heads, l.num_kv_heads, l.intermediate_dim) for l in self._arch.layers]}"
            )
        self.save_run_checkpoint()

    def _build_node(self, node: Any) -> Any:
        """The model component as built: converted for FP8 training when enabled (see ``fp8``)."""
        if not self._fp8:
            return node
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        return wrap_component(node)

    def _calibration_loss(self) -> Dict[str, Any]:
        """``loss_fn`` for calibration passes: KL to the teacher when configured, else next-token CE.

        Before the first cut the student *is* the teacher: the KL is at its minimum, its gradient
        is exactly zero and every Taylor score would be 0, so that first step scores with CE.
        """
        if self._teacher is not None and self._distill.calibration_loss == "kl" and self._pruner.records:
            return {"loss_fn": _with_fault_point(kl_calibration_loss(self._teacher))}
        return {"loss_fn": _with_fault_point(next_token_loss)}

    def _resize(self, keeps: List[Optional[LayerKeep]], new_arch: DecoderArch) -> None:
        """Rebuild the model at its new widths and carry weights and optimizer state."""
        if all(k is None for k in keeps):
            return
        slices = full_slice_map(self._arch, keeps)
        old_model = self._model
        old_shapes = parameter_shapes(old_model)
        old_state = optimizer_state_by_name(old_model, self._optimizer) if self._optimizer_state_mode == "slice" else {}
        # The old moments now live only in `old_state`, which the rebind consumes entry by entry,
        # and the old model is dropped before it: a resize peaks at old + new weights + one set
        # of moments, below a training step (weights, grads, moments, activations).
        self._optimizer.state = defaultdict(dict)
        with _quiet_stock_setup():
            self._model = self._setup_model(
                cfg_model=DictConfig(self._build_node(_arch_component(new_arch))),
                model_state_dict=PrunedStateView(old_model, slices),
                **self._model_cfg_kwargs,
            )
        del old_model
        rebind_optimizer_(self._optimizer, self._model, old_state, slices, old_shapes, consume=True)
        if hasattr(self._loss_fn, "num_output_chunks"):  # CEWithChunkedOutputLoss, DistillationLoss
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
        if self._teacher is not None:
            self._teacher_hook = self._teacher.watch(self._model)
        del old_state
        self._arch = new_arch
        _fit_compile_caches(self._compile, new_arch, self._teacher is not None)
        _check_same_arch_everywhere(new_arch, self._device)

    # ------------------------------------------------------------------ state
    def save_run_checkpoint(self) -> None:
        """Every rank writes its own shards; rank 0 the run's state (see ``checkpointing``)."""
        self._count_training_time()
        recipe_state: Dict[str, Any] = {}
        if self._is_rank_zero:
            recipe_state = {
                "fingerprint": self._fingerprint,
                "settings": self._settings,  # what the fingerprint hashes, to name a mismatch on resume
                "base_arch": self._base_arch.to_dict(),
                "epochs_run": self.epochs_run,
                "global_step": self.global_step,
                "stage_pruned": self._stage_pruned,
                "pruner": self._pruner.state_dict(),
                "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler else None,
                **self._choices,
                "data": self._data_record,  # the plan a resume keeps, and the data it was made for
                "seconds_run": self._seconds_run(),
                "resumes": self._resumes,
                "train_log": self._train_log,
                "stage_log": self._stage_log,
                "heldout_original": self._heldout_original,
                "heldout_log": self._heldout_log,
            }
        # Named by training step, then prune step: sorts in run order.
        tag = ckpt.checkpoint_tag(self.global_step, len(self._pruner.records))
        t0 = time.perf_counter()
        try:
            path = ckpt.save_run_checkpoint(
                self._ckpt_root, tag, self._arch, self._model, self._optimizer, recipe_state, ckpt.capture_rng(),
                self._keep_last,
            )
        except ckpt.CheckpointWriteError as e:
            then = (f"continue with: {_continue_command()}" if ckpt.latest_checkpoint(self._ckpt_root)
                    else "run it again")
            raise ckpt.CheckpointWriteError(f"{e} {_once_fixed(e)} {then}") from e
        if self._is_rank_zero:
            log.info(f"Checkpoint written to {path} ({time.perf_counter() - t0:.1f}s)")

    def _recorded_choices(self, cfg: DictConfig) -> Dict[str, Any]:
        """Settings outside the fingerprint that a resume must keep: the training data's order
        (``seed``, ``shuffle``) and what every held-out evaluation of the run measures (texts and
        windows; its batch size and schedule may change, e.g. after running out of memory)."""
        heldout = OmegaConf.to_container(cfg.heldout, resolve=True) if cfg.get("heldout", None) else None
        measured = ("text", "texts", "num_tokens", "window")
        return {
            "seed": self.seed,
            "shuffle": bool(cfg.get("shuffle", True)),
            "heldout": {k: v for k, v in heldout.items() if k in measured} if heldout else None,
        }

    def _seconds_run(self) -> float:
        """Wall time of the run so far: earlier processes up to their last checkpoint, and this one."""
        return self._seconds_before + time.perf_counter() - self._t_start

    def _restore(self, state: Dict[str, Any], optimizer_state: Optional[Dict[str, Any]]) -> None:
        self._seconds_before = float(state.get("seconds_run", 0.0))
        self._resumes = int(state.get("resumes", 0)) + 1
        self.epochs_run = state["epochs_run"]
        self.global_step = state["global_step"]
        self._stage_pruned = list(state["stage_pruned"])
        self._pruner.load_state_dict(state["pruner"])
        self._train_log = list(state["train_log"])
        self._stage_log = list(state["stage_log"])
        self._heldout_original = state.get("heldout_original")
        self._heldout_log = list(state.get("heldout_log", []))
        if optimizer_state is not None:
            ckpt.restore_optimizer_(self._optimizer, self._model, optimizer_state)
        if self._lr_scheduler is not None and state["lr_scheduler"] is not None:
            self._lr_scheduler.load_state_dict(state["lr_scheduler"])

    # ------------------------------------------------------------------ end
    def _finish(self) -> None:
        """Write the pruned model, its spec and the run record (rank 0)."""
        model_state = gather_full_state(self._model)
        if self._is_rank_zero:
            out = Path(self._cfg.output_dir) / "final"
            out.mkdir(parents=True, exist_ok=True)
            self._arch.save(out / "arch.json")
            from safetensors import SafetensorError
            from safetensors.torch import save_file

            try:
                faults.point("final_write")
                save_file({k: v.contiguous() for k, v in model_state.items()}, str(out / "model.safetensors.tmp"))
                os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
            except (OSError, SafetensorError) as e:
                (out / "model.safetensors.tmp").unlink(missing_ok=True)
                raise ckpt.CheckpointWriteError(self._final_write_failed(out, model_state, e)) from e
            faults.point("export")
            del model_state
            record = self.run_record()
            record["speed"] = self._measure_speed()
            try:
                faults.point("record_write")
                ckpt.atomic_write_text(Path(self._cfg.output_dir) / "run_record.json", json.dumps(record, indent=2))
            except OSError as e:
                from adapt_prune_tune.report import format_bytes

                free = free_space_that_matters(Path(self._cfg.output_dir), e)
                raise ckpt.CheckpointWriteError(
                    f"the run record could not be written to {self._cfg.output_dir}: {error_text(e)}"
                    + ("" if free is None else f" ({format_bytes(free)} free there)") + ". The pruned "
                    f"model is in {out}; {_once_fixed(e).lower()} continue with: {_continue_command()} "
                    "(nothing is trained again)"
                ) from e
            try:  # the model and record are already on disk; a plotting failure must not lose them
                from adapt_prune_tune.report import write_report

                log.info(f"Report: {write_report(record, self._cfg.output_dir)}")
            except Exception as e:  # noqa: BLE001 - report is best effort, the run succeeded
                log.warning(f"Run report could not be written ({e}); run_record.json has the data")
            log.info(
                f"Done: {record['params_before']:,} -> {record['params_after']:,} parameters; "
                f"model in {out}, record in {self._cfg.output_dir}/run_record.json"
            )
        if dist.is_initialized():
            dist.barrier()

    def _final_write_failed(self, out: Path, model_state: Dict[str, torch.Tensor], error: BaseException) -> str:
        """Why the pruned model is not on disk, and that nothing of the training is lost."""
        from adapt_prune_tune.report import format_bytes

        need = sum(v.numel() * v.element_size() for v in model_state.values())
        free = free_space_that_matters(out, error, need)
        free = "" if free is None else f", {format_bytes(free)} free there"
        return (f"the pruned model could not be written to {out}: {error_text(error)} ({format_bytes(need)} to "
                f"write{free}). Training is complete and its last checkpoint is intact: {_once_fixed(error).lower()} "
                f"continue with: {_continue_command()} (nothing is trained again)")

    def _measure_speed(self) -> Optional[Dict[str, Any]]:
        """Forward and generation tokens/s and peak memory of the original and the pruned shape.

        Measured on this machine (rank 0's device) with fresh weights (speed does not depend on
        their values); optimizer state and the teacher are released first, the run is over.
        ``speed: null`` skips it.
        """
        settings = self._cfg.get("speed", None)
        if settings is None:
            return None
        from adapt_prune_tune.speed import arch_speed_record

        self._optimizer.state.clear()
        self._teacher = None
        t0 = time.perf_counter()
        if self._progress is not None:
            self._progress.doing("speed of the original and the pruned model")
        speed = arch_speed_record(
            {"original": self._base_arch, "pruned": self._arch},
            seq_len=int(settings.get("seq_len", 512)),
            batch_size=int(settings.get("batch_size", 1)),
            new_tokens=int(settings.get("new_tokens", 64)),
            device=self._device,
            dtype=self._dtype,
        )
        log.info(
            "speed (forward / generation tokens/s): original "
            f"{speed['original']['forward_tokens_per_second']:,.0f} / {speed['original']['generate_tokens_per_second']:,.1f}, "
            f"pruned {speed['pruned']['forward_tokens_per_second']:,.0f} / {speed['pruned']['generate_tokens_per_second']:,.1f} "
            f"({time.perf_counter() - t0:.0f}s)"
        )
        return speed

    def run_record(self) -> Dict[str, Any]:
        """Everything the run report needs, JSON-able."""
        return {
            "base_model": self._base_arch.meta.get("base_model", ""),
            "command": " ".join(sys.argv),
            **_LAUNCH,
            "config": OmegaConf.to_container(self._cfg, resolve=True),
            "arch_before": self._base_arch.to_dict(),
            "arch_after": self._arch.to_dict(),
            "params_before": self._base_arch.num_params(),
            "params_after": self._arch.num_params(),
            "prunable_params_before": self._base_arch.prunable_params(),
            "prunable_params_after": self._arch.prunable_params(),
            "prune_steps": [r.to_dict() for r in self._pruner.records],
            "stages": self._stage_log,
            "train_log": self._train_log,
            "seconds_run": self._seconds_run(),
            "resumes": self._resumes,
            **self._perplexity_record(),
        }

    def _perplexity_record(self) -> Dict[str, Any]:
        """Original, pruned (last stage's cut, before its training) and recovered perplexity.

        ``perplexity`` is the first held-out text's; ``perplexity_by_text`` has every text's, and
        ``heldout_log`` every evaluation in run order (step, tokens, stage, event).
        """
        if not self._heldout or not self._stage_log:
            return {}
        last = self._stage_log[-1]
        by_text: Dict[str, Dict[str, float]] = {}
        original = next((e["ppl"] for e in self._heldout_log if e["event"] == "original"), {})
        for name in self._heldout:
            row = {"original": original.get(name), "pruned": (last.get("heldout_after_prune") or {}).get(name)}
            if last.get("heldout_after_train"):
                row["recovered"] = last["heldout_after_train"][name]
            by_text[name] = row
        ppl = {"original": self._heldout_original, "pruned": last.get("heldout_ppl_after_prune")}
        if last.get("heldout_ppl_after_train") is not None:
            ppl["recovered"] = last["heldout_ppl_after_train"]
        heldout = OmegaConf.to_container(self._cfg.heldout, resolve=True)
        settings = {k: v for k, v in heldout.items() if k not in ("text", "texts")}
        settings["texts"] = list(self._heldout)
        return {"perplexity": ppl, "perplexity_by_text": by_text, "heldout": settings, "heldout_log": self._heldout_log}


def _with_fault_point(loss_fn):
    """The calibration loss with the ``calibration`` fault point inside the pass (tests only)."""

    def wrapped(model, batch):
        faults.point("calibration")
        return loss_fn(model, batch)

    return wrapped


@contextlib.contextmanager
def _quiet_stock_setup() -> Iterator[None]:
    """Hold back the stock ``_setup_model``'s info lines while a resize rebuilds the model.

    Said at every prune step, "Instantiating model and loading checkpoint on Rank 0" reads as
    if the run went back to the base checkpoint; the progress line and the prune-step log
    already say what happens. Warnings still pass.
    """
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def _eager_if(enabled: bool):
    """Run compiled modules eagerly (no new graphs) inside the block when ``enabled``."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if enabled and set_stance is not None:
        return set_stance("force_eager")
    return contextlib.nullcontext()


def _configure_compile_widths(compiled: bool, widths: str) -> None:
    """How dynamo meets per-layer widths (torchtune compiles layer by layer, one code object).

    ``dynamic``: dynamo treats parameters' shapes like inputs' (``force_parameter_static_shapes``
    and ``force_nn_module_property_static_shapes`` off), and the MLP width dimensions (rows of
    w1/w3, columns of w2) are symbolic from the first trace (``torch.compiler.config
    .dynamic_sources``): one graph serves every layer and every later resize. Without that
    mark, dynamo would first compile a static graph for the first width it meets and recompile
    at the second: two layer graphs for the price of the run's first training step. A changed
    head count still recompiles (heads are Python ints of the attention module). The matmuls are
    the same library calls; only fused pointwise kernels see a symbolic size. ``static``
    (torchtune's behaviour): one graph per distinct layer shape (see ``_fit_compile_caches``).
    """
    if not compiled:
        return
    import torch._dynamo

    cfg = torch._dynamo.config
    # Parameters of builtin modules (nn.Linear) are "nn module properties" to dynamo: both flags.
    for name in ("force_parameter_static_shapes", "force_nn_module_property_static_shapes"):
        if hasattr(cfg, name):
            setattr(cfg, name, widths == "static")
    _mark_mlp_widths_dynamic(widths == "dynamic")


# Source names of torchtune's FeedForward weights inside a compiled layer, with the dimension
# that pruning changes (``:N`` selects one dimension; the hidden size stays static).
_MLP_WIDTH_SOURCES = tuple(
    rf".*\['{proj}'\]\._parameters\['weight'\]:{dim}" for proj, dim in (("w1", 0), ("w3", 0), ("w2", 1))
)


def _mark_mlp_widths_dynamic(on: bool) -> None:
    """Add (or take back) the MLP width dimensions in dynamo's ``dynamic_sources``; entries of
    the user's own are kept. Taking them back matters in a process that compiles both ways
    (benchmarks): the list overrides ``force_parameter_static_shapes``.

    Needs a torch whose ``dynamic_sources`` understands the per-dimension ``:N`` suffix;
    without it the mark would make every dimension of those weights symbolic (the hidden size
    too), so older torch keeps dynamo's automatic dynamism (one extra graph at the first resize).
    """
    from torch._dynamo.variables import builder

    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "dynamic_sources") or not hasattr(builder, "_parse_source_entry"):
        return
    entries = [e for e in config.dynamic_sources.split(",") if e.strip() and e not in _MLP_WIDTH_SOURCES]
    config.dynamic_sources = ",".join(entries + (list(_MLP_WIDTH_SOURCES) if on else []))


def _fit_compile_caches(compiled: bool, arch: DecoderArch, teacher: bool = False) -> None:
    """Let dynamo keep one graph per distinct layer shape.

    All layers share one code object, whose cache holds ``recompile_limit`` (default 8) graphs;
    past the limit dynamo silently runs the remaining layers eagerly. Room for every shape
    (twice: a varying sequence length adds a dynamic variant) plus torchtune's margin keeps all
    layers compiled. A distillation teacher (the unpruned shape) is one more shape. Sized with
    ``compile_widths: dynamic`` too: a dynamic graph may still meet a shape its guards exclude.
    """
    if not compiled:
        return
    import torch._dynamo

    cfg = torch._dynamo.config
    shapes = len({(layer.num_heads, layer.num_kv_heads, layer.intermediate_dim) for layer in arch.layers})
    shapes += int(teacher)
    need = 2 * shapes + 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < need:
            setattr(cfg, name, need)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 4 * need:
            setattr(cfg, name, 4 * need)


def _arch_component(arch: DecoderArch) -> Dict[str, Any]:
    return {"_component_": "adapt_prune_tune.models.decoder_from_arch", "arch": arch.to_dict()}


def _broadcast_keeps(keeps: List[Optional[LayerKeep]], device: torch.device) -> List[Optional[LayerKeep]]:
    """Rank 0's cut for everyone: identical architectures on all ranks by construction.

    Two tensor broadcasts (each layer's kept counts, with -1 for an uncut layer, then every
    kept index in one buffer) rather than pickled objects: at Llama-3.1-8B widths pickling the
    indices cost ~57 ms a prune iteration on the host.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keeps
    counts = torch.tensor(
        [[-1, -1, -1] if k is None else [k.q.numel(), k.kv.numel(), k.mlp.numel()] for k in keeps],
        dtype=torch.int64, device=device,
    )
    dist.broadcast(counts, src=0)
    counts_list = counts.tolist()
    total = sum(sum(row) for row in counts_list if row[0] >= 0)
    if dist.get_rank() == 0:
        parts = [t.to(torch.int64) for k in keeps if k is not None for t in (k.q, k.kv, k.mlp)]
        payload = torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.int64, device=device)
    else:
        payload = torch.empty(total, dtype=torch.int64, device=device)
    if total:
        dist.broadcast(payload, src=0)
    flat = payload.cpu().split([n for row in counts_list if row[0] >= 0 for n in row])
    it = iter(flat)
    return [None if row[0] < 0 else LayerKeep(next(it), next(it), next(it)) for row in counts_list]


# Settings a resume may change: they decide only how much is held in memory at once. The
# calibration windows do not depend on how they are batched, and the Taylor scores of the
# summed gradient only scale with it (one factor for every group): the cut is the same, up to
# rounding, after lowering the batch size that ran out of memory.
MEMORY_SETTINGS = ("pruning.calibration.batch_size",)


def _check_same_run(
    resumed: Dict[str, Any], settings: Dict[str, Any], config_arch: DecoderArch, choices: Dict[str, Any]
) -> None:
    """The checkpoint's run is this config's: same base model, method, schedule, global batch and data order.

    Checked before the weights load. Any other value would silently make another run out of
    the two halves (another cut, schedule or data order), so it is refused with what differs.
    """
    saved = resumed["recipe"]
    base = DecoderArch.from_dict(saved["base_arch"])
    problems = [
        f"model: {key} is {theirs!r} in the checkpoint's base model, {mine!r} in this config's"
        for key, (theirs, mine) in arch_differences(base, config_arch).items()
    ]
    if not problems and saved["fingerprint"] != ckpt.run_fingerprint(base, settings):
        batch = "batch_size × gradient_accumulation_steps × ranks: on another number of ranks keep the product"
        recorded = saved.get("settings")  # None: a checkpoint from before the settings were recorded
        if recorded is None:
            problems = ["the pruning, adapt or distill settings or the global batch differ from the run's (this "
                        f"checkpoint does not record which; global batch = {batch})"]
        else:
            differences = ckpt.settings_differences(recorded, settings)
            problems = [d + (f" ({batch})" if d.startswith("samples_per_step") else "")
                        for d in differences if d.split(":", 1)[0] not in MEMORY_SETTINGS]
    why = {"seed": "it orders the training data", "shuffle": "it orders the training data",
           "heldout": "every held-out evaluation of a run measures the same texts"}
    for key, now in choices.items():
        if key in saved:  # recorded since these checks exist; older checkpoints lack them
            problems += [f"{d} ({why[key]})" for d in ckpt.settings_differences({key: saved[key]}, {key: now})]
    if problems:
        where = Path(resumed["path"]).parent
        raise ConfigError([
            f"resume_from_checkpoint: the checkpoint in {where} belongs to another run; {p}" for p in problems
        ] + [f"restore the run's settings, or start this config in a new output_dir (the run in {where} is kept)"])


def _check_same_arch_everywhere(arch: DecoderArch, device: torch.device) -> None:
    """Fail loudly if ranks ever disagree on the model's shape (they must cut identically).

    One all-reduce (MAX) of every layer's widths beside their negatives: the ranks agree
    exactly when each width's maximum is minus its negative's maximum (its minimum), and
    every rank reaches the same verdict, so all stop together.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    widths = torch.tensor(
        [w for layer in arch.layers for w in (layer.num_heads, layer.num_kv_heads, layer.intermediate_dim)],
        dtype=torch.int64, device=device,
    )
    extremes = torch.cat([widths, -widths])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if not torch.equal(extremes[: widths.numel()], -extremes[widths.numel() :]):
        raise RuntimeError("Ranks hold different architectures after a resize; refusing to continue")
    utils.log_rank_zero(
        log, f"architecture identical on all {dist.get_world_size()} ranks ({arch.num_params():,} params)"
    )


@config.parse
def recipe_main(cfg: DictConfig) -> Optional[int]:
    """Entry point (``tune run adapt_prune_recipe --config NAME_OR_PATH [key=value ...]``)."""
    cfg = expand_home(cfg)
    config.log_config(recipe_name="AdaptPruneRecipe", cfg=cfg)
    recipe = AdaptPruneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    # Stopped by a signal: the shell's code for it (143 for SIGTERM), so no scheduler or script
    # takes the unfinished run for a finished one.
    return 128 + recipe.stopped_by if recipe.stopped_by else None


def _unshared_output_dir(output_dir: Path, unseen: List[int], world_size: int) -> str:
    """Why a run whose ranks do not share ``output_dir`` stops before its first checkpoint."""
    ranks = ", ".join(map(str, unseen[:8])) + (f" and {len(unseen) - 8} more" if len(unseen) > 8 else "")
    return (f"output_dir {output_dir} is not one directory for all {world_size} ranks: global rank 0 does not see "
            f"the files of rank{'s' if len(unseen) > 1 else ''} {ranks} (a node-local path such as /tmp or a local "
            "disk on a multi-node run?). Every rank writes its checkpoint shards there and rank 0 completes the "
            "checkpoint: put output_dir on a filesystem every node mounts (NFS, Lustre, a shared volume)")


def _once_fixed(error: BaseException) -> str:
    """How a write-failure message leads to its continue command: make room for a full disk,
    otherwise mend what the error names (a removed directory, a lost mount, permissions)."""
    return "Make room there, then" if is_out_of_space(error) else "Once that is mended,"


def _launch_command() -> str:
    """The command that started this run, as the run lock names it to a run it refuses."""
    return (reproduce_command(_LAUNCH) if "config_name" in _LAUNCH else None) or " ".join(sys.argv)


def _plan_command(world_size: int) -> str:
    """The ``plan`` command for this run's config and overrides on ``world_size`` ranks."""
    if "config_name" not in _LAUNCH:
        return f"adapt-prune-tune plan CONFIG --world-size {world_size}"
    overrides = _typed_overrides_without({"resume_from_checkpoint"})
    words = ["adapt-prune-tune", "plan", _LAUNCH["config_name"], *overrides, "--world-size", str(world_size)]
    return " ".join(shlex.quote(word) for word in words)


def _continue_command(changes: Optional[Dict[str, Any]] = None, resume: bool = True) -> str:
    """The command that continues this run: the one that launched it, resuming (or, with
    ``resume=False``, starting again), with ``changes`` (``key: value``) in place of what was
    typed for those keys."""
    changes = {**(changes or {}), **({"resume_from_checkpoint": True} if resume else {})}
    typed = [f"{k}={v}" for k, v in changes.items()]
    if "config_name" not in _LAUNCH:  # recipe_main called without main()
        return f"the same command with {' '.join(typed)}"
    overrides = _typed_overrides_without({*changes, "overwrite_output_dir"})  # the latter contradicts a resume
    command = reproduce_command({**_LAUNCH, "overrides": overrides + typed})
    nnodes = int(_LAUNCH.get("launch", {}).get("nnodes", 1))
    if nnodes > 1:  # every node relaunches with its own launcher flags (--node_rank, its local address)
        command += (f" (that is {socket.gethostname()}'s launch line: on each of the {nnodes} nodes run its own "
                    f"with {' '.join(typed)})")
    return command


def _typed_overrides_without(keys: Set[str]) -> List[str]:
    """The ``key=value`` overrides typed at launch, less those setting (or removing) ``keys``."""
    return [o for o in _LAUNCH["overrides"] if o.split("=", 1)[0].lstrip("~+") not in keys]


def _single_process_env() -> None:
    """Let a plain ``tune run`` (no torchrun) form a world of one.

    The stock recipe always initializes a process group; without torchrun's
    variables that fails, so a one-process rendezvous on a free local port is
    set up instead.
    """
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )


def _launcher_prefix() -> Optional[List[str]]:
    """The launcher's own command up to the recipe (``tune run --nnodes 4 --rdzv_endpoint ...
    adapt_prune_recipe``), read from the parent process, which torchrun is to its workers."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not started by torchrun: no launcher flags
        return None
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # no /proc (macOS): the record keeps the world's shape only
        return None
    return launcher_prefix(argv)


# What the user typed (the config name before resolution, the overrides, the launch shape),
# for the report's and the model card's "Reproduce" line.
_LAUNCH: Dict[str, Any] = {}


def main() -> None:
    """Resolve packaged config names (``llama3_1/8B_adapt``) to files, then run."""
    _single_process_env()
    if "--config" in sys.argv:
        i = sys.argv.index("--config") + 1
        if i < len(sys.argv):
            world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            launch: Dict[str, Any] = {"nnodes": max(1, world // max(1, local)), "nproc_per_node": local}
            if prefix := _launcher_prefix():
                launch["prefix"] = prefix
            _LAUNCH.update(config_name=sys.argv[i], overrides=list(sys.argv[i + 1 :]), launch=launch)
            sys.argv[i] = str(packaged_configs.resolve(sys.argv[i]))
            try:  # torchtune's own merge would fail later with a bare TypeError naming no override
                merge_overrides(Path(sys.argv[i]), sys.argv[i + 1 :])
            except ConfigError as e:
                sys.exit(str(e))
    try:
        sys.exit(recipe_main())
    # The problems and their fixes, not a traceback (every rank: none is cut off).
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's code for SIGINT; the run said what survives (``_interrupted``)
    except (ConfigError, ckpt.CheckpointError, OutOfMemory) as e:
        # Config problems are found alike on every rank: the summary shows them once, from rank 0.
        if not isinstance(e, ConfigError) or os.environ.get("RANK", "0") == "0":
            _tell_the_launcher(str(e))
        sys.exit(str(e))


def _tell_the_launcher(message: str) -> None:
    """Give torchrun this worker's message for its failure summary.

    A multi-process run ends with torchrun's summary of the failed workers, whose root cause reads
    "To enable traceback see ..." unless the worker left a message in its error file; ours (a
    config problem, a full disk, out of memory, a stop with its continue command) would scroll away
    above it. A plain ``tune run`` (no torchrun) has no error file and prints the message last anyway.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


if __name__ == "__main__":
    main()
