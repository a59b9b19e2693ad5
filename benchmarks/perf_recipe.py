"""Prune-step overhead through the recipe: what ``_prune_stage`` pays per iteration ÷ a plain
forward+backward over the same calibration tokens, in our recipe set up from the packaged config.

A recipe prune step is measure_and_plan + a rebuild via the stock ``_setup_model`` (FSDP2
re-shard when world size > 1) + AdamW moments sliced and re-bound. One training step runs
first, so the moments exist as after any stage. Each configuration runs in a fresh process
(under torchrun for 2 processes over gloo); run as a script, this file is that process:

    python benchmarks/perf_recipe.py CONFIG.yaml ITERATIONS OUT.json

With ``baseline`` (``perf.py --baseline DIR``: a saved copy of the code, a directory holding
``adapt_prune_tune/`` and ``adapt_prune_recipe.py``), the 2-process run alternates between that
copy and the working tree, rounds of one each, and reports both (``tiny_2proc_before``): a
before/after measured side by side on the same machine load.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from _harness import median, run_cmd, script_cmd, sync
from _recipe import make_recipe, prune_step, recipe_config, train_batches, train_step, write_config
from _shapes import model_dir_for


def recipe_forward_backward(recipe) -> float:
    """A plain forward+backward over the recipe's calibration batches, seconds."""
    from adapt_prune_tune.pruner import next_token_loss

    model = recipe._model
    model.zero_grad(set_to_none=True)
    sync(recipe._device)
    t0 = time.perf_counter()
    for b in recipe._calib_batches:
        next_token_loss(model, b)[0].backward()  # batches live on the device
    sync(recipe._device)
    s = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return s


def measure_in_recipe(cfg_path: Path, iterations: int) -> Dict[str, Any]:
    """Pairs (plain fwd+bwd, one recipe prune step incl. rebuild/re-shard) in our recipe."""
    import torch.distributed as dist

    apr, recipe = make_recipe(cfg_path)
    batches = train_batches(recipe, 1)
    train_step(recipe, batches[0])  # AdamW moments exist, as after any training stage
    recipe_forward_backward(recipe)  # warm-up
    rows = []
    final = recipe._pruner.final_target
    for k in range(iterations):
        c0 = time.process_time()
        fb = recipe_forward_backward(recipe)
        c1 = time.process_time()
        parts = prune_step(apr, recipe, final * (k + 1) / iterations)
        c2 = time.process_time()
        rows.append({"fb": fb, **parts, "ratio": parts["total"] / fb,
                     "ratio_cpu": (c2 - c1) / max(c1 - c0, 1e-9)})
    out = {
        "world_size": recipe.world_size,
        "fsdp": recipe.world_size > 1,
        "params_after": recipe._arch.num_params(),
        "calib_tokens_per_rank": sum(int(b["tokens"][:, 1:].numel()) for b in recipe._calib_batches),
        **summarize(rows),
    }
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return out


def summarize(rows: List[Dict[str, float]]) -> Dict[str, Any]:
    """Medians over iterations (the ratio is the median of per-iteration ratios; the ratio of the
    two medians beside it, which a single slow forward+backward moves less)."""
    return {
        "fb_seconds": median(r["fb"] for r in rows),
        "iteration_seconds": median(r["total"] for r in rows),
        "ratio": median(r["ratio"] for r in rows),
        "ratio_of_medians": median(r["total"] for r in rows) / median(r["fb"] for r in rows),
        "ratio_cpu_time": median(r["ratio_cpu"] for r in rows),
        "parts_seconds": {p: median(r[p] for r in rows)
                          for p in ("measure_and_plan", "resize", "rebuild_model", "rebind_optimizer")},
        "rows": rows,
    }


def section_recipe(shape: str, work: Path, iterations: int, nproc: int = 1, log=print,
                   code: Optional[str] = None) -> Dict[str, Any]:
    """One configuration in a fresh process (or torchrun), on the working tree or on ``code``."""
    model_dir = model_dir_for(shape, work)
    cfg = recipe_config(model_dir, work / f"recipe_{shape}_{nproc}", shape)
    path = write_config(cfg, work / f"recipe_{shape}_{nproc}.yaml")
    out_json = work / f"recipe_{shape}_{nproc}.json"
    cmd = script_cmd(Path(__file__), str(path), str(iterations), str(out_json))
    if nproc > 1:  # FSDP2 over gloo: the re-shard path
        cmd = ["torchrun", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]
    run_cmd(cmd, cwd=work, env={"PERF_RECIPE_DIR": code} if code else None)
    res = json.loads(out_json.read_text())
    res["shape"] = shape
    if code:
        res["code"] = code
    log(f"  recipe path [{shape}, {nproc} proc{', ' + code if code else ''}]: ratio {res['ratio']:.3f} "
        f"(cpu time {res['ratio_cpu_time']:.3f}) (fwd+bwd {res['fb_seconds']:.3f}s, "
        f"step {res['iteration_seconds']:.3f}s: {res['parts_seconds']})")
    return res


def side_by_side(shape: str, work: Path, iterations: int, nproc: int, baseline: str, rounds: int,
                 log=print) -> Dict[str, Dict[str, Any]]:
    """Alternating runs of ``baseline`` and the working tree; each side's iterations pooled."""
    runs: Dict[str, List[Dict[str, Any]]] = {"before": [], "after": []}
    for r in range(rounds):
        for side, code in (("before", baseline), ("after", None)):
            log(f"  round {r + 1}/{rounds}, {side}:")
            runs[side].append(section_recipe(shape, work, iterations, nproc, log, code))
    out = {}
    for side, results in runs.items():
        pooled = {**{k: v for k, v in results[0].items() if k not in ("rows", "parts_seconds")},
                  **summarize([row for res in results for row in res["rows"]]), "runs": len(results)}
        out[side] = pooled
        log(f"  recipe path [{shape}, {nproc} proc] {side}: ratio {pooled['ratio']:.3f} "
            f"(cpu time {pooled['ratio_cpu_time']:.3f}) over {len(pooled['rows'])} iterations")
    return out


def run(quick: bool, work: Path, log, baseline: Optional[str] = None) -> Dict[str, Any]:
    """Tiny and SmolLM2 in one process and in two (not with ``quick``); tiny in two side by side
    with ``baseline``.

    Two processes on the tiny model measure what a resize costs per parameter (FSDP2 set-up,
    loading, re-binding: its layers are 64 wide, so an iteration's compute is small); SmolLM2
    in two processes is the same path at a real model's shapes. The tiny ratio swings by
    ±0.1 from run to run on a shared 2-core machine, so it pools 6 iterations per run.
    """
    runs = [("tiny", 3, 1), ("smollm2", 2 if quick else 3, 1)]
    out = {f"{shape}_{nproc}proc": section_recipe(shape, work, its, nproc, log) for shape, its, nproc in runs}
    if quick:
        return out
    if baseline:
        both = side_by_side("tiny", work, 6, 2, baseline, 2, log)
        out["tiny_2proc"], out["tiny_2proc_before"] = both["after"], both["before"]
    else:
        out["tiny_2proc"] = section_recipe("tiny", work, 6, 2, log)
    out["smollm2_2proc"] = section_recipe("smollm2", work, 3, 2, log)
    return out


if __name__ == "__main__":
    cfg_path, iterations, out_json = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    res = measure_in_recipe(cfg_path, iterations)
    if int(os.environ.get("RANK", "0")) == 0:
        out_json.write_text(json.dumps(res, default=float))
