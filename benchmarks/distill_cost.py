"""What distillation costs: training tokens/s and peak memory with and without the teacher.

Two measurements, side by side in one run, into ``benchmarks/results/distill_cost.json``:

* **recipe**: the real ``tune run adapt_prune_recipe --config smollm2/135M_adapt`` on the real
  SmolLM2-135M-Instruct (one small prune step, then ``--steps`` training steps), once with
  ``distill.enabled=false`` and once with ``true``, one process at a time: median training
  tokens/s over the steps after the first few, and each process's peak RSS.
* **loss**: the loss alone at SmolLM2's vocabulary (49,152) and the recipe's batch, forward +
  backward from the final hidden states: torchtune's ``CEWithChunkedOutputLoss`` +
  ``ForwardKLWithChunkedOutputLoss`` fed the teacher's logits for the whole sequence (what
  torchtune's KD recipe does) against ours (``DistillationLoss``: teacher head one chunk at a
  time, closed-form gradient), and plain cross-entropy for reference: peak memory growth.

    python benchmarks/distill_cost.py              # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, run_with_peak_rss  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "distill_cost.json"

def recipe_run(distill: bool, steps: int, threads: int, work: Path) -> Dict[str, Any]:
    out = work / ("distill" if distill else "plain")
    overrides = [
        f"output_dir={out}", f"distill.enabled={str(distill).lower()}", "adapt.stages=1", "adapt.steps_per_stage=1",
        f"adapt.total_steps={steps}", "adapt.total_tokens=null", "pruning.method.target_sparsity=0.05",
        "pruning.calibration.num_samples=8", f"adapt.checkpoint_every_n_steps={steps}", "heldout=null", "speed=null",
    ]
    command = ["tune", "run", "adapt_prune_recipe", "--config", "smollm2/135M_adapt", *overrides]
    _, peak_bytes, wall = run_with_peak_rss(command, threads)
    rows = [r for r in json.loads((out / "run_record.json").read_text())["train_log"] if "loss" in r]
    speeds = [r["tokens_per_second_per_gpu"] for r in rows[3:]]  # the first steps warm up
    return {
        "distill": distill,
        "command": " ".join(command),
        "steps": len(rows),
        "tokens_per_second_median": statistics.median(speeds),
        "peak_rss_bytes": peak_bytes,
        "seconds_wall": wall,
    }


def loss_memory(batch: int, seq_len: int, chunks: int, variant: str) -> Dict[str, Any]:
    """Peak memory growth of one loss forward + backward (``variant``: see module doc).

    Call it in a fresh process per variant: freed memory a process already holds is reused
    without raising its resident peak, so variants measured one after another would hide
    each other's costs.
    """
    from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss

    from adapt_prune_tune.distillation import DistillationLoss, Teacher
    from adapt_prune_tune.speed import peak_memory_growth

    vocab, dim = 49152, 576
    torch.manual_seed(0)
    head_s = torch.nn.Linear(dim, vocab, bias=False)
    head_t = torch.nn.Linear(dim, vocab, bias=False).requires_grad_(False)
    h_s = torch.randn(batch, seq_len, dim, requires_grad=True)
    h_t = torch.randn(batch, seq_len, dim)
    labels = torch.randint(0, vocab, (batch, seq_len))
    ce, fkl = CEWithChunkedOutputLoss(num_output_chunks=chunks), ForwardKLWithChunkedOutputLoss(num_output_chunks=chunks)

    class _HeadOnlyTeacher(torch.nn.Module):
        """A stand-in teacher whose forward is its final hidden state (the pass itself costs the same either way)."""

        def __init__(self) -> None:
            super().__init__()
            self.norm, self.output = torch.nn.Identity(), head_t

        def forward(self, tokens: torch.Tensor) -> Any:
            return self.unembed(h_t)

    teacher = Teacher(_HeadOnlyTeacher())
    ours = DistillationLoss(teacher, alpha=0.5, temperature=1.0, num_output_chunks=chunks)

    def torchtune_kd() -> None:
        student = [head_s(c) for c in h_s.chunk(chunks, dim=1)]
        with torch.no_grad():
            t_logits = [head_t(c) for c in h_t.chunk(chunks, dim=1)]  # the whole sequence at once
        (0.5 * ce(student, labels) + 0.5 * fkl(student, t_logits, labels)).backward()

    def our_kd() -> None:
        student = [head_s(c) for c in h_s.chunk(chunks, dim=1)]
        teacher.set_inputs(labels)
        ours(student, labels).backward()

    def plain_ce() -> None:
        ce([head_s(c) for c in h_s.chunk(chunks, dim=1)], labels).backward()

    fn = {"ce_only": plain_ce, "torchtune_ce_plus_forward_kl": torchtune_kd, "ours": our_kd}[variant]
    fn()  # allocator and kernels warm, grads allocated: measured below is the step's own peak
    h_s.grad = None
    head_s.zero_grad(set_to_none=False)
    with peak_memory_growth(torch.device("cpu")) as m:
        fn()
    return {"peak_growth_bytes": m["growth_bytes"], "measure": m["measure"]}


LOSS_VARIANTS = ("ce_only", "torchtune_ce_plus_forward_kl", "ours")


def loss_memory_all(batch: int, seq_len: int, chunks: int, threads: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {"batch": batch, "seq_len": seq_len, "vocab": 49152, "chunks": chunks}
    for variant in LOSS_VARIANTS:
        proc = subprocess.run(
            [sys.executable, __file__, "--loss-variant", variant, "--threads", str(threads)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ours_vs_torchtune"] = out["ours"]["peak_growth_bytes"] / out["torchtune_ce_plus_forward_kl"]["peak_growth_bytes"]
    out["ours_vs_ce_only"] = out["ours"]["peak_growth_bytes"] / out["ce_only"]["peak_growth_bytes"]
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-recipe", action="store_true")
    parser.add_argument("--loss-variant", choices=LOSS_VARIANTS, help=argparse.SUPPRESS)  # one fresh process each
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.loss_variant:
        print(json.dumps(loss_memory(2, 256, 8, args.loss_variant)))
        return
    result: Dict[str, Any] = {
        "command": "python benchmarks/distill_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"processor": platform.machine(), "torch": torch.__version__, "threads": args.threads},
        "loss": loss_memory_all(batch=2, seq_len=256, chunks=8, threads=args.threads),
    }
    if not args.skip_recipe:
        with tempfile.TemporaryDirectory(prefix="apt-distill-cost-") as tmp:
            runs: List[Dict[str, Any]] = [recipe_run(d, args.steps, args.threads, Path(tmp)) for d in (False, True)]
        plain, kd = runs
        result["recipe"] = {
            "runs": runs,
            "tokens_per_second_ratio": kd["tokens_per_second_median"] / plain["tokens_per_second_median"],
            "peak_rss_ratio": kd["peak_rss_bytes"] / plain["peak_rss_bytes"],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
