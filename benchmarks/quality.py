"""Quality of pruned SmolLM2-135M-Instruct: Adapt-Pruner vs uniform, magnitude and random.

Held-out perplexity of the real SmolLM2-135M-Instruct (fp32) after structured pruning of
attention heads and MLP channels to a share of the prunable decoder weights (attention + MLP
projections), without any recovery training, on two texts (``benchmarks/_quality_eval.py``):
the first 8,192 tokens of the Python tutorial sources (``python_tutorial``, the calibration
domain) and of Jane Austen's novels (``austen_novels``, prose no step ever sees), each in
16 non-overlapping 512-token windows.

* ``adaptive``  Taylor scores, Adapt-Pruner's layer-adaptive sparsity (A = 0.02), with each
  layer-importance normalization of ``--normalizations`` (max: the paper's; zscore, mad, rank:
  ``adapt_prune_tune/importance.py``)
* ``uniform``   Taylor scores, A = 0 (every layer loses the same share; LLM-Pruner)
* ``magnitude`` L2 magnitude scores, A = 0
* ``random``    random scores, A = 0 (the floor)

plus, per normalization, an amplitude sweep (``--sweep``, at ``--sweep-targets``) and the
MLP-only yardstick (40% of MLP channels, 10 steps, A = 0.02 vs 0). Every calibration seed
(``--seeds``) draws its own calibration sample (``--calib-samples`` x 128 tokens of
``calibration.jsonl``) and gives every method its own trajectory; the table shows the mean
± sample std over seeds, the JSON every seed's value.

Schedules. ``separate``: every target gets its own run of ``--steps`` steps (the paper's
protocol). ``shared``: one run per method removes a fixed 0.4/``--steps`` of the prunable
weights per step and is evaluated when it passes each target, i.e. 40% takes ``--steps``
steps, 20% half as many, 60% 1.5 times as many. The amplitude per step is A * 50 /
steps-to-40%, so the total deviation a layer can accumulate (A * K) is the paper's whatever
K is (a no-op at 50 steps). A = 0 does not read the normalization: those runs are keyed
``none``.

Resumable: the results file is rewritten after every trajectory, and a trajectory already in
it (key ``method/normalization/A<amp>/seed<s>/<schedule>``) is kept, so an interrupted command
run again continues where it stopped, and commands with other methods, seeds or targets add
to the same file. The file-wide settings (calibration sample, evaluation windows, allocation,
similarity) must match; ``--no-resume`` starts the file over (keeping the Torch-Pruning rows
of ``quality_torch_pruning.py``).

    python benchmarks/quality.py --quick      # 15-30 min on 2 busy cores
    python benchmarks/quality.py --smoke      # seconds: a tiny random model on the real texts
    python benchmarks/quality.py              # the full protocol (many CPU hours)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quality_eval import (  # noqa: E402
    EVAL_TOKENS,
    EVAL_WINDOW,
    FORMAT,
    SMOLLM2,
    SPREAD,
    TEXTS,
    TORCH_PRUNING_KEY,
    aggregate,
    calibration_batches,
    evaluate,
    heldout_windows,
    machine,
    read_results,
    settings_conflict,
    update_results,
)
from adapt_prune_tune.assets import prepare_smollm2  # noqa: E402
from adapt_prune_tune.corpus import prepare_python_docs  # noqa: E402
from adapt_prune_tune.importance import IMPORTANCE_NORMALIZATIONS  # noqa: E402
from adapt_prune_tune.models import DecoderArch, RopeSpec, decoder_from_arch, load_hf_model  # noqa: E402
from adapt_prune_tune.novels import prepare_novels  # noqa: E402
from adapt_prune_tune.pruner import (  # noqa: E402
    AdaptivePruner,
    Calibration,
    PruningConfig,
    plan_step,
    score_layers,
)
from adapt_prune_tune.scoring import needs_gradients  # noqa: E402
from adapt_prune_tune.surgery import prune_decoder_  # noqa: E402
from adapt_prune_tune.tokenizer import smollm2_tokenizer  # noqa: E402

PAPER_STEPS = 50  # the paper's A = 0.02 goes with 50 steps to the target
METHODS = {  # method: (scorer, uses A)
    "adaptive": ("taylor", True),
    "uniform": ("taylor", False),
    "magnitude": ("magnitude_l2", False),
    "random": ("random", False),
}
SMOKE_MODEL = "tiny random decoder with SmolLM2's vocabulary (--smoke)"
# Settings every trajectory in one results file shares (the rest is in each trajectory's key).
FILE_SETTINGS = ("model", "calib_samples", "calib_len", "calib_batch", "max_layer_sparsity", "eval_tokens",
                 "eval_window", "attention_allocation", "similarity")


@dataclass
class Run:
    """One pruning trajectory, evaluated at every target in ``targets``."""

    method: str
    scorer: str
    amplitude: float  # nominal A (paper scale)
    normalization: str  # "none" when A = 0 (nothing reads it)
    targets: List[float]
    steps: int  # steps to reach max(targets)
    seed: int
    schedule: str  # "shared" or "separate"
    steps_ref: int  # steps to 40% (shared) or to the target (separate)
    prune_attention: bool = True
    scale_amplitude: bool = True
    schedule_family: str = field(init=False)

    def __post_init__(self) -> None:
        self.schedule_family = f"{self.schedule}{self.steps_ref}"

    @property
    def row(self) -> str:
        """The trajectory's key without its seed: the table row it belongs to."""
        return f"{self.method}/{self.normalization}/A{self.amplitude:g}/{self.schedule_family}"

    @property
    def key(self) -> str:
        where = self.schedule_family if self.schedule == "shared" else f"{self.schedule_family}@{self.targets[0]:.2f}"
        return f"{self.method}/{self.normalization}/A{self.amplitude:g}/seed{self.seed}/{where}"

    def amplitude_per_step(self) -> float:
        """A per step, keeping the paper's total deviation A * 50 when ``scale_amplitude``."""
        if not self.scale_amplitude:
            return self.amplitude
        return self.amplitude * PAPER_STEPS / self.steps_ref

    def spec(self) -> Dict[str, Any]:
        return asdict(self)


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
    windows: Dict[str, torch.Tensor],
    args: argparse.Namespace,
    log,
) -> Dict[str, Any]:
    """Prune a copy of ``base`` step by step, evaluating both texts at each target."""
    final = max(run.targets)
    cfg = PruningConfig(
        target_sparsity=final,
        steps=run.steps,
        amplitude=run.amplitude_per_step(),
        importance_normalization=run.normalization if run.amplitude > 0 else "max",
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
        "row": run.row,
        "spec": run.spec(),
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
            ppl, eval_s = evaluate(model, windows)
            out["at"][f"{reached:.2f}"] = {
                "perplexity": ppl,
                "steps": k + 1,
                "params": current.num_params(),
                "prunable_reduction": 1.0 - current.prunable_params() / original.prunable_params(),
                "total_reduction": 1.0 - current.num_params() / original.num_params(),
                "layer_sparsity": [round(s, 4) for s in pruner.sparsity.tolist()],
                "layer_importance_last": [round(s, 4) for s in record.layer_importance],
                "clamped_layers_total": sum(r.clamped_layers for r in pruner.records),
                "widths": layer_widths(current),
                "eval_seconds": eval_s,
            }
            log(f"  {run.key} @ {reached:.0%}: " + ", ".join(f"{t} {ppl[t]:.2f}" for t in TEXTS)
                + f" ({eval_s:.0f}s eval)")
    out["seconds_per_step"] = sum(step_seconds) / len(step_seconds)
    out["step_seconds"] = [round(s, 2) for s in step_seconds]
    out["calib_loss"] = [r.calib_loss for r in pruner.records]
    return out


# --------------------------------------------------------------------------- plan


def plan_runs(args: argparse.Namespace) -> List[Run]:
    """Every trajectory the command asks for, once each (a sweep point that is a main run, or
    A = 0 under any normalization, is the same trajectory: it is planned once, for the union of
    the targets asked of it)."""
    planned: Dict[str, Run] = {}

    def add(method: str, amplitude: float, normalization: str, targets: Sequence[float], seed: int, **kw) -> None:
        scorer = METHODS.get(method, ("taylor", True))[0]
        normalization = normalization if amplitude > 0 else "none"
        steps_ref = kw.pop("steps_ref", args.steps)
        schedule = kw.pop("schedule", args.schedule)
        if schedule == "shared":
            runs = [Run(method, scorer, amplitude, normalization, sorted(targets),
                        round(steps_ref * max(targets) / 0.4), seed, schedule, steps_ref, **kw)]
        else:
            runs = [Run(method, scorer, amplitude, normalization, [t], steps_ref, seed, schedule, steps_ref, **kw)
                    for t in targets]
        for run in runs:
            same = planned.get(run.key)
            if same is None:
                planned[run.key] = run
            elif schedule == "shared":  # a longer shared trajectory passes the shorter one's targets
                same.targets = sorted(set(same.targets) | set(run.targets))
                same.steps = round(steps_ref * max(same.targets) / 0.4)

    for seed in args.seeds:
        for method in args.methods:
            if method == "magnitude":  # ignores data and randomness: one run, seed 0, whatever --seeds
                add(method, 0.0, "none", args.targets, 0)
            elif METHODS[method][1]:
                for norm in args.normalizations:
                    add(method, args.amplitude, norm, args.targets, seed)
            else:
                add(method, 0.0, "none", args.targets, seed)
        for norm in args.normalizations:
            for amp in args.sweep:
                add("adaptive" if amp > 0 else "uniform", amp, norm, args.sweep_targets, seed)
        if args.mlp_only:
            for method, amp in (("mlp_only_adaptive", args.amplitude), ("mlp_only_uniform", 0.0)):
                add(method, amp, args.normalizations[0], [0.4], seed, schedule="separate",
                    steps_ref=args.mlp_only_steps, prune_attention=False, scale_amplitude=False)
    return list(planned.values())


def same_trajectory(old: Optional[Dict[str, Any]], run: Run) -> bool:
    """Whether a stored result is this trajectory, possibly evaluated at other targets."""
    if old is None:
        return False
    spec = {k: v for k, v in old.get("spec", {}).items() if k not in ("targets", "steps")}
    return spec == {k: v for k, v in run.spec().items() if k not in ("targets", "steps")}


def finished(old: Optional[Dict[str, Any]], run: Run) -> bool:
    """Whether a stored trajectory is this one and reached all of its targets."""
    return same_trajectory(old, run) and all(f"{t:.2f}" in old.get("at", {}) for t in run.targets)


# --------------------------------------------------------------------------- main


def tiny_decoder(vocab_size: int) -> tuple:
    """A 4-layer random decoder with GQA and tied embeddings (``--smoke``)."""
    arch = DecoderArch.uniform(vocab_size=vocab_size, embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2,
                               intermediate_dim=128, max_seq_len=512, head_dim=16,
                               rope=RopeSpec("default", 100_000.0), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = decoder_from_arch(arch)
    with torch.no_grad():  # small weights: logits near zero, perplexity near the vocabulary size
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model, arch


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="shared schedule, 10 steps to 40%%, adaptive/uniform/magnitude/random at 20%%/40%%, one seed")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random decoder on the first 256 tokens of both texts, 2 steps (seconds)")
    parser.add_argument("--schedule", choices=("separate", "shared"), default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per target (separate) or to 40%% (shared)")
    parser.add_argument("--targets", type=float, nargs="+", default=None)
    parser.add_argument("--amplitude", type=float, default=0.02)
    parser.add_argument("--normalizations", nargs="+", default=["max"], choices=tuple(IMPORTANCE_NORMALIZATIONS),
                        help="layer-importance normalizations of the adaptive runs, each with its own sweep")
    parser.add_argument("--sweep", type=float, nargs="*", default=None, help="amplitudes swept per normalization")
    parser.add_argument("--sweep-targets", type=float, nargs="+", default=[0.4])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=tuple(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="calibration samples (one trajectory each)")
    parser.add_argument("--mlp-only", dest="mlp_only", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--mlp-only-steps", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--calib-len", type=int, default=None)
    parser.add_argument("--calib-batch", type=int, default=None)
    parser.add_argument("--max-layer-sparsity", type=float, default=0.9)
    parser.add_argument("--attention-allocation", choices=("proportional", "score"), default=None,
                        help="how a layer's budget is split between heads and MLP channels "
                             "(default: PruningConfig's)")
    parser.add_argument("--similarity", choices=("cosine", "euclidean", "manhattan"), default="cosine")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per text (default 8192)")
    parser.add_argument("--eval-window", type=int, default=None, help="tokens per window (default 512)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--original-from", type=Path, default=None,
                        help="reuse the unpruned perplexities measured in another results file")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the trajectories already in --out (default); --no-resume starts it over")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    args = parser.parse_args(argv)
    quick, smoke = args.quick, args.smoke
    args.schedule = args.schedule or ("shared" if quick or smoke else "separate")
    args.steps = args.steps or (2 if smoke else 10 if quick else PAPER_STEPS)
    args.targets = sorted(args.targets or ([0.2, 0.4] if quick or smoke else [0.2, 0.4, 0.6]))
    args.sweep = args.sweep if args.sweep is not None else ([] if quick or smoke else [0.0, 0.005, 0.01, 0.02, 0.04])
    args.seeds = args.seeds or ([0] if quick or smoke else [0, 1, 2])
    args.mlp_only = args.mlp_only if args.mlp_only is not None else not (quick or smoke)
    args.calib_samples = args.calib_samples or (4 if smoke else 32)
    args.calib_len = args.calib_len or (32 if smoke else 128)
    args.calib_batch = args.calib_batch or (2 if smoke else 8)
    args.eval_tokens = args.eval_tokens or (256 if smoke else EVAL_TOKENS)
    args.eval_window = args.eval_window or (128 if smoke else EVAL_WINDOW)
    args.attention_allocation = args.attention_allocation or PruningConfig(target_sparsity=0.1).attention_allocation
    args.model = SMOKE_MODEL if smoke else SMOLLM2
    return args


def command_line(argv: Optional[Sequence[str]]) -> str:
    return " ".join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    settings = {k: getattr(args, k) for k in FILE_SETTINGS}
    doc = read_results(args.out)
    if "settings" in doc and args.resume:  # quality.py's part of the file exists
        conflict = settings_conflict(doc["settings"], settings, FILE_SETTINGS)
        if doc.get("format") != FORMAT:
            raise SystemExit(f"{args.out} holds results in an older layout (one held-out text); move it aside, "
                             "write elsewhere with --out, or start it over with --no-resume")
        if conflict and doc.get("results"):
            raise SystemExit(f"{args.out} was measured with other settings: {conflict}; use the same settings, "
                             "another --out, or --no-resume")
        args.resume = not conflict  # no trajectory yet: nothing to keep
    if not args.resume:
        doc = {k: doc[k] for k in (TORCH_PRUNING_KEY,) if k in doc}

    t_start = time.perf_counter()
    model_dir = prepare_smollm2()
    python_docs = prepare_python_docs(tokenizer_path=model_dir)
    austen = prepare_novels(tokenizer_path=model_dir)
    tok = smollm2_tokenizer(str(model_dir))
    windows = heldout_windows(tok, python_docs, austen, args.eval_tokens, args.eval_window,
                              max_chars=64 * args.eval_tokens if args.smoke else None)
    if args.smoke:
        base, arch = tiny_decoder(tok.vocab_size)
    else:
        base, arch = load_hf_model(model_dir, dtype=torch.float32, max_seq_len=1024)

    original = doc.get("original")
    if not original and args.original_from is not None:
        other = read_results(args.original_from)
        same_eval = not settings_conflict(other.get("settings", {}), settings, ("model", "eval_tokens", "eval_window"))
        if other.get("format") == FORMAT and same_eval:
            original = other["original"]
    if not original:
        ppl, seconds = evaluate(base, windows)
        original = {"perplexity": ppl, "params": arch.num_params(), "prunable_params": arch.prunable_params(),
                    "eval_seconds": seconds}
    log("original: " + ", ".join(f"{t} {original['perplexity'][t]:.3f}" for t in TEXTS))

    def header(d: Dict[str, Any]) -> None:
        if not args.resume:
            for k in [k for k in d if k != TORCH_PRUNING_KEY]:
                del d[k]
        d["format"] = FORMAT
        d["command"] = command_line(argv)
        d["commands"] = [*d.get("commands", []), d["command"]]
        d["machine"] = machine()
        d["model"] = args.model
        d["settings"] = settings
        d["headline_amplitude"] = args.amplitude
        d["notes"] = [
            f"perplexity: first {args.eval_tokens:,} tokens of each held-out text (no BOS), "
            f"{args.eval_tokens // args.eval_window} non-overlapping {args.eval_window}-token windows, "
            f"{args.eval_window - 1} predictions each: python_tutorial = the Python tutorial sources (sorted paths), "
            "austen_novels = Jane Austen's six novels dealt round-robin in ~4,000-character passages",
            f"calibration: per seed, {args.calib_samples} random {args.calib_len}-token windows of calibration.jsonl "
            "documents; every step runs forward+backward over all of them (summed gradients, "
            f"{args.similarity} layer similarity)",
            "sparsity = fraction of the prunable decoder weights (attention + MLP projections) removed; "
            "total_reduction counts embeddings (tied) and norms too",
            "results key: method/normalization/A<nominal A>/seed<calibration seed>/<schedule><steps to 40% "
            "(shared) or per target (separate)>[@target]; A = 0 runs do not read the normalization (none)",
            "amplitude_per_step = A * 50 / steps-to-40% for the heads+MLP runs (paper's total deviation A*K); "
            "the MLP-only yardstick uses A literally with 10 steps, as in the earlier measurement",
            "magnitude and random use A = 0 (uniform) and skip calibration (nothing reads it); magnitude "
            "ignores the calibration seed (one run)",
            f"aggregates: per row (the key without its seed) and target, {SPREAD}",
        ]
        d["original"] = original
        d.setdefault("results", {})
        d["aggregates"] = aggregate(d["results"])

    doc = update_results(args.out, header)
    batches_by_seed = {
        s: calibration_batches(python_docs, tok, args.calib_samples, args.calib_len, args.calib_batch, s)
        for s in args.seeds
    }
    runs = plan_runs(args)
    for run in runs:  # a shared trajectory measured again keeps the targets it had
        old = doc["results"].get(run.key)
        if run.schedule == "shared" and same_trajectory(old, run) and not finished(old, run):
            run.targets = sorted(set(run.targets) | set(old["spec"]["targets"]))
            run.steps = round(run.steps_ref * max(run.targets) / 0.4)
    todo = [r for r in runs if not finished(doc["results"].get(r.key), r)]
    log(f"{len(runs)} trajectories, {len(runs) - len(todo)} already in {args.out}: "
        + ", ".join(r.key for r in todo))
    for run in todo:
        log(f"{run.key}: scorer={run.scorer} targets={run.targets} steps={run.steps}")
        res = run_trajectory(run, base, arch, batches_by_seed[run.seed], windows, args, log)

        def record(d: Dict[str, Any], key: str = run.key, res: Dict[str, Any] = res) -> None:
            d["results"][key] = res
            for t, at in res["at"].items():
                if res["spec"]["prune_attention"]:
                    d.setdefault("total_reduction", {})[t] = at["total_reduction"]
            d["aggregates"] = aggregate(d["results"])
            d["seconds_last_command"] = time.perf_counter() - t_start

        doc = update_results(args.out, record)
    print()
    print(doc["table"])
    print(f"\ntotal {(time.perf_counter() - t_start) / 60:.1f} min; wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
