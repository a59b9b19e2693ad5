"""GPU check, FP8 training on pruned widths: tokens/s with and without torchao's float8 training.

Llama-3.1-8B layer widths (4 layers, random bf16 weights), pruned by one adaptive step to 20 %
with ``round_to=64``, so every decoder linear has dimensions that are multiples of 16 (what
float8 matmuls need; checked). Then the same training steps on four copies of the pruned
model: bf16 and ``convert_to_float8_training`` (tensorwise scaling; the output projection
stays bf16), each eager and with the layers compiled as the recipe compiles them. Float8
needs compute capability 8.9 or later (Ada, Hopper); elsewhere the section is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from _shapes import calibration_batches
from _training import adamw, chunked_loss, linear_shapes, rebuild, tokens_per_second

SHAPE = dict(vocab_size=128_256, num_layers=4, num_heads=32, num_kv_heads=8, embed_dim=4096, max_seq_len=8192,
             intermediate_dim=14_336)
TRAIN = dict(batch=4, seq=2048, steps=4)


def unavailable(device: str, dry_run: bool) -> str:
    """Why float8 training cannot run here ('' when it can): the recipe's own up-front check."""
    if dry_run:
        return "float8 training needs a CUDA GPU of compute capability >= 8.9 (CPU dry run)"
    from adapt_prune_tune.fp8 import fp8_problems

    return "; ".join(fp8_problems(device, round_to=None))


def run(device: str, dtype: str, dry_run: bool, work: Path, assets: Path, log) -> Dict[str, Any]:
    reason = unavailable(device, dry_run)
    if reason:
        log(f"fp8: skipped: {reason}")
        return {"status": "skipped", "reason": reason, "summary": f"skipped: {reason}"}
    import torch
    import torch._dynamo
    from torchao.float8 import convert_to_float8_training
    from torchtune import training
    from torchtune.models.llama3_1 import llama3_1

    import adapt_prune_recipe as apr
    from adapt_prune_tune.models import arch_from_model, decoder_from_arch
    from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig

    tdtype = torch.bfloat16
    with training.set_default_dtype(tdtype), torch.device(device):
        model = llama3_1(**SHAPE)
    arch = arch_from_model(model)
    pruner = AdaptivePruner(PruningConfig(target_sparsity=0.2, steps=1, round_to=64), arch)
    batches = calibration_batches(arch.vocab_size, 8, 512, 4, device)
    plan, _ = pruner.measure_and_plan(model, arch, batches, pruner.final_target)
    pruned = rebuild(model, arch, plan.arch, plan.keeps, device, tdtype)
    del model
    shapes = linear_shapes(pruned)
    bad = [s for s in shapes if s[0] % 16 or s[1] % 16]
    if bad:
        raise AssertionError(f"pruned linear shapes not multiples of 16: {bad}")
    state = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
    del pruned

    def not_output(module, fqn: str) -> bool:
        return fqn != "output"

    results: Dict[str, Any] = {}
    for name, fp8, compiled in (("bf16_eager", False, False), ("fp8_eager", True, False),
                                ("bf16_compiled", False, True), ("fp8_compiled", True, True)):
        torch._dynamo.reset()
        with training.set_default_dtype(tdtype), torch.device(device):
            m = decoder_from_arch(plan.arch)
        m.load_state_dict(state)
        try:
            if fp8:
                convert_to_float8_training(m, module_filter_fn=not_output)
            if compiled:
                apr._configure_compile_widths(True, "dynamic")  # the recipe's default
                training.compile_model(m, verbose=False)
                apr._fit_compile_caches(True, plan.arch)
            results[name] = tokens_per_second(m, adamw(m, device), chunked_loss(compiled), device, arch.vocab_size,
                                              TRAIN["batch"], TRAIN["seq"], TRAIN["steps"])
            log(f"fp8: {name}: {results[name]['tokens_per_s']:.0f} tokens/s "
                f"(first step +{results[name]['first_step_excess_s']:.1f}s)")
        except Exception as e:  # noqa: BLE001 - one variant failing keeps the others
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"fp8: {name} failed: {results[name]['error'][:300]}")
        del m
        torch.cuda.empty_cache()
        (work / "partial.json").write_text(json.dumps(results, indent=2, default=float))  # kept on a timeout

    def ratio(a: str, b: str) -> float:
        try:
            return results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
        except KeyError:
            return float("nan")

    eager, comp = ratio("fp8_eager", "bf16_eager"), ratio("fp8_compiled", "bf16_compiled")
    return {
        "shape": SHAPE, "train": TRAIN, "device": device,
        "mlp_widths": [layer.intermediate_dim for layer in plan.arch.layers],
        "heads": [(layer.num_heads, layer.num_kv_heads) for layer in plan.arch.layers],
        "linear_shapes_multiple_of_16": True,
        "variants": results,
        "fp8_speedup_compiled": comp,
        "fp8_speedup_eager": eager,
        "summary": f"fp8/bf16 tokens/s on pruned widths (multiples of 64): compiled {comp:.2f}x, eager {eager:.2f}x",
    }
