"""GPU check, ``compile: True`` across resizes (Llama-3.2-1B shape, random bf16 weights).

The recipe's sequence, in one process, once per ``compile_widths``: layers compiled one by
one as the stock ``_setup_model`` does (``training.compile_model``, loss compiled too),
training steps on the uniform model with torchtune's own dynamo settings (the baseline: what the
stock recipe compiles); then dynamo reset and configured as the recipe does
(``_configure_compile_widths``, ``_fit_compile_caches``) and two prune stages as ``_prune_stage``
runs them (``static`` resets dynamo at each; one adaptive step each, to 10 % and 20 % with
``round_to=64``, run eagerly), each followed by the resize, the new model compiled and training
steps. Figure: each stage's first training step's
excess over a steady step ÷ the uniform model's (target ≤ 1 after each resize).

Each trajectory runs in its own process with its own empty inductor and Triton caches,
after a warm-up compile: in one process the second trajectory's uniform compile would find
the first one's kernels cached (and the first would carry the process's one-time costs),
which skews the very ratio measured. One compile of the same graph varies by tens of percent
from process to process (on the H200, 8.2 s and 6.6 s for the same uniform model), so the
default ``compile_widths`` runs twice, first and last, and the figure is the median of its
trajectories' ratios (each against the uniform compile in its own process). Each
trajectory's record is kept as it ends (``partial.json``), so a section stopped at its
timeout still reports the ones that finished.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

from _shapes import build_shape, calibration_batches
from _training import adamw, chunked_loss, rebuild, tokens_per_second

SIZES = {
    "gpu": dict(shape="llama3_2_1b", calib=(8, 512), calib_batch=8, train=(4, 1024), train_steps=3, round_to=64),
    "dry_run": dict(shape="micro", calib=(4, 16), calib_batch=2, train=(2, 32), train_steps=2, round_to=1),
}


def _warm_up_inductor(device: str) -> None:
    """Pay inductor's one-time costs (imports, compile workers, device init) before timing.

    Otherwise the uniform model's first compile carries them and looks slower than later ones.
    """
    import torch
    import torch._dynamo

    backend = os.environ.get("TORCH_COMPILE_BACKEND", "inductor")  # torchtune's compile_model reads it too
    x = torch.randn(64, 64, device=device, requires_grad=True)
    torch.compile(lambda t: torch.nn.functional.silu(t @ t).sum(), backend=backend)(x).backward()
    torch._dynamo.reset()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _heads_dynamic() -> None:
    """A candidate beyond the recipe's ``dynamic``: head counts symbolic too, so that layers
    of different head counts share the one graph (on CPU: one layer graph instead of two, but
    a dearer compile). Attention projections' head dimensions and the modules' ``num_heads`` /
    ``num_kv_heads`` ints join ``dynamic_sources``; measured here, not used by the recipe."""
    import torch
    import torch._dynamo

    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    extra = [rf".*\['{p}'\]\._parameters\['weight'\]:{d}"
             for p, d in (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("output_proj", 1))]
    extra += [r".*\.num_heads", r".*\.num_kv_heads"]
    cfg = torch.compiler.config
    cfg.dynamic_sources = ",".join([e for e in cfg.dynamic_sources.split(",") if e] + extra)


def _trajectory(widths: str, device: str, dtype: str, size: Dict[str, Any], log) -> Dict[str, Any]:
    import torch
    import torch._dynamo
    from torchtune import training

    import adapt_prune_recipe as apr
    from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    batch, seq = size["train"]
    torch._dynamo.reset()
    model, arch = build_shape(size["shape"], device, dtype)
    apr._configure_compile_widths(True, "static")  # torchtune's defaults: the stock baseline
    apr._fit_compile_caches(True, arch)
    training.compile_model(model, verbose=False)
    loss_fn = chunked_loss(compiled=True)
    opt = adamw(model, device)
    g0 = _graphs()
    uniform = tokens_per_second(model, opt, loss_fn, device, arch.vocab_size, batch, seq, size["train_steps"])
    out: Dict[str, Any] = {"uniform": {**uniform, "graphs": _graphs() - g0}, "stages": []}
    log(f"[{widths}] uniform {size['shape']}: first step +{uniform['first_step_excess_s']:.1f}s over a steady "
        f"{uniform['steady_step_s']:.3f}s step ({out['uniform']['graphs']} graphs)")
    apr._configure_compile_widths(True, widths.removesuffix("_heads"))
    if widths == "dynamic_heads":
        _heads_dynamic()
    pruner = AdaptivePruner(PruningConfig(target_sparsity=0.2, steps=2, round_to=size["round_to"]), arch)
    batches = calibration_batches(arch.vocab_size, *size["calib"], size["calib_batch"], device)
    for stage, target in enumerate((0.1, 0.2)):
        # First stage: the recipe's first training step comes after its first prune, under its own
        # settings. Static, every stage: as _prune_stage, graphs of the old widths never match again.
        if stage == 0 or widths == "static":
            torch._dynamo.reset()
        with apr._eager_if(True):
            plan, _ = pruner.measure_and_plan(model, arch, batches, target)
        new_model = rebuild(model, arch, plan.arch, plan.keeps, device, tdtype, opt)
        del model
        model, arch = new_model, plan.arch
        apr._fit_compile_caches(True, arch)
        training.compile_model(model, verbose=False)
        distinct = len({(l.num_heads, l.num_kv_heads, l.intermediate_dim) for l in arch.layers})
        g0 = _graphs()
        stage = tokens_per_second(model, opt, loss_fn, device, arch.vocab_size, batch, seq, size["train_steps"])
        stage.update(graphs=_graphs() - g0, distinct_layer_shapes=distinct, target=target,
                     ratio=stage["first_step_excess_s"] / uniform["first_step_excess_s"])
        out["stages"].append(stage)
        log(f"[{widths}] after the cut to {target:.0%} ({distinct} distinct layer shapes): first step "
            f"+{stage['first_step_excess_s']:.1f}s ({stage['graphs']} graphs); ratio {stage['ratio']:.2f}; "
            f"steady {stage['steady_step_s']:.3f}s")
    out["compile_ratio_after_resize"] = max(st["ratio"] for st in out["stages"])
    del model
    return out


def run_trajectory(widths: str, device: str, dtype: str, dry_run: bool, out: Path) -> None:
    """One trajectory in this process (fresh): warm-up, then the uniform model and the cuts."""
    import torch._inductor.config

    size = SIZES["dry_run" if dry_run else "gpu"]
    # No FX graph cache: the loss graph compiled for the uniform model would be a cache hit after
    # the resize (the process's own caches are fresh directories: see run).
    torch._inductor.config.fx_graph_cache = False
    _warm_up_inductor(device)
    result = _trajectory(widths, device, dtype, size, lambda s: print(s, flush=True))
    out.write_text(json.dumps(result, indent=2, default=float))


def run(device: str, dtype: str, dry_run: bool, work: Path, assets: Path, log) -> Dict[str, Any]:
    size = SIZES["dry_run" if dry_run else "gpu"]
    res: Dict[str, Any] = {"shape": size["shape"], "device": device, "dtype": dtype, "settings": size,
                           "isolation": "one process per trajectory, fresh inductor and Triton caches"}
    # The recipe's default first: a timeout loses the others; its repeat last, the first to go.
    # GPU_COMPILE_VARIANTS picks others (``dynamic_heads``: see _heads_dynamic).
    variants = [v for v in os.environ.get("GPU_COMPILE_VARIANTS", "dynamic,static,dynamic").split(",") if v]
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for i, widths in enumerate(variants):
        out = work / f"trajectory_{i}_{widths}.json"
        caches = work / f"caches_{i}_{widths}"
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
               "TRITON_CACHE_DIR": str(caches / "triton"), "PYTHONUNBUFFERED": "1",
               "TORCH_LOGS": "recompiles"}  # each recompile's reason, in the log (a few lines)
        subprocess.run([sys.executable, str(Path(__file__).resolve()), widths, device, dtype, str(int(dry_run)),
                        str(out)], check=True, env=env, cwd=work)
        runs.setdefault(widths, []).append(json.loads(out.read_text()))
        res[widths] = runs[widths][0]
        if len(runs[widths]) > 1:
            res[f"{widths}_repeats"] = runs[widths][1:]
        (work / "partial.json").write_text(json.dumps(res, indent=2, default=float))
    ratios = [r["compile_ratio_after_resize"] for r in runs[variants[0]]]
    ratio = statistics.median(ratios)
    res["compile_ratio_after_resize"] = ratio
    res["compile_ratio_after_resize_runs"] = ratios
    res["targets"] = {"compile_ratio_after_resize": {"value": ratio, "target": "<= 1.0", "met": ratio <= 1.0}}
    res["summary"] = "; ".join(
        f"{w}: first-step compile {r['uniform']['first_step_excess_s']:.1f}s uniform, after the resizes "
        + ", ".join(f"{st['first_step_excess_s']:.1f}s ({st['graphs']} graphs)" for st in r["stages"])
        + f", worst ratio {r['compile_ratio_after_resize']:.2f}, steady step "
        f"{r['uniform']['steady_step_s']:.3f}s -> {r['stages'][-1]['steady_step_s']:.3f}s"
        for w, rs in runs.items() for r in rs) + f"; {variants[0]} ratio, median of {len(ratios)}: {ratio:.2f}"
    return res


if __name__ == "__main__":  # one trajectory: WIDTHS DEVICE DTYPE DRY_RUN OUT (see run)
    _widths, _device, _dtype, _dry, _out = sys.argv[1:6]
    run_trajectory(_widths, _device, _dtype, _dry == "1", Path(_out))
