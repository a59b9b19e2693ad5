"""End-to-end runs of ``tune run adapt_prune_recipe`` as a user would launch them.

Real processes, real torchtune machinery (FSDP2 over gloo on CPU), the real
SmolLM2 tokenizer and Python-docs data; the model is a tiny random Llama with
SmolLM2's vocabulary so each run takes seconds to a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from adapt_prune_tune import configs
from adapt_prune_tune.models import DecoderArch
from adapt_prune_tune.progress import parse_progress_line

pytestmark = pytest.mark.integration


def write_tiny_checkpoint(out: Path, tokenizer_src: Path, seed: int = 0) -> Path:
    """A random 4-layer Llama (GQA 4/2, tied) in HF format with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_src / name).read_bytes())
    return out


DELETE = object()  # write_config(..., **{"optimizer.fused": DELETE}) removes the key


def write_config(tmp: Path, model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> Path:
    """The packaged SmolLM2 config pointed at the tiny model, with test-sized budgets."""
    from adapt_prune_tune.novels import prepare_novels

    cfg = OmegaConf.load(configs.resolve("smollm2/135M_adapt"))
    cfg.model = {"_component_": "adapt_prune_tune.models.decoder_from_hf_config", "path": str(model_dir)}
    cfg.model_dir = str(model_dir)
    cfg.data_dir = str(data_dir)
    cfg.novels_dir = str(prepare_novels())
    cfg.output_dir = str(output_dir)
    cfg.tokenizer.max_seq_len = 64
    cfg.batch_size = 2
    cfg.optimizer.lr = 1e-2  # a random tiny model learns token frequencies within a few steps
    cfg.lr_scheduler.warmup_ratio = 0.0
    cfg.pruning.method.target_sparsity = 0.4
    cfg.pruning.method.amplitude = 0.05
    cfg.pruning.calibration.num_samples = 8
    cfg.pruning.calibration.seq_len = 32
    cfg.pruning.calibration.batch_size = 2
    cfg.adapt.stages = 2
    cfg.adapt.steps_per_stage = 2
    cfg.adapt.total_tokens = None
    cfg.adapt.total_steps = 12
    cfg.adapt.checkpoint_every_n_steps = 3
    cfg.heldout.num_tokens, cfg.heldout.window = 9 * 64, 64  # 9 windows: uneven over 2 ranks
    for key, value in overrides.items():
        if value is DELETE:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            node.pop(leaf)
        else:
            OmegaConf.update(cfg, key, value, force_add=True)
    path = tmp / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tune(args: List[str], cwd: Path, timeout: int = 600, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``tune run ...`` from an unrelated directory, as a user would."""
    return subprocess.run(
        ["tune", "run", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def stage_losses(record: Dict) -> Dict[int, List[float]]:
    out: Dict[int, List[float]] = {}
    for row in record["train_log"]:
        if "loss" in row:
            out.setdefault(int(row["stage"]), []).append(row["loss"])
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", smollm2_dir)


def test_single_process_run_prunes_trains_and_reports(tmp_path, tiny_model, python_docs_dir):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out)
    proc = tune(["adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path)
    assert_ok(proc)

    # stdout is a pipe: plain progress lines a log file keeps, read back as a person would.
    progress = [p for p in map(parse_progress_line, proc.stdout.splitlines()) if p]
    assert {p["stage"] for p in progress} == {"1", "2"} and all(p["stages"] == "2" for p in progress)
    assert (progress[-1]["step"], progress[-1]["steps"], progress[-1]["percent"]) == ("12", "12", "100")
    assert progress[-1]["eta"] == "0s" and "\x1b" not in proc.stdout
    steps = [int(p["step"]) for p in progress]
    assert steps == sorted(steps)
    # Resizes rebuild the model through the stock setup, quietly: only the first load says so.
    assert (proc.stdout + proc.stderr).count("Instantiating model and loading checkpoint on Rank 0") == 1

    record = json.loads((out / "run_record.json").read_text())
    before, after = DecoderArch.from_dict(record["arch_before"]), DecoderArch.from_dict(record["arch_after"])
    achieved = 1 - after.prunable_params() / before.prunable_params()
    assert abs(achieved - 0.4) < 0.01, achieved
    assert len(record["prune_steps"]) == 4 and len(record["stages"]) == 2
    assert sum(s["train_steps"] for s in record["stages"]) == 12
    # The stage-k share of training grows linearly: 1/3 then 2/3 of 12 steps.
    assert [s["train_steps"] for s in record["stages"]] == [4, 8]
    # Final model: spec + weights whose shapes match it.
    final = DecoderArch.load(out / "final" / "arch.json")
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert final == after
    for i, layer in enumerate(final.layers):
        assert weights[f"layers.{i}.mlp.w1.weight"].shape[0] == layer.intermediate_dim
        assert weights[f"layers.{i}.attn.q_proj.weight"].shape[0] == layer.num_heads * final.head_dim
    # Loss recovers after each prune: the stage's last logged loss is below its first.
    for stage, losses in stage_losses(record).items():
        assert losses[-1] < losses[0], (stage, losses)
    # Held-out perplexity: original, after every prune and every stage's training.
    ppl = record["perplexity"]
    assert ppl["original"] > 0 and ppl["pruned"] == record["stages"][-1]["heldout_ppl_after_prune"]
    assert ppl["recovered"] == record["stages"][-1]["heldout_ppl_after_train"]
    for stage in record["stages"]:  # training on real text helps a random model on held-out text
        assert stage["heldout_ppl_after_train"] < stage["heldout_ppl_after_prune"], stage
        assert stage["seconds_train"] > 0
    assert "held-out ppl after training" in (out / "report.md").read_text()


def test_two_process_fsdp_run(tmp_path, tiny_model, python_docs_dir):
    out = tmp_path / "run"
    # 12 calibration windows under a batch cap of 4: 6 per rank, run as two batches of 3.
    calibration = {"pruning.calibration.num_samples": 12, "pruning.calibration.batch_size": 4}
    # Packed text: the node's first rank packs and writes it, the other waits for the file and reads it;
    # max_tokens null: as many packs as the steps consume, not the whole corpus.
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, **calibration, **{**PACKED, "dataset.max_tokens": None})
    proc = tune(["--nproc_per_node", "2", "adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path)
    assert_ok(proc)
    logs = proc.stdout + proc.stderr
    assert "calibration: 6 windows per rank in batches of 3, the largest divisor of 6 up to" in logs
    assert "training text: 48 packs of 64 tokens" in logs and len(list((out / "packs").glob("packs-*.pt"))) == 1
    # Every resize checks that both ranks cut identically.
    assert logs.count("architecture identical on all 2 ranks") == 4
    record = json.loads((out / "run_record.json").read_text())
    for stage, losses in stage_losses(record).items():
        assert losses[-1] < losses[0], (stage, losses)
    # Held-out windows split over the ranks (one rank has more): every rank joined every forward.
    assert all(math.isfinite(v) for v in record["perplexity"].values())
    final = load_file(str(out / "final" / "model.safetensors"))
    assert DecoderArch.load(out / "final" / "arch.json").prunable_params() < DecoderArch.from_dict(
        record["arch_before"]
    ).prunable_params()
    assert all(torch.isfinite(t).all() for t in final.values())

    # Run checkpoints hold each rank's rows of every tensor; export assembles them. The newest
    # one is the final model, and a run stopped before its end (no final/ nor record) exports it.
    from adapt_prune_tune.cli import main
    from adapt_prune_tune.export import load_pruned_checkpoint

    newest, _ = load_pruned_checkpoint(out / "checkpoints" / "latest")
    assert newest.keys() == final.keys() and all(torch.equal(newest[k], final[k]) for k in final)
    stopped = tmp_path / "stopped"
    shutil.copytree(out, stopped)
    shutil.rmtree(stopped / "final")
    (stopped / "run_record.json").unlink()
    main(["export", str(stopped), str(tmp_path / "hf")])
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["num_hidden_layers"] == 4 and (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("widths", ["dynamic", "static"])
def test_compile_widths_bound_the_graphs_across_resizes(tmp_path, tiny_model, python_docs_dir, widths):
    """compile=True over 3 stages of MLP cuts (dynamo's capture, eager backend: seconds, not minutes).

    dynamic: the MLP widths are symbolic from the first trace, so no resize recompiles for a width
    (on a torch without per-dimension ``dynamic_sources``, one automatic recompile turns them
    symbolic); static: the widths of every stage are traced anew.
    """
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, compile=True, compile_widths=widths,
                       **{"adapt.stages": 3, "adapt.steps_per_stage": 1, "pruning.method.prune_attention": False,
                          "heldout": None})
    proc = tune(["adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path,
                env={"TORCH_COMPILE_BACKEND": "eager", "TORCH_LOGS": "recompiles"})
    assert_ok(proc)
    # Each recompile is tagged [frame/count]; count those a changed MLP width triggered.
    width_recompiles = len({m.group(1) for m in re.finditer(r"\[(\d+/\d+)\] \[__recompiles\].*\['mlp'\].*size mismatch",
                                                             proc.stderr)})
    record = json.loads((out / "run_record.json").read_text())
    assert len(record["stages"]) == 3 and all(math.isfinite(r["loss"]) for r in record["train_log"] if "loss" in r)
    if widths == "dynamic":
        from torch._dynamo.variables import builder

        assert width_recompiles <= (0 if hasattr(builder, "_parse_source_entry") else 1), proc.stderr[-4000:]
    else:
        assert width_recompiles >= 3, proc.stderr[-4000:]


@pytest.mark.parametrize("output_dir", ["shared", "node_local"])
def test_two_node_rendezvous_on_localhost(tmp_path, tiny_model, python_docs_dir, output_dir):
    """Two nodes (one process each) on one machine. ``node_local``: each node's output_dir is its own
    directory, as a path on a node's local disk is; the run stops before it loads the model, where
    before it failed at its first checkpoint, after the first prune, with "No such file or directory"."""
    out = tmp_path / "run"
    configs = [write_config(tmp_path, tiny_model, python_docs_dir, out, **{"adapt.total_steps": 4})]
    if output_dir == "node_local":
        (tmp_path / "node1").mkdir()
        configs.append(write_config(tmp_path / "node1", tiny_model, python_docs_dir, tmp_path / "node1" / "run",
                                    **{"adapt.total_steps": 4}))
    port = free_port()
    launchers = [
        subprocess.Popen(
            ["tune", "run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "apt-test",
             "adapt_prune_recipe", "--config", str(configs[rank % len(configs)])],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in launchers]
    if output_dir == "shared":
        for p, text in zip(launchers, outputs):
            assert p.returncode == 0, text[-6000:]
        assert (out / "final" / "model.safetensors").is_file()
        return
    assert all(p.returncode != 0 for p in launchers), outputs
    # in torchrun's failure summary, the last thing printed, not only above it
    assert any("is not one directory for all 2 ranks: global rank 0 does not see the files of rank 1"
               in text.split("Root Cause")[-1] for text in outputs), outputs
    assert "loading checkpoint" not in "".join(outputs) and not list(tmp_path.rglob("checkpoints"))
    assert not list(tmp_path.rglob(".ranks-visible-*"))  # the markers are gone


def test_two_process_distillation_run(tmp_path, tiny_model, python_docs_dir):
    """Distillation from the unpruned model under FSDP2: both ranks cut alike, losses logged.

    Units kept unsharded between forward and backward (``fsdp_reshard_after_forward: False``):
    the passes without backward (KL calibration losses, held-out perplexity, the teacher) must
    reshard them, or the checkpoint after the first prune misses the optimizer's parameters.
    """
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path, tiny_model, python_docs_dir, out,
        **{"distill.enabled": True, "distill.alpha": 0.5, "distill.temperature": 2.0, "distill.calibration_loss": "kl",
           "fsdp_reshard_after_forward": False},
    )
    proc = tune(["--nproc_per_node", "2", "adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path)
    assert_ok(proc)
    logs = proc.stdout + proc.stderr
    assert "Distilling from the base model" in logs
    assert logs.count("architecture identical on all 2 ranks") == 4
    record = json.loads((out / "run_record.json").read_text())
    rows = [r for r in record["train_log"] if "loss" in r]
    assert all(math.isfinite(r["loss"]) and {"ce_loss", "kd_loss", "teacher_ce_loss"} <= set(r) for r in rows)
    for r in rows:  # the logged loss is the configured mix of its logged parts
        assert abs(r["loss"] - (0.5 * r["ce_loss"] + 0.5 * 4.0 * r["kd_loss"])) < 1e-3 * r["loss"], r
    for stage, losses in stage_losses(record).items():
        assert losses[-1] < losses[0], (stage, losses)
    # The teacher never changes: its own loss on the training batches stays that of the base model.
    assert max(r["teacher_ce_loss"] for r in rows) - min(r["teacher_ce_loss"] for r in rows) < 1.0


def _final_weights(out: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


# Packs of the training text made only as far as asked (4 packs), then topped up to the 24 the
# 12 steps consume and kept in output_dir; the resumed process reads them from there. Long
# documents packed whole, as the GPU configs pack them.
PACKED = {"dataset._component_": "adapt_prune_tune.packing.packed_text_dataset", "dataset.packed": True,
          "dataset.max_tokens": 256, "dataset.seed": "${seed}", "dataset.cache_dir": "${output_dir}/packs",
          "dataset.split_long_documents": True}


@pytest.mark.parametrize(
    "overrides", [{}, {"distill.enabled": True, "distill.alpha": 0.7}, PACKED], ids=["ce", "distill", "packed"]
)
def test_killed_run_resumes_to_identical_weights(tmp_path, tiny_model, python_docs_dir, overrides):
    (tmp_path / "a").mkdir()
    reference = tmp_path / "reference"
    cfg = write_config(tmp_path / "a", tiny_model, python_docs_dir, reference, **overrides)
    assert_ok(tune(["adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path))

    (tmp_path / "b").mkdir()
    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "b", tiny_model, python_docs_dir, killed, **overrides)
    proc = subprocess.Popen(
        ["tune", "run", "adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    # Kill mid-run: once the second stage's pruning has checkpointed (inside the run, between
    # training chunks), without letting the process clean up.
    deadline = time.time() + 600
    ckpts = killed / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        names = [p.name for p in ckpts.glob("step_*") if not p.name.endswith(".tmp")] if ckpts.exists() else []
        if any(n.endswith("prune_0003") or n.endswith("prune_0004") for n in names):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()

    resumed = tune(["adapt_prune_recipe", "--config", str(cfg), "resume_from_checkpoint=True"], cwd=tmp_path)
    assert_ok(resumed)
    if overrides is PACKED:
        cache = next((killed / "packs").glob("packs-*.pt"))
        assert f"training text: 24 packs of 64 tokens, 24 of them read from {cache}" in resumed.stdout + resumed.stderr
    ref, res = _final_weights(reference), _final_weights(killed)
    assert ref.keys() == res.keys()
    for name in ref:
        assert torch.equal(ref[name], res[name]), name
    ref_record = json.loads((reference / "run_record.json").read_text())
    res_record = json.loads((killed / "run_record.json").read_text())
    assert [r["loss"] for r in ref_record["train_log"] if "loss" in r] == [
        r["loss"] for r in res_record["train_log"] if "loss" in r
    ]
    # The held-out evaluations too: each stage's after-training one once, labelled with its stage
    # (a resume once evaluated the unfinished stage early, as stage 1, and skipped it later).
    assert res_record["heldout_log"] == ref_record["heldout_log"]
    heldout = ("heldout_after_prune", "heldout_after_train")
    assert [{k: s[k] for k in heldout} for s in res_record["stages"]] == [
        {k: s[k] for k in heldout} for s in ref_record["stages"]
    ]
    # The wall time is the run's, over both processes (up to the checkpoint resumed from), not the
    # resumed process's alone: pruning's share of it stays a share.
    assert (ref_record["resumes"], res_record["resumes"]) == (0, 1)
    assert res_record["seconds_run"] > sum(s["seconds_prune"] + s["seconds_train"] for s in res_record["stages"])


def _run_2proc(cfg: Path, cwd: Path, *extra: str, kill_at: Optional[str] = None) -> subprocess.CompletedProcess:
    env = {"ADAPT_PRUNE_TUNE_KILL_AT": kill_at} if kill_at else {}
    return tune(["--nproc_per_node", "2", "adapt_prune_recipe", "--config", str(cfg), *extra], cwd=cwd, env=env)


# (fault point, occurrence): during a prune step's calibration pass (stage 2), between a decided
# cut and its resize (stage 2's first), while a checkpoint is being written (the third), after an
# optimizer step in the middle of a chunk, and after the final weights were written.
KILL_POINTS = [("calibration", 7), ("before_resize", 3), ("checkpoint_write", 3), ("training_step", 4), ("export", 1)]


def test_two_process_run_killed_anywhere_resumes_bit_identically(tmp_path, tiny_model, python_docs_dir):
    """SIGKILL at five points across a 2-process (gloo) run; each resume ends bitwise like an uninterrupted run."""
    overrides = {"adapt.total_steps": 6, "heldout": None}
    (tmp_path / "ref").mkdir()
    reference = tmp_path / "ref" / "run"
    cfg = write_config(tmp_path / "ref", tiny_model, python_docs_dir, reference, **overrides)
    assert_ok(_run_2proc(cfg, tmp_path))
    ref_weights = _final_weights(reference)
    ref_losses = [r["loss"] for r in json.loads((reference / "run_record.json").read_text())["train_log"]]

    for point, occurrence in KILL_POINTS:
        work = tmp_path / point
        work.mkdir()
        out = work / "run"
        cfg = write_config(work, tiny_model, python_docs_dir, out, **overrides)
        killed = _run_2proc(cfg, tmp_path, kill_at=f"{point}:{occurrence}")
        assert killed.returncode != 0, f"{point}: the run was not killed\n{killed.stdout[-3000:]}"
        assert not (out / "run_record.json").exists(), point
        assert not any(p.name.endswith(".tmp") and (p / "COMPLETE").exists() for p in (out / "checkpoints").glob("*"))
        resumed = _run_2proc(cfg, tmp_path, "resume_from_checkpoint=True")
        assert_ok(resumed)
        weights = _final_weights(out)
        assert weights.keys() == ref_weights.keys(), point
        for name in ref_weights:
            assert torch.equal(weights[name], ref_weights[name]), (point, name)
        losses = [r["loss"] for r in json.loads((out / "run_record.json").read_text())["train_log"]]
        assert losses == ref_losses, point


def test_checkpoint_from_two_processes_resumes_on_one_and_back(tmp_path, tiny_model, python_docs_dir):
    """Sharded checkpoints are portable across world sizes (same global batch: 2 × 2 = 1 × 4)."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, **{"adapt.total_steps": 9, "heldout": None})
    killed = _run_2proc(cfg, tmp_path, kill_at="training_step:4")
    assert killed.returncode != 0
    names = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert any(n.startswith("step_0000003") for n in names), names
    assert len(list((out / "checkpoints" / names[-1]).glob("model-rank*.safetensors"))) == 2
    one = tune(
        ["adapt_prune_recipe", "--config", str(cfg), "resume_from_checkpoint=True", "batch_size=4"],
        cwd=tmp_path, env={"ADAPT_PRUNE_TUNE_KILL_AT": "training_step:4"},
    )
    assert one.returncode != 0  # killed again, after one process wrote a checkpoint (step 6)
    latest = ckpt_latest(out)
    assert len(list(latest.glob("model-rank*.safetensors"))) == 1
    assert_ok(_run_2proc(cfg, tmp_path, "resume_from_checkpoint=True"))
    record = json.loads((out / "run_record.json").read_text())
    assert [r["step"] for r in record["train_log"]] == list(range(1, 10))
    assert all(math.isfinite(r["loss"]) for r in record["train_log"])


def test_stop_signal_on_one_rank_checkpoints_that_step_and_resumes_bit_identically(tmp_path, tiny_model, python_docs_dir):
    """SIGTERM reaching rank 0 alone after step 8, inside a checkpoint chunk (steps 8-10): both ranks
    stop after that step with its checkpoint, the profiler's trace of the steps so far is written, the
    continue command repeats the launcher's own flags, and the resume continues the chunk from step 9."""
    (tmp_path / "ref").mkdir()
    reference = tmp_path / "ref" / "run"
    assert_ok(_run_2proc(write_config(tmp_path / "ref", tiny_model, python_docs_dir, reference), tmp_path))
    out = tmp_path / "run"
    profiler = {"enabled": True, "wait_steps": 0, "warmup_steps": 1, "active_steps": 20, "num_cycles": 1}
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, **{f"profiler.{k}": v for k, v in profiler.items()})
    launcher = ["--signals_to_handle", "SIGTERM,SIGINT,SIGUSR1", "--nproc_per_node", "2", "adapt_prune_recipe"]
    stopped = tune([*launcher, "--config", str(cfg)], cwd=tmp_path, env={"ADAPT_PRUNE_TUNE_KILL_AT": "training_step:8:SIGTERM"})
    go_on = f"Continue with: tune run {' '.join(launcher)} --config {cfg} resume_from_checkpoint=True"
    assert go_on in stopped.stderr.split("Root Cause")[-1]  # torchrun's summary, the last thing printed, says it
    assert list((out / "profiling_outputs").glob("iteration_*/*.pt.trace.json*")), "no trace written at the stop"
    assert ckpt_latest(out).name.startswith("step_0000008_")
    state = json.loads((ckpt_latest(out) / "state.json").read_text())["recipe"]
    assert (state["global_step"], state["epochs_run"]) == (8, 3)  # chunk 3 (steps 8-10) not finished
    resumed = _run_2proc(cfg, tmp_path, "resume_from_checkpoint=True")
    assert_ok(resumed)
    weights, ref = _final_weights(out), _final_weights(reference)
    assert all(torch.equal(weights[k], ref[k]) for k in ref)
    record, ref_record = (json.loads((d / "run_record.json").read_text()) for d in (out, reference))
    assert [(r["step"], r["loss"]) for r in record["train_log"]] == [(r["step"], r["loss"]) for r in ref_record["train_log"]]
    assert record["heldout_log"] == ref_record["heldout_log"]  # no evaluation added or lost at the stop


def test_scheduler_sigterm_stops_after_a_step_with_its_checkpoint(tmp_path, tiny_model, python_docs_dir):
    """A SIGTERM from outside (a scheduler's preemption) while stage 2 trains: exit code 143, the
    message says how to continue, and the continued run ends as the uninterrupted one."""
    overrides = {"heldout": None, "adapt.checkpoint_every_n_steps": 8}  # stage 2 is one chunk
    (tmp_path / "ref").mkdir()
    reference = tmp_path / "ref" / "run"
    assert_ok(tune(["adapt_prune_recipe", "--config",
                    str(write_config(tmp_path / "ref", tiny_model, python_docs_dir, reference, **overrides))], cwd=tmp_path))
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, **overrides)
    proc = subprocess.Popen(
        ["tune", "run", "adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stage_two = out / "checkpoints" / "step_0000004_prune_0004"  # stage 2 pruned, its training starts
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not stage_two.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before the signal"
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    step = json.loads((ckpt_latest(out) / "state.json").read_text())["recipe"]["global_step"]
    assert 4 <= step < 12 and not (out / "final").exists()
    assert f"Stopped on SIGTERM after {step} of 12 training steps" in stderr
    assert f"Continue with: tune run adapt_prune_recipe --config {cfg} resume_from_checkpoint=True" in stderr
    assert_ok(tune(["adapt_prune_recipe", "--config", str(cfg), "resume_from_checkpoint=True"], cwd=tmp_path))
    weights, ref = _final_weights(out), _final_weights(reference)
    assert all(torch.equal(weights[k], ref[k]) for k in ref)


def test_ctrl_c_stops_at_once_and_names_what_survives(tmp_path, tiny_model, python_docs_dir):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while stage 2 trains: exit
    code 130 at once, no traceback, and the message names the last checkpoint and the steps lost
    since, with the command that continues."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, heldout=None, **{"adapt.checkpoint_every_n_steps": 8})
    proc = subprocess.Popen(
        ["tune", "run", "adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # pytest's children may inherit SIG_IGN
    )
    stage_two = out / "checkpoints" / "step_0000004_prune_0004"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not stage_two.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before the signal"
    time.sleep(1.0)  # into stage 2's training steps
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and not (out / "final").exists()
    latest = ckpt_latest(out)
    found = re.search(r"Interrupted \(Ctrl-C\) at training step (\d+) of 12 \(stage 2 of 2\)\. The last checkpoint "
                      rf"is {latest.name} \(training step (\d+)\)", stderr)
    assert found, stderr[-3000:]
    assert int(found.group(2)) == int(latest.name.split("_")[1]) <= int(found.group(1))
    assert f"Continue from it with: tune run adapt_prune_recipe --config {cfg} resume_from_checkpoint=True" in stderr


def test_a_second_run_into_a_live_runs_output_dir_is_refused_and_changes_nothing(tmp_path, tiny_model, python_docs_dir):
    """A run paused mid-stage (SIGSTOP: alive, holding its output_dir) and a second run into the
    same output_dir, resuming it or overwriting it: refused before any work, naming the first run;
    the first then goes on to its end. Before the lock the two wrote the same checkpoints."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, heldout=None, speed=None)
    first = subprocess.Popen(
        ["tune", "run", "adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "ADAPT_PRUNE_TUNE_KILL_AT": "training_step:5:SIGSTOP"},
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and first.poll() is None and not _stopped(first.pid):
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-3000:]
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        for second in ("resume_from_checkpoint=True", "overwrite_output_dir=True"):
            refused = tune(["adapt_prune_recipe", "--config", str(cfg), second], cwd=tmp_path)
            assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
            assert f"output_dir {out} is in use by another run: pid {first.pid} on {socket.gethostname()}" in refused.stderr
            assert f"(`tune run adapt_prune_recipe --config {cfg}`)" in refused.stderr
            assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == written
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file() and (out / "run_record.json").is_file()


def _stopped(pid: int) -> bool:
    """``pid`` is stopped by a signal (state T in /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def test_full_disk_is_named_with_what_is_intact_and_the_run_continues(tmp_path, tiny_model, python_docs_dir):
    """A write failing as on a full disk, at a checkpoint, at the final weights and at the run record:
    a message (no traceback) naming the cause, what is intact and the command that continues;
    continued after each, the run ends with its model and record."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, heldout=None, speed=None)
    go_on = f"then continue with: tune run adapt_prune_recipe --config {cfg} resume_from_checkpoint=True"
    failed = tune(["adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path,
                  env={"ADAPT_PRUNE_TUNE_KILL_AT": "checkpoint_write:2:ENOSPC"})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert "OSError: [Errno 28] No space left on device" in failed.stderr
    intact = ckpt_latest(out).name
    assert f"The last complete checkpoint, {intact}, is intact. Make room there, {go_on}" in failed.stderr
    assert not list((out / "checkpoints").glob("*.tmp"))  # the failed one's files handed back
    failed = tune(["adapt_prune_recipe", "--config", str(cfg), "resume_from_checkpoint=True"], cwd=tmp_path,
                  env={"ADAPT_PRUNE_TUNE_KILL_AT": "final_write:1:ENOSPC"})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert f"the pruned model could not be written to {out / 'final'}: OSError" in failed.stderr
    assert " to write, " in failed.stderr and " free there)" in failed.stderr  # a full disk: the space is the point
    assert f"Training is complete and its last checkpoint is intact: make room there, {go_on}" in failed.stderr
    assert not (out / "final" / "model.safetensors").exists()
    failed = tune(["adapt_prune_recipe", "--config", str(cfg), "resume_from_checkpoint=True"], cwd=tmp_path,
                  env={"ADAPT_PRUNE_TUNE_KILL_AT": "record_write:1:ENOSPC"})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert f"the run record could not be written to {out}: OSError" in failed.stderr and go_on in failed.stderr
    assert " free there). The pruned model is in " in failed.stderr
    assert (out / "final" / "model.safetensors").is_file() and not (out / "run_record.json").exists()
    assert_ok(tune(["adapt_prune_recipe", "--config", str(cfg), "resume_from_checkpoint=True"], cwd=tmp_path))
    assert (out / "final" / "model.safetensors").is_file() and (out / "run_record.json").is_file()


def _printed_command(stderr: str, after: str) -> List[str]:
    """The command a message printed after ``after``, as the words a shell would pass."""
    line = next(line for line in stderr.splitlines() if after in line)
    return shlex.split(line.split(after, 1)[1])


def test_out_of_memory_names_the_setting_and_the_printed_command_goes_on(tmp_path, tiny_model, python_docs_dir):
    """Memory running out in stage 2's calibration pass, then in training: each time a message
    (no traceback) naming the phase and the setting that lowers it, and a command with a lower
    value that, run as printed, continues the run to its end."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, heldout=None, speed=None)
    # 4 calibration batches per pass, 2 passes with gradients per stage: the 10th is stage 2's.
    failed = tune(["adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path, env={"ADAPT_PRUNE_TUNE_KILL_AT": "calibration:10:OOM"})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert "out of memory on rank 0 (cpu) in stage 2's calibration pass: lower pruning.calibration.batch_size (now 2;" in failed.stderr
    command = _printed_command(failed.stderr, "; continue with: ")
    assert command[:2] == ["tune", "run"] and command[-2:] == ["pruning.calibration.batch_size=1", "resume_from_checkpoint=True"]
    failed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "ADAPT_PRUNE_TUNE_KILL_AT": "training_step:2:OOM"})
    assert failed.returncode == 1 and "in stage 2's training: lower batch_size (now 2)" in failed.stderr, failed.stderr[-3000:]
    command = _printed_command(failed.stderr, "; continue with: ")
    assert command[-4:] == ["pruning.calibration.batch_size=1", "batch_size=1", "gradient_accumulation_steps=2",
                            "resume_from_checkpoint=True"]
    assert_ok(subprocess.run(command, cwd=tmp_path, capture_output=True, text=True))
    assert (out / "final" / "model.safetensors").is_file()


def _reference_and_killed(tmp_path: Path, model: Path, docs: Path, overrides: Dict, kill_at: str):
    """An uninterrupted 2-process reference run, and the same run killed at ``kill_at``:
    (reference output dir, killed output dir, killed run's config)."""
    (tmp_path / "ref").mkdir()
    reference = tmp_path / "ref" / "run"
    assert_ok(_run_2proc(write_config(tmp_path / "ref", model, docs, reference, **overrides), tmp_path))
    out = tmp_path / "run"
    cfg = write_config(tmp_path, model, docs, out, **overrides)
    assert _run_2proc(cfg, tmp_path, kill_at=kill_at).returncode != 0
    return reference, out, cfg


def test_bf16_two_process_run_resumes_and_exports(tmp_path, tiny_model, python_docs_dir):
    """dtype=bf16 on CPU, 2 processes: prune, train, killed and resumed bit-identically, exported in bf16."""
    from transformers import AutoModelForCausalLM

    overrides = {"dtype": "bf16", "adapt.total_steps": 6, "heldout.at_checkpoints": False}
    reference, out, cfg = _reference_and_killed(tmp_path, tiny_model, python_docs_dir, overrides, "training_step:4")
    assert_ok(_run_2proc(cfg, tmp_path, "resume_from_checkpoint=True"))
    weights, ref = _final_weights(out), _final_weights(reference)
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    assert all(torch.equal(weights[k], ref[k]) for k in ref)
    record = json.loads((out / "run_record.json").read_text())
    assert all(math.isfinite(r["loss"]) for r in record["train_log"])
    assert all(math.isfinite(v) for v in record["perplexity"].values())
    export = tmp_path / "compact"
    proc = subprocess.run(["adapt-prune-tune", "export", str(out), str(export)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    assert hf.dtype == torch.bfloat16  # exports keep the training dtype unless --dtype asks otherwise
    with torch.no_grad():
        assert torch.isfinite(hf(torch.randint(0, 49152, (1, 8))).logits).all()


def test_low_bit_adamw_two_processes_through_resizes_and_resume(tmp_path, tiny_model, python_docs_dir):
    """torchao AdamW8bit under FSDP2 (gloo): 2 resizes carry its state, and a resume restores it exactly."""
    overrides = {"optimizer._component_": "torchao.optim.AdamW8bit", "optimizer.fused": DELETE, "adapt.total_steps": 6,
                 "heldout": None, "pruning.method.round_to": 2}  # even shards over 2 ranks (config_checks)
    reference, out, cfg = _reference_and_killed(tmp_path, tiny_model, python_docs_dir, overrides, "training_step:4")
    from safetensors import safe_open

    layouts = []
    for f in ckpt_latest(out).glob("optim-rank*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            layouts.append(json.loads(handle.metadata()["adapt_prune_tune.shards"]))
    assert len(layouts) == 2  # each rank wrote its own shards, 8-bit states as their exact parts
    assert any(spec.get("native", {}).get("class") == "OptimState8bit" for layout in layouts for spec in layout.values())
    assert_ok(_run_2proc(cfg, tmp_path, "resume_from_checkpoint=True"))
    weights, ref = _final_weights(out), _final_weights(reference)
    assert all(torch.equal(weights[k], ref[k]) for k in ref)
    losses = [r["loss"] for r in json.loads((out / "run_record.json").read_text())["train_log"]]
    assert losses == [r["loss"] for r in json.loads((reference / "run_record.json").read_text())["train_log"]]
    assert losses[-1] < losses[0]


# The recipe refuses FP8 training off a GPU of compute capability >= 8.9 (no speed-up there).
# torch >= 2.7 runs torchao's float8 matmuls on CPU too, so this shim, imported by the `tune`
# process at start-up, lifts that one refusal and the whole FP8 path runs here.
_FP8_ON_CPU = """
import adapt_prune_tune.fp8 as fp8
_checks = fp8.fp8_problems
fp8.fp8_problems = lambda device, round_to: [p for p in _checks(device, round_to) if "CUDA GPU" not in p]
"""


@pytest.mark.parametrize("optimizer", ["torch.optim.AdamW", "torchao.optim.AdamWFp8"])
def test_fp8_training_through_resizes(tmp_path, tiny_model, python_docs_dir, optimizer):
    """enable_fp8_training: the model is built, rebuilt at every resize and trained with
    Float8Linear projections, and exports plain weights; with AdamW it recovers after each
    cut. AdamWFp8 (FP8 moments) carries its state through the resizes to the end; its losses
    are not asserted to fall: at this test's lr (1e-2) it diverges on a tiny random model even
    without any resize, where AdamW and AdamW8bit do not."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_FP8_ON_CPU)
    out = tmp_path / "run"
    over = {"dtype": "bf16", "enable_fp8_training": True, "pruning.method.round_to": 16, "heldout": None,
            "optimizer._component_": optimizer}
    if optimizer.startswith("torchao"):
        over["optimizer.fused"] = DELETE
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, **over)
    env = {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = tune(["adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path, env=env)
    assert_ok(proc)
    record = json.loads((out / "run_record.json").read_text())
    losses = stage_losses(record)
    assert sorted(losses) == [1, 2] and all(math.isfinite(x) for v in losses.values() for x in v)
    if optimizer == "torch.optim.AdamW":
        for stage, values in losses.items():
            assert values[-1] < values[0], (stage, values)
    after = DecoderArch.from_dict(record["arch_after"])
    assert all(layer.intermediate_dim % 16 == 0 for layer in after.layers)
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in weights.values())  # no float8 scales or casts saved
    export = tmp_path / "export"
    done = subprocess.run(["adapt-prune-tune", "export", str(out), str(export)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def ckpt_latest(out: Path) -> Path:
    from adapt_prune_tune.checkpointing import latest_checkpoint

    return latest_checkpoint(out / "checkpoints")


@pytest.mark.parametrize("distill", [False, True], ids=["ce", "distill"])
def test_instruction_data_with_cut_off_responses_trains_without_nan(tmp_path, tiny_model, python_docs_dir, distill):
    """Half the pairs have prompts longer than max_seq_len: their labels are all ignored. Steps made
    only of them change nothing (the stock loop would write NaN into every weight); the rest train."""
    rows = [json.loads(line) for line in (python_docs_dir / "train.jsonl").read_text().splitlines()[:80]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"input": (r["text"] * 20)[: 2000 if i % 2 else 80], "output": r["text"][:120]}) + "\n"
        for i, r in enumerate(rows)))
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, **{
        "dataset._component_": "torchtune.datasets.instruct_dataset", "dataset.data_files": str(pairs),
        "dataset.column": DELETE, "speed": None, "heldout": None, "distill.enabled": distill})
    proc = tune(["adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path)
    assert_ok(proc)
    rows = [r for r in json.loads((out / "run_record.json").read_text())["train_log"] if "loss" in r]
    skipped = [r for r in rows if r["tokens_per_second_per_gpu"] == 0]
    trained = [r for r in rows if r["tokens_per_second_per_gpu"] > 0]
    assert skipped and trained and all(math.isfinite(r["loss"]) for r in trained), rows
    assert "without a label token on any rank" in proc.stderr
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_prune_only_config(tmp_path, tiny_model, python_docs_dir):
    out = tmp_path / "run"
    cfg = OmegaConf.load(configs.resolve("smollm2/135M_prune"))
    cfg.model = {"_component_": "adapt_prune_tune.models.decoder_from_hf_config", "path": str(tiny_model)}
    cfg.model_dir, cfg.data_dir, cfg.output_dir = str(tiny_model), str(python_docs_dir), str(out)
    cfg.pruning.calibration.num_samples, cfg.pruning.calibration.seq_len = 4, 32
    cfg.pruning.calibration.batch_size = 2
    cfg.adapt.steps_per_stage = 5
    cfg.pop("distill")  # optional ("absent or null: off"); its absence once crashed the run's set-up
    path = tmp_path / "prune.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    assert_ok(tune(["adapt_prune_recipe", "--config", str(path)], cwd=tmp_path))
    record = json.loads((out / "run_record.json").read_text())
    assert record["train_log"] == [] and len(record["prune_steps"]) == 5
    assert set(record["perplexity"]) == {"original", "pruned"}  # no training: nothing recovered
    assert (out / "final" / "arch.json").is_file()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer_in_bwd=True", "optimizer_in_bwd"),
        ("adapt.total_steps=1", "every stage needs at least one"),
        ("pruning.method.target_sparsity=1.5", "target_sparsity must be in [0, 1)"),
        ("pruning.calibration.num_samples=100000", "Calibration data has"),
        ("optimizer._component_=torchao.optim.AdamW8bit", "remove it with `~optimizer.fused`"),
        ("distill.enabled=True distill.alpha=1.5", "distill.alpha must be in [0, 1]"),
        ("distill.enabled=True distill.temperature=0", "distill.temperature must be a finite number > 0"),
        ("distill.enabled=True distill.alpah=0.3", "did you mean distill.alpha"),
        ("distill.enabled=True adapt.total_steps=0", "there is no training to distil into"),
        (
            "distill.enabled=True distill.teacher_model._component_=torchtune.models.qwen2_5.qwen2_5_0_5b",
            "the teacher must share the student's tokenizer",
        ),
        (
            "distill.enabled=True distill.teacher_checkpointer._component_=torchtune.training.FullModelHFCheckpointer "
            "distill.teacher_checkpointer.checkpoint_dir=/nonexistent distill.teacher_checkpointer.checkpoint_files=[a.safetensors] "
            "distill.teacher_checkpointer.model_type=QWEN2 distill.teacher_checkpointer.output_dir=/tmp",
            "another architecture family",
        ),
        ("pruning.method.amplitde=0.1", "pruning.method.amplitde: unknown key (did you mean pruning.method.amplitude?)"),
        ("prunning.method.amplitude=0.1 adapt.stages=two", "(did you mean pruning?)"),  # and adapt.stages: one message
        ("resume_from_checkpoint=False", "already holds a run (final, run_record.json): set resume_from_checkpoint=True"),
        ("heldout.texts=[python]", "override `heldout.texts=[python]` cannot be applied"),  # not a bare TypeError
        ("batch_size=0", "batch_size must be an integer >= 1"),
    ],
)
def test_bad_input_fails_before_work(tmp_path, tiny_model, python_docs_dir, override, message):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out)
    if "already holds a run" in message:  # a finished run is in the way of a fresh one
        (out / "final").mkdir(parents=True)
        (out / "run_record.json").write_text("{}")
    proc = tune(["adapt_prune_recipe", "--config", str(cfg), *override.split()], cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    if "adapt.stages=two" in override:
        assert "adapt.stages must be an integer >= 1, got 'two' (a string)" in proc.stdout + proc.stderr
    assert not (out / "checkpoints").exists()
    assert (out / "run_record.json").exists() == ("already holds a run" in message)


def test_resume_from_another_config_is_refused(tmp_path, tiny_model, python_docs_dir):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, **{"adapt.total_steps": 2})
    assert_ok(tune(["adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = tune(
        ["adapt_prune_recipe", "--config", str(cfg), "resume_from_checkpoint=True", "pruning.method.amplitude=0.3",
         "gradient_accumulation_steps=2", "shuffle=False", "heldout.num_tokens=640", "heldout.batch_size=2",
         "pruning.calibration.batch_size=1"],
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    logs = proc.stdout + proc.stderr
    # Named, before the weights load (no traceback, no model set-up).
    assert "pruning.method.amplitude: 0.05 in the checkpoint, 0.3 in this config" in logs
    assert "samples_per_step: 2 in the checkpoint, 4 in this config" in logs
    assert "shuffle: True in the checkpoint, False in this config (it orders the training data)" in logs
    assert "heldout.num_tokens: 576 in the checkpoint, 640 in this config" in logs
    remaining = logs.split("cannot run this config")[-1]
    assert "heldout.batch_size" not in remaining and "calibration.batch_size" not in remaining  # memory: may change
    assert "Traceback" not in logs and "Instantiating model" not in logs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_resumed_run_keeps_its_plan_when_the_data_changed(tmp_path, tiny_model, python_docs_dir):
    """A token budget is turned into steps from the data's mean sample length; recomputed on
    resume from changed data (here a shorter max_seq_len), it gave other stage lengths and
    checkpoint chunks than the checkpoint's position belonged to ([8, 16] became [11, 21])."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out,
                       **{"adapt.total_steps": None, "adapt.total_tokens": 3000})
    killed = tune(["adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path,
                  env={"ADAPT_PRUNE_TUNE_KILL_AT": "training_step:5"})
    assert killed.returncode != 0
    planned = re.search(r"adapt\.total_tokens=3,000 ≈ (\d+) steps", killed.stdout + killed.stderr)
    assert planned, killed.stderr[-3000:]
    resumed = tune(["adapt_prune_recipe", "--config", str(cfg), "resume_from_checkpoint=True",
                    "tokenizer.max_seq_len=48"], cwd=tmp_path)
    assert_ok(resumed)
    logs = resumed.stdout + resumed.stderr
    assert "The training data differs from the checkpoint's" in logs
    assert f"keeps its plan of {planned[1]} steps" in logs
    record = json.loads((out / "run_record.json").read_text())
    assert sum(stage["train_steps"] for stage in record["stages"]) == int(planned[1])
    assert max(row["step"] for row in record["train_log"]) == int(planned[1])
    # Later checkpoints record the data as the resumed process found it (a second resume on it
    # does not warn again) beside the plan's own sample length.
    from adapt_prune_tune.checkpointing import STATE_FILE

    data = json.loads((ckpt_latest(out) / STATE_FILE).read_text())["recipe"]["data"]
    assert data["total_steps"] == int(planned[1]) and data["mean_sample_len"] < data["planned_mean_sample_len"]


def test_packaged_config_names_resolve_from_any_directory(tmp_path):
    # The user's exact command shape: a config *name*, from a directory with no project files.
    for name in configs.available():
        assert configs.resolve(name).is_file()
    with pytest.raises(FileNotFoundError, match="Packaged configs"):
        configs.resolve("llama3_1/does_not_exist")
    proc = subprocess.run(
        [sys.executable, "-c", "import adapt_prune_recipe"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_run_exports_to_transformers_with_matching_logits(tmp_path, tiny_model, python_docs_dir):
    """The user's path end to end: tune run -> adapt-prune-tune export -> transformers."""
    from transformers import AutoModelForCausalLM

    from adapt_prune_tune.export import load_pruned_checkpoint
    from adapt_prune_tune.models import decoder_from_arch

    out = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_model, python_docs_dir, out, **{"adapt.total_steps": 2})
    assert_ok(tune(["adapt_prune_recipe", "--config", str(cfg)], cwd=tmp_path))
    assert (out / "report.md").is_file()
    state, arch = load_pruned_checkpoint(out / "final")
    model = decoder_from_arch(arch)
    model.load_state_dict(state)
    tokens = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        expected = model(tokens)
    for mode in ("compact", "padded"):
        export = tmp_path / mode
        proc = subprocess.run(["adapt-prune-tune", "export", str(out), str(export), "--mode", mode],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=(mode == "compact"))
        with torch.no_grad():
            got = hf(tokens).logits
        assert (got - expected).abs().max() < 1e-4, mode
        assert (export / "tokenizer.json").is_file()
