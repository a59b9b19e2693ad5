"""Recovery at equal training tokens: Adapt-Accel against simpler protocols, with distillation.

The paper's central claim is that interleaving small adaptive prunes with training recovers
better than pruning once and training afterwards (LLM-Pruner's protocol) for the same
tokens. Every arm here is a real ``tune run adapt_prune_recipe --config smollm2/135M_adapt``
on the real SmolLM2-135M-Instruct, with the same target (20 % of the prunable projections),
the same 8 adaptive prune steps in total, the same training-token budget, data order, seed and
warmup-stable-decay LR schedule; only *how* pruning and training interleave (and whether the
unpruned model teaches) differs:

* ``a``  Adapt-Accel as configured: adaptive A = 0.02, 4 stages × 2 prune steps, tokens 1:2:3:4
* ``b``  prune-then-train: the same 8 adaptive steps, all before training (1 stage)
* ``c``  uniform (A = 0), interleaved like ``a``
* ``d``  ``a`` with distillation from the unpruned model
* ``e``  ``b`` with distillation
* ``d1`` ``a`` with logits-only distillation (α = 1, no label loss: Minitron's finding for
  pruned students), to see whether ``d``'s α = 0.5 is what holds distillation back
* ``n2``, ``n8``  the paper's Figure 4 in small: 2 stages × 4 steps, 8 stages × 1 step
  (N = 1 is ``b``, N = 4 is ``a``)

Each arm is scored on two held-out texts — the Python tutorial (the training domain) and
Jane Austen's novels (ordinary English prose the run never sees) — after its last prune and
after its training, with curves of held-out perplexity against training tokens, and by the
offline next-sentence multiple-choice task (lm-eval, Python docs) on the model after its last
prune and after training. Results go to ``benchmarks/results/recovery.json`` after every arm
(a stopped benchmark resumes where it was: a half-run arm resumes its own run checkpoint) and
the figure to ``benchmarks/results/recovery.png``.

    python benchmarks/recovery.py                        # every arm (hours on 2 CPU cores)
    python benchmarks/recovery.py --arms a b             # some arms
    python benchmarks/recovery.py --report               # table and figure from the JSON only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from _harness import override_args

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = "smollm2/135M_adapt"
PRUNE_STEPS = 8  # adaptive prune steps in every arm (the demo's 4 stages × 2)

ARMS: Dict[str, Dict[str, Any]] = {
    "a": {"label": "Adapt-Accel (A=0.02, N=4)", "overrides": {"adapt.stages": 4}},
    "b": {"label": "prune-then-train (A=0.02, N=1)", "overrides": {"adapt.stages": 1}},
    "c": {"label": "uniform interleaved (A=0, N=4)", "overrides": {"adapt.stages": 4, "pruning.method.amplitude": 0.0}},
    "d": {"label": "Adapt-Accel + distillation (N=4)", "overrides": {"adapt.stages": 4, "distill.enabled": True}},
    "e": {"label": "prune-then-train + distillation (N=1)", "overrides": {"adapt.stages": 1, "distill.enabled": True}},
    "d1": {"label": "Adapt-Accel + distillation, logits only (α=1, N=4)",
           "overrides": {"adapt.stages": 4, "distill.enabled": True, "distill.alpha": 1.0}},
    "n2": {"label": "Adapt-Accel N=2", "overrides": {"adapt.stages": 2}},
    "n8": {"label": "Adapt-Accel N=8", "overrides": {"adapt.stages": 8}},
}


def common_overrides(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    """What every arm shares (besides the packaged config itself)."""
    return {
        "output_dir": str(out),
        "adapt.total_tokens": args.tokens,
        "adapt.checkpoint_every_n_steps": args.eval_every,
        # Keep the checkpoint written right after the last prune: the after-prune model.
        "adapt.keep_last_checkpoints": 1000,
        "heldout.num_tokens": args.heldout_tokens,
        "heldout.at_checkpoints": True,
        "metric_logger.log_dir": str(out / "logs"),
    }


def arm_overrides(name: str, args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    overrides = {**common_overrides(args, out), **ARMS[name]["overrides"]}
    overrides["adapt.steps_per_stage"] = PRUNE_STEPS // int(overrides["adapt.stages"])
    return overrides


def run_arm(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """One ``tune run`` (resumed if an earlier attempt left run checkpoints), then its scores."""
    out = args.work / name
    overrides = arm_overrides(name, args, out)
    command = ["tune", "run", "adapt_prune_recipe", "--config", CONFIG]
    command += override_args(overrides)
    record_path = out / "run_record.json"
    t0 = time.perf_counter()
    if not record_path.is_file():
        resume = (out / "checkpoints" / "latest").is_file()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "stdout.log", "a") as log:
            proc = subprocess.run(
                command + (["resume_from_checkpoint=True"] if resume else []),
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"arm {name} failed (exit {proc.returncode}); see {out / 'stdout.log'}")
    record = json.loads(record_path.read_text())
    result = summarize_record(record)
    result.update(label=ARMS[name]["label"], command=" ".join(command), seconds_wall=time.perf_counter() - t0)
    if args.mc_limit:
        after_prune = last_prune_checkpoint(out / "checkpoints")
        result["mc_after_prune"] = multiple_choice(after_prune, args)
        result["mc_after_train"] = multiple_choice(out / "final", args)
    if not args.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


def summarize_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """Held-out figures, curve, sizes and times of one finished run."""
    stages = record["stages"]
    log = record["heldout_log"]
    train_steps = sum(s["train_steps"] for s in stages)
    return {
        "params_after": record["params_after"],
        "train_steps": train_steps,
        "train_tokens": sum(s["tokens"] for s in stages),
        "ppl_original": next(e["ppl"] for e in log if e["event"] == "original"),
        "ppl_after_prune": stages[-1]["heldout_after_prune"],
        "ppl_after_train": stages[-1]["heldout_after_train"],
        "curve": [{"tokens": e["tokens"], "event": e["event"], "stage": e["stage"], "ppl": e["ppl"]} for e in log],
        "seconds_prune": sum(s["seconds_prune"] for s in stages),
        "seconds_train": sum(s.get("seconds_train", 0.0) for s in stages),
        "seconds_run": record.get("seconds_run"),
        "final_train_loss": next((r["loss"] for r in reversed(record["train_log"]) if "loss" in r), None),
    }


def last_prune_checkpoint(root: Path) -> Path:
    """The run checkpoint written right after the final prune step (before the last training)."""
    tags = sorted(p for p in root.glob(f"step_*_prune_{PRUNE_STEPS:04d}") if (p / "COMPLETE").is_file())
    if not tags:
        raise FileNotFoundError(f"No complete checkpoint after prune step {PRUNE_STEPS} in {root}")
    return tags[0]


def multiple_choice(checkpoint: Optional[Path], args: argparse.Namespace) -> Dict[str, float]:
    """Next-sentence multiple choice (lm-eval, held-out Python docs) of a checkpoint (None: the original)."""
    from adapt_prune_tune.assets import smollm2_checkpoint_dir
    from adapt_prune_tune.eval_tasks import NEXT_SENTENCE_TASK
    from adapt_prune_tune.evaluation import TaskSpec, evaluate
    from adapt_prune_tune.export import load_pruned_checkpoint
    from adapt_prune_tune.models import decoder_from_arch, load_hf_model
    from adapt_prune_tune.tokenizer import smollm2_tokenizer

    torch.set_num_threads(args.threads)
    if checkpoint is None:
        model, _ = load_hf_model(smollm2_checkpoint_dir())
    else:
        state, arch = load_pruned_checkpoint(checkpoint)
        model = decoder_from_arch(arch)
        model.load_state_dict(state)
    tokenizer = smollm2_tokenizer(str(smollm2_checkpoint_dir()), max_seq_len=2048)
    table = evaluate(
        model.eval(), [TaskSpec(NEXT_SENTENCE_TASK, ("acc", "acc_norm"), 0)], tokenizer=tokenizer,
        limit=args.mc_limit, batch_size=8, bootstrap_iters=1000,
    )
    return table[NEXT_SENTENCE_TASK]


# --------------------------------------------------------------------------- report


def table_rows(results: Dict[str, Any]) -> List[List[str]]:
    arms = results["arms"]
    texts = list(next(iter(arms.values()))["ppl_after_train"]) if arms else []
    rows = []
    for name, r in arms.items():
        row = [name, r["label"]]
        for t in texts:
            row.append(f"{r['ppl_after_prune'][t]:.2f} → **{r['ppl_after_train'][t]:.2f}**")
        for key in ("mc_after_prune", "mc_after_train"):
            mc = r.get(key)
            row.append(f"{mc['acc']:.3f} ± {mc.get('acc_stderr', float('nan')):.3f}" if mc else "")
        row.append(f"{r['train_tokens']:,}")
        rows.append(row)
    return rows


def markdown(results: Dict[str, Any]) -> str:
    arms = results["arms"]
    if not arms:
        return "(no arm finished yet)"
    texts = list(next(iter(arms.values()))["ppl_after_train"])
    original = next(iter(arms.values()))["ppl_original"]
    header = ["arm", "protocol"] + [f"{t} ppl: pruned → trained" for t in texts]
    header += ["MC acc after prune", "MC acc after training", "train tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    orig_mc = results.get("original", {}).get("mc")
    orig = ["", "original (unpruned)"] + [f"{original[t]:.2f}" for t in texts]
    orig += [f"{orig_mc['acc']:.3f} ± {orig_mc.get('acc_stderr', float('nan')):.3f}" if orig_mc else "", "", ""]
    lines.append("| " + " | ".join(orig) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    comparisons = targets(results)
    if comparisons:
        lines += ["", "| comparison (after training) | target | " + " | ".join(texts) + " | met |",
                  "|---|---|" + "---|" * len(texts) + "---|"]
        for c in comparisons:
            ratios = " | ".join(f"{c['ratios'][t]:.3f}" for t in texts)
            lines.append(f"| {c['name']} | ≤ {c['limit']:g} | {ratios} | {'yes' if c['met'] else 'no'} |")
    interleavings = [(n, arms[name]) for name, n in ABLATION if name in arms]
    if len(interleavings) > 1:
        lines += ["", "| interleavings N (same prune steps and tokens) | "
                  + " | ".join(f"{t}: pruned → trained" for t in texts) + " |",
                  "|---|" + "---|" * len(texts)]
        for n, r in interleavings:
            cells = " | ".join(f"{r['ppl_after_prune'][t]:.2f} → {r['ppl_after_train'][t]:.2f}" for t in texts)
            lines.append(f"| {n} | {cells} |")
    return "\n".join(lines)


# The paper's Figure 4 in small: the arms that differ only in the number of stages N.
ABLATION = (("b", 1), ("n2", 2), ("a", 4), ("n8", 8))


# The targets: held-out perplexity after training, one arm ÷ another, on every text.
TARGETS = (("d", "a", 0.9), ("d1", "a", 0.9), ("a", "b", 1.0), ("a", "c", 1.0), ("e", "b", 0.9))


def targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each target whose two arms have finished: the ratio per text, met only if met on all."""
    arms = results["arms"]
    out = []
    for num, den, limit in TARGETS:
        if num in arms and den in arms:
            ratios = {t: arms[num]["ppl_after_train"][t] / arms[den]["ppl_after_train"][t]
                      for t in arms[num]["ppl_after_train"]}
            out.append({"name": f"{num} ÷ {den}", "limit": limit, "ratios": ratios,
                        "met": all(r <= limit for r in ratios.values())})
    return out


def plot(results: Dict[str, Any], path: Path) -> None:
    """Held-out perplexity against training tokens, every arm, one panel per text."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    arms = results["arms"]
    if not arms:
        return
    texts = list(next(iter(arms.values()))["ppl_after_train"])
    figure = Figure(figsize=(6 * len(texts), 4.2))
    axes = figure.subplots(1, len(texts), squeeze=False)[0]
    for ax, text in zip(axes, texts):
        for name, r in arms.items():
            points = [(p["tokens"], p["ppl"][text]) for p in r["curve"] if p["event"] != "original"]
            ax.plot([x for x, _ in points], [y for _, y in points], marker=".", lw=1, label=f"{name}: {r['label']}")
        original = next(iter(arms.values()))["ppl_original"][text]
        ax.axhline(original, color="k", lw=0.8, ls="--", label="original")
        ax.set_title(f"held-out perplexity: {text}")
        ax.set_xlabel("training tokens")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda y, _: f"{y:g}")  # 16, not 1.6 × 10^1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--tokens", type=int, default=100_000, help="training tokens per arm")
    parser.add_argument("--eval-every", type=int, default=50, help="held-out evaluation every N training steps")
    parser.add_argument("--heldout-tokens", type=int, default=8192, help="tokens per held-out text")
    parser.add_argument("--mc-limit", type=int, default=300, help="multiple-choice examples (0: skip)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "adapt-prune-tune" / "bench" / "recovery")
    parser.add_argument("--out", type=Path, default=RESULTS / "recovery.json")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and figure")
    args = parser.parse_args(argv)

    results: Dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("arms", {})
    if not args.report:  # a report keeps the settings and command that made the arms
        results["settings"] = {
            "config": CONFIG, "tokens": args.tokens, "prune_steps": PRUNE_STEPS,
            "eval_every_steps": args.eval_every, "heldout_tokens": args.heldout_tokens,
            "mc_limit": args.mc_limit, "threads": args.threads,
            "machine": {"processor": platform.machine(), "torch": torch.__version__,
                        "python": sys.version.split()[0]},
        }
        results["command"] = "python benchmarks/recovery.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(args.out)

    if not args.report:
        if args.mc_limit and "mc" not in results.get("original", {}):
            results.setdefault("original", {})["mc"] = multiple_choice(None, args)
            save()
        for name in args.arms:
            if name in results["arms"]:
                print(f"arm {name}: done earlier, kept")
                continue
            print(f"arm {name}: {ARMS[name]['label']} ...", flush=True)
            results["arms"][name] = run_arm(name, args)
            save()
            r = results["arms"][name]
            print(f"arm {name}: after prune {r['ppl_after_prune']}, after training {r['ppl_after_train']}", flush=True)
    results["table"] = markdown(results)
    results["targets"] = targets(results)
    save()
    plot(results, args.out.with_suffix(".png"))
    print(results["table"])


if __name__ == "__main__":
    main()
