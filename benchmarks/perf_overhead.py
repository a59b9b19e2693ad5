"""Prune-step overhead: one adaptive iteration ÷ one plain forward+backward over the same tokens.

An iteration is what ``adapt_prune_tune.pruner.prune`` runs per step:
``AdaptivePruner.measure_and_plan`` (one calibration pass giving layer similarity and
Taylor gradients, importance normalization, group scores, the plan) then
``prune_decoder_`` and ``commit``. It runs unchanged; its ``calibrate`` and
``plan_step`` calls are timed in place, so the parts add up to what the recipe pays.
The plain pass runs right before each iteration on the current (shrinking) model, so
every ratio compares like with like. Target ≤ 1.1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from _harness import median, strip_private, sync, timed_calls
from _shapes import build_shape, calibration_batches


def plain_forward_backward(model, batches, device) -> float:
    """One plain forward+backward over the calibration tokens (no hooks), seconds."""
    from adapt_prune_tune.pruner import next_token_loss

    model.zero_grad(set_to_none=True)
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        loss, _ = next_token_loss(model, b)
        loss.backward()
    sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def prune_iteration(pruner, model, arch, batches, target: float, device) -> Tuple[Any, Dict[str, float]]:
    """One adaptive iteration, timed by part: calibrate, score (the rest of measure_and_plan:
    importance normalization, group scores), plan, surgery. Returns the new arch and the parts."""
    from adapt_prune_tune import pruner as pruner_module
    from adapt_prune_tune.surgery import prune_decoder_

    sync(device)
    t0 = time.perf_counter()
    with timed_calls((pruner_module, "calibrate"), (pruner_module, "plan_step"), after=lambda: sync(device)) as inner:
        plan, calib = pruner.measure_and_plan(model, arch, batches, target)
    sync(device)
    t1 = time.perf_counter()
    new_arch = prune_decoder_(model, arch, plan.keeps)
    sync(device)
    t2 = time.perf_counter()
    pruner.commit(plan, calib, target, stage=1, seconds=t2 - t0)
    parts = {
        "calibrate": inner["calibrate"],
        "score": (t1 - t0) - inner["calibrate"] - inner["plan_step"],
        "plan": inner["plan_step"],
        "surgery": t2 - t1,
    }
    parts["total"] = t2 - t0
    return new_arch, parts


def measure_overhead(
    shape: str = "tiny",
    iterations: int = 3,
    target_sparsity: float = 0.2,
    total_steps: Optional[int] = None,
    num_samples: int = 16,
    seq_len: int = 128,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "fp32",
    model_and_arch=None,
    batches=None,
    fb_every: int = 1,
    round_to: int = 1,
    log: Callable[[str], None] = lambda s: None,
) -> Dict[str, Any]:
    """Pairs (plain fwd+bwd, one adaptive iteration) on the same model and tokens.

    ``total_steps`` sets the schedule (default: ``iterations``; the GPU check prunes 20%
    in 50). ``fb_every`` > 1 times the plain pass before every ``fb_every``-th iteration
    only (long runs on big shapes); the ratio is the median over those pairs.
    """
    from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig

    model, arch = model_and_arch or build_shape(shape, device, dtype)
    batches = batches or calibration_batches(arch.vocab_size, num_samples, seq_len, batch_size, device)
    steps = total_steps or iterations
    pruner = AdaptivePruner(PruningConfig(target_sparsity=target_sparsity, steps=steps, round_to=round_to), arch)
    params_before = arch.num_params()
    plain_forward_backward(model, batches, device)  # warm-up (allocator, lazy inits)
    rows = []
    for k in range(iterations):
        paired = k % fb_every == 0
        c0 = time.process_time()
        fb = plain_forward_backward(model, batches, device) if paired else float("nan")
        c1 = time.process_time()
        target = pruner.final_target * (k + 1) / steps
        arch, parts = prune_iteration(pruner, model, arch, batches, target, device)
        c2 = time.process_time()
        # CPU seconds of this process (all its threads): less sensitive to other load on a
        # shared machine than wall time; meaningless for GPU work (wall time is the figure there).
        rows.append({"fb": fb, **parts, "ratio": parts["total"] / fb,
                     "fb_cpu": c1 - c0, "iteration_cpu": c2 - c1,
                     "ratio_cpu": (c2 - c1) / max(c1 - c0, 1e-9) if paired else float("nan")})
        log(f"  [{shape}] iteration {k + 1}/{iterations}: fwd+bwd {fb:.3f}s, iteration {parts['total']:.3f}s "
            f"(calib {parts['calibrate']:.3f} score {parts['score']:.3f} plan {parts['plan']:.3f} "
            f"surgery {parts['surgery']:.3f}), ratio {parts['total'] / fb:.3f} (cpu time {rows[-1]['ratio_cpu']:.3f})")
    tokens = sum(int(b["tokens"][:, 1:].numel()) for b in batches)
    return {
        "shape": shape,
        "device": device,
        "dtype": dtype,
        "params_before": params_before,
        "params_after": arch.num_params(),
        "calib_tokens": tokens,
        "iterations": iterations,
        "fb_seconds": median(r["fb"] for r in rows),
        "iteration_seconds": median(r["total"] for r in rows),
        "ratio": median(r["ratio"] for r in rows),
        "ratio_cpu_time": median(r["ratio_cpu"] for r in rows),
        "parts_seconds": {p: median(r[p] for r in rows) for p in ("calibrate", "score", "plan", "surgery")},
        "rows": rows,
        "_model": model,
        "_arch": arch,
    }


def run(quick: bool, work: Path, log) -> Dict[str, Any]:
    """The tiny shape and SmolLM2-135M, single process."""
    return {
        shape: strip_private(measure_overhead(shape, iterations=its, log=log))
        for shape, its in (("tiny", 3 if quick else 6), ("smollm2", 2 if quick else 4))
    }
