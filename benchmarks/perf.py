"""Performance of the prune loop and of recovery training, measured side by side.

Every figure is a ratio of two things timed in the same run (same process where possible,
alternating subprocesses otherwise), so a shared or throttled machine moves both sides
alike; medians over repeats. One measurement per file, over a shared harness
(``_harness.py``: timing, peak memory per phase, subprocesses, the results file):

    python benchmarks/perf.py [--quick] [--only overhead,recipe,...] [--merge]

Sections (JSON keys of benchmarks/results/perf.json):

overhead      perf_overhead.py    one adaptive iteration ÷ one plain forward+backward over the
                                  same calibration tokens. Target ≤ 1.1.
recipe        perf_recipe.py      the same through the recipe's path (rebuild via the stock
                                  ``_setup_model``, AdamW moments carried, FSDP2 re-shard).
profile       perf_profile.py     where an iteration's time goes (parts, cProfile, torch.profiler).
scaling       perf_scaling.py     seconds per iteration vs model size and vs calibration tokens.
memory        perf_memory.py      peak RSS of a prune step vs a training step. Target: no higher.
memory_small  perf_memory.py      the same with small activations (key memory_small_activations).
throughput    perf_throughput.py  recovery tokens/s, our recipe ÷ the stock recipe on the same
                                  widths. Target ≥ 0.97.
compile       perf_compile.py     compile: True after each resize vs the uniform model.
share         perf_share.py       prune stages' share of a real SmolLM2 run, and at paper budgets.

The GPU check is benchmarks/gpu_check.sh (benchmarks/gpu_check.py and its gpu_*.py sections).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_compile  # noqa: E402
import perf_memory  # noqa: E402
import perf_overhead  # noqa: E402
import perf_profile  # noqa: E402
import perf_recipe  # noqa: E402
import perf_scaling  # noqa: E402
import perf_share  # noqa: E402
import perf_throughput  # noqa: E402
from _harness import RESULTS, open_results, print_table, save_results  # noqa: E402


class Section(NamedTuple):
    key: str  # where it lands in perf.json
    title: str
    run: Callable[..., Dict[str, Any]]  # run(quick, work, log)


# In the order they run, whatever the order of --only.
SECTIONS: Dict[str, Section] = {
    "overhead": Section("overhead", "prune-step overhead (single process: calibrate+score+plan+surgery vs fwd+bwd)",
                        perf_overhead.run),
    "recipe": Section("recipe", "prune-step overhead through the recipe (rebuild via _setup_model, AdamW carried)",
                      perf_recipe.run),
    "profile": Section("profile", "profile of one iteration (SmolLM2-135M)", perf_profile.run),
    "scaling": Section("scaling", "scaling", perf_scaling.run),
    "memory": Section("memory", "peak memory: prune step vs training step (maxrss, subprocesses)", perf_memory.run),
    "memory_small": Section("memory_small_activations", "peak memory, small activations (short windows + activation "
                            "checkpointing): the resize's share", perf_memory.run_small_activations),
    "throughput": Section("throughput", "recovery-training throughput: ours vs stock full_finetune_distributed, same "
                          "widths", perf_throughput.run),
    "compile": Section("compile", "compile: True (12-layer model; inductor on CPU)", perf_compile.run),
    "share": Section("share", "prune share of a real Adapt-Accel run (SmolLM2-135M, demo budget)", perf_share.run),
}
DEFAULT = ["overhead", "recipe", "profile", "scaling", "memory", "throughput", "share"]
NOT_QUICK = ["memory_small", "compile"]


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller budgets (~10 min on 2 cores)")
    p.add_argument("--only", default="", help="comma list of sections (default: all; compile and memory_small "
                   "are skipped by --quick)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--merge", action="store_true", help="update the sections run in an existing --out file")
    p.add_argument("--share-from", default=None, help="share: a finished SmolLM2 run's output_dir instead of a new run")
    p.add_argument("--baseline", default=None, help="recipe: a saved copy of the code (a directory holding "
                   "adapt_prune_tune/ and adapt_prune_recipe.py) whose 2-process run alternates with the working "
                   "tree's (key tiny_2proc_before)")
    args = p.parse_args(argv)
    sections = [s for s in args.only.split(",") if s] or DEFAULT + ([] if args.quick else NOT_QUICK)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; one of {list(SECTIONS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="perf_"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    result = open_results(out, args.merge, " ".join([Path(sys.executable).name, *sys.argv]), sections, args.quick)
    started = time.time()

    def log(s):
        print(s, flush=True)

    for name, section in SECTIONS.items():
        if name not in sections:
            continue
        log(f"== {section.title}")
        extra = {"run_dir": args.share_from} if name == "share" else {}
        if name == "recipe" and args.baseline:
            extra = {"baseline": str(Path(args.baseline).resolve())}
        result[section.key] = section.run(args.quick, work, log, **extra)
        save_results(result, out, started)
    save_results(result, out, started)
    print_table(result["targets"])
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
