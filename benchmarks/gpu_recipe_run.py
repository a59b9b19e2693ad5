"""GPU check, the real thing: ``tune run adapt_prune_recipe --config smollm2/135M_adapt device=cuda
dtype=bf16 compile=True`` through two stages, then ``adapt-prune-tune export`` and a load of the
export with transformers.

The model is SmolLM2-135M's shape initialized at random on the GPU machine from its
``config.json`` (the real weights are 538 MB, too big to carry); tokenizer, corpus slices and
held-out texts come from the carried assets (``gpu_assets.py``), laid out as the project
cache that ``cache_dir`` points to, so no path is overridden. Small overrides only: two
stages of two prune steps to the config's 20 %, a short training budget, short held-out
texts, MLP widths in multiples of 64 (the GPU configs' ``round_to``) and a learning rate for
a random initialization (1e-3: at the paper's 2e-5 a random model barely moves in a few
dozen steps, and recovery would not be visible).

Checks: the run completes; after each resize the loss recovers (held-out perplexity after
the stage's training below the one right after its cut: the same text both times, where
per-batch training losses of a few steps differ by batch; those are reported too); the
export loads with ``trust_remote_code`` and gives finite logits matching the recipe's own
model. Also reported: each stage's first-step compile time (first step's time minus a steady
step's) and the prune stages' seconds. The CPU dry run narrows the shape and shortens
everything (SETTINGS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from _harness import median

SETTINGS = {
    "gpu": {"device": "cuda", "dtype": "bf16", "compile": True, "total_steps": 24, "batch_size": 8,
            "max_seq_len": 256, "calib_seq_len": 128, "heldout_tokens": 1024, "heldout_window": 256, "round_to": 64},
    "dry_run": {"device": "cpu", "dtype": "fp32", "compile": True, "total_steps": 8, "batch_size": 2,
                "max_seq_len": 64, "calib_seq_len": 32, "heldout_tokens": 256, "heldout_window": 128, "round_to": 1},
}
# The dry run's model: SmolLM2's config, narrowed (same tokenizer and vocabulary).
DRY_RUN_SHAPE = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16}
RANDOM_INIT_LR = 1e-3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def random_init_checkpoint(assets: Path, out: Path, dry_run: bool, seed: int = 0) -> Path:
    """SmolLM2's shape (narrowed for the dry run) at random, in HF format, with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((assets / "smollm2" / "config.json").read_text())
    if dry_run:
        config.update(DRY_RUN_SHAPE)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (assets / "smollm2" / name).is_file():
            shutil.copyfile(assets / "smollm2" / name, out / name)
    return out


def _command(name: str, module: str) -> List[str]:
    """A console script, or its module run by this Python where the script is not on PATH."""
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def recipe_overrides(s: Dict[str, Any], dry_run: bool, extra: Sequence[str] = ()) -> List[str]:
    """The command line's overrides: none of them paths (the run finds its inputs through cache_dir).

    ``extra`` (and ``$GPU_RECIPE_OVERRIDES``, split on spaces) come last: the same checks on
    another configuration (``gpu_recipe_fp8``: FP8 training with torchao's AdamWFp8)."""
    over = [
        f"device={s['device']}", f"dtype={s['dtype']}", f"compile={s['compile']}",
        "adapt.stages=2", "adapt.steps_per_stage=2", "adapt.total_tokens=null", f"adapt.total_steps={s['total_steps']}",
        "adapt.checkpoint_every_n_steps=1000",
        f"batch_size={s['batch_size']}", f"tokenizer.max_seq_len={s['max_seq_len']}",
        f"optimizer.lr={RANDOM_INIT_LR}", f"pruning.method.round_to={s['round_to']}",
        f"pruning.calibration.seq_len={s['calib_seq_len']}",
        f"heldout.num_tokens={s['heldout_tokens']}", f"heldout.window={s['heldout_window']}",
        f"log_peak_memory_stats={s['device'] == 'cuda'}",
    ]
    over += [*extra, *os.environ.get("GPU_RECIPE_OVERRIDES", "").split()]
    if dry_run:  # the packaged builder is SmolLM2's full shape; the narrowed one is read off config.json
        over += ["model._component_=adapt_prune_tune.models.decoder_from_hf_config", "model.path=${model_dir}"]
    return over


def lay_out_cache(cache: Path, assets: Path, dry_run: bool) -> Path:
    """The project cache as ``adapt-prune-tune prepare`` leaves it, with a random-init model.

    The packaged config reads everything through ``cache_dir`` (``$ADAPT_PRUNE_TUNE_CACHE``),
    so the run needs no path overrides. Returns the model directory.
    """
    for name in ("python-docs", "austen-novels"):
        shutil.rmtree(cache / "data" / name, ignore_errors=True)
        shutil.copytree(assets / name, cache / "data" / name)
    return random_init_checkpoint(assets, cache / "models" / "SmolLM2-135M-Instruct", dry_run)


def stage_checks(record: Dict[str, Any], tokens_per_step: int) -> List[Dict[str, Any]]:
    """Per stage: held-out perplexity after the cut and after training (``recovers``: lower after),
    the first/last training losses (medians of two steps), and the first step's compile excess."""
    out = []
    for s in record["stages"]:
        rows = [r for r in record["train_log"] if r["stage"] == s["stage"]]
        losses = [r["loss"] for r in rows if "loss" in r]
        tps = [r["tokens_per_second_per_gpu"] for r in rows if "tokens_per_second_per_gpu" in r]
        secs = [tokens_per_step / t for t in tps]
        first, last = median(losses[:2]), median(losses[-2:])
        pruned, trained = s.get("heldout_ppl_after_prune"), s.get("heldout_ppl_after_train")
        ppl_recovers = pruned is not None and trained is not None and trained < pruned
        out.append({
            "stage": s["stage"], "params": s["params"], "seconds_prune": s["seconds_prune"],
            "calib_loss_before_prune": s["calib_loss_before_prune"],
            "calib_loss_after_prune": s["calib_loss_after_prune"],
            "heldout_ppl_after_prune": pruned, "heldout_ppl_after_train": trained,
            "train_steps": len(losses), "train_loss_first": first, "train_loss_last": last,
            "first_step_excess_s": secs[0] - median(secs[1:]) if len(secs) > 1 else float("nan"),
            "steady_tokens_per_s": median(tps[1:]) if len(tps) > 1 else float("nan"),
            "recovers": bool(ppl_recovers),
        })
    return out


def keep_run_files(output_dir: Path, tag: str) -> None:
    """The run's record and report into ``$OUT`` (the device tool's return folder), when set:
    the run directory itself stays on the lent machine."""
    out = os.environ.get("OUT")
    if not out or not Path(out).is_dir():
        return
    for name in ("run_record.json", "report.md"):
        if (output_dir / name).is_file():
            shutil.copyfile(output_dir / name, Path(out) / f"{tag}_{name}")


def export_check(output_dir: Path, export_dir: Path, model_dir: Path, env: Dict[str, str]) -> Dict[str, Any]:
    """``adapt-prune-tune export`` (compact), then transformers vs the recipe's model on one window."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from adapt_prune_tune.models import decoder_from_arch
    from adapt_prune_tune.tokenizer import smollm2_tokenizer

    shutil.rmtree(export_dir, ignore_errors=True)
    t = time.perf_counter()
    cmd = _command("adapt-prune-tune", "adapt_prune_tune.cli") + ["export", str(output_dir), str(export_dir)]
    subprocess.run(cmd, check=True, env=env, cwd=output_dir.parent)
    export_s = time.perf_counter() - t
    hf = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    final = output_dir / "final"
    ours = decoder_from_arch(final / "arch.json")
    ours.load_state_dict({k: v.float() for k, v in load_file(str(final / "model.safetensors")).items()})
    ours.eval()
    ids = smollm2_tokenizer(str(model_dir)).encode("def greet(name):\n    return f'Hello, {name}!'\n", add_bos=False,
                                                   add_eos=False)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        hf_logits, our_logits = hf(tokens).logits, ours(tokens)
    finite = bool(torch.isfinite(hf_logits).all())
    diff = float((hf_logits - our_logits).abs().max())
    files = sorted(p.name for p in export_dir.iterdir())
    return {"export_seconds": export_s, "files": files, "tokens": len(ids), "logits_finite": finite,
            "max_abs_diff_vs_recipe_model": diff, "loads": finite and diff < 1e-3,
            "params": sum(p.numel() for p in hf.parameters())}


def run(device: str, dtype: str, dry_run: bool, work: Path, assets: Path, log, extra: Sequence[str] = (),
        tag: str = "recipe") -> Dict[str, Any]:
    s = SETTINGS["dry_run" if dry_run else "gpu"]
    if (device, dtype) != (s["device"], s["dtype"]):
        s = {**s, "device": device, "dtype": dtype}
    from omegaconf import OmegaConf

    from adapt_prune_tune import configs

    t = time.perf_counter()
    cache = work / "cache"
    model_dir = lay_out_cache(cache, assets, dry_run)
    init_s = time.perf_counter() - t
    os.environ["ADAPT_PRUNE_TUNE_CACHE"] = str(cache)  # for this process's view of the config too
    over = recipe_overrides(s, dry_run, extra)
    settable = [o for o in over if not o.startswith("~")]  # `~key` deletions do not move output_dir
    cfg = OmegaConf.merge(OmegaConf.load(configs.resolve("smollm2/135M_adapt")), OmegaConf.from_dotlist(settable))
    output_dir = Path(cfg.output_dir)
    shutil.rmtree(output_dir, ignore_errors=True)
    args = ["run", "adapt_prune_recipe", "--config", "smollm2/135M_adapt", *over]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    log("$ tune " + " ".join(args))
    t = time.perf_counter()
    subprocess.run(_command("tune", "torchtune._cli.tune") + args, check=True, env=env, cwd=work)
    wall = time.perf_counter() - t
    record = json.loads((output_dir / "run_record.json").read_text())
    keep_run_files(output_dir, tag)
    stages = stage_checks(record, s["batch_size"] * s["max_seq_len"])
    export = export_check(output_dir, work / "export", model_dir, env)
    completed = len(record["stages"]) == 2 and (output_dir / "final" / "model.safetensors").is_file()
    checks = {"completed": completed, "loss_recovers_after_each_resize": all(st["recovers"] for st in stages),
              "export_loads": export["loads"]}
    ppl = ", ".join(f"{st['heldout_ppl_after_prune']:.0f}->{st['heldout_ppl_after_train']:.0f}" for st in stages)
    compile_s = "/".join(f"{st['first_step_excess_s']:.1f}" for st in stages)
    summary = (f"{'all checks pass' if all(checks.values()) else 'CHECKS FAILED ' + str(checks)}; "
               f"{record['params_before']:,} -> {record['params_after']:,} params; held-out ppl per stage "
               f"(cut->trained) {ppl}; first-step compile {compile_s}s; export max|HF-ours| "
               f"{export['max_abs_diff_vs_recipe_model']:.1e}; tune run {wall:.0f}s")
    log(summary)
    return {
        "status": "ok" if all(checks.values()) else "checks_failed",
        "command": " ".join(["tune", *args]),
        "settings": {**s, "random_init_lr": RANDOM_INIT_LR, "shape": DRY_RUN_SHAPE if dry_run else "SmolLM2-135M"},
        "random_init_seconds": init_s,
        "tune_run_wall_seconds": wall,
        "seconds_run": record["seconds_run"],
        "params_before": record["params_before"], "params_after": record["params_after"],
        "prune_seconds": sum(st["seconds_prune"] for st in stages),
        "stages": stages,
        "perplexity": record.get("perplexity"),
        "export": export,
        "checks": checks,
        "summary": summary,
    }
