"""Carry AdamW state across a resize (sliced) or reset it? Measured on the real SmolLM2.

Adapt-Accel's official scripts restart training per stage, so AdamW starts from
zero after each prune; our recipe can instead slice the moments to the kept
channels (``adapt.optimizer_state: slice``). This benchmark trains SmolLM2 for
a few steps (building moments), prunes once, then continues on fresh batches
with each policy from identical weights, and reports the mean training loss
over the steps right after the resize and the held-out loss at the end.

    python benchmarks/optimizer_state.py [--lr 2e-5 --sparsity 0.2 --after 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from adapt_prune_tune.assets import prepare_smollm2
from adapt_prune_tune.corpus import prepare_python_docs
from adapt_prune_tune.models import decoder_from_arch, load_hf_model
from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig, next_token_loss
from adapt_prune_tune.resize import PrunedStateView, optimizer_state_by_name, parameter_shapes, rebind_optimizer_
from adapt_prune_tune.surgery import full_slice_map
from adapt_prune_tune.tokenizer import smollm2_tokenizer

POLICIES = {
    "slice": "carry exp_avg and exp_avg_sq of kept channels (and the step count)",
    "reset": "fresh AdamW state after every resize (the official code's behaviour)",
    "slice_second_moment": "carry exp_avg_sq and step, zero exp_avg (drop stale momentum)",
}


def windows(model_dir: Path, data_dir: Path, count: int, batch: int, seq_len: int) -> List[Dict[str, torch.Tensor]]:
    tok = smollm2_tokenizer(str(model_dir))
    stream: List[int] = []
    for line in (data_dir / "train.jsonl").read_text().splitlines():
        stream += tok.encode(json.loads(line)["text"])
        if len(stream) >= count * batch * (seq_len + 1):
            break
    w = torch.tensor(stream[: count * batch * (seq_len + 1)]).view(count, batch, seq_len + 1)
    return [{"tokens": x} for x in w]


def run_policy(policy: str, model_dir: Path, data: List[Dict], args: argparse.Namespace) -> Dict[str, float]:
    torch.manual_seed(0)
    warm, calib = data[: args.warm], data[args.warm : args.warm + 2]
    after = data[args.warm + 2 : args.warm + 2 + args.after]
    held = data[args.warm + 2 + args.after :]
    model, arch = load_hf_model(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for batch in warm:
        next_token_loss(model, batch)[0].backward()
        opt.step()
        opt.zero_grad()
    pruner = AdaptivePruner(PruningConfig(target_sparsity=args.sparsity, steps=1), arch)
    plan, _ = pruner.measure_and_plan(model, arch, calib, args.sparsity)
    slices = full_slice_map(arch, plan.keeps)
    state = optimizer_state_by_name(model, opt) if policy != "reset" else {}
    if policy == "slice_second_moment":
        state = {n: {k: torch.zeros_like(v) if k == "exp_avg" else v for k, v in e.items()} for n, e in state.items()}
    shapes = parameter_shapes(model)
    new = decoder_from_arch(plan.arch)
    new.load_state_dict(dict(PrunedStateView(model, slices)))
    for m in new.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    rebind_optimizer_(opt, new, state, slices, shapes)
    losses = []
    for batch in after:
        loss = next_token_loss(new, batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        heldout = sum(float(next_token_loss(new, b)[0]) for b in held) / len(held)
    return {"mean_train_loss_after_resize": sum(losses) / len(losses), "heldout_loss": heldout, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-5, 1e-4])
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--warm", type=int, default=10, help="training steps before the resize")
    parser.add_argument("--after", type=int, default=8, help="training steps after the resize")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "optimizer_state.json")
    args = parser.parse_args()
    model_dir, data_dir = prepare_smollm2(), None
    data_dir = prepare_python_docs(tokenizer_path=model_dir)
    data = windows(model_dir, data_dir, args.warm + 2 + args.after + 4, batch=2, seq_len=128)
    results = {}
    t0 = time.perf_counter()
    for lr in args.lr:
        args_lr = argparse.Namespace(**{**vars(args), "lr": lr})
        results[str(lr)] = {p: run_policy(p, model_dir, data, args_lr) for p in POLICIES}
        for p, r in results[str(lr)].items():
            print(f"lr {lr:g}  {p:22s} train loss after resize {r['mean_train_loss_after_resize']:.4f}  held-out {r['heldout_loss']:.4f}")
    payload = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": platform.processor() or platform.machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"batch": "2 x 128 tokens"},
        "policies": POLICIES,
        "results": results,
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
