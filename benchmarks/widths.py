"""Hardware-aligned widths and bf16 pruning on the real SmolLM2: what each costs, what it buys.

Two questions a GPU user asks before the first run, answered on the CPU with the real
SmolLM2-135M-Instruct, pruned (no training) to 30 % of the prunable weights in ``--steps``
adaptive steps (the package's own ``pruner.prune``; same calibration windows for every run):

* **round_to** ∈ {1, 32, 64, 128}: held-out perplexity on both texts (what rounding costs) and
  the time of the pruned model's MLP forwards over a batch of tokens (what it buys: widths that
  are multiples of the SIMD/tensor-core tile, and fewer distinct layer shapes — each distinct
  shape is one compiled graph). The MLP time is measured side by side for all widths in one
  process, alternating, median of repeats.
* **bf16 vs fp32**: the same pruning with the model in bf16 (gradients summed in fp32, see
  ``pruner.calibrate``): overlap of the kept MLP channels per layer with the fp32 run, and both
  pruned models' held-out perplexity (each evaluated in fp32 so only the pruning differs).

    python benchmarks/widths.py                 # ~25 min on 2 CPU cores (~50 at one thread)
    python benchmarks/widths.py --steps 2 --quick  # smoke

The JSON is rewritten after every phase (each round_to, the timings, the bf16 run), so a run
stopped early keeps what it finished; ``summary`` appears once the timings are in. The bf16 pass
is slow on a CPU without native bf16 (over an hour at one thread here): ``--precision-only`` runs
just that phase on top of a finished file.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _quality_eval import calibration_batches, evaluate, heldout_windows, machine  # noqa: E402

from adapt_prune_tune.assets import prepare_smollm2  # noqa: E402
from adapt_prune_tune.corpus import prepare_python_docs  # noqa: E402
from adapt_prune_tune.models import load_hf_model  # noqa: E402
from adapt_prune_tune.novels import prepare_novels  # noqa: E402
from adapt_prune_tune.pruner import PruningConfig, prune  # noqa: E402
from adapt_prune_tune.tokenizer import smollm2_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "widths.json"


def kept_channels(original: nn.Module, pruned: nn.Module) -> List[set]:
    """Which original MLP channels each layer kept: pruning copies kept w1 rows unchanged, so
    each pruned row is found among the original's rows (same dtype) by exact equality."""
    out = []
    for before, after in zip(original.layers, pruned.layers):
        rows = {bytes(r.detach().contiguous().view(torch.uint8).numpy()): i
                for i, r in enumerate(before.mlp.w1.weight.to(after.mlp.w1.weight.dtype))}
        out.append({rows[bytes(r.detach().contiguous().view(torch.uint8).numpy())] for r in after.mlp.w1.weight})
    return out


def mlp_seconds(model: nn.Module, tokens: int, repeats: int) -> float:
    """Median time of every layer's MLP forward on ``tokens`` hidden states (no autograd)."""
    x = torch.randn(tokens, model.layers[0].mlp.w1.in_features)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for layer in model.layers:
                layer.mlp(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args: argparse.Namespace, out: Dict[str, Any], save: Callable[[], None]) -> None:
    """Fill ``out`` phase by phase, calling ``save`` after each."""
    torch.manual_seed(0)
    model_dir = prepare_smollm2()
    tok = smollm2_tokenizer(str(model_dir))
    windows = heldout_windows(tok, prepare_python_docs(tokenizer_path=model_dir), prepare_novels(tokenizer_path=model_dir),
                              num_tokens=args.eval_tokens)
    batches = calibration_batches(prepare_python_docs(), tok, args.calib_samples, 128, 8, seed=0)
    base, arch = load_hf_model(model_dir)
    if args.precision_only:  # the round_to phases and timings are already in ``out``
        out["precision"] = {}
    else:
        original, _ = evaluate(base, windows)
        out.update(original=original, round_to={}, precision={})

    def pruned(model: nn.Module, round_to: int) -> tuple:
        cfg = PruningConfig(target_sparsity=args.target, steps=args.steps, round_to=round_to, amplitude=0.02)
        name = f"{str(next(model.parameters()).dtype).removeprefix('torch.')}, round_to {round_to}"
        t0 = time.perf_counter()
        new_arch, _ = prune(model, arch, batches, cfg, log=lambda msg: print(f"  {name}: {msg}", flush=True))
        return new_arch, time.perf_counter() - t0

    models: Dict[int, nn.Module] = {}
    for r in [] if args.precision_only else args.round_to:
        model = copy.deepcopy(base)
        new_arch, seconds = pruned(model, r)
        ppl, _ = evaluate(model, windows)
        widths = [layer.intermediate_dim for layer in new_arch.layers]
        out["round_to"][str(r)] = {
            "perplexity": ppl, "params": new_arch.num_params(), "mlp_widths": widths,
            "distinct_layer_shapes": len({(l.num_heads, l.num_kv_heads, l.intermediate_dim) for l in new_arch.layers}),
            "seconds_pruning": seconds,
        }
        models[r] = model
        save()
        print(f"round_to {r}: {ppl}, {new_arch.num_params():,} params, widths {sorted(set(widths))[:6]}...", flush=True)
    # What the widths buy: MLP forward time, all variants alternated in one loop (a shared CPU
    # slows each alike), and the unpruned model's as the reference.
    if models:
        timings: Dict[str, List[float]] = {"unpruned": []} | {str(r): [] for r in models}
        for _ in range(args.rounds):
            timings["unpruned"].append(mlp_seconds(base, args.mlp_tokens, 1))
            for r, model in models.items():
                timings[str(r)].append(mlp_seconds(model, args.mlp_tokens, 1))
        out["mlp_seconds"] = {k: statistics.median(v) for k, v in timings.items()}
        out["mlp_tokens"] = args.mlp_tokens
        out["summary"] = summarize(out, args.round_to[0])
        save()

    # bf16 vs fp32 pruning: kept channels and held-out perplexity (both evaluated in fp32).
    fp32_model = models.get(1)  # the round_to = 1 run above is the fp32 run
    bf16_model = copy.deepcopy(base).to(torch.bfloat16)
    arch16, seconds_bf16 = pruned(bf16_model, 1)
    first = out["round_to"].get("1", {})
    seconds_fp32, fp32_ppl = first.get("seconds_pruning"), first.get("perplexity")
    if fp32_model is None:  # no round_to 1 run in this process (--precision-only, or not asked):
        # prune and evaluate fp32 here; a stored run may come from a CPU whose fp32 kernels round differently
        fp32_model = copy.deepcopy(base)
        _, seconds_fp32 = pruned(fp32_model, 1)
        fp32_ppl = evaluate(fp32_model, windows)[0]
    overlaps = [
        len(a & b) / max(1, len(a), len(b))
        for a, b in zip(kept_channels(base, fp32_model), kept_channels(base, bf16_model))
    ]
    out["precision"] = {
        "kept_mlp_channel_overlap_per_layer": overlaps,
        "kept_mlp_channel_overlap_mean": sum(overlaps) / len(overlaps),
        "mlp_widths": {"fp32": [l.mlp.w1.weight.shape[0] for l in fp32_model.layers],
                       "bf16": [l.intermediate_dim for l in arch16.layers]},
        "perplexity_fp32_pruned": fp32_ppl,
        "perplexity_bf16_pruned": evaluate(bf16_model.float(), windows)[0],
        "seconds_pruning": {"fp32": seconds_fp32, "bf16": seconds_bf16},
        "machine": machine(),  # may differ from the round_to phases' (--precision-only runs later)
    }
    save()


def summarize(result: Dict[str, Any], reference: int) -> Dict[str, Any]:
    """Each round_to's perplexity and MLP time against ``reference``'s (round_to 1)."""
    base_ppl = result["round_to"][str(reference)]["perplexity"]
    return {
        r: {
            "perplexity_ratio_vs_round_to_1": {t: v["perplexity"][t] / base_ppl[t] for t in base_ppl},
            "mlp_speedup_vs_round_to_1": result["mlp_seconds"][str(reference)] / result["mlp_seconds"][r],
            "distinct_layer_shapes": v["distinct_layer_shapes"],
        }
        for r, v in result["round_to"].items()
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--round-to", dest="round_to", type=int, nargs="+", default=[1, 32, 64, 128])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--mlp-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="smoke: tiny evaluation and timing")
    parser.add_argument("--precision-only", action="store_true",
                        help="run only the bf16-vs-fp32 phase, keeping the round_to results already in --out "
                             "(the bf16 pass is slow on CPUs without native bf16)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.eval_tokens, args.rounds, args.calib_samples = 1024, 2, 8
    command = "python benchmarks/widths.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "precision_only")} | {"out": str(args.out)}
    if args.precision_only:
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        if "summary" not in result or result.get("settings") != settings:
            raise SystemExit(f"--precision-only needs {args.out} from a run with the same settings that finished its "
                             f"round_to phases and timings; run without --precision-only first")
        result["precision_command"] = command
    else:
        result = {"command": command, "machine": machine(), "settings": settings}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    run(args, result, save)
    print(json.dumps({"summary": result["summary"], "precision": {k: v for k, v in result["precision"].items()
                                                                  if k != "kept_mlp_channel_overlap_per_layer"}}, indent=1))


if __name__ == "__main__":
    main()
