"""Packing pre-training text: torchtune's ``PackedDataset`` against ``adapt_prune_tune.packing``.

Both pack the same documents in the same (seeded) order into the same packs (tested in
``tests/test_packing.py``); each side runs in a fresh process, one after the other, and reports
its wall time and the growth of its resident memory over the loaded, unpacked dataset (the
packs' cost). ``benchmarks/results/packing.json`` holds the figures and, from them, what packing
a corpus the size of the GPU configs' SlimPajama-6B (up to 5.6 B tokens once each document is
cut at 1,024) would take per rank.

    python benchmarks/packing.py                  # the Python docs, 1,024-token packs (~1 min)
    python benchmarks/packing.py --max-tokens 500000   # ours packs only that many tokens' worth

A third side, ``ours_workers``, packs the corpus ``--repeat`` times over (enough tokens for
worker processes to pay for their start) with ``--workers`` tokenizing processes (default: this
machine's CPUs), against ours in this process on the same documents: the speed-up a rank gets
from its share of the node's CPUs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, last_json_line, machine_info, run_with_peak_rss, script_cmd  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "packing.json"
SLIMPAJAMA_6B_TOKENS_MAX = 5.6e9  # 5.5 M documents, each cut at 1,024 tokens: an upper bound


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024


def worker(side: str, max_seq_len: int, max_tokens: int, seed: int, workers: int = 0, repeat: int = 1) -> Dict[str, Any]:
    """Pack the Python docs on one side in this process; time and memory of the packing alone."""
    import torch
    from torchtune.datasets import PackedDataset

    from adapt_prune_tune.assets import prepare_smollm2
    from adapt_prune_tune.corpus import prepare_python_docs
    from adapt_prune_tune.packing import TextPacks, _Samples, packed_text_dataset
    from adapt_prune_tune.tokenizer import smollm2_tokenizer

    tok = smollm2_tokenizer(str(prepare_smollm2()), max_seq_len=max_seq_len)
    source = dict(source="json", data_files=str(prepare_python_docs() / "train.jsonl"), column="text", split="train")
    docs = packed_text_dataset(tok, packed=False, **source)  # loaded and cached before the clock
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    start, started_rate = 0.0, 0.0
    if workers > 1:  # apart: what starting the processes costs, and their rate once started
        t0 = time.perf_counter()
        reader = _Samples(docs, order * repeat, 0, workers)
        reader.next()
        start, read = time.perf_counter() - t0, 0
        while reader.start < len(order) * repeat:
            read += len(reader.next()[0])
        reader.close()
        started_rate = read / (time.perf_counter() - t0 - start)
    gc.collect()
    before, t0 = rss_bytes(), time.perf_counter()
    if side == "torchtune":
        packs = PackedDataset(torch.utils.data.Subset(docs, order), max_seq_len=max_seq_len, split_across_pack=True)
    elif side.startswith("repeated"):  # the corpus `repeat` times over, tokenized by `workers` processes
        packs = TextPacks(docs, max_seq_len, order * repeat, workers=workers)
    else:
        packs = packed_text_dataset(tok, packed=True, max_tokens=max_tokens or None, seed=seed, **source)
    seconds = time.perf_counter() - t0
    gc.collect()
    grown = rss_bytes() - before
    tokens = len(packs) * max_seq_len
    if side.startswith("repeated"):
        return {"side": side, "workers": workers, "repeat": repeat, "packs": len(packs), "tokens": tokens,
                "seconds": seconds, "tokens_per_s": tokens / seconds, "start_seconds": start,
                "started_tokens_per_s": started_rate or tokens / seconds}
    if side == "torchtune":
        tensors = [t for pack in packs.packs for t in pack.values()]
    else:
        tensors = [t for block in packs._blocks for t in block.values()]
    stored = sum(t.numel() * t.element_size() for t in tensors)
    return {"side": side, "packs": len(packs), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "rss_growth_bytes": grown, "bytes_per_token": grown / tokens, "tensor_bytes_per_token": stored / tokens}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=0, help="ours: pack only this many tokens' worth (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes, ours_workers side")
    p.add_argument("--repeat", type=int, default=4, help="ours_workers: pack the corpus this many times over")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("PACKING", json.dumps(worker(args.worker, args.max_seq_len, args.max_tokens, args.seed,
                                           args.workers, args.repeat)))
        return 0
    sides = {}
    for side in ("torchtune", "ours"):
        cmd = script_cmd(Path(__file__), "--worker", side, "--max-seq-len", str(args.max_seq_len),
                         "--max-tokens", str(args.max_tokens), "--seed", str(args.seed))
        proc, peak, wall = run_with_peak_rss(cmd, threads=1)
        sides[side] = {**last_json_line(proc.stdout, "PACKING"), "process_peak_rss_bytes": peak}
        s = sides[side]
        print(f"{side:9s}: {s['packs']:,} packs ({s['tokens']:,} tokens) in {s['seconds']:.1f} s "
              f"({s['tokens_per_s']:,.0f} tokens/s), +{s['rss_growth_bytes'] / 2**20:,.0f} MiB "
              f"= {s['bytes_per_token']:.1f} bytes per packed token (tensor data: {s['tensor_bytes_per_token']:.1f})")
    pooled = {}
    for side, workers in (("repeated_here", 0), ("repeated_workers", args.workers)):
        cmd = script_cmd(Path(__file__), "--worker", side, "--max-seq-len", str(args.max_seq_len), "--seed",
                         str(args.seed), "--workers", str(workers), "--repeat", str(args.repeat))
        proc, _, _ = run_with_peak_rss(cmd, threads=1)
        pooled[side] = last_json_line(proc.stdout, "PACKING")
        print(f"ours, the corpus {args.repeat}× over, {workers or 'no'} tokenizing processes: "
              f"{pooled[side]['tokens']:,} tokens in {pooled[side]['seconds']:.1f} s "
              f"({pooled[side]['tokens_per_s']:,.0f} tokens/s, starting them included)")
    here, there = pooled["repeated_here"], pooled["repeated_workers"]
    speedup = there["tokens_per_s"] / here["tokens_per_s"]
    started = there["started_tokens_per_s"] / here["tokens_per_s"]
    print(f"tokenizing processes ({args.workers}) / this process, tokens/s: {speedup:.2f} "
          f"({started:.2f} once started; starting them took {there['start_seconds']:.0f} s)")
    one_b = {"this_process_hours": 1e9 / here["tokens_per_s"] / 3600,
             "tokenizing_processes_hours": (there["start_seconds"] + 1e9 / there["started_tokens_per_s"]) / 3600}
    print(f"1 B tokens on this machine: {one_b['this_process_hours']:.2f} h in this process, "
          f"{one_b['tokenizing_processes_hours']:.2f} h with {args.workers} tokenizing processes")
    ours, theirs = sides["ours"], sides["torchtune"]
    memory_ratio = ours["bytes_per_token"] / theirs["bytes_per_token"]
    print(f"memory per packed token, ours / torchtune: {memory_ratio:.2f}")
    at_scale = {side: {"GiB_per_rank": s["bytes_per_token"] * SLIMPAJAMA_6B_TOKENS_MAX / 2**30,
                       "hours_per_rank": SLIMPAJAMA_6B_TOKENS_MAX / s["tokens_per_s"] / 3600}
                for side, s in sides.items()}
    for side, v in at_scale.items():
        print(f"SlimPajama-6B whole ({SLIMPAJAMA_6B_TOKENS_MAX:.1e} tokens at most), {side}: "
              f"{v['GiB_per_rank']:,.0f} GiB and {v['hours_per_rank']:.1f} h per rank at this machine's rate")
    result = {
        "command": "python benchmarks/packing.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "max_seq_len": args.max_seq_len,
        "sides": sides,
        "memory_per_token_ours_over_torchtune": memory_ratio,
        "tokenizing_processes": {**pooled, "speedup": speedup, "speedup_once_started": started,
                                 "one_billion_tokens": one_b},
        "slimpajama_6b_whole_corpus_estimate": at_scale,
        "note": "the GPU configs pack only adapt.total_tokens (1 B: ~6 GB per rank with ours), not the whole corpus",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
