"""The one-shot GPU check: its sections, each in a fresh process with its own timeout.

    python benchmarks/gpu_check.py                  # on the GPU machine (benchmarks/gpu_check.sh runs this)
    python benchmarks/gpu_check.py --dry-run        # the same sections CPU-sized, here

Sections, in order (the first is the one that matters most; a section that fails or times
out is recorded as such and the next one runs):

recipe      gpu_recipe_run.py  ``tune run adapt_prune_recipe --config smollm2/135M_adapt device=cuda
                               dtype=bf16 compile=True`` through two stages, export, transformers load.
recipe_fp8  gpu_recipe_fp8.py  the same with enable_fp8_training=True and torchao's AdamWFp8 (sm89+).
recipe_distill gpu_recipe_distill.py  the same with distill.enabled=True and torchao's AdamW8bit.
prune_loop  gpu_prune_loop.py  50 adaptive iterations on the Llama-3.1-8B shape (target ≤ 60 s),
                               recovery tokens/s ours ÷ stock (target ≥ 0.97), peak memory.
compile     gpu_compile.py     first-step compile after a resize vs the uniform model's.
fp8         gpu_fp8.py         tokens/s with and without torchao float8 training on pruned widths.

Every section merges its record into the results file (``benchmarks/results/gpu_check.json``
on a GPU, a copy in ``$OUT`` when set; ``WORK/gpu_check.json`` for a dry run) under
``sections.NAME``, with its status (ok, checks_failed, skipped, failed, timeout), seconds,
timeout and a one-line summary, so a section that fails loses none of the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ROOT, machine_info  # noqa: E402

# name -> (module, timeout in seconds on the GPU, on the CPU dry run)
SECTIONS = {
    "recipe": ("gpu_recipe_run", 200, 900),  # H200, 2026-11-30: 92 s
    "recipe_fp8": ("gpu_recipe_fp8", 200, 60),  # not run on a GPU yet
    "recipe_distill": ("gpu_recipe_distill", 200, 900),  # not run on a GPU yet
    "prune_loop": ("gpu_prune_loop", 150, 600),  # 80 s
    "compile": ("gpu_compile", 200, 600),  # 103 s for dynamic + static; its dynamic repeat adds about 40 s
    "fp8": ("gpu_fp8", 180, 60),  # > 120 s (its compiled FP8 step alone: 73 s)
}
BUDGET_S = 530  # all sections together on the GPU (gpu_check.sh passes GPU_CHECK_BUDGET less its install)
MIN_SECTION_S = 20  # a section given less than this is skipped, not started
ASSETS = ROOT / ".whl" / "assets"


def _pump(stream, tail: deque) -> None:
    """Echo a section's output as it comes and keep its last lines for the record."""
    for line in iter(stream.readline, ""):
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip("\n"))
    stream.close()


def run_section(name: str, timeout: float, args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Run one section in its own process group; its record with status, seconds and summary."""
    out_json = work / f"section_{name}.json"
    out_json.unlink(missing_ok=True)
    (work / name / "partial.json").unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--section-out", str(out_json),
           "--work", str(work / name), "--assets", str(args.assets)] + (["--dry-run"] if args.dry_run else [])
    tail: deque = deque(maxlen=40)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, tail), daemon=True)
    pump.start()
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the section's children too (a `tune run`, compile workers)
        proc.wait()
        rc, status = None, "timeout"
    pump.join(timeout=10)
    seconds = time.perf_counter() - t0
    record: Dict[str, Any] = {"status": status, "seconds": round(seconds, 1), "timeout_s": round(timeout),
                              "returncode": rc}
    if status == "ok" and out_json.is_file():
        result = json.loads(out_json.read_text())
        record["status"] = result.pop("status", "ok")
        record["summary"] = result.pop("summary", "")
        record["result"] = result
    else:
        if status == "ok":
            record["status"] = "failed"
        errors = [line for line in tail if "Error" in line and not line.startswith("subprocess.CalledProcessError")]
        record["summary"] = f"{record['status']} after {seconds:.0f}s: " + (
            errors[-1] if errors else tail[-1] if tail else "no output")[:500]
        record["output_tail"] = list(tail)
        partial = work / name / "partial.json"  # what a section keeps as it goes (gpu_compile, gpu_fp8)
        if partial.is_file():
            record["partial"] = json.loads(partial.read_text())
    return record


def open_record(path: Path, mode: str) -> Dict[str, Any]:
    """The results file's record to merge into: kept when it holds sections of the same mode."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("mode") == mode and isinstance(old.get("sections"), dict):
            return old
    return {"mode": mode, "sections": {}}


def write_record(record: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    out = os.environ.get("OUT")
    if out and Path(out).is_dir() and Path(out).resolve() != path.parent.resolve():
        (Path(out) / path.name).write_text(path.read_text())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU-sized sections (also CPU_DRY_RUN=1)")
    p.add_argument("--only", default="", help=f"comma list of sections (default: all of {', '.join(SECTIONS)})")
    p.add_argument("--budget", type=float, default=None, help=f"seconds for all sections (default {BUDGET_S} on a "
                   "GPU, none for a dry run)")
    p.add_argument("--out", default=None, help="results file (default: benchmarks/results/gpu_check.json on a GPU, "
                   "WORK/gpu_check.json for a dry run)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--assets", type=Path, default=ASSETS, help="carried assets (benchmarks/gpu_assets.py)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # one section, in this process
    p.add_argument("--section-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dry_run = args.dry_run or os.environ.get("CPU_DRY_RUN") == "1"
    device, dtype = ("cpu", "fp32") if args.dry_run else ("cuda", "bf16")
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)

    if args.section:  # a section's own process
        module = importlib.import_module(SECTIONS[args.section][0])
        result = module.run(device, dtype, args.dry_run, work, args.assets, lambda s: print(s, flush=True))
        Path(args.section_out).write_text(json.dumps(result, indent=2, default=float))
        return 0

    names = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; one of {list(SECTIONS)}")
    mode = "cpu_dry_run" if args.dry_run else "gpu"
    out = Path(args.out) if args.out else (work / "gpu_check.json" if args.dry_run else
                                           ROOT / "benchmarks" / "results" / "gpu_check.json")
    record = open_record(out, mode)
    record.update(command=" ".join(["python3", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
                  machine=machine_info(device), assets=str(args.assets))
    budget = args.budget if args.budget is not None else (None if args.dry_run else BUDGET_S)
    started = time.perf_counter()
    summaries = []
    for name in names:
        module, gpu_timeout, cpu_timeout = SECTIONS[name]
        timeout = cpu_timeout if args.dry_run else gpu_timeout
        if budget is not None:
            timeout = min(timeout, budget - (time.perf_counter() - started))
        print(f"\n== gpu check: {name} ({module}.py, timeout {timeout:.0f}s)", flush=True)
        if timeout < MIN_SECTION_S:
            entry = {"status": "skipped", "seconds": 0, "timeout_s": round(timeout),
                     "summary": f"skipped: {timeout:.0f}s of the {budget:.0f}s budget left"}
        else:
            entry = run_section(name, timeout, args, work)
        entry["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record["sections"][name] = entry
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_record(record, out)
        line = f"[{name}] {entry['status']} in {entry['seconds']:.0f}s: {entry['summary']}"
        summaries.append(line)
        print(line, flush=True)
    print("\nGPU check summary" + (" (CPU dry run)" if args.dry_run else ""))
    for line in summaries:
        print("  " + line)
    print(f"wrote {out}")
    return 0 if all(record["sections"][n]["status"] in ("ok", "skipped") for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
