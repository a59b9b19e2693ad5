"""Whole recipe runs in fresh processes: ours, or torchtune's stock recipe on the same widths.

``our_run`` runs ``adapt_prune_recipe`` on a config; ``stock_run`` runs the stock
``full_finetune_distributed`` on a model with a finished run's widths (its checkpoint,
or another one). Each returns the per-step rows of the DiskLogger and dynamo's counters
at exit. Run as a script, this file is that subprocess:

    python benchmarks/_runs.py ours|stock CONFIG.yaml
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from _harness import last_json_line, median, run_cmd, script_cmd
from _recipe import recipe_config, stock_config, write_config
from _shapes import model_dir_for


def parse_disk_log(log_dir: Path) -> List[Dict[str, float]]:
    """Per-step rows of torchtune's DiskLogger files (``Step N | key:value ...``)."""
    rows = []
    for f in sorted(Path(log_dir).glob("*.txt")):
        for line in f.read_text().splitlines():
            m = re.match(r"Step (\d+) \| (.*)", line)
            if not m:
                continue
            row: Dict[str, float] = {"step": int(m.group(1))}
            for key, value in re.findall(r"(\S+?):(\S+)", m.group(2)):
                try:
                    row[key] = float(value.replace("tensor(", "").rstrip(")").rstrip(","))
                except ValueError:
                    pass
            rows.append(row)
    return rows


def steady_tokens_per_second(rows: List[Dict[str, float]], warmup: int = 2) -> Dict[str, Any]:
    """Median tokens/s after the first ``warmup`` steps (allocator, lazy inits, compile)."""
    tps = [r["tokens_per_second_per_gpu"] for r in rows if "tokens_per_second_per_gpu" in r]
    steady = tps[warmup:] if len(tps) > warmup else tps
    return {"median": median(steady), "steps": len(tps), "warmup_dropped": min(warmup, len(tps)),
            "values": [round(v, 2) for v in tps]}


def dynamo_counters(stdout: str) -> Dict[str, Any]:
    try:
        return last_json_line(stdout, "PERF_COUNTERS")
    except RuntimeError:
        return {}


def our_run(shape: str, work: Path, tag: str, steps: int, compile_: bool, env=None, **over) -> Dict[str, Any]:
    """One stage of one prune step then ``steps`` training steps (defaults; ``over`` changes them)."""
    model_dir = model_dir_for(shape, work)
    out = work / f"ours_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = {
        "adapt.stages": 1, "adapt.steps_per_stage": 1, "adapt.total_tokens": None, "adapt.total_steps": steps,
        "adapt.checkpoint_every_n_steps": steps, "compile": compile_, "tokenizer.max_seq_len": 128,
        "pruning.method.target_sparsity": 0.2,
    }
    overrides.update(over)
    cfg = recipe_config(model_dir, out, shape, **overrides)
    path = write_config(cfg, work / f"ours_{tag}.yaml")
    proc, wall = run_cmd(script_cmd(Path(__file__), "ours", str(path)), cwd=work, env=env)
    record = json.loads((out / "run_record.json").read_text())
    return {"cfg": cfg, "out": out, "record": record, "wall": wall, "stderr": proc.stderr, "stdout": proc.stdout,
            "rows": parse_disk_log(out / "logs"), "counters": dynamo_counters(proc.stdout)}


def stock_run(our: Dict[str, Any], work: Path, tag: str, steps: int, compile_: bool, arch_dict=None,
              ckpt_dir: Optional[Path] = None, env=None) -> Dict[str, Any]:
    """The stock recipe, same settings as ``our``, on ``our``'s final widths and weights by default."""
    import torch
    from safetensors.torch import load_file

    out = work / f"stock_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    if ckpt_dir is None:
        ckpt_dir = work / f"stock_ckpt_{tag}"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        torch.save(load_file(str(our["out"] / "final" / "model.safetensors")), ckpt_dir / "model.pt")
    arch_dict = arch_dict or json.loads((our["out"] / "final" / "arch.json").read_text())
    cfg = stock_config(our["cfg"], arch_dict, ckpt_dir, out, steps)
    cfg.compile = compile_
    path = write_config(cfg, work / f"stock_{tag}.yaml")
    proc, wall = run_cmd(script_cmd(Path(__file__), "stock", str(path)), cwd=work, env=env)
    return {"out": out, "wall": wall, "stderr": proc.stderr, "stdout": proc.stdout,
            "rows": parse_disk_log(out / "logs"), "counters": dynamo_counters(proc.stdout)}


def _run_recipe_here(which: str, cfg_path: Path) -> None:
    """Run a recipe's main in this process and print dynamo counters at exit."""
    import atexit

    def report():
        try:
            from torch._dynamo.utils import counters

            print("PERF_COUNTERS " + json.dumps({k: dict(v) for k, v in counters.items()}), flush=True)
        except Exception:
            pass

    atexit.register(report)
    import adapt_prune_recipe as apr

    sys.argv = [which, "--config", str(cfg_path)]
    apr._single_process_env()
    if which == "ours":
        apr.main()
    else:  # torchtune's recipe, loaded unchanged except CPU-safe memory stats (see adapt_prune_recipe)
        sys.exit(apr._stock.recipe_main())


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("ours", "stock"):
        raise SystemExit("usage: python benchmarks/_runs.py ours|stock CONFIG.yaml")
    _run_recipe_here(sys.argv[1], Path(sys.argv[2]))
