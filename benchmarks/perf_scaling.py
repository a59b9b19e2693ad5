"""Seconds per adaptive iteration vs model size, and vs calibration tokens (with a linear fit:
seconds per 1k calibration tokens, plus the fixed part: scores, plan and surgery)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, Sequence

from _harness import median
from perf_overhead import measure_overhead


def measure_scaling(
    shapes: Sequence[str], token_counts: Sequence[int], device: str = "cpu", iterations: int = 2,
    seq_len: int = 128, batch_size: int = 8, token_shape: str = "smollm2", log=lambda s: None,
) -> Dict[str, Any]:
    by_size = []
    for shape in shapes:
        r = measure_overhead(shape, iterations=iterations, device=device, seq_len=seq_len,
                             batch_size=batch_size, log=log)
        by_size.append({k: r[k] for k in ("shape", "params_before", "calib_tokens", "fb_seconds",
                                          "iteration_seconds", "ratio", "parts_seconds")})
    by_tokens = []
    for n in token_counts:
        samples = max(batch_size, n // seq_len)
        r = measure_overhead(token_shape, iterations=iterations, device=device, num_samples=samples,
                             seq_len=seq_len, batch_size=batch_size, log=log)
        by_tokens.append({k: r[k] for k in ("calib_tokens", "fb_seconds", "iteration_seconds", "ratio",
                                            "parts_seconds")})
    fit = None
    if len(by_tokens) >= 2:
        xs = [r["calib_tokens"] for r in by_tokens]
        ys = [r["iteration_seconds"] for r in by_tokens]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        fixed = my - slope * mx
        fixed_parts = median(r["parts_seconds"]["score"] + r["parts_seconds"]["plan"] + r["parts_seconds"]["surgery"]
                             for r in by_tokens)
        fit = {"seconds_per_1k_tokens": slope * 1000, "fixed_seconds": fixed,
               "score_plan_surgery_seconds": fixed_parts, "shape": token_shape}
    return {"by_model_size": by_size, "by_calib_tokens": by_tokens, "calib_tokens_fit": fit}


def run(quick: bool, work: Path, log) -> Dict[str, Any]:
    result = measure_scaling(["tiny", "smollm2"], [512, 2048] if quick else [512, 1024, 2048, 4096],
                             iterations=2, log=log)
    log(f"  fit: {result['calib_tokens_fit']}")
    return result
