"""Which loss should the Taylor scores come from: next-token CE (the paper's) or the KL to the teacher?

With distillation on, the unpruned model is loaded anyway, and ``distill.calibration_loss: kl``
scores each group by how far removing it moves the student's distribution from the original's
instead of by how much it raises the label loss. Whether that prunes better is an empirical
question, and this answers it before anything makes it a default: the same prune-only run
(``smollm2/135M_prune``: the same adaptive steps on the same calibration windows, no training,
so only the scores differ) once per calibration loss and target, each a real
``tune run adapt_prune_recipe``, scored by held-out perplexity on the Python tutorial (the
calibration domain) and Jane Austen's novels (outside it).

Layer importance (input/output similarity) does not read the loss, so the per-layer widths of the
two arms are equal; the difference is *which* groups each layer keeps. The first prune step
always scores with CE: before any cut the student is the teacher, the KL's gradient is exactly
zero and every KL score would be 0.

    python benchmarks/calibration_loss.py                      # 20 % in 8 steps (~10 min on 2 cores)
    python benchmarks/calibration_loss.py --targets 0.2 0.3    # more targets (1 % per step)

Results go to ``benchmarks/results/calibration_loss.json`` after every run (a finished run's
record is reused when the benchmark is started again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from _harness import override_args

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = "smollm2/135M_prune"
LOSSES = ("ce", "kl")
TEXTS = ("python_tutorial", "austen_novels")


def overrides(loss: str, target: float, args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    """One arm: the packaged prune-only config at ``target``, 1/``steps_per_percent`` % per step."""
    return {
        "output_dir": str(out),
        "pruning.method.target_sparsity": target,
        "adapt.steps_per_stage": round(target * 100 / args.percent_per_step),
        "pruning.calibration.num_samples": args.calib_samples,
        "heldout.num_tokens": args.heldout_tokens,
        "distill.enabled": loss == "kl",
        "distill.calibration_loss": loss,
        "speed": None,
        "metric_logger.log_dir": str(out / "logs"),
    }


def run_arm(loss: str, target: float, args: argparse.Namespace) -> Dict[str, Any]:
    """One prune-only ``tune run`` (skipped when its record exists), summarized."""
    out = args.work / f"{loss}_{target:.2f}"
    command = ["tune", "run", "adapt_prune_recipe", "--config", CONFIG]
    command += override_args(overrides(loss, target, args, out))
    record_path = out / "run_record.json"
    t0 = time.perf_counter()
    if not record_path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
        with open(out / "stdout.log", "w") as log:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
        if proc.returncode != 0:
            raise RuntimeError(f"{loss} at {target:.0%} failed (exit {proc.returncode}); see {out / 'stdout.log'}")
    record = json.loads(record_path.read_text())
    stage = record["stages"][-1]
    return {
        "command": " ".join(command),
        "ppl_original": next(e["ppl"] for e in record["heldout_log"] if e["event"] == "original"),
        "params_after": record["params_after"],
        "prune_steps": len(record["prune_steps"]),
        "ppl_after_prune": stage["heldout_after_prune"],
        "calib_ce_before": stage["calib_loss_before_prune"],
        "calib_ce_after": stage["calib_loss_after_prune"],
        "mlp_widths": [layer["intermediate_dim"] for layer in stage["layers"]],
        "seconds_prune": stage["seconds_prune"],
        "seconds_wall": time.perf_counter() - t0,
    }


def ratios(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """KL ÷ CE held-out perplexity per target and text (below 1: KL scores prune better)."""
    rows = []
    for key, ce in sorted(results["runs"].get("ce", {}).items()):
        kl = results["runs"].get("kl", {}).get(key)
        if kl is None:
            continue
        rows.append({
            "target": key,
            **{text: kl["ppl_after_prune"][text] / ce["ppl_after_prune"][text] for text in TEXTS},
            "same_layer_widths": kl["mlp_widths"] == ce["mlp_widths"],
        })
    return rows


def markdown(results: Dict[str, Any]) -> str:
    original = results.get("original", {})
    lines = [
        "| calibration loss | target | " + " | ".join(f"{t} (original {original.get(t, float('nan')):.2f})" for t in TEXTS)
        + " | calibration CE after |",
        "|---|---|" + "---|" * len(TEXTS) + "---|",
    ]
    for loss in LOSSES:
        for key, r in sorted(results["runs"].get(loss, {}).items()):
            cells = " | ".join(f"{r['ppl_after_prune'][t]:.2f}" for t in TEXTS)
            lines.append(f"| {loss} | {float(key):.0%} | {cells} | {r['calib_ce_after']:.4f} |")
    for row in ratios(results):
        cells = " | ".join(f"{row[t]:.3f}" for t in TEXTS)
        lines.append(f"| kl ÷ ce | {float(row['target']):.0%} | {cells} | |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2])
    parser.add_argument("--percent-per-step", type=float, default=2.5, help="sparsity added per prune step, in %%")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--work", type=Path,
                        default=Path.home() / ".cache" / "adapt-prune-tune" / "bench" / "calibration_loss")
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration_loss.json")
    args = parser.parse_args(argv)
    for target in args.targets:
        if not 0 < target < 1:
            parser.error(f"--targets: {target} is not a fraction in (0, 1)")
    if args.percent_per_step <= 0:
        parser.error("--percent-per-step must be > 0")

    results: Dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["command"] = "python benchmarks/calibration_loss.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["settings"] = {
        "config": CONFIG, "percent_per_step": args.percent_per_step, "calib_samples": args.calib_samples,
        "heldout_tokens": args.heldout_tokens, "threads": args.threads,
        "machine": {"processor": platform.machine(), "python": sys.version.split()[0]},
    }
    results["notes"] = [
        "prune only (no training): the same adaptive steps on the same calibration windows; only the loss "
        "whose gradients give the Taylor group scores differs",
        "kl: KL(teacher ‖ student) per predicted token, teacher = the unpruned base model; the first prune step "
        "scores with CE in both arms (the KL's gradient is zero before any cut)",
        "calib_ce_*: next-token cross-entropy on the calibration windows before the first and after the last cut",
    ]
    results.setdefault("runs", {})

    def save() -> None:
        results["ratios"] = ratios(results)
        results["table"] = markdown(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(args.out)

    for target in args.targets:
        for loss in LOSSES:
            print(f"{loss} at {target:.0%} ...", flush=True)
            r = run_arm(loss, target, args)
            results["runs"].setdefault(loss, {})[f"{target:.2f}"] = r
            results["original"] = r["ppl_original"]
            save()
            print(f"{loss} at {target:.0%}: {r['ppl_after_prune']}", flush=True)
    print(results["table"])
    return results


if __name__ == "__main__":
    main()
