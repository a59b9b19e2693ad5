"""torchao low-bit AdamW across resizes: what its compiled step costs when every width is new.

torchao's ``_AdamBase.step`` compiles its per-parameter update with ``dynamic=False`` (and no
recompile limit), so every distinct parameter shape is one more graph. After a resize the MLP
weights of each layer have a width no earlier step saw (``w1``/``w3`` and ``w2`` are two
shapes per layer), so the first optimizer step of every stage compiles again, once per shape.

Measured here, each side in a fresh process with an empty inductor cache: ``--resizes`` rounds
of ``--layers`` layers' MLP weights (SmolLM2's hidden size, a width per layer, all new in each
round, as after a cut), with ``torchao.optim.AdamW8bit`` as shipped (``static``) and with the
same update compiled with dynamic shapes (``dynamic``, torchao's module sees a ``compile``
that passes ``dynamic=True``; a candidate, not what the recipe does). Per round: the first
step's seconds, graphs compiled, and a steady step's seconds.

    OMP_NUM_THREADS=1 python benchmarks/lowbit_compile.py      # writes benchmarks/results/lowbit_compile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ROOT, last_json_line, machine_info, median, run_cmd, script_cmd  # noqa: E402

HIDDEN = 576  # SmolLM2-135M
BASE_WIDTH = 1536


class _DynamicCompile:
    """``torch`` as torchao's adam module sees it, with ``compile`` forced to dynamic shapes."""

    def __init__(self, torch_module) -> None:
        self._torch = torch_module

    def __getattr__(self, name: str):
        return getattr(self._torch, name)

    def compile(self, fn, **kwargs):
        return self._torch.compile(fn, **{**kwargs, "dynamic": True})


def widths(round_: int, layers: int) -> List[int]:
    """Per-layer MLP widths of one round: distinct within the round and from every other round."""
    return [BASE_WIDTH - 32 * (round_ * layers + i + 1) for i in range(layers)]


def one_side(mode: str, layers: int, resizes: int, steady: int) -> Dict[str, Any]:
    """Run in a fresh process (see ``main``): the per-round figures of one ``mode``."""
    import torch
    import torchao.optim.adam as torchao_adam
    from torch._dynamo.utils import counters
    from torchao.optim import AdamW8bit

    if mode == "dynamic":
        torchao_adam.torch = _DynamicCompile(torch)
    torch.manual_seed(0)
    rounds = []
    for r in range(resizes):
        params = []
        for w in widths(r, layers):
            params += [torch.nn.Parameter(torch.randn(w, HIDDEN) * 0.02) for _ in range(2)]  # w1, w3
            params.append(torch.nn.Parameter(torch.randn(HIDDEN, w) * 0.02))  # w2
        opt = AdamW8bit(params, lr=1e-3)
        shapes = len({tuple(p.shape) for p in params})
        times, graphs = [], []
        for _ in range(1 + steady):
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            g0 = counters["stats"]["unique_graphs"]
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
            graphs.append(counters["stats"]["unique_graphs"] - g0)
        rounds.append({"round": r + 1, "distinct_shapes": shapes, "first_step_s": times[0],
                       "first_step_graphs": graphs[0], "steady_step_s": median(times[1:]),
                       "later_graphs": sum(graphs[1:])})
        print(f"[{mode}] round {r + 1}: {shapes} new shapes, first step {times[0]:.1f}s "
              f"({graphs[0]} graphs), steady {median(times[1:]):.3f}s", flush=True)
    return {"rounds": rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--resizes", type=int, default=2)
    p.add_argument("--steady", type=int, default=3, help="steps after the first, per round")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lowbit_compile.json")
    p.add_argument("--side", choices=("static", "dynamic"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.side:
        print("RESULT " + json.dumps(one_side(args.side, args.layers, args.resizes, args.steady)), flush=True)
        return
    started = time.time()
    res: Dict[str, Any] = {"command": " ".join(["python", "benchmarks/lowbit_compile.py", *sys.argv[1:]]),
                           "machine": machine_info("cpu"), "optimizer": "torchao.optim.AdamW8bit",
                           "settings": {"layers": args.layers, "resizes": args.resizes, "steady": args.steady,
                                        "hidden": HIDDEN, "widths": [widths(r, args.layers)
                                                                    for r in range(args.resizes)]}}
    for side in ("static", "dynamic"):
        with tempfile.TemporaryDirectory() as cache:
            cmd = script_cmd(Path(__file__), "--side", side, "--layers", str(args.layers),
                             "--resizes", str(args.resizes), "--steady", str(args.steady))
            out = run_cmd(cmd, ROOT, env={"TORCHINDUCTOR_CACHE_DIR": cache})[0].stdout
        sys.stdout.write("".join(l + "\n" for l in out.splitlines() if not l.startswith("RESULT ")))
        res[side] = last_json_line(out, "RESULT")
        args.out.write_text(json.dumps(res, indent=1))  # partial results survive a stop
    s, d = res["static"]["rounds"], res["dynamic"]["rounds"]
    res["summary"] = {
        "static_first_step_s_per_new_shape": median(r["first_step_s"] / r["distinct_shapes"] for r in s),
        "static_first_step_s": [r["first_step_s"] for r in s],
        "dynamic_first_step_s": [r["first_step_s"] for r in d],
        "steady_step_dynamic_over_static": median(b["steady_step_s"] for b in d) / median(a["steady_step_s"] for a in s),
    }
    res["seconds"] = time.time() - started
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
