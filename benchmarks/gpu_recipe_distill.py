"""GPU check, the real recipe with distillation and 8-bit AdamW: ``gpu_recipe_run``'s run and
checks again with ``distill.enabled=True`` (the unpruned model as frozen teacher, one more
forward per step on the GPU) and ``torchao.optim.AdamW8bit`` (block-quantized moments sliced
and re-quantized at both resizes). Neither has run on a GPU before this section; on CPU both
are tested end to end (``tests/recipes/test_adapt_prune_recipe.py``: two-process runs with each).

The teacher is the same random initialization as the student's start, so its distribution is
near uniform: the KL half of the loss pulls toward it and recovery shows only through the label
half. The first optimizer step of each stage also pays torchao's compile of its update for every
new parameter shape (``benchmarks/lowbit_compile.py``): the stage's first-step excess reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import gpu_recipe_run

OVERRIDES = ("distill.enabled=True", "optimizer._component_=torchao.optim.AdamW8bit", "~optimizer.fused")


def run(device: str, dtype: str, dry_run: bool, work: Path, assets: Path, log) -> Dict[str, Any]:
    return gpu_recipe_run.run(device, dtype, dry_run, work, assets, log, extra=OVERRIDES, tag="recipe_distill")
