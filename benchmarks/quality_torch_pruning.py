"""Torch-Pruning's row of the quality benchmark: the same model, calibration windows and held-out
texts as ``quality.py``, pruned by a general dependency-graph pruner to the same parameter counts.

Torch-Pruning (VainF/Torch-Pruning, ``pip install torch-pruning==1.6.1``: a benchmark-only
dependency, not one of the package's) traces the Hugging Face model (``LlamaForCausalLM``,
``attn_implementation="eager"``, ``use_cache=False``, fp32, from the prepared checkpoint
directory) into a dependency graph and prunes it through its public API: ``tp.pruner.BasePruner``
(``MetaPruner`` in its older examples) with ``iterative_steps`` and either
``tp.importance.GroupTaylorImportance`` (gradients of the next-token loss summed over the
calibration batches before every step, as ``quality.py`` computes them) or its magnitude default
``tp.importance.GroupMagnitudeImportance`` (L2, no calibration).

MLP channels only. Its iterative GQA head pruning does not work on SmolLM2's 9 query / 3 KV
heads, so ``lm_head`` and every ``self_attn`` are ``ignored_layers``: a group whose output
channels touch an ignored module is not pruned, which removes the heads, their head dims and
the hidden size (``o_proj`` writes the residual stream) from its reach and leaves exactly the
MLP channel groups (rows of gate_proj and up_proj, columns of down_proj). Neither embedding
nor ``lm_head`` is cut, so the tied embeddings stay one tensor (checked; re-tied if not).
Our Taylor rows are MLP pruning in effect too (``attention_allocation: score`` never removed a
head on SmolLM2, README "Quality").

Same parameter count: our sparsity s removes s x (attention + MLP projections) weights; an MLP
channel holds 3 x hidden of them, so Torch-Pruning removes round(s x prunable / (3 x hidden))
channels, spread evenly over the layers (``pruning_ratio_dict`` per layer's ``mlp``, local
ranking as in its LLM example) or ranked model-wide (``--scope global``). Each target is its own
run of round(``--steps`` x s / 0.4) steps, the step size of ``quality.py``'s shared schedule with
the same ``--steps``; the parameter count is asserted equal to ours.

Evaluation: the Hugging Face model behind a module that returns logits, through the same
``perplexity`` on the same windows as ``quality.py``; the unpruned model's perplexities are
compared with our torchtune model's (``original.ours``).

Results go to the ``"torch_pruning"`` key of ``benchmarks/results/quality.json``, rewritten
after every trajectory; trajectories already there (key
``<importance>/<scope>/seed<s>/steps<K>@<target>``) are kept, so an interrupted command run
again continues.

    pip install --no-deps torch-pruning==1.6.1
    python benchmarks/quality_torch_pruning.py --seeds 0 1 2          # Taylor, 20/30/40 %
    python benchmarks/quality_torch_pruning.py --importance magnitude  # one run per target
    python benchmarks/quality_torch_pruning.py --smoke                 # seconds: a tiny random Llama
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quality_eval import (  # noqa: E402
    EVAL_TOKENS,
    EVAL_WINDOW,
    SMOLLM2,
    TEXTS,
    TORCH_PRUNING_KEY,
    aggregate,
    calibration_batches,
    evaluate,
    heldout_windows,
    machine,
    read_results,
    settings_conflict,
    update_results,
)
from adapt_prune_tune.assets import prepare_smollm2  # noqa: E402
from adapt_prune_tune.corpus import prepare_python_docs  # noqa: E402
from adapt_prune_tune.models import DecoderArch, load_hf_model  # noqa: E402
from adapt_prune_tune.models._hf import read_hf_arch  # noqa: E402
from adapt_prune_tune.novels import prepare_novels  # noqa: E402
from adapt_prune_tune.pruner import next_token_loss  # noqa: E402
from adapt_prune_tune.tokenizer import smollm2_tokenizer  # noqa: E402

TORCH_PRUNING_VERSION = "1.6.1"
SMOKE_MODEL = "tiny random Llama with SmolLM2's vocabulary (--smoke)"
SETTINGS = ("model", "calib_samples", "calib_len", "calib_batch", "eval_tokens", "eval_window")
QUALITY_DEFAULTS = {"calib_samples": 32, "calib_len": 128, "calib_batch": 8}  # quality.py's
SMOKE_DEFAULTS = {"calib_samples": 4, "calib_len": 32, "calib_batch": 2}


def import_torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise SystemExit("Torch-Pruning is not installed: pip install --no-deps "
                         f"torch-pruning=={TORCH_PRUNING_VERSION} (pure Python; --no-deps keeps the installed torch)"
                         ) from None
    return torch_pruning


class CausalLMLogits(nn.Module):
    """``tokens -> logits`` of a Hugging Face causal LM: what ``perplexity`` and
    ``next_token_loss`` call, so both read the windows exactly as they do for torchtune models."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens).logits


def load_causal_lm(model_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                use_cache=False)


def mlp_channels_to_remove(arch: DecoderArch, sparsity: float) -> int:
    """MLP channels whose weights equal ``sparsity`` of the prunable (attention + MLP) projections."""
    return round(sparsity * arch.prunable_params() / (3 * arch.embed_dim))


def even_split(total: int, parts: int) -> List[int]:
    """``total`` as ``parts`` integers that differ by at most one, the larger ones spread out."""
    return [(i + 1) * total // parts - i * total // parts for i in range(parts)]


def prune_trajectory(
    tp,
    hf_model: nn.Module,
    arch: DecoderArch,
    importance: str,
    scope: str,
    target: float,
    steps: int,
    batches: Sequence[Dict[str, torch.Tensor]],
    windows: Dict[str, torch.Tensor],
    log,
) -> Dict[str, Any]:
    """Prune a copy of ``hf_model``'s MLP channels to ``target`` in ``steps`` Torch-Pruning steps."""
    model = copy.deepcopy(hf_model)
    lm = CausalLMLogits(model)
    layers = list(model.model.layers)
    width = arch.layers[0].intermediate_dim
    removed = mlp_channels_to_remove(arch, target)
    # Ratios half a channel short of the count: Torch-Pruning keeps int(width * (1 - ratio)).
    if scope == "local":
        ratios = dict(pruning_ratio_dict={layer.mlp: (n - 0.5) / width
                                          for layer, n in zip(layers, even_split(removed, len(layers)))})
    else:
        ratios = dict(global_pruning=True, pruning_ratio=(removed - 0.5) / (width * len(layers)))
    if importance == "taylor":
        scorer = tp.importance.GroupTaylorImportance()
    else:
        scorer = tp.importance.GroupMagnitudeImportance()  # its default: L2, mean over the group
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=batches[0]["tokens"][:1],
        importance=scorer,
        iterative_steps=steps,
        ignored_layers=[model.lm_head, *(layer.self_attn for layer in layers)],
        # The RMSNorm weights live on the hidden size (dim 0), which the ignored layers keep whole.
        unwrapped_parameters=[(p, 0) for name, p in model.named_parameters() if name.endswith("norm.weight")],
        **ratios,
    )
    # Taylor needs only the MLP gradients (attention and embeddings are never scored).
    for name, p in model.named_parameters():
        p.requires_grad_(importance == "taylor" and ".mlp." in name)
    step_seconds, calib_seconds, tp_seconds, calib_loss = [], [], [], []
    for k in range(steps):
        t0 = time.perf_counter()
        loss_sum, count = float("nan"), 0
        if importance == "taylor":
            model.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for batch in batches:
                loss, n = next_token_loss(lm, batch)
                loss.backward()
                loss_sum, count = loss_sum + float(loss.detach()) * n, count + n
        t1 = time.perf_counter()
        pruner.step()
        t2 = time.perf_counter()
        calib_loss.append(loss_sum / count if count else float("nan"))
        calib_seconds.append(t1 - t0)
        tp_seconds.append(t2 - t1)
        step_seconds.append(t2 - t0)
        log(f"  step {k + 1}/{steps} loss {calib_loss[-1]:.4f} MLP widths "
            f"{min(l.mlp.gate_proj.out_features for l in layers)}-{max(l.mlp.gate_proj.out_features for l in layers)} "
            f"{t2 - t0:.1f}s (pruner.step {t2 - t1:.1f}s)")
    model.zero_grad(set_to_none=True)

    tied = "not tied"
    if arch.tie_word_embeddings:
        tied = "stayed tied"
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.lm_head.weight = model.model.embed_tokens.weight
            tied = "re-tied"
    widths = [layer.mlp.gate_proj.out_features for layer in layers]
    params = sum(p.numel() for p in model.parameters())  # a tied weight counts once
    expected = arch.num_params() - removed * 3 * arch.embed_dim
    attention_kept = all(
        layer.self_attn.q_proj.weight.shape == (spec.num_heads * arch.head_dim, arch.embed_dim)
        and layer.self_attn.k_proj.weight.shape == (spec.num_kv_heads * arch.head_dim, arch.embed_dim)
        and layer.self_attn.o_proj.weight.shape == (arch.embed_dim, spec.num_heads * arch.head_dim)
        for layer, spec in zip(layers, arch.layers)
    )
    if params != expected or sum(widths) != arch.num_layers * width - removed or not attention_kept:
        raise RuntimeError(f"Torch-Pruning removed other weights than {removed} MLP channels: {params:,} parameters "
                           f"(expected {expected:,}), MLP widths {widths}, attention unchanged: {attention_kept}")
    ppl, eval_s = evaluate(lm, windows)
    log(f"  @ {target:.0%}: " + ", ".join(f"{t} {ppl[t]:.2f}" for t in TEXTS) + f" ({eval_s:.0f}s eval)")
    return {
        "at": {f"{target:.2f}": {
            "perplexity": ppl,
            "params": params,
            "mlp_channels_removed": removed,
            "prunable_reduction": removed * 3 * arch.embed_dim / arch.prunable_params(),
            "total_reduction": 1.0 - params / arch.num_params(),
            "intermediate_dim": widths,
            "eval_seconds": eval_s,
        }},
        "tied_embeddings": tied,
        "seconds_per_step": sum(step_seconds) / steps,
        "calibration_seconds_per_step": sum(calib_seconds) / steps,
        "pruner_step_seconds_per_step": sum(tp_seconds) / steps,
        "step_seconds": [round(s, 2) for s in step_seconds],
        "calib_loss": calib_loss,
    }


# --------------------------------------------------------------------------- main


def tiny_llama(vocab_size: int, directory: Path) -> Path:
    """A random 4-layer Llama (GQA 4/2, tied embeddings) saved as a checkpoint directory (``--smoke``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         rope_theta=100_000.0, tie_word_embeddings=True, initializer_range=0.02)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, 256 tokens of each text (seconds)")
    parser.add_argument("--importance", choices=("taylor", "magnitude"), default="taylor")
    parser.add_argument("--scope", choices=("local", "global"), default="local",
                        help="local: the same number of channels from every layer; global: ranked model-wide")
    parser.add_argument("--targets", type=float, nargs="+", default=None,
                        help="fractions of the prunable projections (as quality.py's), default 0.2 0.3 0.4")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps to 40%% (fewer for lower targets: the step size of quality.py --schedule shared)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration samples (Taylor only)")
    parser.add_argument("--calib-samples", type=int, default=None, help="default: quality.json's, else quality.py's")
    parser.add_argument("--calib-len", type=int, default=None)
    parser.add_argument("--calib-batch", type=int, default=None)
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per text (default 8192)")
    parser.add_argument("--eval-window", type=int, default=None, help="tokens per window (default 512)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the trajectories already in --out (default); --no-resume starts the section over")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    args = parser.parse_args(argv)
    args.targets = sorted(args.targets or ([0.2, 0.4] if args.smoke else [0.2, 0.3, 0.4]))
    args.steps = args.steps or (2 if args.smoke else 40)
    args.eval_tokens = args.eval_tokens or (256 if args.smoke else EVAL_TOKENS)
    args.eval_window = args.eval_window or (128 if args.smoke else EVAL_WINDOW)
    args.model = SMOKE_MODEL if args.smoke else SMOLLM2
    if args.importance == "magnitude":
        args.seeds = [0]  # no calibration: one run whatever --seeds
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    tp = import_torch_pruning()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    doc = read_results(args.out)
    ours = doc.get("settings", {})
    same_model = ours.get("model") == args.model
    defaults = SMOKE_DEFAULTS if args.smoke else QUALITY_DEFAULTS
    for k in defaults:  # the calibration windows of quality.py's rows in this file
        if getattr(args, k) is None:
            setattr(args, k, ours[k] if same_model and k in ours else defaults[k])
    settings = {k: getattr(args, k) for k in SETTINGS}
    section = doc.get(TORCH_PRUNING_KEY, {}) if args.resume else {}
    if section.get("results") and (conflict := settings_conflict(section.get("settings", {}), settings, SETTINGS)):
        raise SystemExit(f"{args.out} holds Torch-Pruning runs with other settings: {conflict}; use the same "
                         "settings, another --out, or --no-resume")
    if same_model and (conflict := settings_conflict(ours, settings, SETTINGS)):
        log(f"note: quality.py's rows in {args.out} used other settings ({conflict}): not comparable")

    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tmp:  # --smoke's checkpoint
        return _run(tp, args, doc, settings, ours, same_model, Path(tmp), argv, log)


def _run(tp, args, doc, settings, ours, same_model, tmp: Path, argv, log) -> Dict[str, Any]:
    t_start = time.perf_counter()
    section = doc.get(TORCH_PRUNING_KEY, {}) if args.resume else {}
    smollm2 = prepare_smollm2()
    python_docs = prepare_python_docs(tokenizer_path=smollm2)
    austen = prepare_novels(tokenizer_path=smollm2)
    tok = smollm2_tokenizer(str(smollm2))
    windows = heldout_windows(tok, python_docs, austen, args.eval_tokens, args.eval_window,
                              max_chars=64 * args.eval_tokens if args.smoke else None)
    model_dir = tiny_llama(tok.vocab_size, tmp) if args.smoke else smollm2
    arch = read_hf_arch(model_dir)
    hf_model = load_causal_lm(model_dir)
    same_settings = not settings_conflict(section.get("settings", {}), settings, SETTINGS)
    original = section.get("original") if same_settings else None
    if not original:
        ppl, seconds = evaluate(CausalLMLogits(hf_model), windows)
        same_eval = same_model and not settings_conflict(ours, settings, ("eval_tokens", "eval_window"))
        if same_eval and doc.get("original", {}).get("perplexity"):
            theirs = doc["original"]["perplexity"]
        else:  # our torchtune model of the same checkpoint
            tune_model, _ = load_hf_model(model_dir, dtype=torch.float32, max_seq_len=1024)
            theirs = evaluate(tune_model, windows)[0]
            del tune_model
        diff = max(abs(ppl[t] / theirs[t] - 1.0) for t in TEXTS)
        original = {"perplexity": ppl, "params": sum(p.numel() for p in hf_model.parameters()),
                    "eval_seconds": seconds, "ours": theirs, "max_relative_difference": diff,
                    "matches_ours": diff < 1e-4}
    log("original (Hugging Face model): " + ", ".join(f"{t} {original['perplexity'][t]:.4f}" for t in TEXTS)
        + "; ours (torchtune): " + ", ".join(f"{t} {original['ours'][t]:.4f}" for t in TEXTS)
        + f"; max relative difference {original['max_relative_difference']:.1e}")

    def header(d: Dict[str, Any]) -> None:
        sec = d.get(TORCH_PRUNING_KEY, {}) if args.resume else {}
        command = " ".join(["python", "benchmarks/quality_torch_pruning.py",
                            *(sys.argv[1:] if argv is None else argv)])
        d[TORCH_PRUNING_KEY] = {
            "version": version("torch-pruning"),
            "commands": [*sec.get("commands", []), command],
            "machine": machine(),
            "model": args.model,
            "settings": settings,
            "notes": [
                "Torch-Pruning BasePruner (MetaPruner), iterative_steps, MLP channels only (lm_head and every "
                "self_attn in ignored_layers), Hugging Face LlamaForCausalLM, eager attention, fp32",
                "each target its own run of round(steps_to_40% * target / 0.4) steps; MLP channels removed = "
                "round(target * prunable / (3 * hidden)): the parameter count of quality.py's rows at that target",
                "taylor: GroupTaylorImportance on the next-token loss gradients summed over the calibration "
                "batches (quality.py's windows for that seed), recomputed before every step; magnitude: "
                "GroupMagnitudeImportance (L2), no calibration",
                "seconds_per_step = calibration forward+backward + pruner.step (both also reported)",
            ],
            "original": original,
            "results": sec.get("results", {}),
        }
        d[TORCH_PRUNING_KEY]["aggregates"] = aggregate(d[TORCH_PRUNING_KEY]["results"])

    doc = update_results(args.out, header)
    percent = 40.0 / args.steps
    for seed in args.seeds:
        batches = calibration_batches(python_docs, tok, args.calib_samples, args.calib_len, args.calib_batch, seed)
        for target in args.targets:
            steps = max(1, round(args.steps * target / 0.4))
            key = f"{args.importance}/{args.scope}/seed{seed}/steps{steps}@{target:.2f}"
            if key in doc[TORCH_PRUNING_KEY]["results"]:
                log(f"{key}: kept from {args.out}")
                continue
            log(f"{key}: {mlp_channels_to_remove(arch, target):,} MLP channels in {steps} steps")
            res = prune_trajectory(tp, hf_model, arch, args.importance, args.scope, target, steps, batches,
                                   windows, log)
            res["row"] = f"torch_pruning/{args.importance}/{args.scope}/{percent:g}%"
            res["spec"] = {"importance": args.importance, "scope": args.scope, "seed": seed, "target": target,
                           "steps": steps, "percent_per_step": percent}

            def record(d: Dict[str, Any], key: str = key, res: Dict[str, Any] = res) -> None:
                d[TORCH_PRUNING_KEY]["results"][key] = res
                d[TORCH_PRUNING_KEY]["aggregates"] = aggregate(d[TORCH_PRUNING_KEY]["results"])

            doc = update_results(args.out, record)
    print()
    print(doc["table"])
    print(f"\ntotal {(time.perf_counter() - t_start) / 60:.1f} min; wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
