"""Prune stages' share of the wall time of a real ``tune run adapt_prune_recipe --config
smollm2/135M_adapt`` (demo budget), and the extrapolation to the paper's budgets through a
cost model fitted on the same run. Target ≤ 3 % at a real budget.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from _harness import median, run_cmd


def section_share(work: Path, quick: bool, log=print, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """``run_dir``: read a finished run's ``run_record.json`` instead (wall time = its ``seconds_run``)."""
    if run_dir is None:
        out = work / "share_run"
        shutil.rmtree(out, ignore_errors=True)
        overrides = [f"output_dir={out}"]
        if quick:
            overrides += ["adapt.total_tokens=12000"]
        cmd = ["tune", "run", "adapt_prune_recipe", "--config", "smollm2/135M_adapt", *overrides]
        proc, wall = run_cmd(cmd, cwd=work)
        record = json.loads((out / "run_record.json").read_text())
    else:
        record = json.loads((Path(run_dir) / "run_record.json").read_text())
        cmd, wall = record["command"].split(), record["seconds_run"]
    prune_s = sum(s["seconds_prune"] for s in record["stages"])
    steps = record["prune_steps"]
    step_s = [s["seconds"] for s in steps]
    tps = [r["tokens_per_second_per_gpu"] for r in record["train_log"] if "tokens_per_second_per_gpu" in r]
    cfg = record["config"]
    calib = cfg["pruning"]["calibration"]
    calib_tokens = int(calib["num_samples"]) * int(calib["seq_len"])
    train_tokens = sum(int(s["tokens"]) for s in record["stages"])
    train_s = train_tokens / median(tps) if tps else float("nan")
    # Cost model: a prune step ≈ r × (fwd+bwd over C calibration tokens) and a training token costs
    # about what a calibration token's fwd+bwd costs (+ optimizer). With K prune steps in total,
    # N stages (one forward-only check per stage ≈ C/3) and T training tokens:
    #     share ≈ (K·r·C + N·C/3) / (K·r·C + N·C/3 + T)
    # r is measured (overhead section); prune-step seconds per calibration token on this run give
    # the model-free check: measured K·p / (K·p + T/τ).
    per_calib_token = median(step_s) / calib_tokens
    per_train_token = 1.0 / median(tps) if tps else float("nan")
    r_eff = per_calib_token / per_train_token

    def share(K, C, T, N, r=r_eff):
        prune = K * r * C + N * C / 3
        return prune / (prune + T)

    K, N = len(steps), len(record["stages"])
    res = {
        "command": " ".join(cmd),
        "wall_seconds": wall,
        "prune_seconds": prune_s,
        "share_of_wall": prune_s / wall,
        "training_seconds_est": train_s,
        "prune_steps": K,
        "stages": N,
        "prune_step_seconds_median": median(step_s),
        "calib_tokens_per_step": calib_tokens,
        "train_tokens": train_tokens,
        "train_tokens_per_s_median": median(tps),
        "r_prune_token_vs_train_token": r_eff,
        "model_share_demo": share(K, calib_tokens, train_tokens, N),
        "other_seconds": wall - prune_s - train_s,
        "extrapolation": {
            "formula": "share = (K*r*C + N*C/3) / (K*r*C + N*C/3 + T); K prune steps, C calibration "
                       "tokens per step, T training tokens, N stages, r = cost of a calibration token "
                       "in a prune step / cost of a training token (measured)",
            "smollm2_demo(K=8,C=2048,T=40k,N=4)": share(8, 2048, 40_000, 4),
            "qwen2.5_0.5B_config(K=50,C=512x64,T=1e9,N=5)": share(50, 512 * 64, 1_000_000_000, 5),
            "llama3.1_8B_config(K=50,C=512x64,T=1e9,N=10)": share(50, 512 * 64, 1_000_000_000, 10),
            "paper_qwen_script(K=5x50,C=512x64,T=1e9,N=5)": share(250, 512 * 64, 1_000_000_000, 5),
            "min_T_for_3pct_demo": (8 * r_eff * 2048 + 4 * 2048 / 3) * (1 / 0.03 - 1),
        },
    }
    log(f"  share: prune {prune_s:.1f}s of {wall:.1f}s wall = {res['share_of_wall']:.1%} (demo budget); "
        f"paper-scale extrapolation {res['extrapolation']['qwen2.5_0.5B_config(K=50,C=512x64,T=1e9,N=5)']:.3%}")
    return res


def run(quick: bool, work: Path, log, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    return section_share(work, quick, log, run_dir)
