"""GPU check, ``compile: True`` across a resize (Llama-3.2-1B shape, random bf16 weights).

The recipe's sequence, in one process: layers compiled one by one as the stock
``_setup_model`` does (``training.compile_model``, loss compiled too), dynamo's caches sized
to the distinct layer shapes (``_fit_compile_caches``); training steps on the uniform model;
then a prune stage as ``_prune_stage`` runs it (dynamo reset, one adaptive step to 20 % with
``round_to=64``, run eagerly), the resize, the new model compiled, training steps again.
Figure: the first training step's excess over a steady step after the resize ÷ the uniform
model's (target ≤ 1: every distinct width is its own graph, so this is expected above 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

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


def run(device: str, dtype: str, dry_run: bool, work: Path, assets: Path, log) -> Dict[str, Any]:
    import torch
    import torch._dynamo
    from torchtune import training

    import adapt_prune_recipe as apr
    from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig

    size = SIZES["dry_run" if dry_run else "gpu"]
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    batch, seq = size["train"]
    import torch._inductor.config

    # No FX graph cache: the loss graph compiled for the uniform model would be a cache hit after
    # the resize, and a warm cache from an earlier run would hide both compiles.
    torch._inductor.config.fx_graph_cache = False
    _warm_up_inductor(device)
    model, arch = build_shape(size["shape"], device, dtype)
    training.compile_model(model, verbose=False)
    apr._fit_compile_caches(True, arch)
    loss_fn = chunked_loss(compiled=True)
    opt = adamw(model, device)
    g0 = _graphs()
    uniform = tokens_per_second(model, opt, loss_fn, device, arch.vocab_size, batch, seq, size["train_steps"])
    uniform_graphs = _graphs() - g0
    log(f"uniform {size['shape']}: first step +{uniform['first_step_excess_s']:.1f}s over a steady "
        f"{uniform['steady_step_s']:.3f}s step ({uniform_graphs} graphs)")

    torch._dynamo.reset()  # as _prune_stage: graphs of the old widths never match again
    pruner = AdaptivePruner(PruningConfig(target_sparsity=0.2, steps=1, round_to=size["round_to"]), arch)
    batches = calibration_batches(arch.vocab_size, *size["calib"], size["calib_batch"], device)
    with apr._eager_if(True):
        plan, _ = pruner.measure_and_plan(model, arch, batches, pruner.final_target)
    new_model = rebuild(model, arch, plan.arch, plan.keeps, device, tdtype, opt)
    del model
    training.compile_model(new_model, verbose=False)
    apr._fit_compile_caches(True, plan.arch)
    distinct = len({(l.num_heads, l.num_kv_heads, l.intermediate_dim) for l in plan.arch.layers})
    g0 = _graphs()
    pruned = tokens_per_second(new_model, opt, loss_fn, device, arch.vocab_size, batch, seq, size["train_steps"])
    pruned_graphs = _graphs() - g0
    ratio = pruned["first_step_excess_s"] / uniform["first_step_excess_s"]
    log(f"after the resize ({distinct} distinct layer shapes): first step +{pruned['first_step_excess_s']:.1f}s "
        f"({pruned_graphs} graphs); ratio {ratio:.2f}")
    return {
        "shape": size["shape"], "device": device, "dtype": dtype, "settings": size,
        "num_layers": arch.num_layers, "distinct_layer_shapes_after": distinct,
        "uniform": {**uniform, "graphs": uniform_graphs},
        "after_resize": {**pruned, "graphs": pruned_graphs},
        "compile_ratio_after_resize": ratio,
        "targets": {"compile_ratio_after_resize": {"value": ratio, "target": "<= 1.0", "met": ratio <= 1.0}},
        "summary": f"first-step compile {uniform['first_step_excess_s']:.1f}s uniform vs "
                   f"{pruned['first_step_excess_s']:.1f}s after a resize ({distinct} distinct layer shapes, "
                   f"{pruned_graphs} graphs): ratio {ratio:.2f}; steady step {uniform['steady_step_s']:.3f}s vs "
                   f"{pruned['steady_step_s']:.3f}s",
    }
