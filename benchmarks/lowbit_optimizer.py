"""torchao's low-bit AdamW against fp32 AdamW on the demo run: state bytes, peak memory, loss.

Two measurements into ``benchmarks/results/lowbit_optimizer.json``:

* **state bytes**: the real SmolLM2-135M-Instruct after one optimizer step, per optimizer: the
  bytes of every state tensor, a torchao ``OptimState8bit``/``OptimState4bit`` counted by its
  inner tensors (codes, block scales, code map), so the figure is what the process holds.
* **demo run**: the real ``tune run adapt_prune_recipe --config smollm2/135M_adapt`` (4 stages,
  prune + train, resizes carrying the moments) once per optimizer, same seed, one process at a
  time: the per-step training loss, the held-out perplexity after training, each process's peak
  RSS and wall time. The fp32 run's terminal output is kept: it is the README's demo run.

    python benchmarks/lowbit_optimizer.py                       # ~25 min on 2 CPU cores
    python benchmarks/lowbit_optimizer.py --tokens 20000 --no-eval   # ~12 min: loss and memory only
    python benchmarks/lowbit_optimizer.py --optimizers torch.optim.AdamW --tokens 2000 --no-eval  # smoke

The JSON is rewritten after each run, and runs already in it are kept (``--fresh`` redoes them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, run_with_peak_rss  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "lowbit_optimizer.json"
OPTIMIZERS = ("torch.optim.AdamW", "torchao.optim.AdamW8bit", "torchao.optim.AdamW4bit")

def tensor_bytes(t: Any) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized states) by its inner tensors."""
    import torch

    if not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        from adapt_prune_tune.optimizer_state import flatten_quantized

        return sum(tensor_bytes(part) for part in flatten_quantized(t)[2].values())
    return t.numel() * t.element_size()


def state_bytes(optimizer_path: str) -> Dict[str, Any]:
    """Optimizer-state bytes of the real SmolLM2 after one step (fp32 weights, as in the demo)."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from adapt_prune_tune.assets import prepare_smollm2
    from adapt_prune_tune.models import load_hf_model

    model, _ = load_hf_model(prepare_smollm2())
    optimizer = tt_config.instantiate(OmegaConf.create({"_component_": optimizer_path, "lr": 2e-5}), model.parameters())
    tokens = torch.randint(0, 49152, (1, 32))
    model(tokens).logsumexp(-1).mean().backward()
    optimizer.step()
    total = sum(tensor_bytes(v) for state in optimizer.state.values() for v in state.values())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kinds = sorted({type(v).__name__ for state in optimizer.state.values() for v in state.values()})
    return {"state_bytes": total, "weight_bytes": weights, "state_over_weights": total / weights, "state_types": kinds}


def demo_run(optimizer_path: str, tokens: Optional[int], threads: int, work: Path, evaluate: bool) -> Dict[str, Any]:
    out = work / optimizer_path.rsplit(".", 1)[1]
    overrides = [f"output_dir={out}", f"optimizer._component_={optimizer_path}"]
    if optimizer_path != "torch.optim.AdamW":
        overrides.append("~optimizer.fused")  # torchao's optimizers take no `fused`
    if tokens is not None:
        overrides.append(f"adapt.total_tokens={tokens}")
    if not evaluate:  # held-out perplexity and the speed table are most of a short run's time
        overrides += ["heldout=null", "speed=null"]
    command = ["tune", "run", "adapt_prune_recipe", "--config", "smollm2/135M_adapt", *overrides]
    proc, peak_bytes, wall = run_with_peak_rss(command, threads)
    record = json.loads((out / "run_record.json").read_text())
    rows = [r for r in record["train_log"] if "loss" in r]
    trained = [h for h in record.get("heldout_log", []) if h["event"] == "trained"]
    return {
        "command": " ".join(command),
        "seconds_wall": wall,
        "peak_rss_bytes": peak_bytes,
        "losses": [r["loss"] for r in rows],
        "mean_loss_by_stage": {
            str(s): statistics.mean(r["loss"] for r in rows if r["stage"] == s) for s in sorted({r["stage"] for r in rows})
        },
        "heldout_ppl_after_training": trained[-1]["ppl"] if trained else None,
        "params_after": record["params_after"],
        "stdout": proc.stdout.splitlines(),
    }


def compare(results: Dict[str, Any]) -> Dict[str, Any]:
    """Each low-bit optimizer against fp32 AdamW: state bytes, peak RSS, loss, perplexity."""
    base_state = results["state"].get("torch.optim.AdamW")
    base_run = results["runs"].get("torch.optim.AdamW")
    out: Dict[str, Any] = {}
    for name in OPTIMIZERS[1:]:
        entry: Dict[str, Any] = {}
        state, run = results["state"].get(name), results["runs"].get(name)
        if state and base_state:
            entry["state_bytes_ratio"] = state["state_bytes"] / base_state["state_bytes"]
        if run and base_run:
            entry["peak_rss_ratio"] = run["peak_rss_bytes"] / base_run["peak_rss_bytes"]
            n = min(len(run["losses"]), len(base_run["losses"]))
            gaps = [a - b for a, b in zip(run["losses"][:n], base_run["losses"][:n])]
            entry["mean_loss_difference"] = statistics.mean(gaps)
            entry["max_abs_loss_difference"] = max(abs(g) for g in gaps)
            entry["last_stage_mean_loss"] = {"fp32": list(base_run["mean_loss_by_stage"].values())[-1],
                                             name: list(run["mean_loss_by_stage"].values())[-1]}
            if run["heldout_ppl_after_training"] and base_run["heldout_ppl_after_training"]:
                entry["heldout_ppl_ratio"] = {
                    t: run["heldout_ppl_after_training"][t] / base_run["heldout_ppl_after_training"][t]
                    for t in base_run["heldout_ppl_after_training"]
                }
        if entry:
            out[name] = entry
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS[:2]), choices=OPTIMIZERS)
    parser.add_argument("--tokens", type=int, default=None, help="training tokens (default: the demo's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-eval", dest="evaluate", action="store_false",
                        help="skip the runs' held-out perplexity and speed measurements")
    parser.add_argument("--fresh", action="store_true", help="redo runs already in the results file")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results: Dict[str, Any] = {"state": {}, "runs": {}}
    if args.out.is_file() and not args.fresh:
        results.update(json.loads(args.out.read_text()))
    results["command"] = "python benchmarks/lowbit_optimizer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["settings"] = {"tokens": args.tokens or "the demo's", "threads": args.threads, "evaluate": args.evaluate,
                           "model": "SmolLM2-135M-Instruct, fp32, config smollm2/135M_adapt"}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["comparison"] = compare(results)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    for name in args.optimizers:
        results["state"][name] = state_bytes(name)
        print(f"{name}: state {results['state'][name]['state_bytes'] / 1e6:.1f} MB", flush=True)
        save()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.optimizers:
            if name in results["runs"]:
                print(f"{name}: demo run done earlier, kept", flush=True)
                continue
            print(f"{name}: demo run ...", flush=True)
            results["runs"][name] = demo_run(name, args.tokens, args.threads, Path(tmp), args.evaluate)
            run = results["runs"][name]
            print(f"{name}: {run['seconds_wall']:.0f} s, peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB, "
                  f"held-out {run['heldout_ppl_after_training']}", flush=True)
            save()
    save()
    print(json.dumps(results["comparison"], indent=1))


if __name__ == "__main__":
    main()
