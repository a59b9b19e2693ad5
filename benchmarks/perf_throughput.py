"""Recovery-training throughput: tokens/s of our recipe on a pruned model ÷ torchtune's stock
``full_finetune_distributed`` on a model with the same per-layer widths, same data, batch and
settings. Target ≥ 0.97.

Alternating runs (ours: one prune step then ``steps`` training steps; stock: the first run's
pruned checkpoint), each in a fresh process; the first two steps of every run are dropped and
the ratio is of the medians over all remaining steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from _harness import median
from _runs import our_run, steady_tokens_per_second, stock_run


def section_throughput(shape: str, work: Path, steps: int, repeats: int, log=print) -> Dict[str, Any]:
    ours_tps, stock_tps, runs = [], [], []
    first = None
    for r in range(repeats):
        ours = our_run(shape, work, f"tp_{shape}_{r}", steps, False)
        first = first or ours
        stock = stock_run(first, work, f"tp_{shape}_{r}", steps, False)
        o = steady_tokens_per_second([x for x in ours["rows"] if "tokens_per_second_per_gpu" in x])
        s = steady_tokens_per_second([x for x in stock["rows"] if "tokens_per_second_per_gpu" in x])
        ours_tps += o["values"][o["warmup_dropped"]:]
        stock_tps += s["values"][s["warmup_dropped"]:]
        runs.append({"ours": o, "stock": s})
        log(f"  throughput [{shape}] run {r + 1}/{repeats}: ours {o['median']:.1f} tok/s, stock {s['median']:.1f} tok/s")
    arch = first["record"]["arch_after"]
    widths = [(l["num_heads"], l["num_kv_heads"], l["intermediate_dim"]) for l in arch["layers"]]
    res = {"shape": shape, "steps": steps, "batch_size": int(first["cfg"].batch_size),
           "max_seq_len": int(first["cfg"].tokenizer.max_seq_len), "layer_widths": widths,
           "ours_tokens_per_s": median(ours_tps), "stock_tokens_per_s": median(stock_tps), "runs": runs}
    res["ratio"] = res["ours_tokens_per_s"] / res["stock_tokens_per_s"]
    log(f"  throughput [{shape}]: ratio {res['ratio']:.3f}")
    return res


def run(quick: bool, work: Path, log) -> Dict[str, Any]:
    return {
        shape: section_throughput(shape, work, steps, reps, log)
        for shape, steps, reps in (("tiny", 12, 2), ("smollm2", 8 if quick else 12, 1 if quick else 2))
    }
