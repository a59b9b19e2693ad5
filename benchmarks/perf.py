"""Performance of the prune loop and of recovery training, measured side by side.

Every figure is a ratio of two things timed in the same run (same process
where possible, alternating subprocesses otherwise), so a shared or throttled
machine moves both sides alike; medians over repeats.

    python benchmarks/perf.py [--quick] [--only overhead,recipe,profile,scaling,memory,throughput,compile,share]
    python benchmarks/perf.py gpu --device cuda --shape llama3_1_8b    # what benchmarks/gpu_check.sh runs
    python benchmarks/perf.py gpu --device cpu --shape tiny            # the same check, CPU-sized

Sections (JSON keys of benchmarks/results/perf.json):

overhead     one adaptive iteration (similarity + Taylor gradients from one
             calibration pass, group scores, planning, surgery) ÷ one plain
             forward+backward over the same calibration tokens. Target ≤ 1.1.
recipe       the same through the distributed recipe's path: measure_and_plan
             + rebuild via the stock ``_setup_model`` + AdamW state sliced and
             re-bound (FSDP2 re-shard when world size > 1).
profile      where an iteration's time goes (parts, cProfile, torch.profiler).
scaling      seconds per iteration vs model size and vs calibration tokens.
memory       peak RSS of a prune step vs a training step (getrusage maxrss in
             fresh subprocesses, both orders). Target: a prune step no higher.
throughput   tokens/s of our recipe on a pruned model ÷ torchtune's stock
             full_finetune_distributed on a model with the same per-layer
             widths, same data/batch/settings. Target ≥ 0.97.
compile      compile: True on a 12-layer model: first-step compile time after
             each resize vs the uniform model's, graphs/recompiles, and layers
             left in eager by dynamo's recompile limit.
share        prune stages' share of a real ``tune run adapt_prune_recipe`` on
             SmolLM2-135M (demo budget), and the extrapolation to the paper's.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import platform
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "perf.json"
CACHE = Path(os.environ.get("ADAPT_PRUNE_TUNE_CACHE", Path.home() / ".cache" / "adapt-prune-tune"))
SMOLLM2_DIR = CACHE / "models" / "SmolLM2-135M-Instruct"
DATA_DIR = CACHE / "data" / "python-docs"

TARGETS = {
    "prune_step_overhead": ("<=", 1.1),
    "recipe_prune_step_overhead": ("<=", 1.1),
    "throughput_ratio": (">=", 0.97),
    "prune_share_paper_budget": ("<=", 0.03),
    "prune_peak_extra_mb": ("<=", 0.0),
}


# =========================================================================== helpers


def _torch():
    import torch

    return torch


def sync(device) -> None:
    torch = _torch()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def machine_info(device: str = "cpu") -> Dict[str, Any]:
    torch = _torch()
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


# =========================================================================== shapes


def _tiny_kwargs(num_layers: int = 4, dim: int = 64, heads: int = 4, kv: int = 2, mlp: int = 128,
                 vocab: int = 49152) -> Dict[str, Any]:
    return dict(
        vocab_size=vocab, embed_dim=dim, num_layers=num_layers, num_heads=heads, num_kv_heads=kv,
        intermediate_dim=mlp, max_seq_len=512,
    )


# name -> kwargs of a random Llama; tiny/small have SmolLM2's vocabulary (recipe runs use its
# tokenizer), micro is for in-process smoke tests only.
RANDOM_HF_SHAPES = {
    "micro": _tiny_kwargs(num_layers=2, dim=32, heads=4, kv=2, mlp=64, vocab=512),
    "tiny": _tiny_kwargs(),
    "small": _tiny_kwargs(num_layers=12, dim=128, heads=4, kv=2, mlp=256),
}
GPU_SHAPES = {"llama3_2_1b", "llama3_1_8b"}
ALL_SHAPES = sorted({*RANDOM_HF_SHAPES, "smollm2", *GPU_SHAPES})


def tiny_arch(name: str = "tiny"):
    from adapt_prune_tune.models import DecoderArch, RopeSpec

    kw = RANDOM_HF_SHAPES[name]
    return DecoderArch.uniform(
        **kw, norm_eps=1e-5, rope=RopeSpec("default", 100_000.0), tie_word_embeddings=True,
        meta={"base_model": f"random-{name}"},
    )


def build_shape(name: str, device: str = "cpu", dtype: str = "fp32", seed: int = 0):
    """(model, arch) for a named shape; weights random except SmolLM2 (real when prepared)."""
    torch = _torch()
    from torchtune import training

    from adapt_prune_tune.models import arch_from_model, decoder_from_arch, load_hf_model

    torch.manual_seed(seed)
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    dev = torch.device(device)
    if name == "smollm2" and (SMOLLM2_DIR / "model.safetensors").is_file():
        model, arch = load_hf_model(SMOLLM2_DIR)
        return model.to(device=dev, dtype=tdtype), arch
    with training.set_default_dtype(tdtype), dev:
        if name in RANDOM_HF_SHAPES:
            model = decoder_from_arch(tiny_arch(name))
        elif name == "smollm2":
            from adapt_prune_tune.models import smollm2_135m

            model = smollm2_135m(max_seq_len=2048)
        elif name == "llama3_2_1b":
            from torchtune.models.llama3_2 import llama3_2_1b

            model = llama3_2_1b()
        elif name == "llama3_1_8b":
            from torchtune.models.llama3_1 import llama3_1_8b

            model = llama3_1_8b()
        else:
            raise ValueError(f"unknown shape {name!r}; one of {ALL_SHAPES}")
    return model, arch_from_model(model)


def write_random_hf_checkpoint(out: Path, name: str = "tiny", seed: int = 0) -> Path:
    """A random Llama in HF format with SmolLM2's tokenizer (for ``tune run`` benchmarks)."""
    torch = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "model.safetensors").is_file():
        return out
    kw = RANDOM_HF_SHAPES[name]
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=kw["vocab_size"], hidden_size=kw["embed_dim"], intermediate_size=kw["intermediate_dim"],
        num_hidden_layers=kw["num_layers"], num_attention_heads=kw["num_heads"],
        num_key_value_heads=kw["num_kv_heads"], max_position_embeddings=kw["max_seq_len"],
        rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((SMOLLM2_DIR / f).read_bytes())
    return out


def model_dir_for(shape: str, work: Path) -> Path:
    if shape == "smollm2":
        return SMOLLM2_DIR
    return write_random_hf_checkpoint(work / f"model_{shape}", shape)


_TOKEN_STREAM: Optional[List[int]] = None


def calibration_batches(
    vocab_size: int, num_samples: int, seq_len: int, batch_size: int, device: str = "cpu", seed: int = 0
) -> List[Dict[str, Any]]:
    """Real calibration text (SmolLM2 tokenizer) when the vocab matches and data exist, else random ids.

    Windows of ``seq_len + 1`` tokens (the loss predicts ``seq_len`` of them).
    """
    global _TOKEN_STREAM
    torch = _torch()
    need = num_samples * (seq_len + 1)
    calib = DATA_DIR / "calibration.jsonl"
    if vocab_size == 49152 and calib.is_file() and (SMOLLM2_DIR / "tokenizer.json").is_file():
        if _TOKEN_STREAM is None or len(_TOKEN_STREAM) < need:
            from adapt_prune_tune.tokenizer import smollm2_tokenizer

            tok = smollm2_tokenizer(str(SMOLLM2_DIR))
            stream: List[int] = []
            for line in calib.read_text().splitlines():
                stream += tok.encode(json.loads(line)["text"])
                if len(stream) >= max(need, 70_000):
                    break
            _TOKEN_STREAM = stream
        if len(_TOKEN_STREAM) >= need:
            t = torch.tensor(_TOKEN_STREAM[:need], dtype=torch.long).view(num_samples, seq_len + 1)
            return [{"tokens": b.to(device)} for b in t.split(batch_size)]
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab_size, (num_samples, seq_len + 1), generator=g)
    return [{"tokens": b.to(device)} for b in t.split(batch_size)]


# =========================================================================== prune-step overhead


def plain_forward_backward(model, batches, device) -> float:
    """One plain forward+backward over the calibration tokens (no hooks), seconds."""
    from adapt_prune_tune.pruner import next_token_loss

    model.zero_grad(set_to_none=True)
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        loss, _ = next_token_loss(model, b)
        loss.backward()
    sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def prune_iteration(pruner, model, arch, batches, target: float, device) -> Tuple[Any, Dict[str, float]]:
    """One adaptive iteration, the parts of ``AdaptivePruner.measure_and_plan`` + surgery timed.

    Same calls in the same order as ``measure_and_plan`` followed by
    ``prune_decoder_`` and ``commit`` (what ``pruner.prune`` does per step).
    """
    from adapt_prune_tune.importance import importance_from_similarity, normalize_importance
    from adapt_prune_tune.pruner import calibrate, plan_step, score_layers
    from adapt_prune_tune.scoring import needs_gradients
    from adapt_prune_tune.surgery import prune_decoder_

    cfg = pruner.cfg
    parts: Dict[str, float] = {}
    sync(device)
    t = time.perf_counter()
    calib = calibrate(model, batches, cfg.similarity, needs_gradients(cfg.scorer))
    sync(device)
    parts["calibrate"] = time.perf_counter() - t
    t = time.perf_counter()
    importance = normalize_importance(importance_from_similarity(calib.mean_similarity, cfg.similarity))
    scores = score_layers(model, arch, cfg.scorer, pruner._generator)
    model.zero_grad(set_to_none=True)
    sync(device)
    parts["score"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = plan_step(cfg, pruner.original, arch, pruner.sparsity, target, importance, scores)
    parts["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    new_arch = prune_decoder_(model, arch, plan.keeps)
    sync(device)
    parts["surgery"] = time.perf_counter() - t
    pruner.commit(plan, calib, target, stage=1, seconds=sum(parts.values()))
    parts["total"] = sum(parts.values())
    return new_arch, parts


def measure_overhead(
    shape: str = "tiny",
    iterations: int = 3,
    target_sparsity: float = 0.2,
    total_steps: Optional[int] = None,
    num_samples: int = 16,
    seq_len: int = 128,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "fp32",
    model_and_arch=None,
    batches=None,
    log: Callable[[str], None] = lambda s: None,
) -> Dict[str, Any]:
    """Pairs (plain fwd+bwd, one adaptive iteration) on the same model and tokens.

    The plain pass runs right before each iteration on the current (shrinking)
    model, so every ratio compares like with like. ``total_steps`` sets the
    schedule (default: ``iterations``; the GPU check prunes 20% in 50).
    """
    from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig

    model, arch = model_and_arch or build_shape(shape, device, dtype)
    batches = batches or calibration_batches(arch.vocab_size, num_samples, seq_len, batch_size, device)
    steps = total_steps or iterations
    pruner = AdaptivePruner(PruningConfig(target_sparsity=target_sparsity, steps=steps), arch)
    params_before = arch.num_params()
    plain_forward_backward(model, batches, device)  # warm-up (allocator, lazy inits)
    rows = []
    for k in range(iterations):
        c0 = time.process_time()
        fb = plain_forward_backward(model, batches, device)
        c1 = time.process_time()
        target = pruner.final_target * (k + 1) / steps
        arch, parts = prune_iteration(pruner, model, arch, batches, target, device)
        c2 = time.process_time()
        # CPU seconds of this process (all its threads): less sensitive to other load on a
        # shared machine than wall time; meaningless for GPU work (wall time is the figure there).
        rows.append({"fb": fb, **parts, "ratio": parts["total"] / fb,
                     "fb_cpu": c1 - c0, "iteration_cpu": c2 - c1, "ratio_cpu": (c2 - c1) / max(c1 - c0, 1e-9)})
        log(f"  [{shape}] iteration {k + 1}/{iterations}: fwd+bwd {fb:.3f}s, iteration {parts['total']:.3f}s "
            f"(calib {parts['calibrate']:.3f} score {parts['score']:.3f} plan {parts['plan']:.3f} "
            f"surgery {parts['surgery']:.3f}), ratio {parts['total'] / fb:.3f} (cpu time {rows[-1]['ratio_cpu']:.3f})")
    tokens = sum(int(b["tokens"][:, 1:].numel()) for b in batches)
    return {
        "shape": shape,
        "device": device,
        "dtype": dtype,
        "params_before": params_before,
        "params_after": arch.num_params(),
        "calib_tokens": tokens,
        "iterations": iterations,
        "fb_seconds": median(r["fb"] for r in rows),
        "iteration_seconds": median(r["total"] for r in rows),
        "ratio": median(r["ratio"] for r in rows),
        "ratio_cpu_time": median(r["ratio_cpu"] for r in rows),
        "parts_seconds": {p: median(r[p] for r in rows) for p in ("calibrate", "score", "plan", "surgery")},
        "rows": rows,
        "_model": model,
        "_arch": arch,
    }


def strip_private(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: strip_private(v) for k, v in d.items() if not str(k).startswith("_")}
    if isinstance(d, list):
        return [strip_private(v) for v in d]
    return d


def profile_iteration(shape: str = "tiny", device: str = "cpu", top: int = 12, **kw) -> Dict[str, Any]:
    """cProfile (our functions) and torch.profiler (ops) of one iteration after a warm-up one."""
    torch = _torch()
    from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig

    model, arch = build_shape(shape, device)
    batches = calibration_batches(arch.vocab_size, kw.get("num_samples", 16), kw.get("seq_len", 128),
                                  kw.get("batch_size", 8), device)
    pruner = AdaptivePruner(PruningConfig(target_sparsity=0.2, steps=10), arch)
    arch, _ = prune_iteration(pruner, model, arch, batches, 0.02, device)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    arch, parts = prune_iteration(pruner, model, arch, batches, 0.04, device)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        if "adapt_prune_tune" in fname:
            rows.append({"function": f"{Path(fname).name}:{func}", "calls": nc,
                         "cumulative_s": round(ct, 4), "self_s": round(tt, 4)})
    rows.sort(key=lambda r: -r["cumulative_s"])
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts) as p:
        arch, parts2 = prune_iteration(pruner, model, arch, batches, 0.06, device)
    key = "self_cpu_time_total"
    ops = sorted(p.key_averages(), key=lambda e: -getattr(e, key))[:top]
    total_self = sum(getattr(e, key) for e in p.key_averages()) or 1.0
    return {
        "shape": shape,
        "parts_seconds": {k: round(v, 4) for k, v in parts.items()},
        "cprofile_top": rows[:top],
        "torch_ops_top": [
            {"op": e.key, "calls": e.count, "self_cpu_ms": round(getattr(e, key) / 1e3, 2),
             "share": round(getattr(e, key) / total_self, 3)}
            for e in ops
        ],
    }


def measure_scaling(
    shapes: Sequence[str], token_counts: Sequence[int], device: str = "cpu", iterations: int = 2,
    seq_len: int = 128, batch_size: int = 8, token_shape: str = "smollm2", log=lambda s: None,
) -> Dict[str, Any]:
    """Seconds per iteration vs model size, and vs calibration tokens (linear fit)."""
    by_size = []
    for shape in shapes:
        r = measure_overhead(shape, iterations=iterations, device=device, seq_len=seq_len,
                             batch_size=batch_size, log=log)
        by_size.append({k: r[k] for k in ("shape", "params_before", "calib_tokens", "fb_seconds",
                                          "iteration_seconds", "ratio", "parts_seconds")})
    by_tokens = []
    for n in token_counts:
        samples = max(batch_size, n // seq_len)
        r = measure_overhead(token_shape, iterations=iterations, device=device, num_samples=samples,
                             seq_len=seq_len, batch_size=batch_size, log=log)
        by_tokens.append({k: r[k] for k in ("calib_tokens", "fb_seconds", "iteration_seconds", "ratio",
                                            "parts_seconds")})
    fit = None
    if len(by_tokens) >= 2:
        xs = [r["calib_tokens"] for r in by_tokens]
        ys = [r["iteration_seconds"] for r in by_tokens]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        fixed = my - slope * mx
        fixed_parts = median(r["parts_seconds"]["score"] + r["parts_seconds"]["plan"] + r["parts_seconds"]["surgery"]
                             for r in by_tokens)
        fit = {"seconds_per_1k_tokens": slope * 1000, "fixed_seconds": fixed,
               "score_plan_surgery_seconds": fixed_parts, "shape": token_shape}
    return {"by_model_size": by_size, "by_calib_tokens": by_tokens, "calib_tokens_fit": fit}


# =========================================================================== recipe configs


def recipe_config(model_dir: Path, output_dir: Path, shape: str, **overrides):
    """The packaged SmolLM2 config pointed at a model directory, with overrides (dotted keys)."""
    from omegaconf import OmegaConf

    from adapt_prune_tune import configs

    cfg = OmegaConf.load(configs.resolve("smollm2/135M_adapt"))
    if shape != "smollm2":
        cfg.model = {"_component_": "adapt_prune_tune.models.decoder_from_hf_config", "path": str(model_dir)}
    cfg.model_dir = str(model_dir)
    cfg.data_dir = str(DATA_DIR)
    cfg.output_dir = str(output_dir)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def stock_config(our_cfg, arch_dict: Dict[str, Any], ckpt_dir: Path, output_dir: Path, steps: int):
    """torchtune's full_finetune_distributed config for a model with the pruned widths."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(our_cfg, resolve=True))
    for key in ("pruning", "adapt"):
        cfg.pop(key, None)
    cfg.model = {"_component_": "adapt_prune_tune.models.decoder_from_arch", "arch": arch_dict}
    cfg.checkpointer = {
        "_component_": "torchtune.training.FullModelTorchTuneCheckpointer",
        "checkpoint_dir": str(ckpt_dir),
        "checkpoint_files": ["model.pt"],
        "recipe_checkpoint": None,
        "output_dir": str(output_dir / "ckpt"),
        "model_type": "LLAMA3_2",
    }
    cfg.output_dir = str(output_dir)
    cfg.metric_logger.log_dir = str(output_dir / "logs")
    cfg.epochs = 1
    cfg.max_steps_per_epoch = steps
    return cfg


def write_config(cfg, path: Path) -> Path:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg))
    return path


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
    tps = [r["tokens_per_second_per_gpu"] for r in rows if "tokens_per_second_per_gpu" in r]
    steady = tps[warmup:] if len(tps) > warmup else tps
    return {"median": median(steady), "steps": len(tps), "warmup_dropped": min(warmup, len(tps)),
            "values": [round(v, 2) for v in tps]}


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # PERF_RECIPE_DIR: a directory holding another adapt_prune_recipe.py (A/B against a saved copy)
    first = os.environ.get("PERF_RECIPE_DIR")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (first, str(ROOT), str(ROOT / "recipes"), env.get("PYTHONPATH")) if p
    )
    env.update(extra or {})
    return env


def run_cmd(cmd: List[str], cwd: Path, env=None, timeout: int = 3600) -> Tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc, wall


def worker_cmd(*args: str) -> List[str]:
    return [sys.executable, str(Path(__file__).resolve()), "worker", *args]


def last_json_line(text: str, tag: str) -> Dict[str, Any]:
    lines = [l for l in text.splitlines() if l.startswith(tag + " ")]
    if not lines:
        raise RuntimeError(f"no {tag} line in worker output:\n{text[-3000:]}")
    return json.loads(lines[-1][len(tag) + 1:])


# =========================================================================== workers (subprocesses)


def _make_recipe(cfg_path: Path):
    """Our recipe, in this process, set up from a config file (world of one unless under torchrun)."""
    from omegaconf import OmegaConf

    import adapt_prune_recipe as apr

    apr._single_process_env()
    cfg = OmegaConf.load(cfg_path)
    recipe = apr.AdaptPruneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    return apr, recipe


def _train_batches(recipe, count: int) -> List[Dict[str, Any]]:
    recipe._dataloader.sampler.set_epoch(0)
    out = []
    for batch in recipe._dataloader:
        out.append(batch)
        if len(out) == count:
            break
    return out


def _train_step(recipe, batch) -> float:
    """The stock recipe's inner step (fwd, chunked CE, bwd, clip, AdamW), seconds."""
    torch = _torch()
    from torchtune import training, utils

    batch = {k: v.clone() for k, v in batch.items()}
    t0 = time.perf_counter()
    utils.batch_to_device(batch, recipe._device)
    n = (batch["labels"] != recipe._loss_fn.ignore_index).sum()
    labels = batch.pop("labels")
    logits = recipe._model(**batch)
    labels = torch.hstack((labels[..., 1:], recipe.ignore_labels_cache[: labels.shape[0]]))
    if not isinstance(logits, list):
        labels, logits = labels.reshape(-1), logits.reshape(-1, logits.size(-1))
    loss = recipe._loss_fn(logits, labels) * n
    del logits
    loss.backward()
    training.scale_grads(recipe._model, 1 / n)
    if recipe._clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(recipe._model.parameters(), max_norm=float(recipe._clip_grad_norm))
    recipe._optimizer.step()
    recipe._optimizer.zero_grad(set_to_none=True)
    sync(recipe._device)
    return time.perf_counter() - t0


def _recipe_fb(recipe) -> float:
    from adapt_prune_tune.pruner import next_token_loss

    model = recipe._model
    model.zero_grad(set_to_none=True)
    sync(recipe._device)
    t0 = time.perf_counter()
    for b in recipe._calib_batches:
        next_token_loss(model, {"tokens": b["tokens"].to(recipe._device)})[0].backward()
    sync(recipe._device)
    s = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return s


class _Timer:
    """Wraps a callable and accumulates its wall time."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t0


def _recipe_prune_step(apr, recipe, target: float) -> Dict[str, float]:
    """One of ``_prune_stage``'s iterations (measure_and_plan, broadcast, _resize, commit), timed by part."""
    setup_timer = _Timer(recipe._setup_model)
    rebind_timer = _Timer(apr.rebind_optimizer_)
    recipe._setup_model, apr.rebind_optimizer_ = setup_timer, rebind_timer
    try:
        sync(recipe._device)
        t0 = time.perf_counter()
        plan, calib = recipe._pruner.measure_and_plan(recipe._model, recipe._arch, recipe._calib_batches, target)
        t1 = time.perf_counter()
        rss_measure = _maxrss_mb()
        peaks = {"peak_measure_mb": _proc_status_mb("VmHWM")}  # since the caller's reset, if any
        _reset_peak_rss()
        keeps = apr._broadcast_keeps(plan.keeps)
        recipe._resize(keeps, plan.arch)
        sync(recipe._device)
        t2 = time.perf_counter()
        peaks["peak_resize_mb"] = _proc_status_mb("VmHWM")
        recipe._pruner.commit(plan, calib, target, 1, t2 - t0)
    finally:
        del recipe._setup_model
        apr.rebind_optimizer_ = rebind_timer.fn
    return {"measure_and_plan": t1 - t0, "resize": t2 - t1, "rebuild_model": setup_timer.seconds,
            "rebind_optimizer": rebind_timer.seconds, "total": t2 - t0,
            "maxrss_after_measure_mb": rss_measure, "maxrss_after_resize_mb": _maxrss_mb(), **peaks}


def worker_recipe_overhead(cfg_path: Path, iterations: int) -> Dict[str, Any]:
    """Pairs (plain fwd+bwd, one recipe prune step incl. rebuild/re-shard) in our recipe."""
    import torch.distributed as dist

    apr, recipe = _make_recipe(cfg_path)
    batches = _train_batches(recipe, 1)
    _train_step(recipe, batches[0])  # AdamW moments exist, as after any training stage
    _recipe_fb(recipe)  # warm-up
    rows = []
    final = recipe._pruner.final_target
    for k in range(iterations):
        c0 = time.process_time()
        fb = _recipe_fb(recipe)
        c1 = time.process_time()
        parts = _recipe_prune_step(apr, recipe, final * (k + 1) / iterations)
        c2 = time.process_time()
        rows.append({"fb": fb, **parts, "ratio": parts["total"] / fb,
                     "ratio_cpu": (c2 - c1) / max(c1 - c0, 1e-9)})
    out = {
        "world_size": recipe.world_size,
        "fsdp": recipe.world_size > 1,
        "params_after": recipe._arch.num_params(),
        "calib_tokens_per_rank": sum(int(b["tokens"][:, 1:].numel()) for b in recipe._calib_batches),
        "fb_seconds": median(r["fb"] for r in rows),
        "iteration_seconds": median(r["total"] for r in rows),
        "ratio": median(r["ratio"] for r in rows),
        "ratio_cpu_time": median(r["ratio_cpu"] for r in rows),
        "parts_seconds": {p: median(r[p] for r in rows)
                          for p in ("measure_and_plan", "resize", "rebuild_model", "rebind_optimizer")},
        "rows": rows,
    }
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return out


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to ``/proc/self/clear_refs`` restarts the peak-RSS counter (VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def worker_memory(cfg_path: Path, order: str, train_steps: int = 3) -> Dict[str, Any]:
    """Peak RSS of training steps and of a prune step, in the given order.

    ``after_*_mb`` are the process's running maxima (getrusage), which loading the checkpoint
    can dominate; ``*_peak_mb`` are each phase's own peaks (peak counter reset before it, where
    Linux allows), the figure that compares a prune step with a training step.
    """
    import gc

    apr, recipe = _make_recipe(cfg_path)
    batches = _train_batches(recipe, train_steps)
    out: Dict[str, Any] = {"after_setup_mb": _maxrss_mb()}
    target = recipe._pruner.final_target

    def train():
        for b in batches:
            _train_step(recipe, b)

    def prune():
        step = _recipe_prune_step(apr, recipe, target)
        out["prune_maxrss_after_measure_mb"] = step["maxrss_after_measure_mb"]
        out["prune_maxrss_after_resize_mb"] = step["maxrss_after_resize_mb"]
        out["prune_measure_peak_mb"], out["prune_resize_peak_mb"] = step["peak_measure_mb"], step["peak_resize_mb"]

    phases = [("train", train), ("prune", prune)] if order == "train_first" else [("prune", prune), ("train", train)]
    if order == "prune_first":
        _train_step(recipe, batches[0])  # AdamW state exists in both orders (a resize carries it)
        out["after_first_train_step_mb"] = _maxrss_mb()
    for name, fn in phases:
        gc.collect()
        if _reset_peak_rss():
            out[f"{name}_start_rss_mb"] = _proc_status_mb("VmRSS")
            fn()
            out[f"{name}_peak_mb"] = _proc_status_mb("VmHWM")
            if name == "prune":  # the step resets the counter between its calibration and its resize
                out["prune_peak_mb"] = max(out["prune_measure_peak_mb"], out["prune_resize_peak_mb"])
        else:
            fn()
        out[f"after_{name}_mb"] = _maxrss_mb()
    train_tokens = int(batches[0]["tokens"].numel())
    calib_tokens = int(recipe._calib_batches[0]["tokens"][:, 1:].numel())
    out.update(order=order, train_tokens_per_batch=train_tokens, calib_tokens_per_batch=calib_tokens,
               params=recipe._arch.num_params())
    return out


def worker_run_recipe(which: str, cfg_path: Path) -> None:
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


# =========================================================================== recipe-level sections


def section_recipe(shape: str, work: Path, iterations: int, nproc: int = 1, log=print) -> Dict[str, Any]:
    model_dir = model_dir_for(shape, work)
    cfg = recipe_config(model_dir, work / f"recipe_{shape}_{nproc}", shape)
    path = write_config(cfg, work / f"recipe_{shape}_{nproc}.yaml")
    out_json = work / f"recipe_{shape}_{nproc}.json"
    cmd = worker_cmd("recipe_overhead", str(path), str(iterations), str(out_json))
    if nproc > 1:  # FSDP2 over gloo: the re-shard path
        cmd = ["torchrun", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]
    run_cmd(cmd, cwd=work)
    res = json.loads(out_json.read_text())
    res["shape"] = shape
    log(f"  recipe path [{shape}, {nproc} proc]: ratio {res['ratio']:.3f} (cpu time {res['ratio_cpu_time']:.3f}) "
        f"(fwd+bwd {res['fb_seconds']:.3f}s, step {res['iteration_seconds']:.3f}s: {res['parts_seconds']})")
    return res


# Activations small next to weights (short windows, activation checkpointing): the regime of
# big models, where a resize holding two copies of the AdamW moments would set the peak.
SMALL_ACTIVATIONS = {
    "pruning.calibration.seq_len": 32, "pruning.calibration.num_samples": 4,
    "tokenizer.max_seq_len": 32, "batch_size": 1, "enable_activation_checkpointing": True,
}


def section_memory(shape: str, work: Path, calib_batch_sizes: Sequence[int], orders: Sequence[str],
                   log=print, variant: str = "default") -> Dict[str, Any]:
    model_dir = model_dir_for(shape, work)
    results = []
    extra = SMALL_ACTIVATIONS if variant == "small_activations" else {}
    for cbs in calib_batch_sizes:
        for order in orders:
            cfg = recipe_config(model_dir, work / f"mem_{shape}", shape,
                                **{**extra, "pruning.calibration.batch_size": cbs})
            path = write_config(cfg, work / f"mem_{shape}_{variant}_{cbs}.yaml")
            out_json = work / f"mem_{shape}_{variant}_{cbs}_{order}.json"
            # A fixed mmap threshold makes glibc return every large tensor to the OS when it is
            # freed, so maxrss follows the live-tensor peak instead of heap fragmentation.
            run_cmd(worker_cmd("memory", str(path), order, str(out_json)), cwd=work,
                    env={"MALLOC_MMAP_THRESHOLD_": "131072"})
            r = json.loads(out_json.read_text())
            r["calib_batch_size"] = cbs
            r["variant"] = variant
            if "prune_peak_mb" in r:  # each phase's own peak: the comparison the target is about
                r["prune_extra_mb"] = r["prune_peak_mb"] - r["train_peak_mb"]
            elif order == "train_first":
                r["prune_extra_mb"] = r["after_prune_mb"] - r["after_train_mb"]
            else:
                r["train_extra_mb"] = r["after_train_mb"] - r["after_prune_mb"]
            results.append(r)
            log(f"  memory [{shape}, {variant}, calib batch {cbs} ({r['calib_tokens_per_batch']} tok) vs train batch "
                f"{r['train_tokens_per_batch']} tok, {order}]: " + ", ".join(
                    f"{k} {v:.0f}" for k, v in r.items() if k.endswith("_mb")))
    return {"shape": shape, "variant": variant, "runs": results}


def _our_run(shape: str, work: Path, tag: str, steps: int, compile_: bool, env=None, **over) -> Dict[str, Any]:
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
    proc, wall = run_cmd(worker_cmd("run_recipe", "ours", str(path)), cwd=work, env=env)
    record = json.loads((out / "run_record.json").read_text())
    return {"cfg": cfg, "out": out, "record": record, "wall": wall, "stderr": proc.stderr, "stdout": proc.stdout,
            "rows": parse_disk_log(out / "logs"), "counters": _counters(proc.stdout)}


def _counters(stdout: str) -> Dict[str, Any]:
    try:
        return last_json_line(stdout, "PERF_COUNTERS")
    except RuntimeError:
        return {}


def _stock_run(our: Dict[str, Any], work: Path, tag: str, steps: int, compile_: bool, arch_dict=None,
               ckpt_dir: Optional[Path] = None, env=None) -> Dict[str, Any]:
    torch = _torch()
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
    proc, wall = run_cmd(worker_cmd("run_recipe", "stock", str(path)), cwd=work, env=env)
    return {"out": out, "wall": wall, "stderr": proc.stderr, "stdout": proc.stdout,
            "rows": parse_disk_log(out / "logs"), "counters": _counters(proc.stdout)}


def section_throughput(shape: str, work: Path, steps: int, repeats: int, log=print) -> Dict[str, Any]:
    """Alternating runs: ours (1 prune step, then `steps` training steps), stock on the same widths."""
    ours_tps, stock_tps, runs = [], [], []
    first = None
    for r in range(repeats):
        ours = _our_run(shape, work, f"tp_{shape}_{r}", steps, False)
        first = first or ours
        stock = _stock_run(first, work, f"tp_{shape}_{r}", steps, False)
        o = steady_tokens_per_second([x for x in ours["rows"] if "tokens_per_second_per_gpu" in x])
        s = steady_tokens_per_second([x for x in stock["rows"] if "tokens_per_second_per_gpu" in x])
        ours_tps += o["values"][o["warmup_dropped"]:]
        stock_tps += s["values"][s["warmup_dropped"]:]
        runs.append({"ours": o, "stock": s})
        log(f"  throughput [{shape}] run {r + 1}/{repeats}: ours {o['median']:.1f} tok/s, stock {s['median']:.1f} tok/s")
    arch = first["record"]["arch_after"]
    widths = [(l["num_heads"], l["num_kv_heads"], l["intermediate_dim"]) for l in arch["layers"]]
    res = {"shape": shape, "steps": steps, "batch_size": int(first["cfg"].batch_size),
           "max_seq_len": int(first["cfg"].tokenizer.max_seq_len), "layer_widths": widths,
           "ours_tokens_per_s": median(ours_tps), "stock_tokens_per_s": median(stock_tps), "runs": runs}
    res["ratio"] = res["ours_tokens_per_s"] / res["stock_tokens_per_s"]
    log(f"  throughput [{shape}]: ratio {res['ratio']:.3f}")
    return res


def _dynamo_summary(run: Dict[str, Any]) -> Dict[str, Any]:
    c = run.get("counters", {})
    text = run["stderr"]
    return {
        "unique_graphs": c.get("stats", {}).get("unique_graphs"),
        "frames_total": c.get("frames", {}).get("total"),
        "frames_ok": c.get("frames", {}).get("ok"),
        "recompile_limit_hits": text.count("hit config.recompile_limit") + text.count("hit config.cache_size_limit"),
        "recompiles_logged": len(re.findall(r"Recompiling function", text)),
    }


def section_compile(shape: str, work: Path, steps: int, log=print, env_extra=None) -> Dict[str, Any]:
    """compile: True — uniform first-step compile vs after each resize; graphs; eager fallbacks.

    Ours runs two stages; the stock recipe runs the uniform model and the pruned widths.
    """
    from adapt_prune_tune.models import DecoderArch

    def env(tag):
        d = work / f"inductor_{tag}"
        shutil.rmtree(d, ignore_errors=True)
        return {"TORCHINDUCTOR_CACHE_DIR": str(d), "TORCH_LOGS": "recompiles", **(env_extra or {})}

    stages = 2
    tag = f"cc_{shape}"
    over = {"adapt.stages": stages, "adapt.steps_per_stage": 2, "adapt.checkpoint_every_n_steps": 10_000}
    ours = _our_run(shape, work, tag, 3 * steps, True, env=env(tag), **over)
    model_dir = model_dir_for(shape, work)
    base = DecoderArch.from_dict(ours["record"]["arch_before"])
    tokens = int(ours["cfg"].batch_size) * int(ours["cfg"].tokenizer.max_seq_len)
    stage_rows: Dict[int, List[float]] = {}
    for row in ours["record"]["train_log"]:
        if "tokens_per_second_per_gpu" in row:
            stage_rows.setdefault(int(row["stage"]), []).append(row["tokens_per_second_per_gpu"])
    ours_compile = []
    for stage, tps in sorted(stage_rows.items()):
        secs = [tokens / t for t in tps]  # approximate: full-length batches
        ours_compile.append(secs[0] - median(secs[1:]) if len(secs) > 1 else float("nan"))
    final = DecoderArch.from_dict(ours["record"]["arch_after"])
    distinct = len({(l.num_heads, l.num_kv_heads, l.intermediate_dim) for l in final.layers})
    # Uniform model, stock recipe, compile: the HF base checkpoint through the stock HF checkpointer.
    uni_ckpt = work / f"uniform_ckpt_{shape}"
    uni_ckpt.mkdir(parents=True, exist_ok=True)
    if not (uni_ckpt / "model.pt").is_file():
        from adapt_prune_tune.models import load_hf_model

        m, _ = load_hf_model(model_dir)
        _torch().save({k: v for k, v in m.state_dict().items()}, uni_ckpt / "model.pt")
    uniform = _stock_run(ours, work, f"cc_uniform_{shape}", steps, True, arch_dict=base.to_dict(),
                         ckpt_dir=uni_ckpt, env=env("uniform"))
    pruned = _stock_run(ours, work, f"cc_pruned_{shape}", steps, True, env=env("stock_pruned"))

    def excess(rows):
        secs = [tokens / r["tokens_per_second_per_gpu"] for r in rows if "tokens_per_second_per_gpu" in r]
        return (secs[0] - median(secs[1:])) if len(secs) > 1 else float("nan"), median(secs[1:])

    uni_excess, uni_step = excess(uniform["rows"])
    pr_excess, pr_step = excess(pruned["rows"])
    res = {
        "shape": shape,
        "num_layers": base.num_layers,
        "distinct_layer_shapes_final": distinct,
        "uniform_first_step_compile_s": uni_excess,
        "ours_stage_first_step_compile_s": ours_compile,
        "stock_pruned_first_step_compile_s": pr_excess,
        "steady_step_s": {"uniform_stock": uni_step, "pruned_stock": pr_step,
                          "pruned_ours": median(tokens / t for t in stage_rows.get(stages, [float("nan")])[1:])},
        "dynamo": {"ours": _dynamo_summary(ours), "stock_uniform": _dynamo_summary(uniform),
                   "stock_pruned": _dynamo_summary(pruned)},
        "ours_prune_seconds": [s["seconds_prune"] for s in ours["record"]["stages"]],
    }
    res["compile_ratio_after_resize"] = median(ours_compile) / uni_excess if uni_excess else float("nan")
    log(f"  compile [{shape}]: uniform first-step compile {uni_excess:.1f}s; ours after each resize "
        f"{[round(x, 1) for x in ours_compile]}s; stock on pruned widths {pr_excess:.1f}s; "
        f"dynamo {res['dynamo']}")
    return res


def section_share(work: Path, quick: bool, log=print, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """A real `tune run adapt_prune_recipe --config smollm2/135M_adapt` (demo budget): prune share of wall time.

    ``run_dir``: read a finished run's ``run_record.json`` instead (wall time = its ``seconds_run``).
    """
    if run_dir is None:
        out = work / "share_run"
        shutil.rmtree(out, ignore_errors=True)
        overrides = [f"output_dir={out}"]
        if quick:
            overrides += ["adapt.total_tokens=12000"]
        cmd = ["tune", "run", "adapt_prune_recipe", "--config", "smollm2/135M_adapt", *overrides]
        proc, wall = run_cmd(cmd, cwd=work)
        record = json.loads((out / "run_record.json").read_text())
    else:
        record = json.loads((Path(run_dir) / "run_record.json").read_text())
        cmd, wall = record["command"].split(), record["seconds_run"]
    prune_s = sum(s["seconds_prune"] for s in record["stages"])
    steps = record["prune_steps"]
    step_s = [s["seconds"] for s in steps]
    tps = [r["tokens_per_second_per_gpu"] for r in record["train_log"] if "tokens_per_second_per_gpu" in r]
    cfg = record["config"]
    calib = cfg["pruning"]["calibration"]
    calib_tokens = int(calib["num_samples"]) * int(calib["seq_len"])
    train_tokens = sum(int(s["tokens"]) for s in record["stages"])
    train_s = train_tokens / median(tps) if tps else float("nan")
    # Cost model: a prune step ≈ r × (fwd+bwd over C calibration tokens) and a training token costs
    # about what a calibration token's fwd+bwd costs (+ optimizer). With K prune steps in total,
    # N stages (one forward-only check per stage ≈ C/3) and T training tokens:
    #     share ≈ (K·r·C + N·C/3) / (K·r·C + N·C/3 + T)
    # r is measured (overhead section); prune-step seconds per calibration token on this run give
    # the model-free check: measured K·p / (K·p + T/τ).
    per_calib_token = median(step_s) / calib_tokens
    per_train_token = 1.0 / median(tps) if tps else float("nan")
    r_eff = per_calib_token / per_train_token

    def share(K, C, T, N, r=r_eff):
        prune = K * r * C + N * C / 3
        return prune / (prune + T)

    K, N = len(steps), len(record["stages"])
    res = {
        "command": " ".join(cmd),
        "wall_seconds": wall,
        "prune_seconds": prune_s,
        "share_of_wall": prune_s / wall,
        "training_seconds_est": train_s,
        "prune_steps": K,
        "stages": N,
        "prune_step_seconds_median": median(step_s),
        "calib_tokens_per_step": calib_tokens,
        "train_tokens": train_tokens,
        "train_tokens_per_s_median": median(tps),
        "r_prune_token_vs_train_token": r_eff,
        "model_share_demo": share(K, calib_tokens, train_tokens, N),
        "other_seconds": wall - prune_s - train_s,
        "extrapolation": {
            "formula": "share = (K*r*C + N*C/3) / (K*r*C + N*C/3 + T); K prune steps, C calibration "
                       "tokens per step, T training tokens, N stages, r = cost of a calibration token "
                       "in a prune step / cost of a training token (measured)",
            "smollm2_demo(K=8,C=2048,T=40k,N=4)": share(8, 2048, 40_000, 4),
            "qwen2.5_0.5B_config(K=50,C=512x64,T=1e9,N=5)": share(50, 512 * 64, 1_000_000_000, 5),
            "llama3.1_8B_config(K=50,C=512x64,T=1e9,N=10)": share(50, 512 * 64, 1_000_000_000, 10),
            "paper_qwen_script(K=5x50,C=512x64,T=1e9,N=5)": share(250, 512 * 64, 1_000_000_000, 5),
            "min_T_for_3pct_demo": (8 * r_eff * 2048 + 4 * 2048 / 3) * (1 / 0.03 - 1),
        },
    }
    log(f"  share: prune {prune_s:.1f}s of {wall:.1f}s wall = {res['share_of_wall']:.1%} (demo budget); "
        f"paper-scale extrapolation {res['extrapolation']['qwen2.5_0.5B_config(K=50,C=512x64,T=1e9,N=5)']:.3%}")
    return res


# =========================================================================== GPU check (also CPU-sized)

# Imported by torchtune at import time but never called by the GPU check (data and tokenizer
# libraries). The GPU machine gets its packages from a few carried wheels; where one of these
# is missing, an inert stand-in module takes its place so that `import torchtune` works.
STUBBABLE = ("datasets", "pyarrow", "pandas", "sentencepiece", "tiktoken", "blobfile", "kagglehub", "PIL", "psutil")


def install_import_stubs(names: Sequence[str] = STUBBABLE, simulate_missing: Sequence[str] = ()) -> List[str]:
    """Stand-ins for missing modules (any attribute is a class; calling one raises)."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import types

    def absent(n: str) -> bool:
        if n in simulate_missing:
            return True
        try:
            return importlib.util.find_spec(n) is None
        except (ImportError, ValueError):
            return True

    missing = [n for n in names if absent(n)]
    if not missing:
        return []

    class _StubMeta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _StubMeta(name, (), {})

        def __getitem__(cls, item):
            return cls

        def __call__(cls, *a, **k):
            raise RuntimeError(f"{cls.__name__} comes from a stand-in module (perf.py install_import_stubs)")

    def module_getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (), {})

    class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in missing:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            m = types.ModuleType(spec.name)
            m.__path__ = []
            m.__getattr__ = module_getattr
            m.__version__ = "0.0.0-stub"
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _StubFinder())
    return missing



def recipe_style_rebuild(model, arch, device, dtype, optimizer=None, keeps=None):
    """What the recipe's ``_resize`` does at world size 1: meta build, load sliced weights, rebind AdamW."""
    torch = _torch()
    from torchtune import training

    from adapt_prune_tune.models import decoder_from_arch
    from adapt_prune_tune.resize import PrunedStateView, optimizer_state_by_name, parameter_shapes, rebind_optimizer_
    from adapt_prune_tune.surgery import full_slice_map

    slices = full_slice_map(arch, keeps) if keeps else {}
    shapes = parameter_shapes(model)
    state = optimizer_state_by_name(model, optimizer) if optimizer is not None else {}
    new_arch = arch if not keeps else arch.with_layers([k.arch() if k else l for k, l in zip(keeps, arch.layers)])
    with training.set_default_dtype(dtype), torch.device("meta"):
        new = decoder_from_arch(new_arch)
    with training.set_default_dtype(dtype), torch.device(device):
        for m in new.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    training.load_from_full_model_state_dict(new, PrunedStateView(model, slices), torch.device(device), strict=True)
    if optimizer is not None:
        if hasattr(optimizer, "state"):
            optimizer.state = type(optimizer.state)()  # the old entries live on only in `state`
        rebind_optimizer_(optimizer, new, state, slices, shapes)
    return new, new_arch


def _stock_step(model, optimizer, loss_fn, batch, device) -> float:
    torch = _torch()
    from torchtune import training

    sync(device)
    t0 = time.perf_counter()
    tokens = batch["tokens"]
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], loss_fn.ignore_index)], dim=1)
    n = (labels != loss_fn.ignore_index).sum()
    logits = model(tokens)
    if not isinstance(logits, list):
        logits, labels = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    loss = loss_fn(logits, labels) * n
    del logits
    loss.backward()
    training.scale_grads(model, 1 / n)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def _train_tokens_per_s(model, optimizer, device, vocab, batch, seq, steps, warmup=2) -> Dict[str, Any]:
    torch = _torch()
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    g = torch.Generator().manual_seed(1)
    secs = []
    for _ in range(warmup + steps):
        b = {"tokens": torch.randint(0, vocab, (batch, seq), generator=g).to(device)}
        secs.append(_stock_step(model, optimizer, loss_fn, b, device))
    model.set_num_output_chunks(0)
    steady = secs[warmup:]
    return {"tokens_per_s": batch * (seq - 1) / median(steady), "step_seconds": steady}


def _peak_reset(device):
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> Optional[float]:
    torch = _torch()
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return _maxrss_mb() / 1024.0


def run_gpu_check(shape: str, device: str, dtype: str, iterations: int, target: float, calib_samples: int,
                  calib_seq: int, calib_batch: int, train_batch: int, train_seq: int, train_steps: int,
                  scaling_shapes: Sequence[str] = (), log=print) -> Dict[str, Any]:
    """The GPU check: big shape, many iterations, each part timed; recovery ours vs stock; memory."""
    torch = _torch()
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    t_start = time.perf_counter()
    t = time.perf_counter()
    model, arch = build_shape(shape, device, dtype)
    build_s = time.perf_counter() - t
    log(f"built {shape} ({arch.num_params() / 1e9:.3f}B params, {dtype}) on {device} in {build_s:.1f}s")
    batches = calibration_batches(arch.vocab_size, calib_samples, calib_seq, calib_batch, device)
    _peak_reset(device)
    ov = measure_overhead(shape, iterations=iterations, total_steps=iterations, target_sparsity=target,
                          device=device, dtype=dtype, model_and_arch=(model, arch), batches=batches,
                          log=log if iterations <= 10 else (lambda s: None))
    prune_peak = _peak_gb(device)
    model, arch = ov.pop("_model"), ov.pop("_arch")
    rows = ov["rows"]
    log(f"{iterations} adaptive iterations to {target:.0%}: median fwd+bwd {ov['fb_seconds']:.3f}s, iteration "
        f"{ov['iteration_seconds']:.3f}s, ratio {ov['ratio']:.3f}; parts {ov['parts_seconds']}; "
        f"total {sum(r['total'] for r in rows):.1f}s; params {ov['params_before']:,} -> {ov['params_after']:,}")
    # Recovery: ours = the recipe's rebuild (meta build + sliced load + AdamW moments carried),
    # stock = a freshly built model with the same widths and a fresh AdamW; same step function.
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=False)
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    lf = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(lf.num_output_chunks)
    tok = {"tokens": torch.randint(0, arch.vocab_size, (train_batch, train_seq)).to(device)}
    _peak_reset(device)
    _stock_step(model, opt, lf, tok, device)  # moments exist, as after any stage
    model.set_num_output_chunks(0)
    t = time.perf_counter()
    ours_model, _ = recipe_style_rebuild(model, arch, device, tdtype, opt)
    sync(device)
    rebuild_s = time.perf_counter() - t
    del model
    ours = _train_tokens_per_s(ours_model, opt, device, arch.vocab_size, train_batch, train_seq, train_steps)
    train_peak = _peak_gb(device)
    state = {k: v.detach().clone() for k, v in ours_model.state_dict().items()}
    del ours_model, opt
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    from torchtune import training

    from adapt_prune_tune.models import decoder_from_arch

    with training.set_default_dtype(tdtype), torch.device(device):
        stock_model = decoder_from_arch(arch)
    stock_model.load_state_dict(state)
    del state
    stock_opt = torch.optim.AdamW(stock_model.parameters(), lr=2e-5, fused=False)
    stock = _train_tokens_per_s(stock_model, stock_opt, device, arch.vocab_size, train_batch, train_seq, train_steps)
    del stock_model, stock_opt
    res = {
        "shape": shape, "device": device, "dtype": dtype, "build_seconds": build_s,
        "overhead": strip_private(ov),
        "prune_total_seconds": sum(r["total"] for r in rows),
        "rebuild_seconds": rebuild_s,
        "recovery": {"ours_tokens_per_s": ours["tokens_per_s"], "stock_tokens_per_s": stock["tokens_per_s"],
                     "ratio": ours["tokens_per_s"] / stock["tokens_per_s"],
                     "train_batch": train_batch, "train_seq": train_seq, "steps": train_steps},
        "peak_memory_gb": {"prune_iterations": prune_peak, "train_steps": train_peak,
                           "kind": "torch.cuda.max_memory_allocated" if "cuda" in device else "process maxrss"},
    }
    log(f"recovery tokens/s: ours {ours['tokens_per_s']:.0f}, stock {stock['tokens_per_s']:.0f}, ratio "
        f"{res['recovery']['ratio']:.3f} (rebuild {rebuild_s:.2f}s)")
    log(f"peak memory: prune iterations {prune_peak:.2f} GB, train steps {train_peak:.2f} GB")
    scaling = []
    for s in scaling_shapes:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        r = measure_overhead(s, iterations=3, total_steps=iterations, target_sparsity=target, device=device,
                             dtype=dtype, num_samples=calib_samples, seq_len=calib_seq, batch_size=calib_batch)
        r = strip_private(r)
        scaling.append({k: r[k] for k in ("shape", "params_before", "fb_seconds", "iteration_seconds", "ratio",
                                          "parts_seconds")})
        log(f"scaling {s}: iteration {r['iteration_seconds']:.3f}s, fwd+bwd {r['fb_seconds']:.3f}s, ratio {r['ratio']:.3f}")
    scaling.append({"shape": shape, "params_before": ov["params_before"], "fb_seconds": ov["fb_seconds"],
                    "iteration_seconds": ov["iteration_seconds"], "ratio": ov["ratio"],
                    "parts_seconds": ov["parts_seconds"]})
    res["scaling"] = scaling
    res["wall_seconds"] = time.perf_counter() - t_start
    return res


# =========================================================================== report


def targets_table(result: Dict[str, Any]) -> List[Dict[str, Any]]:
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
        add(f"recipe prune-step overhead ({tag})", r["ratio"], "recipe_prune_step_overhead", "recipe")
    for shape, r in result.get("throughput", {}).items():
        add(f"recovery throughput ours/stock ({shape})", r["ratio"], "throughput_ratio", "throughput")
    if "share" in result:
        ex = result["share"]["extrapolation"]
        add("prune share, paper-scale budget (Qwen 0.5B config)",
            ex["qwen2.5_0.5B_config(K=50,C=512x64,T=1e9,N=5)"], "prune_share_paper_budget", "share")
        rows.append({"figure": "prune share, demo budget (measured)", "value": result["share"]["share_of_wall"],
                     "target": "<= 0.03", "met": result["share"]["share_of_wall"] <= 0.03, "where": "share"})
    for section in ("memory", "memory_small_activations"):
        for r in result.get(section, {}).get("runs", []):
            if "prune_extra_mb" in r:
                add(f"prune-step peak RSS above training ({r.get('variant', 'default')}, calib batch "
                    f"{r['calib_batch_size']}" + (f", {r['order']})" if "order" in r else ")"), r["prune_extra_mb"], "prune_peak_extra_mb", section)
    return rows


def print_table(rows: List[Dict[str, Any]]) -> None:
    w = max([len(r["figure"]) for r in rows] + [10])
    print(f"\n{'figure'.ljust(w)}  {'value':>10}  {'target':>8}  met")
    for r in rows:
        v = r["value"]
        vs = f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        print(f"{r['figure'].ljust(w)}  {vs:>10}  {r['target']:>8}  {'yes' if r['met'] else 'NO'}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        return _worker_main(argv[1:])
    if argv and argv[0] == "gpu":
        return _gpu_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller budgets (~10 min on 2 cores)")
    p.add_argument("--only", default="", help="comma list of sections (default: all; compile is skipped by --quick)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--merge", action="store_true", help="update the sections run in an existing --out file")
    p.add_argument("--share-from", default=None, help="share: a finished SmolLM2 run's output_dir instead of a new run")
    args = p.parse_args(argv)
    sections = [s for s in args.only.split(",") if s] or [
        "overhead", "recipe", "profile", "scaling", "memory", "throughput", "share"
    ] + ([] if args.quick else ["memory_small", "compile"])
    work = Path(args.work or tempfile.mkdtemp(prefix="perf_"))
    work.mkdir(parents=True, exist_ok=True)
    q = args.quick
    result: Dict[str, Any] = {}
    if args.merge and Path(args.out).is_file():
        result = json.loads(Path(args.out).read_text())
        result.setdefault("merged_runs", []).append(
            {"command": result.get("command"), "sections": result.get("sections"), "machine": result.get("machine")})
    result.update({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                   "machine": machine_info(), "quick": q, "sections": sections})
    started = time.time()

    def log(s):
        print(s, flush=True)

    def save():
        result["seconds"] = time.time() - started
        result["machine"]["load_average_end"] = os.getloadavg()
        result["targets"] = targets_table(result)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(strip_private(result), indent=2, default=float))

    if "overhead" in sections:
        log("== prune-step overhead (single process: calibrate+score+plan+surgery vs fwd+bwd)")
        result["overhead"] = {}
        for shape, its in (("tiny", 3 if q else 6), ("smollm2", 2 if q else 4)):
            result["overhead"][shape] = strip_private(measure_overhead(shape, iterations=its, log=log))
        save()
    if "recipe" in sections:
        log("== prune-step overhead through the recipe (rebuild via _setup_model, AdamW carried)")
        result["recipe"] = {}
        runs = [("tiny", 3, 1), ("smollm2", 2 if q else 3, 1)] + ([] if q else [("tiny", 3, 2)])
        for shape, its, nproc in runs:
            result["recipe"][f"{shape}_{nproc}proc"] = section_recipe(shape, work, its, nproc, log)
        save()
    if "profile" in sections:
        log("== profile of one iteration (SmolLM2-135M)")
        result["profile"] = profile_iteration("smollm2")
        for r in result["profile"]["cprofile_top"][:8]:
            log(f"  {r['function']:<40} {r['cumulative_s']:8.3f}s cum  {r['self_s']:8.3f}s self  x{r['calls']}")
        for r in result["profile"]["torch_ops_top"][:8]:
            log(f"  {r['op']:<40} {r['self_cpu_ms']:10.1f} ms  {r['share']:.1%}")
        save()
    if "scaling" in sections:
        log("== scaling")
        result["scaling"] = measure_scaling(["tiny", "smollm2"], [512, 2048] if q else [512, 1024, 2048, 4096],
                                            iterations=2, log=log)
        log(f"  fit: {result['scaling']['calib_tokens_fit']}")
        save()
    if "memory" in sections:
        log("== peak memory: prune step vs training step (maxrss, subprocesses)")
        result["memory"] = section_memory("smollm2", work, [8] if q else [8, 4],
                                          ["train_first"] if q else ["train_first", "prune_first"], log)
        save()
    if "memory_small" in sections:
        log("== peak memory, small activations (short windows + activation checkpointing): the resize's share")
        result["memory_small_activations"] = section_memory("smollm2", work, [1], ["train_first"], log,
                                                            variant="small_activations")
        save()
    if "throughput" in sections:
        log("== recovery-training throughput: ours vs stock full_finetune_distributed, same widths")
        result["throughput"] = {}
        for shape, steps, reps in (("tiny", 12, 2), ("smollm2", 8 if q else 12, 1 if q else 2)):
            result["throughput"][shape] = section_throughput(shape, work, steps, reps, log)
        save()
    if "compile" in sections:
        log("== compile: True (12-layer model; inductor on CPU)")
        result["compile"] = section_compile("small", work, 6, log)
        save()
    if "share" in sections:
        log("== prune share of a real Adapt-Accel run (SmolLM2-135M, demo budget)")
        result["share"] = section_share(work, q, log, args.share_from)
        save()
    save()
    print_table(result["targets"])
    print(f"\nwrote {args.out}")
    return 0


def _worker_main(argv: List[str]) -> int:
    kind = argv[0]
    if kind == "recipe_overhead":
        res = worker_recipe_overhead(Path(argv[1]), int(argv[2]))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(argv[3]).write_text(json.dumps(res, default=float))
    elif kind == "memory":
        res = worker_memory(Path(argv[1]), argv[2])
        Path(argv[3]).write_text(json.dumps(res, default=float))
    elif kind == "run_recipe":
        worker_run_recipe(argv[1], Path(argv[2]))
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    return 0


def _gpu_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description="GPU check (or its CPU-sized version)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama3_1_8b", choices=ALL_SHAPES)
    p.add_argument("--dtype", default=None, help="bf16 on cuda, fp32 on cpu by default")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--target", type=float, default=0.2)
    p.add_argument("--calib", default="16x512", help="SAMPLESxSEQ_LEN")
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--train", default="4x1024", help="BATCHxSEQ_LEN of recovery steps")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--scaling", default="", help="comma list of extra shapes timed for scaling, e.g. llama3_2_1b")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if os.environ.get("PERF_STUB_MISSING"):
        simulated = [n for n in os.environ.get("PERF_STUB_SIMULATE", "").split(",") if n]
        stubbed = install_import_stubs(simulate_missing=simulated)
        if stubbed:
            print(f"gpu check: stand-in modules for {', '.join(stubbed)} (imported by torchtune, unused here)")
    dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    cs, cl = (int(x) for x in a.calib.split("x"))
    tb, tl = (int(x) for x in a.train.split("x"))
    res = run_gpu_check(a.shape, a.device, dtype, a.iterations, a.target, cs, cl, a.calib_batch, tb, tl,
                        a.train_steps, [s for s in a.scaling.split(",") if s])
    res["machine"] = machine_info(a.device)
    res["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    ov = res["overhead"]
    print("\nGPU check summary")
    print(f"  prune-step overhead (iteration / fwd+bwd, median of {ov['iterations']}): {ov['ratio']:.3f}  target <= 1.1")
    print(f"  iteration {ov['iteration_seconds']:.3f}s = {ov['parts_seconds']}; fwd+bwd {ov['fb_seconds']:.3f}s")
    print(f"  {ov['iterations']} iterations total {res['prune_total_seconds']:.1f}s")
    print(f"  recovery tokens/s ours/stock: {res['recovery']['ratio']:.3f}  target >= 0.97 "
          f"({res['recovery']['ours_tokens_per_s']:.0f} vs {res['recovery']['stock_tokens_per_s']:.0f})")
    pk = res["peak_memory_gb"]
    print(f"  peak memory ({pk['kind']}): prune {pk['prune_iterations']:.2f} GB vs train {pk['train_steps']:.2f} GB")
    for s in res["scaling"]:
        print(f"  scaling {s['shape']}: {s['params_before'] / 1e9:.3f}B params, iteration {s['iteration_seconds']:.3f}s, "
              f"fwd+bwd {s['fb_seconds']:.3f}s, ratio {s['ratio']:.3f}")
    print(f"  wall {res['wall_seconds']:.1f}s")
    out = a.out or os.path.join(os.environ.get("OUT", str(ROOT / "benchmarks" / "results")), "gpu_check.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
