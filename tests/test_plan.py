"""``adapt-prune-tune plan``: the recipe's checks on meta-device models, stage tables and memory estimates."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from adapt_prune_tune import config_checks
from adapt_prune_tune.cli import main
from adapt_prune_tune.importance import normalize_importance
from adapt_prune_tune.models import DecoderArch, decoder_from_arch
from adapt_prune_tune.planning import (
    adaptive_sparsity_range,
    format_plan,
    importance_bound,
    layer_activation_bytes,
    load_config,
    lowbit_recompile_notes,
    optimizer_state_bytes,
    plan_run,
)
from adapt_prune_tune.sparsity import assign_layer_sparsity

pytestmark = pytest.mark.usefixtures("one_thread")


def plan_8b(tmp_path, *overrides, world_size=1):
    """The packaged 8B config, pointed at files that do not exist (as on a laptop without the model)."""
    missing = tmp_path / "no-model"
    cfg, path = load_config(
        "llama3_1/8B_adapt",
        [f"checkpointer.checkpoint_dir={missing}", f"tokenizer.path={missing}/tokenizer.model", *overrides],
    )
    return plan_run(cfg, world_size=world_size, config_name="llama3_1/8B_adapt", config_path=str(path))


def test_8b_plans_in_seconds_without_any_files(tmp_path):
    t0 = time.perf_counter()
    plan = plan_8b(tmp_path, world_size=8)
    assert time.perf_counter() - t0 < 10  # meta device: no weights are ever allocated or read

    assert [s.stage for s in plan.stages] == list(range(1, 11))
    assert [s.target_sparsity for s in plan.stages] == pytest.approx([0.05 * k for k in range(1, 11)])
    assert plan.params_before == 8_030_261_248
    # Stage k removes k/N of half the prunable projections: the count after each prune is the budget.
    for s in plan.stages:
        assert s.params_after_prune == plan.params_before - round(s.target_sparsity * plan.prunable_params)
    assert plan.params_after == plan.stages[-1].params_after_prune == pytest.approx(4.54e9, rel=0.01)
    assert plan.params_tolerance == 64 * 3 * 4096 // 2  # round_to: 64 MLP channels
    # Packed data: 1e9 tokens / (4 × 4 × 8 samples × 1024 tokens), split 1:2:...:10 over the stages.
    assert plan.mean_sample_len_source == "packed"
    assert plan.total_steps == round(1e9 / (128 * 1024)) == sum(s.train_steps for s in plan.stages)
    assert [s.train_steps for s in plan.stages] == sorted(s.train_steps for s in plan.stages)
    # The adaptive range widens with every prune step (A·K) and never passes max_layer_sparsity.
    lo1, hi1 = plan.stages[0].layer_sparsity_range
    assert (lo1, hi1) == pytest.approx((0.0, 0.05 + 0.02 * 5))
    assert plan.stages[-1].layer_sparsity_range[1] == pytest.approx(0.9)
    assert all(s.layer_params_narrowest <= s.layer_params_uniform <= s.layer_params_widest for s in plan.stages)
    # The missing model is reported, not fatal.
    assert any("checkpoint files not found" in w for w in plan.warnings)
    assert any("tokenizer.path not found" in w for w in plan.warnings)

    # One checkpoint: bf16 weights + 2 bf16 AdamW moments of the base model, 1/8 of it per rank.
    assert plan.checkpoint_bytes == 8_030_261_248 * 6 and plan.checkpoint_every == 200

    text = format_plan(plan)
    assert "4,540,600,320" in text and "Warnings" in text
    assert "ckpt      ~44.87 GiB each (5.61 GiB per rank) after every stage's prune and every 200 training steps" in text
    assert json.loads(plan.to_json())["stages"][0]["train_steps"] == plan.stages[0].train_steps


def test_the_gpu_configs_pack_only_what_they_train_on(tmp_path):
    assert not any("whole corpus" in note for note in plan_8b(tmp_path, world_size=8).notes)
    # max_tokens: ${adapt.total_tokens} is then null: the recipe packs what its 1,000 steps consume.
    by_steps = plan_8b(tmp_path, "adapt.total_tokens=null", "adapt.total_steps=1000", world_size=8)
    assert not any("whole corpus" in note for note in by_steps.notes)


def test_the_papers_1b_recipe_plans_from_its_own_builder(tmp_path):
    """DeepSeek-R1-Distill-Qwen-1.5B -> 1B: the official script's counts, from a builder (no download)."""
    missing = tmp_path / "no-model"
    cfg, path = load_config(
        "deepseek_r1_distill_qwen/1.5B_adapt",
        [f"checkpointer.checkpoint_dir={missing}", f"tokenizer.path={missing}"],
    )
    plan = plan_run(cfg, world_size=4, config_name="deepseek_r1_distill_qwen/1.5B_adapt", config_path=str(path))
    assert plan.params_before == 1_777_088_000  # untied output projection: the script's original_param_num
    assert len(plan.stages) == 11
    assert abs(plan.params_after - 1_005_461_760) <= plan.params_tolerance
    # 128 sequences of 1,024 tokens per step on 4 ranks, 7,714,363 sequences in all.
    assert plan.total_steps == round(7_714_363 * 1024 / (128 * 1024))
    assert any("checkpoint files not found" in w for w in plan.warnings)


def test_memory_per_rank_falls_with_the_world_size(tmp_path):
    peaks = []
    for world in (1, 2, 4, 8):  # 512 calibration samples in batches of 64: at most 8 ranks
        plan = plan_8b(tmp_path, world_size=world)
        train = plan.memory["train_stage_1"]
        peaks.append(max(max(s.memory_prune_peak, s.memory_train_peak or 0) for s in plan.stages))
        # bf16 AdamW: weights, gradients and both moments are 2 bytes per element, sharded.
        assert train["optimizer_state"] == pytest.approx(2 * train["weights"])
        assert train["weights"] == pytest.approx(2 * plan.stages[0].params_after_prune / world)
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > 4 * peaks[-1]
    # 8B on one rank: 16 GB weights + 16 GB gradients + 32 GB moments at least.
    assert peaks[0] > 64e9
    # Stage 1's prune runs before any optimizer step: no AdamW state yet; stage 2's has it.
    assert plan.memory["prune_stage_1"]["optimizer_state"] == 0
    assert plan.stages[1].memory_prune_peak > plan.stages[0].memory_prune_peak


def test_calibration_gradients_are_the_scored_ones_summed_in_fp32_below_fp32(tmp_path):
    """calibrate computes the scored projections' gradients only, and keeps an fp32 sum beside
    each batch's bf16 ones (pruner.calibrate)."""
    bf16 = plan_8b(tmp_path, world_size=2)
    scored = bf16.prunable_params  # stage 1 prunes the unpruned model: no embedding, norm or output
    prune, train = bf16.memory["prune_stage_1"], bf16.memory["train_stage_1"]
    assert prune["gradients"] == pytest.approx((2 + 4) * scored / 2)
    assert train["gradients"] == pytest.approx(train["weights"])  # training: the bf16 .grad only
    fp32 = plan_8b(tmp_path, "dtype=fp32", world_size=2).memory["prune_stage_1"]
    assert fp32["gradients"] == pytest.approx(4 * scored / 2)  # fp32: sums in .grad itself
    # The largest unit's unsharded gradient is a layer's (218 M), not the output projection's (525 M).
    no_cut = plan_8b(tmp_path, "pruning.method.target_sparsity=0.0001", world_size=2).memory
    assert no_cut["prune_stage_1"]["fsdp_working_set"] == pytest.approx(
        no_cut["train_stage_1"]["fsdp_working_set"] - 2 * (525_336_576 - 218_112_000), rel=1e-3)


def test_activation_checkpointing_and_distillation_change_the_estimate(tmp_path):
    plan = plan_8b(tmp_path, world_size=8)
    train = plan.memory["train_stage_1"]
    assert train["activations"] == train["activations_checkpointing_on"]
    assert train["activations_checkpointing_off"] > 10 * train["activations_checkpointing_on"]
    no_ac = plan_8b(tmp_path, "enable_activation_checkpointing=False", world_size=8)
    assert no_ac.stages[0].memory_train_peak > plan.stages[0].memory_train_peak
    kd = plan_8b(tmp_path, "distill.enabled=True", world_size=8)
    teacher = kd.memory["train_stage_1"]["teacher"]
    # The teacher's sharded bf16 weights plus its unsharded embedding and output projection.
    assert teacher > 2 * 8_030_261_248 / 8 + 2 * 2 * 128_256 * 4096
    assert kd.stages[0].memory_train_peak > plan.stages[0].memory_train_peak + teacher * 0.99


def test_units_kept_unsharded_after_forward_hold_the_whole_model(tmp_path):
    """fsdp_reshard_after_forward=False: between forward and backward every unit is whole."""
    plan = plan_8b(tmp_path, world_size=8)
    kept = plan_8b(tmp_path, "fsdp_reshard_after_forward=False", world_size=8)
    params = plan.params_before
    assert kept.memory["train_stage_1"]["fsdp_working_set"] > 2 * params  # bf16: the whole model, and more
    assert plan.memory["train_stage_1"]["fsdp_working_set"] < 0.5 * 2 * params
    assert any("fsdp_reshard_after_forward=False" in note for note in kept.notes)


@pytest.mark.parametrize(
    "override, message",
    [
        ("pruning.method.target_sparsity=1.5", "target_sparsity must be in [0, 1)"),
        ("optimizer_in_bwd=True", "optimizer_in_bwd"),
        ("adapt.total_tokens=null adapt.total_steps=3", "every stage needs at least one"),
        ("adapt.total_steps=5", "set exactly one of total_tokens or total_steps"),
        ("pruning.method.target_params=900_000_000 pruning.method.target_sparsity=null", "cannot prune"),
        ("distill.enabled=True distill.alpha=1.5", "distill.alpha must be in [0, 1]"),
        ("distill.enabled=True distill.alpah=0.3", "did you mean distill.alpha"),
        (
            "distill.enabled=True distill.teacher_model._component_=torchtune.models.qwen2_5.qwen2_5_0_5b",
            "the teacher must share the student's tokenizer",
        ),
        ("dtype=fp16", "full fp16 training is not supported"),
        ("lr_scheduler.warmup_ratio=1.5", "warmup_ratio must be in [0, 1]"),
    ],
)
def test_bad_config_fails_with_the_recipes_message(tmp_path, override, message):
    with pytest.raises((ValueError, RuntimeError)) as err:
        plan_8b(tmp_path, *override.split())
    assert message in str(err.value)


def test_calibration_split_is_checked_for_the_world_size(tmp_path):
    on_8 = plan_8b(tmp_path, world_size=8)  # 512 windows = 64 per rank: one batch at the cap of 64
    assert on_8.calibration["batch_size"] == 64 and "up to pruning.calibration" not in format_plan(on_8)
    on_16 = plan_8b(tmp_path, world_size=16)  # 32 per rank: one batch of 32, and the memory of 32
    assert on_16.calibration["batch_size"] == 32
    assert "batches of 32 per rank (the largest divisor of 32 up to pruning.calibration.batch_size=64)" in format_plan(on_16)
    explicit = plan_8b(tmp_path, "pruning.calibration.batch_size=32", world_size=16)
    assert on_16.memory["prune_stage_1"] == explicit.memory["prune_stage_1"]
    with pytest.raises(ValueError, match=r"multiple of the data-parallel ranks \(3\).*num_samples=513"):
        plan_8b(tmp_path, world_size=3)


def test_the_recipe_runs_the_same_checks():
    import adapt_prune_recipe

    assert adapt_prune_recipe._check_inputs is config_checks.check_inputs
    assert adapt_prune_recipe._clear_previous_run is config_checks.clear_previous_run


def test_cli_prints_table_and_json(tmp_path, capsys):
    missing = tmp_path / "nothing"
    args = ["plan", "llama3_1/8B_adapt", f"checkpointer.checkpoint_dir={missing}", "--world-size", "8"]
    main(args)
    text = capsys.readouterr().out
    assert "world size 8" in text and "7,629" in text and "checkpoint files not found" in text
    main(args + ["--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 8 and len(data["stages"]) == 10
    main(["plan", "llama3_1/8B_adapt", "--world-size", "8", "adapt.stages=4", "--json"])  # overrides after options
    assert len(json.loads(capsys.readouterr().out)["stages"]) == 4
    # ~key deletes a key, as for tune run: torchtune's packer instead of ours is named with the fix
    main(["plan", "llama3_1/8B_adapt", "--world-size", "8", "dataset._component_=torchtune.datasets.text_completion_dataset",
          "~dataset.max_tokens", "~dataset.seed", "~dataset.cache_dir", "~dataset.tokenize_workers"])
    assert "torchtune's text_completion_dataset with packed: True packs the whole corpus" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "llama3_1/8B_adapt", "--world-sise", "8"])
    assert "unrecognized arguments: --world-sise 8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["plan", "llama3_1/8B_adapt", "pruning.method.target_sparsity=1.5"])
    assert err.value.code == 2
    assert "target_sparsity must be in [0, 1)" in capsys.readouterr().err


def test_demo_plan_without_data_states_its_assumption(tmp_path):
    cfg, _ = load_config("smollm2/135M_adapt", [f"cache_dir={tmp_path}"])
    plan = plan_run(cfg, read_data=False)
    # Non-packed data that is not here: max_seq_len (256) is assumed, which can only undercount steps.
    assert plan.mean_sample_len_source == "assumed" and plan.mean_sample_len == 256
    assert [s.train_steps for s in plan.stages] == [8, 16, 23, 31]
    assert "ASSUMED mean sample length" in format_plan(plan)
    given = plan_run(cfg, mean_sample_len=247, read_data=False)
    assert [s.train_steps for s in given.stages] == [8, 16, 24, 33]


@pytest.mark.integration
def test_demo_plan_matches_the_recipe(tmp_path, smollm2_dir, python_docs_dir):
    """README's demo: 134.5 M -> 113.3 M parameters, 40 k tokens as 8/16/24/33 steps."""
    cfg, _ = load_config("smollm2/135M_adapt", [f"output_dir={tmp_path}/run"])  # not a finished demo run
    plan = plan_run(cfg)
    assert plan.mean_sample_len_source == "dataset"  # measured like the recipe's _resolve_total_steps
    assert [s.train_steps for s in plan.stages] == [8, 16, 24, 33]
    assert plan.params_before == 134_515_008 and plan.params_after == 113_281_344
    assert plan.warnings == []


# --------------------------------------------------------------------------- the pieces


def test_adaptive_range_bounds_the_rule():
    """Whatever the measured importance, a layer stays within target ± A·M·K (lower clamps binding)."""
    gen = torch.Generator().manual_seed(0)
    layers, steps, amplitude = 12, 10, 0.04
    for method in ("max", "rank", "mad", "zscore"):
        bound = importance_bound(method, layers)
        for trial in range(20):
            s = torch.zeros(layers, dtype=torch.float64)
            for k in range(1, steps + 1):
                target = 0.3 * k / steps
                raw = torch.randn(layers, generator=gen, dtype=torch.float64) ** 3  # heavy tails, outliers
                imp = normalize_importance(raw, method)
                assert imp.abs().max() <= bound + 1e-9
                s, _ = assign_layer_sparsity(s, target, imp, amplitude, 0.9)
                lo, hi = adaptive_sparsity_range(target, amplitude, k, bound, 0.9)
                assert float(s.min()) >= lo - 1e-9 and float(s.max()) <= hi + 1e-9, (method, trial, k)


def test_importance_bounds():
    assert importance_bound("max", 32) == importance_bound("rank", 32) == 1.0
    assert importance_bound("mad", 30) == pytest.approx(2 * 29 / 30)
    assert 1.0 < importance_bound("zscore", 30) < 3.0
    assert adaptive_sparsity_range(0.05, 0.02, 5, 1.0, 0.9) == pytest.approx((0.0, 0.15))
    assert adaptive_sparsity_range(0.5, 0.0, 50, 1.0, 0.9) == (0.5, 0.5)  # A = 0: uniform


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 1)])
def test_activation_formula_matches_what_autograd_saves(dtype, heads, kv_heads):
    h, head_dim, mlp, b, s = 256, 32, 704, 3, 100
    arch = DecoderArch.uniform(
        vocab_size=1000, embed_dim=h, num_layers=1, num_heads=heads, num_kv_heads=kv_heads,
        intermediate_dim=mlp, max_seq_len=512, head_dim=head_dim,
    )
    model = decoder_from_arch(arch).to(dtype)
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(b, s, h, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x)
    estimate = b * s * layer_activation_bytes(h, heads * head_dim, mlp, dtype.itemsize)
    assert sum(saved.values()) == pytest.approx(estimate, rel=0.1)


def test_optimizer_state_bytes():
    p = [torch.nn.Parameter(torch.zeros(8))]
    assert optimizer_state_bytes(torch.optim.AdamW(p), 2)[0] == 4  # two bf16 moments
    assert optimizer_state_bytes(torch.optim.AdamW(p, amsgrad=True), 4)[0] == 12
    assert optimizer_state_bytes(torch.optim.SGD(p, lr=0.1, momentum=0.9), 2)[0] == 2
    assert optimizer_state_bytes(torch.optim.SGD(p, lr=0.1), 2)[0] == 0
    torchao_optim = pytest.importorskip("torchao.optim")
    assert optimizer_state_bytes(torchao_optim.AdamW8bit(p), 2)[0] == pytest.approx(2 * (1 + 4 / 256))
    assert optimizer_state_bytes(torchao_optim.AdamW4bit(p), 2)[0] == pytest.approx(2 * (0.5 + 4 / 128))
    assert math.isclose(optimizer_state_bytes(torchao_optim.AdamW8bit(p, block_size=128), 2)[0], 2 * (1 + 4 / 128))


def test_lowbit_optimizer_recompiles_are_noted_once_per_run_with_training():
    from torchao import optim as torchao_optim

    p = [torch.nn.Parameter(torch.zeros(8))]
    assert lowbit_recompile_notes(torch.optim.AdamW(p), 4, 100) == []
    (note,) = lowbit_recompile_notes(torchao_optim.AdamW8bit(p), 4, 100)
    assert "AdamW8bit" in note and "4 stages" in note and "round_to" in note
    assert lowbit_recompile_notes(torchao_optim.AdamW8bit(p), 4, 0) == []  # prune only: no optimizer step
    assert len(lowbit_recompile_notes(torchao_optim.AdamW4bit(p), 2, None)) == 1  # length unknown: still trains
