"""Peak RSS of a prune step vs a training step, in our recipe. Target: a prune step no higher.

Each configuration runs in a fresh process, training first or pruning first. Each phase's
own peak is read from Linux's ``VmHWM`` with the counter reset before the phase (and, in a
prune step, between its calibration pass and its resize); the process's running maxima
(getrusage), which loading the checkpoint can dominate, are kept beside them. Two variants:
the SmolLM2 demo config, and small activations (short windows + activation checkpointing:
the regime of big models, where a resize holding two copies of the AdamW moments would set
the peak). Run as a script, this file is the measured process:

    python benchmarks/perf_memory.py CONFIG.yaml train_first|prune_first OUT.json
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

from _harness import maxrss_mb, proc_status_mb, reset_peak_rss, run_cmd, script_cmd
from _recipe import make_recipe, prune_step, recipe_config, train_batches, train_step, write_config
from _shapes import model_dir_for

SMALL_ACTIVATIONS = {
    "pruning.calibration.seq_len": 32, "pruning.calibration.num_samples": 4,
    "tokenizer.max_seq_len": 32, "batch_size": 1, "enable_activation_checkpointing": True,
}


def measure_phases(cfg_path: Path, order: str, train_steps: int = 3) -> Dict[str, Any]:
    """Peak RSS of training steps and of a prune step, in the given order (this process)."""
    apr, recipe = make_recipe(cfg_path)
    batches = train_batches(recipe, train_steps)
    out: Dict[str, Any] = {"after_setup_mb": maxrss_mb()}
    target = recipe._pruner.final_target

    def train():
        for b in batches:
            train_step(recipe, b)

    def prune():
        step = prune_step(apr, recipe, target)
        out["prune_maxrss_after_measure_mb"] = step["maxrss_after_measure_mb"]
        out["prune_maxrss_after_resize_mb"] = step["maxrss_after_resize_mb"]
        out["prune_measure_peak_mb"], out["prune_resize_peak_mb"] = step["peak_measure_mb"], step["peak_resize_mb"]

    phases = [("train", train), ("prune", prune)] if order == "train_first" else [("prune", prune), ("train", train)]
    if order == "prune_first":
        train_step(recipe, batches[0])  # AdamW state exists in both orders (a resize carries it)
        out["after_first_train_step_mb"] = maxrss_mb()
    for name, fn in phases:
        gc.collect()
        if reset_peak_rss():
            out[f"{name}_start_rss_mb"] = proc_status_mb("VmRSS")
            fn()
            out[f"{name}_peak_mb"] = proc_status_mb("VmHWM")
            if name == "prune":  # the step resets the counter between its calibration and its resize
                out["prune_peak_mb"] = max(out["prune_measure_peak_mb"], out["prune_resize_peak_mb"])
        else:
            fn()
        out[f"after_{name}_mb"] = maxrss_mb()
    train_tokens = int(batches[0]["tokens"].numel())
    calib_tokens = int(recipe._calib_batches[0]["tokens"][:, 1:].numel())
    out.update(order=order, train_tokens_per_batch=train_tokens, calib_tokens_per_batch=calib_tokens,
               params=recipe._arch.num_params())
    return out


def section_memory(shape: str, work: Path, calib_batch_sizes: Sequence[int], orders: Sequence[str],
                   log=print, variant: str = "default") -> Dict[str, Any]:
    model_dir = model_dir_for(shape, work)
    results = []
    extra = SMALL_ACTIVATIONS if variant == "small_activations" else {}
    for cbs in calib_batch_sizes:
        for order in orders:
            cfg = recipe_config(model_dir, work / f"mem_{shape}", shape,
                                **{**extra, "pruning.calibration.batch_size": cbs})
            path = write_config(cfg, work / f"mem_{shape}_{variant}_{cbs}.yaml")
            out_json = work / f"mem_{shape}_{variant}_{cbs}_{order}.json"
            # A fixed mmap threshold makes glibc return every large tensor to the OS when it is
            # freed, so maxrss follows the live-tensor peak instead of heap fragmentation.
            run_cmd(script_cmd(Path(__file__), str(path), order, str(out_json)), cwd=work,
                    env={"MALLOC_MMAP_THRESHOLD_": "131072"})
            r = json.loads(out_json.read_text())
            r["calib_batch_size"] = cbs
            r["variant"] = variant
            if "prune_peak_mb" in r:  # each phase's own peak: the comparison the target is about
                r["prune_extra_mb"] = r["prune_peak_mb"] - r["train_peak_mb"]
            elif order == "train_first":
                r["prune_extra_mb"] = r["after_prune_mb"] - r["after_train_mb"]
            else:
                r["train_extra_mb"] = r["after_train_mb"] - r["after_prune_mb"]
            results.append(r)
            log(f"  memory [{shape}, {variant}, calib batch {cbs} ({r['calib_tokens_per_batch']} tok) vs train batch "
                f"{r['train_tokens_per_batch']} tok, {order}]: " + ", ".join(
                    f"{k} {v:.0f}" for k, v in r.items() if k.endswith("_mb")))
    return {"shape": shape, "variant": variant, "runs": results}


def run(quick: bool, work: Path, log) -> Dict[str, Any]:
    """The demo config, calibration batches of 8 (and 4), both orders (train first with ``quick``)."""
    return section_memory("smollm2", work, [8] if quick else [8, 4],
                          ["train_first"] if quick else ["train_first", "prune_first"], log)


def run_small_activations(quick: bool, work: Path, log) -> Dict[str, Any]:
    """Short windows + activation checkpointing: the resize's own share of the peak."""
    return section_memory("smollm2", work, [1], ["train_first"], log, variant="small_activations")


if __name__ == "__main__":
    cfg_path, order, out_json = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    out_json.write_text(json.dumps(measure_phases(cfg_path, order), default=float))
