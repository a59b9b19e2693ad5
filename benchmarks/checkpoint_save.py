"""Run-checkpoint saves: each rank writing its own shards vs gathering everything onto rank 0.

The recipe's checkpoints (``adapt_prune_tune.checkpointing``) have every rank write its own FSDP2
shards of the weights and AdamW moments. The earlier design gathered the full weights and full
moments onto rank 0's CPU and wrote them from there — what torchtune's stock recipe does with
``get_model_state_dict(full_state_dict=True, cpu_offload=True)``. This benchmark saves the same
FSDP2 model and optimizer both ways in one 2-process (gloo) run, alternating, and reports per
rank the median wall seconds of a save and the largest resident-memory growth during one, then projects
both to Llama-3.1-8B on 8 and 32 GPUs from exact byte counts.

The model is SmolLM2-135M's shape (random weights: a save does not depend on their values)
after one AdamW step, so both moments exist.

    python benchmarks/checkpoint_save.py            # ~2 min on 2 CPU cores
    python benchmarks/checkpoint_save.py --repeats 1 --out /tmp/c.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_save.json"
ROOT = Path(__file__).resolve().parents[1]


def gather_save(model, optimizer, directory: Path) -> None:
    """The gather design: full weights and moments assembled on rank 0's CPU, written there."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() == 0:
        moments = {
            f"{name}/{key}": value.contiguous()
            for name, state in optim["state"].items()
            for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        }
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
        save_file(moments, str(directory / "optim.safetensors"))
        for f in directory.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    dist.barrier()


def worker(args: argparse.Namespace) -> None:
    """One rank of the torchrun job: build, shard, step, then time both saves alternately."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from adapt_prune_tune.checkpointing import save_run_checkpoint
    from adapt_prune_tune.models import SMOLLM2_135M, decoder_from_arch
    from adapt_prune_tune.speed import peak_memory_growth

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = decoder_from_arch(SMOLLM2_135M).to(dtype)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens = torch.randint(0, SMOLLM2_135M.vocab_size, (1, 64))
    model(tokens).float().logsumexp(-1).mean().backward()
    optimizer.step()

    root = Path(args.dir)
    samples: Dict[str, List[Dict[str, float]]] = {"sharded": [], "gather": []}
    for repeat in range(args.repeats):
        order = ("sharded", "gather") if repeat % 2 == 0 else ("gather", "sharded")
        for design in order:
            target = root / f"{design}-{repeat}"
            if rank == 0:
                target.mkdir(parents=True)
            dist.barrier()
            with peak_memory_growth(torch.device("cpu")) as peak:
                t0 = time.perf_counter()
                if design == "sharded":
                    save_run_checkpoint(target, "step_0000001_prune_0001", SMOLLM2_135M, model, optimizer, {}, {})
                else:
                    gather_save(model, optimizer, target)
                seconds = time.perf_counter() - t0
            samples[design].append({"seconds": seconds, "peak_growth_bytes": peak["growth_bytes"]})
            dist.barrier()
            if rank == 0:
                shutil.rmtree(target)
    every = [None] * world
    dist.all_gather_object(every, {"rank": rank, "samples": samples, "measure": peak["measure"]})
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(every))
    dist.destroy_process_group()


def llama3_1_8b_arch():
    """Llama-3.1-8B's spec, built on the meta device from torchtune's own builder (no weights)."""
    import torch
    from torchtune.models.llama3_1 import llama3_1_8b

    from adapt_prune_tune.models import arch_from_model

    with torch.device("meta"):
        return arch_from_model(llama3_1_8b())


def summarize(per_rank: List[Dict[str, Any]], args: argparse.Namespace) -> Dict[str, Any]:
    from adapt_prune_tune.config_checks import checkpoint_bytes
    from adapt_prune_tune.models import SMOLLM2_135M

    def med(rank: int, design: str, key: str) -> float:
        return statistics.median(s[key] for s in per_rank[rank]["samples"][design])

    def peak(rank: int, design: str) -> float:
        """The largest growth over the repeats: a process keeps memory it freed, so a repeat after
        the first can reuse it and show less; the first gather shows the whole cost."""
        return max(0.0, max(s["peak_growth_bytes"] for s in per_rank[rank]["samples"][design]))

    world = len(per_rank)
    dtype_bytes = {"fp32": 4, "bf16": 2}[args.dtype]
    # Weights plus AdamW's two moments, in the parameter dtype as torchtune's recipe keeps them.
    total = checkpoint_bytes(SMOLLM2_135M, dtype_bytes, dtype_bytes, trains=True)
    measured = {
        design: {
            f"rank{r}": {"seconds": med(r, design, "seconds"), "peak_growth_MB": peak(r, design) / 1e6}
            for r in range(world)
        }
        for design in ("sharded", "gather")
    }
    ratios = {
        "rank0_seconds_sharded_over_gather": measured["sharded"]["rank0"]["seconds"] / measured["gather"]["rank0"]["seconds"],
        "rank0_peak_sharded_over_gather": measured["sharded"]["rank0"]["peak_growth_MB"]
        / max(1e-9, measured["gather"]["rank0"]["peak_growth_MB"]),
    }
    # Bytes one process must hold and write per save, Llama-3.1-8B in bf16 (weights + 2 moments).
    full_8b = checkpoint_bytes(llama3_1_8b_arch(), 2, 2, trains=True)
    projection = {
        f"{gpus}_gpus": {
            "gather_rank0_GB": full_8b / 1e9,
            "sharded_per_rank_GB": full_8b / gpus / 1e9,
            "gather_rank0_write_seconds_at_measured_rate": full_8b
            / (total / measured["gather"]["rank0"]["seconds"]),
            "sharded_write_seconds_at_measured_rate": full_8b
            / gpus
            / (total / world / measured["sharded"]["rank0"]["seconds"]),
        }
        for gpus in (8, 32)
    }
    return {
        "state_bytes_MB": total / 1e6,
        "measured": measured,
        "ratios": ratios,
        "projection_llama3_1_8b_bf16": projection,
        "projection_note": (
            "bytes are exact (8,030,261,248 params x 2 bytes x weights + 2 AdamW moments); seconds scale this "
            "run's per-process write rate (CPU, local disk, gloo) to those bytes and ignore that gathering also "
            "moves every byte over the network to rank 0: on GPUs the gather adds that transfer, the sharded "
            "write does not"
        ),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        worker_out = Path(tmp) / "ranks.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            __file__, "--worker", "--dir", str(Path(tmp) / "saves"), "--worker-out", str(worker_out),
            "--repeats", str(args.repeats), "--dtype", args.dtype,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run(cmd, check=True, env=env)
        per_rank = json.loads(worker_out.read_text())
    result = {
        "command": "python benchmarks/checkpoint_save.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"repeats": args.repeats, "dtype": args.dtype, "nproc": args.nproc, "model": "SmolLM2-135M shape"},
        "memory_measure": per_rank[0]["measure"],
        **summarize(per_rank, args),
        "raw": per_rank,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("measured", "ratios", "projection_llama3_1_8b_bf16")}, indent=1))


if __name__ == "__main__":
    main()
