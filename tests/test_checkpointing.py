"""Run checkpoints are atomic: an interrupted save never hides or corrupts the last good one."""

import pytest
import torch

from adapt_prune_tune import checkpointing as ckpt
from adapt_prune_tune.models import DecoderArch


def tiny_arch():
    return DecoderArch.uniform(vocab_size=8, embed_dim=4, num_layers=1, num_heads=2, num_kv_heads=1,
                               intermediate_dim=6, max_seq_len=16)


def save(root, tag, value):
    return ckpt.save_run_checkpoint(
        root, tag, tiny_arch(), {"w": torch.full((2, 2), float(value))}, {"state": {}, "param_groups": []},
        {"value": value}, keep_last=2,
    )


def test_latest_points_at_newest_complete(tmp_path):
    save(tmp_path, "step_0000001_prune_0000", 1)
    save(tmp_path, "step_0000002_prune_0000", 2)
    latest = ckpt.latest_checkpoint(tmp_path)
    loaded = ckpt.load_run_checkpoint(latest)
    assert latest.name == "step_0000002_prune_0000"
    assert loaded["recipe"]["value"] == 2 and torch.equal(loaded["model"]["w"], torch.full((2, 2), 2.0))
    assert loaded["arch"] == tiny_arch()


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    save(tmp_path, "step_0000001_prune_0000", 1)
    # A kill mid-save leaves a half-written temp dir (no COMPLETE marker, not renamed).
    half = tmp_path / "step_0000002_prune_0000.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000001_prune_0000"
    # A dir without the marker (e.g. copied by hand) is never taken for a checkpoint.
    (tmp_path / "step_0000003_prune_0000").mkdir()
    (tmp_path / "latest").unlink()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000001_prune_0000"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_run_checkpoint(tmp_path / "step_0000003_prune_0000")


def test_old_checkpoints_are_dropped_after_the_new_one_lands(tmp_path):
    for i in range(1, 5):
        save(tmp_path, f"step_{i:07d}_prune_0000", i)
    names = sorted(p.name for p in tmp_path.glob("step_*"))
    assert names == ["step_0000003_prune_0000", "step_0000004_prune_0000"]


def test_fingerprint_changes_with_settings():
    a = ckpt.run_fingerprint(tiny_arch(), {"pruning": {"amplitude": 0.02}})
    b = ckpt.run_fingerprint(tiny_arch(), {"pruning": {"amplitude": 0.03}})
    assert a != b and a == ckpt.run_fingerprint(tiny_arch(), {"pruning": {"amplitude": 0.02}})
