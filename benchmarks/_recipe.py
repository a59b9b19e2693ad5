"""The recipe under measurement: its configs, and its steps driven one at a time in process.

``recipe_config`` is the packaged ``smollm2/135M_adapt`` pointed at a model directory;
``stock_config`` turns it into torchtune's ``full_finetune_distributed`` config for a
model with given per-layer widths. ``make_recipe`` sets our recipe up in this process,
so a benchmark can time one training step (the stock inner step) or one prune step
(``_prune_stage``'s body: measure_and_plan, broadcast, ``_resize``, commit) by part.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List

from _harness import proc_status_mb, reset_peak_rss, maxrss_mb, sync, timed_calls
from _shapes import DATA_DIR


def recipe_config(model_dir: Path, output_dir: Path, shape: str, **overrides):
    """The packaged SmolLM2 config pointed at a model directory, with overrides (dotted keys)."""
    from omegaconf import OmegaConf

    from adapt_prune_tune import configs

    cfg = OmegaConf.load(configs.resolve("smollm2/135M_adapt"))
    if shape != "smollm2":
        cfg.model = {"_component_": "adapt_prune_tune.models.decoder_from_hf_config", "path": str(model_dir)}
    cfg.model_dir = str(model_dir)
    cfg.data_dir = str(DATA_DIR)
    cfg.output_dir = str(output_dir)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def stock_config(our_cfg, arch_dict: Dict[str, Any], ckpt_dir: Path, output_dir: Path, steps: int):
    """torchtune's full_finetune_distributed config for a model with the pruned widths."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(our_cfg, resolve=True))
    for key in ("pruning", "adapt"):
        cfg.pop(key, None)
    cfg.model = {"_component_": "adapt_prune_tune.models.decoder_from_arch", "arch": arch_dict}
    cfg.checkpointer = {
        "_component_": "torchtune.training.FullModelTorchTuneCheckpointer",
        "checkpoint_dir": str(ckpt_dir),
        "checkpoint_files": ["model.pt"],
        "recipe_checkpoint": None,
        "output_dir": str(output_dir / "ckpt"),
        "model_type": "LLAMA3_2",
    }
    cfg.output_dir = str(output_dir)
    cfg.metric_logger.log_dir = str(output_dir / "logs")
    cfg.epochs = 1
    cfg.max_steps_per_epoch = steps
    return cfg


def write_config(cfg, path: Path) -> Path:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg))
    return path


# --------------------------------------------------------------------------- in process


def make_recipe(cfg_path: Path):
    """(recipe module, our recipe set up from a config file) in this process.

    A world of one unless started under torchrun.
    """
    from omegaconf import OmegaConf

    import adapt_prune_recipe as apr

    apr._single_process_env()
    cfg = OmegaConf.load(cfg_path)
    recipe = apr.AdaptPruneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    return apr, recipe


def train_batches(recipe, count: int) -> List[Dict[str, Any]]:
    recipe._dataloader.sampler.set_epoch(0)
    out = []
    for batch in recipe._dataloader:
        out.append(batch)
        if len(out) == count:
            break
    return out


def train_step(recipe, batch) -> float:
    """The stock recipe's inner step (fwd, chunked CE, bwd, clip, AdamW), seconds."""
    import torch
    from torchtune import training, utils

    batch = {k: v.clone() for k, v in batch.items()}
    t0 = time.perf_counter()
    utils.batch_to_device(batch, recipe._device)
    n = (batch["labels"] != recipe._loss_fn.ignore_index).sum()
    labels = batch.pop("labels")
    logits = recipe._model(**batch)
    labels = torch.hstack((labels[..., 1:], recipe.ignore_labels_cache[: labels.shape[0]]))
    if not isinstance(logits, list):
        labels, logits = labels.reshape(-1), logits.reshape(-1, logits.size(-1))
    loss = recipe._loss_fn(logits, labels) * n
    del logits
    loss.backward()
    training.scale_grads(recipe._model, 1 / n)
    if recipe._clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(recipe._model.parameters(), max_norm=float(recipe._clip_grad_norm))
    recipe._optimizer.step()
    recipe._optimizer.zero_grad(set_to_none=True)
    sync(recipe._device)
    return time.perf_counter() - t0


def prune_step(apr, recipe, target: float) -> Dict[str, float]:
    """One of ``_prune_stage``'s iterations (measure_and_plan, broadcast, _resize, commit), timed by part.

    Also the peak RSS of its two phases: the counter is reset after the calibration
    pass, so ``peak_measure_mb`` runs from the caller's reset (if any) to there and
    ``peak_resize_mb`` covers the rebuild alone.
    """
    with timed_calls((recipe, "_setup_model"), (apr, "rebind_optimizer_")) as seconds:
        sync(recipe._device)
        t0 = time.perf_counter()
        plan, calib = recipe._pruner.measure_and_plan(recipe._model, recipe._arch, recipe._calib_batches, target)
        t1 = time.perf_counter()
        rss_measure = maxrss_mb()
        peaks = {"peak_measure_mb": proc_status_mb("VmHWM")}
        reset_peak_rss()
        keeps = apr._broadcast_keeps(plan.keeps, recipe._device)
        recipe._resize(keeps, plan.arch)
        sync(recipe._device)
        t2 = time.perf_counter()
        peaks["peak_resize_mb"] = proc_status_mb("VmHWM")
        recipe._pruner.commit(plan, calib, target, 1, t2 - t0)
    return {"measure_and_plan": t1 - t0, "resize": t2 - t1, "rebuild_model": seconds["_setup_model"],
            "rebind_optimizer": seconds["rebind_optimizer_"], "total": t2 - t0,
            "maxrss_after_measure_mb": rss_measure, "maxrss_after_resize_mb": maxrss_mb(), **peaks}
