"""GPU check, the real recipe with FP8: ``gpu_recipe_run``'s run and checks again with
``enable_fp8_training=True`` and torchao's ``AdamWFp8`` (decoder projections in float8, FP8
optimizer moments carried through both resizes). Needs compute capability 8.9 or later, as the
recipe itself does; elsewhere, and on the CPU dry run, the section is skipped (the CPU tests run
this path with the GPU refusal lifted: ``test_fp8_training_through_resizes``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import gpu_recipe_run
from gpu_fp8 import unavailable

OVERRIDES = ("enable_fp8_training=True", "optimizer._component_=torchao.optim.AdamWFp8", "~optimizer.fused")


def run(device: str, dtype: str, dry_run: bool, work: Path, assets: Path, log) -> Dict[str, Any]:
    reason = unavailable(device, dry_run)
    if reason:
        log(f"recipe_fp8: skipped: {reason}")
        return {"status": "skipped", "reason": reason, "summary": f"skipped: {reason}"}
    return gpu_recipe_run.run(device, dtype, dry_run, work, assets, log, extra=OVERRIDES, tag="recipe_fp8")
