"""What every measurement in ``benchmarks/perf_*.py`` and ``benchmarks/gpu_*.py`` shares.

* Timing: ``sync`` before reading a clock (GPU work is asynchronous), ``median`` of
  repeated or alternating runs (a shared CPU moves both sides of a ratio alike, and
  medians ignore the odd slow repeat), ``timed_calls`` to time the parts of a call
  without copying it (the measured code runs unchanged, its inner calls wrapped).
* Peak memory per phase: process RSS peaks on Linux (``VmHWM`` can be reset between
  phases), ``torch.cuda.max_memory_allocated`` on a GPU.
* Subprocesses: a fresh process per run where a measurement needs one (peak RSS,
  compile caches, a recipe's ``main``), with the repository on ``PYTHONPATH``.
* The results file: sections merge into ``benchmarks/results/perf.json`` under their
  keys, with the targets table recomputed from every section present.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "perf.json"


# --------------------------------------------------------------------------- timing


def sync(device) -> None:
    """Wait for queued GPU work (a no-op on CPU), so that a clock read covers it."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median(xs: Iterable[Optional[float]]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


class Timed:
    """A callable that runs ``fn`` and adds its wall time to ``seconds``.

    ``after`` runs inside the timed span (e.g. a device sync), so asynchronous work
    the call queued is charged to it.
    """

    def __init__(self, fn: Callable, after: Optional[Callable[[], None]] = None) -> None:
        self.fn, self.after, self.seconds = fn, after, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            result = self.fn(*args, **kwargs)
            if self.after is not None:
                self.after()
            return result
        finally:
            self.seconds += time.perf_counter() - t0


@contextlib.contextmanager
def timed_calls(*targets: Tuple[Any, str], after: Optional[Callable[[], None]] = None) -> Iterator[Dict[str, float]]:
    """Time calls to ``getattr(obj, name)`` for each ``(obj, name)`` inside the block.

    Yields a dict filled with each name's seconds when the block ends. Module functions
    are looked up by the code that calls them at call time, so wrapping the attribute
    times the calls of an unchanged caller (``AdaptivePruner.measure_and_plan``'s
    ``calibrate``, a recipe's ``_setup_model``).
    """
    seconds: Dict[str, float] = {}
    saved = []
    for obj, name in targets:
        own = name in vars(obj)  # an instance's bound method is not in its __dict__
        original = getattr(obj, name)
        saved.append((obj, name, own, original))
        setattr(obj, name, Timed(original, after))
    try:
        yield seconds
    finally:
        for obj, name, own, original in saved:
            seconds[name] = getattr(obj, name).seconds
            if own:
                setattr(obj, name, original)
            else:
                delattr(obj, name)


# --------------------------------------------------------------------------- memory


def maxrss_mb() -> float:
    """This process's peak RSS since it started (getrusage), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Linux: writing 5 to ``/proc/self/clear_refs`` restarts the peak-RSS counter (VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_memory(device) -> None:
    """Start a phase: the GPU allocator's peak (on a GPU) or the RSS peak (on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory_gb(device) -> float:
    """The phase's peak: GPU memory allocated by tensors, or the process's RSS peak."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = proc_status_mb("VmHWM")
    return (maxrss_mb() if math.isnan(peak) else peak) / 1024.0


def peak_memory_kind(device) -> str:
    import torch

    return "torch.cuda.max_memory_allocated" if torch.device(device).type == "cuda" else "process peak RSS"


# --------------------------------------------------------------------------- machine


def machine_info(device: str = "cpu") -> Dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "device": device,
    }
    try:
        import torchtune

        info["torchtune"] = torchtune.__version__
    except Exception:  # pragma: no cover - reported, not needed
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except Exception:
        pass
    return info


def strip_private(d: Any) -> Any:
    """Drop ``_``-prefixed keys (live objects a caller may reuse) before writing JSON."""
    if isinstance(d, dict):
        return {k: strip_private(v) for k, v in d.items() if not str(k).startswith("_")}
    if isinstance(d, list):
        return [strip_private(v) for v in d]
    return d


# --------------------------------------------------------------------------- subprocesses


def subprocess_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # PERF_RECIPE_DIR: a directory holding another adapt_prune_recipe.py (A/B against a saved copy)
    first = (extra or {}).get("PERF_RECIPE_DIR", os.environ.get("PERF_RECIPE_DIR"))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (first, str(ROOT), str(ROOT / "recipes"), env.get("PYTHONPATH")) if p
    )
    env.update(extra or {})
    return env


def run_cmd(cmd: List[str], cwd: Path, env=None, timeout: int = 3600) -> Tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` to completion; its wall time; raises with the output's tail if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc, wall


# Runs a command and prints its peak RSS (the child's, not this wrapper's).
_PEAK_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def run_with_peak_rss(cmd: List[str], threads: int) -> Tuple[subprocess.CompletedProcess, int, float]:
    """Run ``cmd`` with ``threads`` torch threads; its output, peak RSS in bytes and wall seconds.

    The peak is the command's own (``RUSAGE_CHILDREN`` of a one-line wrapper), not this process's.
    Raises with the output's tail if it fails.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak_kb = int(next(l.split()[1] for l in proc.stdout.splitlines() if l.startswith("PEAK_RSS_KB")))
    proc.stdout = "\n".join(l for l in proc.stdout.splitlines() if not l.startswith("PEAK_RSS_KB"))
    return proc, peak_kb * 1024, wall


def override_args(overrides: Dict[str, Any]) -> List[str]:
    """``key=value`` arguments of ``tune run`` as OmegaConf reads them (``true``, ``null``)."""

    def value(v: Any) -> str:
        if v is None:
            return "null"
        return str(v).lower() if isinstance(v, bool) else str(v)

    return [f"{k}={value(v)}" for k, v in overrides.items()]


def script_cmd(script: Path, *args: str) -> List[str]:
    """``python SCRIPT ARGS``: a benchmark file run as its own subprocess worker."""
    return [sys.executable, str(script), *args]


def last_json_line(text: str, tag: str) -> Dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith(tag + " ")]
    if not lines:
        raise RuntimeError(f"no {tag} line in worker output:\n{text[-3000:]}")
    return json.loads(lines[-1][len(tag) + 1:])


# --------------------------------------------------------------------------- results file

# figure -> (comparison, limit); the README's targets.
TARGETS = {
    "prune_step_overhead": ("<=", 1.1),
    "recipe_prune_step_overhead": ("<=", 1.1),
    "throughput_ratio": (">=", 0.97),
    "prune_share_paper_budget": ("<=", 0.03),
    "prune_peak_extra_mb": ("<=", 0.0),
    "compile_ratio_after_resize": ("<=", 1.0),
}


def open_results(path: Path, merge: bool, command: str, sections: List[str], quick: bool) -> Dict[str, Any]:
    """The results dict a run fills: the existing file's sections kept when ``merge``.

    A merged file records each earlier run's command, sections and machine in
    ``merged_runs``; the top-level ``command``/``machine`` are the latest run's.
    """
    result: Dict[str, Any] = {}
    if merge and path.is_file():
        result = json.loads(path.read_text())
        result.setdefault("merged_runs", []).append(
            {"command": result.get("command"), "sections": result.get("sections"), "machine": result.get("machine")})
    result.update({"command": command, "machine": machine_info(), "quick": quick, "sections": sections})
    return result


def save_results(result: Dict[str, Any], path: Path, started: float) -> None:
    result["seconds"] = time.time() - started
    result["machine"]["load_average_end"] = os.getloadavg()
    result["targets"] = targets_table(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strip_private(result), indent=2, default=float))


def targets_table(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per figure with a target, from whichever sections ``result`` holds."""
    rows = []

    def add(name, value, key, where):
        op, limit = TARGETS[key]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        met = value <= limit if op == "<=" else value >= limit
        rows.append({"figure": name, "value": value, "target": f"{op} {limit}", "met": bool(met), "where": where})

    for shape, r in result.get("overhead", {}).items():
        add(f"prune-step overhead ({shape})", r["ratio"], "prune_step_overhead", "overhead")
    for tag, r in result.get("recipe", {}).items():
        if tag.endswith("_before"):  # a saved copy of the code, measured side by side (--baseline)
            continue
        add(f"recipe prune-step overhead ({tag})", r["ratio"], "recipe_prune_step_overhead", "recipe")
    for shape, r in result.get("throughput", {}).items():
        add(f"recovery throughput ours/stock ({shape})", r["ratio"], "throughput_ratio", "throughput")
    if "share" in result:
        ex = result["share"]["extrapolation"]
        add("prune share, paper-scale budget (Qwen 0.5B config)",
            ex["qwen2.5_0.5B_config(K=50,C=512x64,T=1e9,N=5)"], "prune_share_paper_budget", "share")
        rows.append({"figure": "prune share, demo budget (measured)", "value": result["share"]["share_of_wall"],
                     "target": "<= 0.03", "met": result["share"]["share_of_wall"] <= 0.03, "where": "share"})
    if "compile" in result:
        add(f"first-step compile after a resize / uniform ({result['compile'].get('shape', '?')}, compile_widths "
            "dynamic)", result["compile"]["compile_ratio_after_resize"], "compile_ratio_after_resize", "compile")
    for section in ("memory", "memory_small_activations"):
        for r in result.get(section, {}).get("runs", []):
            if "prune_extra_mb" in r:
                add(f"prune-step peak RSS above training ({r.get('variant', 'default')}, calib batch "
                    f"{r['calib_batch_size']}" + (f", {r['order']})" if "order" in r else ")"),
                    r["prune_extra_mb"], "prune_peak_extra_mb", section)
    return rows


def print_table(rows: List[Dict[str, Any]]) -> None:
    w = max([len(r["figure"]) for r in rows] + [10])
    print(f"\n{'figure'.ljust(w)}  {'value':>10}  {'target':>8}  met")
    for r in rows:
        v = r["value"]
        vs = f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        print(f"{r['figure'].ljust(w)}  {vs:>10}  {r['target']:>8}  {'yes' if r['met'] else 'NO'}")
