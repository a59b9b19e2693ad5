"""Where an adaptive iteration's time goes: its parts, cProfile of our functions, torch.profiler of ops.

One warm-up iteration, then one under cProfile and one under torch.profiler (SmolLM2-135M).
"""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path
from typing import Any, Dict

from _shapes import build_shape, calibration_batches
from perf_overhead import prune_iteration


def profile_iteration(shape: str = "tiny", device: str = "cpu", top: int = 12, **kw) -> Dict[str, Any]:
    """cProfile (our functions) and torch.profiler (ops) of one iteration after a warm-up one."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig

    model, arch = build_shape(shape, device)
    batches = calibration_batches(arch.vocab_size, kw.get("num_samples", 16), kw.get("seq_len", 128),
                                  kw.get("batch_size", 8), device)
    pruner = AdaptivePruner(PruningConfig(target_sparsity=0.2, steps=10), arch)
    arch, _ = prune_iteration(pruner, model, arch, batches, 0.02, device)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    arch, parts = prune_iteration(pruner, model, arch, batches, 0.04, device)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        if "adapt_prune_tune" in fname:
            rows.append({"function": f"{Path(fname).name}:{func}", "calls": nc,
                         "cumulative_s": round(ct, 4), "self_s": round(tt, 4)})
    rows.sort(key=lambda r: -r["cumulative_s"])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts) as p:
        prune_iteration(pruner, model, arch, batches, 0.06, device)
    key = "self_cpu_time_total"
    ops = sorted(p.key_averages(), key=lambda e: -getattr(e, key))[:top]
    total_self = sum(getattr(e, key) for e in p.key_averages()) or 1.0
    return {
        "shape": shape,
        "parts_seconds": {k: round(v, 4) for k, v in parts.items()},
        "cprofile_top": rows[:top],
        "torch_ops_top": [
            {"op": e.key, "calls": e.count, "self_cpu_ms": round(getattr(e, key) / 1e3, 2),
             "share": round(getattr(e, key) / total_self, 3)}
            for e in ops
        ],
    }


def run(quick: bool, work: Path, log) -> Dict[str, Any]:
    result = profile_iteration("smollm2")
    for r in result["cprofile_top"][:8]:
        log(f"  {r['function']:<40} {r['cumulative_s']:8.3f}s cum  {r['self_s']:8.3f}s self  x{r['calls']}")
    for r in result["torch_ops_top"][:8]:
        log(f"  {r['op']:<40} {r['self_cpu_ms']:10.1f} ms  {r['share']:.1%}")
    return result
