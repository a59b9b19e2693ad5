"""Smoke test of benchmarks/deployment.py: its pruning, export and measurement path on a tiny model.

No figures are checked (they come from ``python benchmarks/deployment.py``, which needs the
real SmolLM2 and many minutes); this keeps the benchmark's code working as the package
changes. A few seconds on 2 cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from adapt_prune_tune.export import export_hf
from adapt_prune_tune.models import DecoderArch, RopeSpec, decoder_from_arch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def deployment():
    spec = importlib.util.spec_from_file_location("deployment_bench", ROOT / "benchmarks" / "deployment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prune_export_and_measure(deployment, tmp_path: Path) -> None:
    arch = DecoderArch.uniform(
        vocab_size=128, embed_dim=64, num_layers=3, num_heads=8, num_kv_heads=4, intermediate_dim=128,
        head_dim=16, max_seq_len=64, rope=RopeSpec("default", 1e5), tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = decoder_from_arch(arch).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, 128, (2, 16), generator=g)}]
    windows = {name: torch.randint(0, 128, (2, 16), generator=g) for name in ("python", "austen")}
    args = type("Args", (), {"new_tokens": 4, "gen_runs": 1})()

    snapshots = list(deployment.prune_trajectory(model, arch, batches, [0.2, 0.3], 2, 0.0, 0, lambda s: None))
    assert [t for t, _, _ in snapshots] == [0.2, 0.3]
    target, pruned, current = snapshots[-1]
    assert current.prunable_params() < arch.prunable_params()

    rows = []
    for scheme in deployment.SCHEMES:
        out = export_hf(pruned, tmp_path / str(scheme), arch=current, original_arch=arch, quantize=scheme)
        row = deployment.measure_export(out, windows, windows["python"][:1, :8], args, lambda s: None)
        assert row["weights_bytes"] > 0 and row["generation"]["new_tokens"] == 4
        rows.append({"label": deployment._label(target, scheme), "params": current.num_params(),
                     "prunable_removed": 0.3, **row})
    assert rows[1]["weights_bytes"] < rows[0]["weights_bytes"]
    assert rows[1]["class"] == "TorchaoAdaptLlamaForCausalLM"
    table = deployment.markdown_table(rows)
    assert "pruned 30%+int8wo" in table and table.count("\n") == 3
