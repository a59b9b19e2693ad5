"""GPU check, the prune loop at scale (Llama-3.1-8B shape, random bf16 weights).

* 50 adaptive iterations to 20 % of the prunable weights with ``round_to=64`` (the GPU
  configs' setting), 16 × 512 calibration tokens each, timed by part as in
  ``perf_overhead`` (a plain forward+backward over the same tokens before every 10th,
  for the ratio). Target: the 50 iterations in ≤ 60 s.
* Recovery tokens/s on the pruned widths: ours is the model as the recipe's resize leaves
  it (meta build, sliced load, AdamW moments carried), stock a freshly built model of the
  same widths with a fresh AdamW; same step function, same tokens. Target ≥ 0.97.
* Peak GPU memory of the prune iterations vs the training steps, each beside what the
  planner (``adapt-prune-tune plan``'s memory model) says for the same shapes, so every GPU
  run checks the estimates users size their jobs by.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

from _harness import peak_memory_gb, peak_memory_kind, reset_peak_memory, strip_private
from _shapes import build_shape, calibration_batches
from _training import adamw, chunked_loss, rebuild, tokens_per_second, train_step
from perf_overhead import measure_overhead

SIZES = {
    "gpu": dict(shape="llama3_1_8b", iterations=50, calib=(16, 512), calib_batch=8, train=(4, 1024),
                train_steps=5, fb_every=10, round_to=64),
    "dry_run": dict(shape="tiny", iterations=4, calib=(8, 32), calib_batch=4, train=(2, 64),
                    train_steps=3, fb_every=2, round_to=1),
}
TARGET_SPARSITY = 0.2
TARGET_LOOP_SECONDS = 60.0
TARGET_RATIO = 0.97


def planned_peaks_gib(arch, pruned_arch, size: Dict[str, Any], dtype: str, num_output_chunks: int) -> Dict[str, float]:
    """The planner's per-rank peaks for this check's setting: one process (no FSDP), no
    activation checkpointing, AdamW moments in the parameter dtype; the prune step at the
    unpruned widths before any optimizer step, training at the pruned widths."""
    from adapt_prune_tune.planning import MemoryModel

    d = {"fp32": 4, "bf16": 2}[dtype]
    seq, (batch, train_seq) = size["calib"][1], size["train"]
    memory = MemoryModel(
        dtype_bytes=d, world_size=1, batch_size=batch, seq_len=train_seq, calib_batch_size=size["calib_batch"],
        calib_seq_len=seq - 1, activation_checkpointing=False, activation_offloading=False, fsdp_cpu_offload=False,
        separate_units=(), optimizer_bytes=2.0 * d, chunked_loss=True, num_output_chunks=num_output_chunks,
    )
    return {
        "prune_iterations": memory.pruning(arch, optimizer_state=False)["peak"] / 2**30,
        "train_steps": memory.training(pruned_arch)["peak"] / 2**30,
    }


def run(device: str, dtype: str, dry_run: bool, work: Path, assets: Path, log) -> Dict[str, Any]:
    import torch

    size = SIZES["dry_run" if dry_run else "gpu"]
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    t = time.perf_counter()
    model, arch = build_shape(size["shape"], device, dtype)
    build_s = time.perf_counter() - t
    log(f"built {size['shape']} ({arch.num_params() / 1e9:.3f}B params, {dtype}) on {device} in {build_s:.1f}s")
    samples, seq = size["calib"]
    batches = calibration_batches(arch.vocab_size, samples, seq, size["calib_batch"], device)
    iterations = size["iterations"]
    reset_peak_memory(device)
    ov = measure_overhead(size["shape"], iterations=iterations, total_steps=iterations, target_sparsity=TARGET_SPARSITY,
                          device=device, dtype=dtype, model_and_arch=(model, arch), batches=batches,
                          fb_every=size["fb_every"], round_to=size["round_to"],
                          log=log if iterations <= 10 else (lambda s: None))
    prune_peak = peak_memory_gb(device)
    model, pruned_arch = ov.pop("_model"), ov.pop("_arch")
    loop_s = sum(r["total"] for r in ov["rows"])
    log(f"{iterations} adaptive iterations to {TARGET_SPARSITY:.0%}: {loop_s:.1f}s (median iteration "
        f"{ov['iteration_seconds']:.3f}s = {ov['parts_seconds']}; fwd+bwd {ov['fb_seconds']:.3f}s, ratio "
        f"{ov['ratio']:.3f}); params {ov['params_before']:,} -> {ov['params_after']:,}")

    # Recovery: one step on the pruned model first, so AdamW moments exist as after any stage;
    # then the recipe's resize (here a no-op cut: every group kept) carries them over.
    batch, train_seq = size["train"]
    opt = adamw(model, device)
    loss_fn = chunked_loss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    reset_peak_memory(device)
    train_step(model, opt, loss_fn, torch.randint(0, arch.vocab_size, (batch, train_seq)).to(device), device)
    model.set_num_output_chunks(0)
    from adapt_prune_tune.surgery import LayerKeep

    keeps = [LayerKeep.everything(layer) for layer in pruned_arch.layers]
    t = time.perf_counter()
    ours_model = rebuild(model, pruned_arch, pruned_arch, keeps, device, tdtype, opt)
    rebuild_s = time.perf_counter() - t
    del model
    ours = tokens_per_second(ours_model, opt, loss_fn, device, arch.vocab_size, batch, train_seq, size["train_steps"])
    train_peak = peak_memory_gb(device)
    state = {k: v.detach().clone() for k, v in ours_model.state_dict().items()}
    del ours_model, opt
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    from torchtune import training

    from adapt_prune_tune.models import decoder_from_arch

    with training.set_default_dtype(tdtype), torch.device(device):
        stock_model = decoder_from_arch(pruned_arch)
    stock_model.load_state_dict(state)
    del state
    stock = tokens_per_second(stock_model, adamw(stock_model, device), loss_fn, device, arch.vocab_size, batch,
                              train_seq, size["train_steps"])
    del stock_model
    ratio = ours["tokens_per_s"] / stock["tokens_per_s"]
    log(f"recovery tokens/s: ours {ours['tokens_per_s']:.0f}, stock {stock['tokens_per_s']:.0f}, ratio {ratio:.3f} "
        f"(rebuild {rebuild_s:.2f}s); peak memory: prune {prune_peak:.2f} GB, train {train_peak:.2f} GB")
    widths = sorted({layer.intermediate_dim for layer in pruned_arch.layers})
    planned = planned_peaks_gib(arch, pruned_arch, size, dtype, loss_fn.num_output_chunks)
    log(f"planner: prune {planned['prune_iterations']:.2f} GiB, train {planned['train_steps']:.2f} GiB")
    return {
        "shape": size["shape"], "device": device, "dtype": dtype, "build_seconds": build_s,
        "settings": {**size, "target_sparsity": TARGET_SPARSITY},
        "overhead": strip_private(ov),
        "loop_seconds": loop_s,
        "rebuild_seconds": rebuild_s,
        "mlp_widths": widths,
        "recovery": {"ours": ours, "stock": stock, "ratio": ratio},
        "peak_memory_gb": {"prune_iterations": prune_peak, "train_steps": train_peak, "kind": peak_memory_kind(device)},
        "planned_peak_gib": planned,
        "targets": {
            "loop_seconds": {"value": loop_s, "target": f"<= {TARGET_LOOP_SECONDS}", "met": loop_s <= TARGET_LOOP_SECONDS},
            "recovery_ratio": {"value": ratio, "target": f">= {TARGET_RATIO}", "met": ratio >= TARGET_RATIO},
        },
        "summary": f"{iterations} iterations {loop_s:.1f}s (target <= {TARGET_LOOP_SECONDS:.0f}), iteration/fwd+bwd "
                   f"{ov['ratio']:.2f}; recovery ours/stock {ratio:.3f} (target >= {TARGET_RATIO}); peak "
                   f"{prune_peak:.1f} GB prune vs {train_peak:.1f} GB train (planner {planned['prune_iterations']:.1f} / "
                   f"{planned['train_steps']:.1f})",
    }
