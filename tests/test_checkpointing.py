"""Run checkpoints: atomic, pickle-free, complete (weights, optimizer, RNG), resumable."""

import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from adapt_prune_tune import checkpointing as ckpt
from adapt_prune_tune.models import DecoderArch, RopeSpec, decoder_from_arch
from adapt_prune_tune.pruner import next_token_loss
from adapt_prune_tune.resize import load_optimizer_state_


def tiny():
    torch.manual_seed(0)
    arch = DecoderArch.uniform(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_dim=48, max_seq_len=32, rope=RopeSpec("default", 1e4))
    return decoder_from_arch(arch), arch


def trained(optimizer_cls=torch.optim.AdamW, steps=2, **kwargs):
    model, arch = tiny()
    opt = optimizer_cls(model.parameters(), lr=1e-2, **kwargs)
    for _ in range(steps):
        next_token_loss(model, {"tokens": torch.randint(0, 64, (2, 16))})[0].backward()
        opt.step()
        opt.zero_grad()
    return model, arch, opt


def save(root, tag, model, arch, opt, value=0, keep_last=2):
    return ckpt.save_run_checkpoint(root, tag, arch, model, opt, {"value": value}, ckpt.capture_rng(), keep_last)


def test_round_trip_weights_optimizer_recipe_state_and_rng(tmp_path):
    model, arch, opt = trained()
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    rng = ckpt.capture_rng()
    path = ckpt.save_run_checkpoint(
        tmp_path, "step_0000002_prune_0001", arch, model, opt,
        {"value": 7, "pairs": (1, 2), "gen": torch.Generator().manual_seed(9).get_state()}, rng,
    )
    loaded = ckpt.load_latest(tmp_path)
    assert loaded["path"] == path and loaded["arch"] == arch and loaded["world_size"] == 1
    assert loaded["recipe"]["value"] == 7 and loaded["recipe"]["pairs"] == (1, 2)
    assert torch.equal(loaded["recipe"]["gen"], torch.Generator().manual_seed(9).get_state())
    for name, p in model.state_dict().items():
        assert torch.equal(loaded["model"][name], p), name
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    load_optimizer_state_(fresh, model, loaded["optimizer"])
    assert fresh.param_groups[0]["lr"] == 1e-2 and fresh.param_groups[0]["betas"] == (0.9, 0.999)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key])
    torch.manual_seed(123)
    random.seed(0)
    ckpt.restore_rng(loaded["rng"])
    assert torch.equal(torch.rand(3), (torch.manual_seed(5), torch.rand(3))[1])
    random.seed(3), np.random.seed(4)
    expected = (random.random(), np.random.rand())
    ckpt.restore_rng(loaded["rng"])
    assert (random.random(), np.random.rand()) == expected
    # Nothing in the checkpoint is a pickle.
    names = sorted(f.name for f in path.iterdir())
    assert not [n for n in names if n.endswith((".pt", ".pkl", ".bin"))], names
    json.loads((path / "state.json").read_text())


class Payload:
    """Unpickling this runs code (it creates a file): what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_is_refused_not_run(tmp_path):
    model, arch, opt = trained(steps=1)
    path = save(tmp_path, "step_0000001_prune_0000", model, arch, opt)
    marker = tmp_path / "pwned"
    for name in ("recipe_state.pt", "optimizer.pt"):
        with open(path / name, "wb") as f:
            pickle.dump(Payload(marker), f)
    with pytest.raises(ckpt.CheckpointError, match="not opened, because unpickling can run code"):
        ckpt.load_latest(tmp_path)
    assert not marker.exists()
    # JSON state cannot carry code either: objects are data, unknown markers stay plain dicts.
    (path / "recipe_state.pt").unlink(), (path / "optimizer.pt").unlink()
    state = json.loads((path / "state.json").read_text())
    state["recipe"]["evil"] = {"__reduce__": ["os.system", ["touch " + str(marker)]]}
    (path / "state.json").write_text(json.dumps(state))
    assert ckpt.load_latest(tmp_path)["recipe"]["evil"] == {"__reduce__": ["os.system", ["touch " + str(marker)]]}
    assert not marker.exists()


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    model, arch, opt = trained(steps=1)
    save(tmp_path, "step_0000001_prune_0000", model, arch, opt, 1)
    # A kill mid-save leaves a half-written temp dir (no COMPLETE marker, not renamed).
    half = tmp_path / "step_0000002_prune_0000.tmp"
    half.mkdir()
    (half / "model-rank00000-of-00001.safetensors").write_bytes(b"\x00" * 10)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000001_prune_0000"
    # A dir without the marker (e.g. copied by hand) is never taken for a checkpoint.
    (tmp_path / "step_0000003_prune_0000").mkdir()
    (tmp_path / "latest").unlink()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000001_prune_0000"
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load_run_checkpoint(tmp_path / "step_0000003_prune_0000")
    # The next save cleans up the half-written one.
    save(tmp_path, "step_0000004_prune_0000", model, arch, opt, 4)
    assert not half.exists()


def test_failed_write_names_the_cause_and_space_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    model, arch, opt = trained(steps=1)
    save(tmp_path, "step_0000001_prune_0000", model, arch, opt, 1)
    real_save_file, calls = ckpt.save_file, []

    def disk_full_on_the_optimizer(tensors, path, **kwargs):  # the weights land, the moments do not
        calls.append(path)
        if "optim-rank" in path:
            real_save_file(dict(list(tensors.items())[:1]), path, **kwargs)  # a partial file, as ENOSPC leaves
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, path, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", disk_full_on_the_optimizer)
    with pytest.raises(ckpt.CheckpointWriteError) as failed:
        save(tmp_path, "step_0000002_prune_0000", model, arch, opt, 2)
    message = str(failed.value)
    assert "checkpoint step_0000002_prune_0000 could not be written" in message and "No space left on device" in message
    assert " free there; the last checkpoint took " in message
    assert "The last complete checkpoint, step_0000001_prune_0000, is intact." in message
    assert list((tmp_path / "step_0000002_prune_0000.tmp").iterdir()) == []  # its space handed back
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000001_prune_0000"
    assert ckpt.load_run_checkpoint(tmp_path / "step_0000001_prune_0000")["recipe"] == {"value": 1}
    monkeypatch.setattr(ckpt, "save_file", real_save_file)  # space freed: the next save lands
    assert save(tmp_path, "step_0000002_prune_0000", model, arch, opt, 2).name == "step_0000002_prune_0000"


def test_failed_write_for_another_cause_does_not_talk_of_space(tmp_path, monkeypatch):
    """A write that fails because its directory went away (another process removed it) is not a
    disk problem: no free-space figures beside it, which would send the user to make room."""
    model, arch, opt = trained(steps=1)
    save(tmp_path, "step_0000001_prune_0000", model, arch, opt, 1)

    def directory_removed(tensors, path, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No such file or directory (os error 2)")

    monkeypatch.setattr(ckpt, "save_file", directory_removed)
    with pytest.raises(ckpt.CheckpointWriteError) as failed:
        save(tmp_path, "step_0000002_prune_0000", model, arch, opt, 2)
    message = str(failed.value)
    assert "No such file or directory" in message and "free there" not in message
    assert "The last complete checkpoint, step_0000001_prune_0000, is intact." in message


def test_unreadable_newest_names_the_previous_and_deletes_nothing(tmp_path):
    model, arch, opt = trained(steps=1)
    save(tmp_path, "step_0000001_prune_0000", model, arch, opt, 1)
    newest = save(tmp_path, "step_0000002_prune_0000", model, arch, opt, 2)
    shard = newest / "model-rank00000-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # a disk fault / truncated copy
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_latest(tmp_path)
    assert "step_0000002_prune_0000 is unreadable" in str(e.value)
    assert "previous complete checkpoint is" in str(e.value) and "step_0000001_prune_0000" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    newest.rename(tmp_path / "step_0000002_prune_0000.unreadable")  # what the message says to do
    assert ckpt.load_latest(tmp_path)["recipe"]["value"] == 1


@pytest.mark.parametrize("lost", ["optim-rank00000-of-00001.safetensors", "rng-rank00000.json"])
def test_a_newest_checkpoint_missing_a_file_names_it_and_the_previous(tmp_path, lost):
    """A copy of the run (rsync with a filter, a partial restore) that left out one rank's file: named
    before the weights load, with the previous complete checkpoint. Before, a 2-process run missing one
    rank's weights failed inside the model's load with "the shard files cover N of M elements"."""
    model, arch, opt = trained(steps=1)
    save(tmp_path, "step_0000001_prune_0000", model, arch, opt, 1)
    newest = save(tmp_path, "step_0000002_prune_0000", model, arch, opt, 2)
    (newest / lost).unlink()
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_latest(tmp_path)
    assert f"step_0000002_prune_0000 lacks 1 of the files its rank wrote ({lost})" in str(e.value)
    assert "previous complete checkpoint is" in str(e.value) and "step_0000001_prune_0000" in str(e.value)


def test_old_checkpoints_are_dropped_after_the_new_one_lands(tmp_path):
    model, arch, opt = trained(steps=1)
    for i in range(1, 5):
        save(tmp_path, f"step_{i:07d}_prune_0000", model, arch, opt, i)
    names = sorted(p.name for p in tmp_path.glob("step_*"))
    assert names == ["step_0000003_prune_0000", "step_0000004_prune_0000"]


def test_json_state_encoding_round_trips_and_refuses_objects():
    value = {"a": (1, [2.5, None]), "t": torch.arange(6, dtype=torch.int16).view(2, 3), "e": torch.empty(0),
             "np": np.arange(3, dtype=np.uint32)}
    back = ckpt.from_json(json.loads(json.dumps(ckpt.to_json(value))))
    assert back["a"] == (1, [2.5, None]) and torch.equal(back["t"], value["t"]) and back["e"].numel() == 0
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.to_json({"f": lambda: 0})


def test_fingerprint_changes_with_settings():
    _, arch = tiny()
    a = ckpt.run_fingerprint(arch, {"pruning": {"amplitude": 0.02}})
    b = ckpt.run_fingerprint(arch, {"pruning": {"amplitude": 0.03}})
    assert a != b and a == ckpt.run_fingerprint(arch, {"pruning": {"amplitude": 0.02}})


def test_settings_differences_name_every_changed_key():
    saved = {"pruning": {"method": {"amplitude": 0.02, "seed": 0}}, "adapt": {"stages": 4}, "samples_per_step": 8}
    now = {"pruning": {"method": {"amplitude": 0.05, "seed": 0}}, "adapt": {"stages": 4, "extra": 1}, "samples_per_step": 8}
    assert ckpt.settings_differences(saved, now) == [
        "adapt.extra: '(absent)' in the checkpoint, 1 in this config",
        "pruning.method.amplitude: 0.02 in the checkpoint, 0.05 in this config",
    ]
    assert ckpt.settings_differences(saved, saved) == []


def _unseen_on_rank(rank: int, world: int, shared: str, per_node: str) -> None:
    device = torch.device("cpu")
    assert ckpt.unseen_ranks(Path(shared), device) == []
    # ranks 0-1 on one "node", 2 on another: each node has its own copy of the path
    assert ckpt.unseen_ranks(Path(per_node) / f"node{rank // 2}", device) == [2]
    assert not list(Path(shared).iterdir())  # the markers are removed


def test_unseen_ranks_tells_a_shared_output_dir_from_node_local_ones(tmp_path):
    from _gloo import on_ranks

    on_ranks(_unseen_on_rank, 3, tmp_path, str(tmp_path / "shared"), str(tmp_path / "local"))
    assert ckpt.unseen_ranks(tmp_path / "one", torch.device("cpu")) == []  # one process: nothing to see



def test_checkpoint_tag_reads_back_its_step_and_the_newest_is_found_past_seven_digits(tmp_path: Path) -> None:
    steps = [9, 100, 9_999_999, 10_000_000]
    tags = [ckpt.checkpoint_tag(step, prunes) for prunes, step in enumerate(steps)]
    assert [ckpt.tag_step(tag) for tag in tags] == steps
    for tag in reversed(tags):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / ckpt.COMPLETE).write_text("")
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == tags
    assert ckpt.latest_checkpoint(tmp_path).name == tags[-1]
    with pytest.raises(ValueError, match=re.escape("step_<7+ digits>_prune_<4+ digits>")):
        ckpt.tag_step("step_12_prune_1")
