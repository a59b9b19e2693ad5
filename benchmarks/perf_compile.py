"""``compile: True`` across resizes: first-step compile time after each resize vs the uniform
model's, graphs and recompiles, and layers left eager by dynamo's recompile limit.

A 12-layer model (inductor on CPU): ours runs two stages; the stock recipe runs the uniform
model and the pruned widths. A stage's compile time is its first step's time minus its
median steady step (full-length batches).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

from _harness import median
from _runs import our_run, stock_run
from _shapes import model_dir_for


def dynamo_summary(run: Dict[str, Any]) -> Dict[str, Any]:
    c = run.get("counters", {})
    text = run["stderr"]
    return {
        "unique_graphs": c.get("stats", {}).get("unique_graphs"),
        "frames_total": c.get("frames", {}).get("total"),
        "frames_ok": c.get("frames", {}).get("ok"),
        "recompile_limit_hits": text.count("hit config.recompile_limit") + text.count("hit config.cache_size_limit"),
        "recompiles_logged": len(re.findall(r"Recompiling function", text)),
    }


def section_compile(shape: str, work: Path, steps: int, log=print, env_extra=None) -> Dict[str, Any]:
    import torch

    from adapt_prune_tune.models import DecoderArch, load_hf_model

    def env(tag):
        d = work / f"inductor_{tag}"
        shutil.rmtree(d, ignore_errors=True)
        return {"TORCHINDUCTOR_CACHE_DIR": str(d), "TORCH_LOGS": "recompiles", **(env_extra or {})}

    stages = 2
    tag = f"cc_{shape}"
    over = {"adapt.stages": stages, "adapt.steps_per_stage": 2, "adapt.checkpoint_every_n_steps": 10_000}
    ours = our_run(shape, work, tag, 3 * steps, True, env=env(tag), **over)
    model_dir = model_dir_for(shape, work)
    base = DecoderArch.from_dict(ours["record"]["arch_before"])
    tokens = int(ours["cfg"].batch_size) * int(ours["cfg"].tokenizer.max_seq_len)
    stage_rows: Dict[int, List[float]] = {}
    for row in ours["record"]["train_log"]:
        if "tokens_per_second_per_gpu" in row:
            stage_rows.setdefault(int(row["stage"]), []).append(row["tokens_per_second_per_gpu"])
    ours_compile = []
    for stage, tps in sorted(stage_rows.items()):
        secs = [tokens / t for t in tps]  # approximate: full-length batches
        ours_compile.append(secs[0] - median(secs[1:]) if len(secs) > 1 else float("nan"))
    final = DecoderArch.from_dict(ours["record"]["arch_after"])
    distinct = len({(l.num_heads, l.num_kv_heads, l.intermediate_dim) for l in final.layers})
    # Uniform model, stock recipe, compile: the HF base checkpoint through the stock HF checkpointer.
    uni_ckpt = work / f"uniform_ckpt_{shape}"
    uni_ckpt.mkdir(parents=True, exist_ok=True)
    if not (uni_ckpt / "model.pt").is_file():
        m, _ = load_hf_model(model_dir)
        torch.save({k: v for k, v in m.state_dict().items()}, uni_ckpt / "model.pt")
    uniform = stock_run(ours, work, f"cc_uniform_{shape}", steps, True, arch_dict=base.to_dict(),
                        ckpt_dir=uni_ckpt, env=env("uniform"))
    pruned = stock_run(ours, work, f"cc_pruned_{shape}", steps, True, env=env("stock_pruned"))

    def excess(rows):
        secs = [tokens / r["tokens_per_second_per_gpu"] for r in rows if "tokens_per_second_per_gpu" in r]
        return (secs[0] - median(secs[1:])) if len(secs) > 1 else float("nan"), median(secs[1:])

    uni_excess, uni_step = excess(uniform["rows"])
    pr_excess, pr_step = excess(pruned["rows"])
    res = {
        "shape": shape,
        "num_layers": base.num_layers,
        "distinct_layer_shapes_final": distinct,
        "uniform_first_step_compile_s": uni_excess,
        "ours_stage_first_step_compile_s": ours_compile,
        "stock_pruned_first_step_compile_s": pr_excess,
        "steady_step_s": {"uniform_stock": uni_step, "pruned_stock": pr_step,
                          "pruned_ours": median(tokens / t for t in stage_rows.get(stages, [float("nan")])[1:])},
        "dynamo": {"ours": dynamo_summary(ours), "stock_uniform": dynamo_summary(uniform),
                   "stock_pruned": dynamo_summary(pruned)},
        "ours_prune_seconds": [s["seconds_prune"] for s in ours["record"]["stages"]],
    }
    res["compile_ratio_after_resize"] = median(ours_compile) / uni_excess if uni_excess else float("nan")
    log(f"  compile [{shape}]: uniform first-step compile {uni_excess:.1f}s; ours after each resize "
        f"{[round(x, 1) for x in ours_compile]}s; stock on pruned widths {pr_excess:.1f}s; "
        f"dynamo {res['dynamo']}")
    return res


def run(quick: bool, work: Path, log) -> Dict[str, Any]:
    return section_compile("small", work, 6, log)
