"""The iterative driver end to end on tiny random models, and its up-front errors."""

import copy
from typing import Dict, List

import pytest
import torch
from _gloo import on_ranks
from torch import nn

from adapt_prune_tune.models import DecoderArch, RopeSpec, arch_from_model, decoder_from_arch
from adapt_prune_tune.pruner import (
    AdaptivePruner,
    PruningConfig,
    calibrate,
    next_token_loss,
    prunable_per_layer,
    prune,
    score_layers,
    scored_parameters,
)


pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB = 64
ARCH = DecoderArch.uniform(vocab_size=VOCAB, embed_dim=48, num_layers=4, num_heads=6, num_kv_heads=3,
                           intermediate_dim=64, max_seq_len=64, rope=RopeSpec("default", 1e5),
                           tie_word_embeddings=True)
PER_CHANNEL = 3 * ARCH.embed_dim


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = decoder_from_arch(ARCH)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def batches(n: int = 2, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, VOCAB, (2, 17), generator=g)} for _ in range(n)]


def test_end_to_end_steps_records_and_target() -> None:
    model = tiny()
    cfg = PruningConfig(target_sparsity=0.5, steps=4, amplitude=0.05)
    arch, pruner = prune(model, ARCH, batches(), cfg)
    assert [r.step for r in pruner.records] == [1, 2, 3, 4]
    assert [r.target for r in pruner.records] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert all(len(r.layer_importance) == 4 and len(r.layer_sparsity) == 4 for r in pruner.records)
    assert all(r.seconds > 0 and r.calib_loss > 0 for r in pruner.records)
    # params shrink every step and end at the target (within one MLP channel overall)
    params = [r.params for r in pruner.records]
    assert params == sorted(params, reverse=True) and params[-1] == arch.num_params()
    removed = ARCH.prunable_params() - arch.prunable_params()
    assert abs(removed - 0.5 * ARCH.prunable_params()) <= PER_CHANNEL
    # the model is physically that architecture and still runs
    assert arch_from_model(model) == arch
    assert sum(p.numel() for p in model.parameters()) == arch.num_params()
    assert all(layer.num_heads % layer.num_kv_heads == 0 for layer in arch.layers)
    loss, _ = next_token_loss(model, batches(1, seed=5)[0])
    assert torch.isfinite(loss)
    # the per-layer sparsity the pruner tracks is the achieved one, and it never decreases
    achieved = 1 - prunable_per_layer(arch, cfg) / prunable_per_layer(ARCH, cfg)
    assert torch.allclose(pruner.sparsity, achieved)
    per_step = torch.tensor([r.layer_sparsity for r in pruner.records])
    assert bool((per_step[1:] >= per_step[:-1] - 1e-12).all())


def test_param_count_target() -> None:
    target = ARCH.num_params() - 30_000
    arch, _ = prune(tiny(1), ARCH, batches(), PruningConfig(target_params=target, steps=2, amplitude=0.02))
    assert abs(arch.num_params() - target) <= PER_CHANNEL


def test_amplitude_zero_prunes_every_layer_alike() -> None:
    arch, pruner = prune(tiny(2), ARCH, batches(), PruningConfig(target_sparsity=0.4, steps=3, amplitude=0.0))
    attention = {arch.layer_attention_params(i) for i in range(arch.num_layers)}
    assert len(attention) == 1
    widths = [layer.intermediate_dim for layer in arch.layers]
    assert max(widths) - min(widths) <= 1  # only the budget's last rounded channel differs
    assert max(pruner.records[-1].layer_sparsity) - min(pruner.records[-1].layer_sparsity) < 0.01


def test_adaptive_prunes_the_layer_that_changes_its_input_least_the_most() -> None:
    model = tiny(3)
    with torch.no_grad():  # layer 2 barely writes to the residual stream: output ~ input
        model.layers[2].attn.output_proj.weight.mul_(1e-3)
        model.layers[2].mlp.w2.weight.mul_(1e-3)
    unpruned = copy.deepcopy(model)
    arch, pruner = prune(model, ARCH, batches(), PruningConfig(target_sparsity=0.3, steps=3, amplitude=0.1))
    first = pruner.records[0].layer_importance
    assert first[2] == pytest.approx(-1.0)  # least important, normalized to -1
    final = pruner.records[-1].layer_sparsity
    assert final[2] == max(final) and final[2] > 0.3 + 0.1
    uniform, _ = prune(unpruned, ARCH, batches(), PruningConfig(target_sparsity=0.3, steps=3, amplitude=0.0))
    assert arch.layers != uniform.layers


def test_configured_normalization_is_what_the_rule_sees() -> None:
    cfg = PruningConfig(target_sparsity=0.3, steps=2, amplitude=0.05, importance_normalization="rank")
    _, pruner = prune(tiny(3), ARCH, batches(), cfg)
    for record in pruner.records:  # 4 layers: ranks -> -1, -1/3, 1/3, 1
        assert sorted(record.layer_importance) == pytest.approx([-1, -1 / 3, 1 / 3, 1])


@pytest.mark.parametrize("normalization", ["zscore", "mad", "rank"])
def test_alternative_normalizations_prune_to_the_target(normalization: str) -> None:
    cfg = PruningConfig(target_sparsity=0.4, steps=3, amplitude=0.05, importance_normalization=normalization)
    arch, pruner = prune(tiny(5), ARCH, batches(), cfg)
    assert all(abs(sum(r.layer_importance)) < 1e-9 for r in pruner.records)
    removed = ARCH.prunable_params() - arch.prunable_params()
    assert abs(removed - 0.4 * ARCH.prunable_params()) <= PER_CHANNEL


def test_round_to_end_to_end() -> None:
    model = tiny(7)
    cfg = PruningConfig(target_sparsity=0.5, steps=4, amplitude=0.05, round_to=16)
    arch, pruner = prune(model, ARCH, batches(), cfg)
    assert all(layer.intermediate_dim % 16 == 0 for layer in arch.layers)
    assert arch_from_model(model) == arch
    removed = ARCH.prunable_params() - arch.prunable_params()
    assert abs(removed - 0.5 * ARCH.prunable_params()) <= 16 * PER_CHANNEL / 2
    # the rule continues from its own unrounded sparsities; the record keeps the achieved ones
    assert not torch.allclose(pruner.planned, pruner.sparsity)
    assert pruner.records[-1].layer_sparsity == pytest.approx(pruner.sparsity.tolist())
    assert float((pruner.planned - pruner.sparsity).abs().max()) < 0.25


def test_round_to_wider_than_the_mlp_prunes_only_heads() -> None:
    model = tiny(8)
    cfg = PruningConfig(target_sparsity=0.25, steps=2, amplitude=0.02, round_to=128)
    arch, _ = prune(model, ARCH, batches(), cfg)
    assert [layer.intermediate_dim for layer in arch.layers] == [64] * 4
    assert arch.prunable_params() < ARCH.prunable_params()
    assert torch.isfinite(next_token_loss(model, batches(1, seed=5)[0])[0])
    # heads alone cannot remove 45% of the prunable weights: said before any work
    with pytest.raises(ValueError, match="exceeds what the minimum widths"):
        prune(tiny(8), ARCH, batches(), PruningConfig(target_sparsity=0.45, steps=2, round_to=128))


def test_large_amplitude_reports_clamped_layers_and_still_meets_the_budget(caplog) -> None:
    cfg = PruningConfig(target_sparsity=0.4, steps=3, amplitude=0.5, max_layer_sparsity=0.6)
    with caplog.at_level("WARNING", logger="adapt_prune_tune.pruner"):
        arch, pruner = prune(tiny(4), ARCH, batches(), cfg)
    assert sum(r.clamped_layers for r in pruner.records) > 0
    warnings = [r.getMessage() for r in caplog.records if "past a clamp" in r.getMessage()]
    assert len(warnings) == 1 and "pruning.method.amplitude" in warnings[0]  # said once, with the fix
    assert max(pruner.records[-1].layer_sparsity) <= 0.6 + 0.05  # whole groups round a little
    removed = ARCH.prunable_params() - arch.prunable_params()
    assert abs(removed - 0.4 * ARCH.prunable_params()) <= PER_CHANNEL


def test_mlp_only_leaves_heads_alone() -> None:
    cfg = PruningConfig(target_sparsity=0.5, steps=2, prune_attention=False)
    arch, _ = prune(tiny(5), ARCH, batches(), cfg)
    assert all((layer.num_heads, layer.num_kv_heads) == (6, 3) for layer in arch.layers)
    assert sum(layer.intermediate_dim for layer in arch.layers) == 4 * 64 // 2


@pytest.mark.parametrize("scorer", ["magnitude_l2", "random", "taylor_vector"])
def test_other_scorers_run(scorer: str) -> None:
    arch, _ = prune(tiny(6), ARCH, batches(1), PruningConfig(target_sparsity=0.3, steps=2, scorer=scorer))
    assert abs(ARCH.prunable_params() - arch.prunable_params() - 0.3 * ARCH.prunable_params()) <= PER_CHANNEL


def test_random_scorer_is_reproducible_with_the_seed() -> None:
    cfg = PruningConfig(target_sparsity=0.3, steps=2, scorer="random", seed=3)
    m1, m2 = tiny(7), tiny(7)
    prune(m1, ARCH, batches(1), cfg)
    prune(m2, ARCH, batches(1), cfg)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_calibrate_matches_a_manual_loss() -> None:
    model, data = tiny(8), batches(3)
    calib = calibrate(model, data)
    with torch.no_grad():
        losses = [next_token_loss(model, b) for b in data]
    expected = sum(float(l) * n for l, n in losses) / sum(n for _, n in losses)
    assert calib.loss == pytest.approx(expected, rel=1e-5)
    assert calib.tokens == 3 * 2 * 16
    assert all(p.grad is not None for n, p in model.named_parameters() if ".mlp." in n)


def test_calibration_computes_only_the_scored_gradients_and_scores_alike() -> None:
    """Freezing the embeddings, norms and output for the calibration backward changes no score:
    the scored projections' gradients do not depend on theirs."""
    whole, only = tiny(10), tiny(10)
    data = batches(2)
    scored = scored_parameters(ARCH)
    c_whole = calibrate(whole, data)
    c_only = calibrate(only, data, gradients_of=scored)
    assert c_only.loss == c_whole.loss
    grads = {n for n, p in only.named_parameters() if p.grad is not None}
    assert grads == scored and "tok_embeddings.weight" not in grads
    assert all(p.requires_grad for p in only.parameters())  # training goes on as before
    for expected, got in zip(score_layers(whole, ARCH, "taylor"), score_layers(only, ARCH, "taylor")):
        for kind in expected:
            torch.testing.assert_close(got[kind], expected[kind], rtol=0, atol=0)


def test_frozen_parameters_are_released_when_the_calibration_pass_fails() -> None:
    model = tiny(11)

    def failing(model: nn.Module, batch: Dict[str, torch.Tensor]):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        calibrate(model, batches(1), loss_fn=failing, gradients_of=scored_parameters(ARCH))
    assert all(p.requires_grad for p in model.parameters())


def test_loss_over_chunked_output_equals_the_plain_loss() -> None:
    model, batch = tiny(9), batches(1)[0]
    with torch.no_grad():
        logits = model(batch["tokens"][:, :-1])
        manual = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["tokens"][:, 1:].reshape(-1))
        model.set_num_output_chunks(3)  # 16 positions in chunks of 6, 6, 4
        chunked, n = next_token_loss(model, batch)
    assert n == 2 * 16 and float(chunked) == pytest.approx(float(manual), rel=1e-6)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1])
def test_sparsity_outside_unit_interval(sparsity: float) -> None:
    with pytest.raises(ValueError, match=r"target_sparsity must be in \[0, 1\)"):
        PruningConfig(target_sparsity=sparsity)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        PruningConfig()
    with pytest.raises(ValueError, match="exactly one"):
        PruningConfig(target_sparsity=0.2, target_params=10)
    with pytest.raises(ValueError, match="steps"):
        PruningConfig(target_sparsity=0.2, steps=0)
    with pytest.raises(ValueError, match="amplitude"):
        PruningConfig(target_sparsity=0.2, amplitude=-0.01)
    with pytest.raises(ValueError, match="scorer"):
        PruningConfig(target_sparsity=0.2, scorer="hessian")
    with pytest.raises(ValueError, match="similarity"):
        PruningConfig(target_sparsity=0.2, similarity="dot")
    with pytest.raises(ValueError, match="prune_attention and/or prune_mlp"):
        PruningConfig(target_sparsity=0.2, prune_attention=False, prune_mlp=False)
    with pytest.raises(ValueError, match=r"importance_normalization must be one of \('max', 'zscore', 'mad', 'rank'\)"):
        PruningConfig(target_sparsity=0.2, importance_normalization="minmax")
    with pytest.raises(ValueError, match="round_to must be an integer >= 1"):
        PruningConfig(target_sparsity=0.2, round_to=0)


def test_param_targets_outside_the_model() -> None:
    with pytest.raises(ValueError, match="not below"):
        AdaptivePruner(PruningConfig(target_params=ARCH.num_params() + 1), ARCH)
    embeddings = ARCH.vocab_size * ARCH.embed_dim
    with pytest.raises(ValueError, match="cannot prune"):
        AdaptivePruner(PruningConfig(target_params=embeddings), ARCH)


def test_target_below_minimum_widths_fails_before_any_work() -> None:
    model = tiny(9)
    before = copy.deepcopy(model.state_dict())
    cfg = PruningConfig(target_sparsity=0.95 - 1e-3, max_layer_sparsity=0.99, min_kv_heads=3, min_q_per_kv=2)
    with pytest.raises(ValueError, match="exceeds what the minimum widths"):
        prune(model, ARCH, batches(), cfg)
    cfg = PruningConfig(target_sparsity=0.7, max_layer_sparsity=0.6)
    with pytest.raises(ValueError, match="max_layer_sparsity"):
        prune(model, ARCH, batches(), cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_empty_calibration() -> None:
    with pytest.raises(ValueError, match="Calibration data is empty"):
        prune(tiny(), ARCH, [], PruningConfig(target_sparsity=0.2, steps=1))


def test_non_gated_mlp_is_rejected_before_work() -> None:
    from torchtune.modules import FeedForward

    model = tiny()
    model.layers[1].mlp = FeedForward(gate_proj=nn.Linear(48, 64, bias=False), down_proj=nn.Linear(64, 48, bias=False))
    with pytest.raises(TypeError, match="gated"):
        arch_from_model(model)
    with pytest.raises(TypeError, match="gated"):
        prune(model, ARCH, batches(), PruningConfig(target_sparsity=0.2, steps=1))


def test_lora_linear_is_rejected_before_work() -> None:
    from torchtune.modules.peft import LoRALinear

    model = tiny()
    model.layers[0].attn.q_proj = LoRALinear(48, 48, rank=4, alpha=8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="LoRA"):
        arch_from_model(model)
    # the driver checks the model itself, not just the spec it is handed
    with pytest.raises(TypeError, match="LoRA"):
        prune(model, ARCH, batches(), PruningConfig(target_sparsity=0.2, steps=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_decoder_the_rebuild_would_change_is_rejected_before_work() -> None:
    """Gemma reads as a valid Llama-like spec (same projections, widths and RoPE), but every
    resize rebuilds from the spec: its scaled embeddings, own norm and GELU gate would be lost."""
    from torchtune.models.gemma._component_builders import gemma

    torch.manual_seed(0)
    model = gemma(vocab_size=VOCAB, num_layers=2, num_heads=4, head_dim=12, num_kv_heads=1, embed_dim=48,
                  intermediate_dim=64, max_seq_len=64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"(?s)GemmaNormEmbeddings.*GELU.*GemmaRMSNorm"):
        arch_from_model(model)
    with pytest.raises(TypeError, match="rebuild"):
        prune(model, ARCH, batches(), PruningConfig(target_sparsity=0.2, steps=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A scalar the spec keeps once (norm eps) but one layer overrides is a difference too.
    llama = tiny()
    llama.layers[2].mlp_norm.eps = 1e-3
    with pytest.raises(TypeError, match=r"layers\.2\.mlp_norm`\.eps is 0\.001"):
        arch_from_model(llama)


def test_wrapped_decoders_read_as_the_network_they_wrap() -> None:
    """Activation checkpointing adds a path segment and a wrapper module, not a layer: the spec
    and the rebuild check see through it (the recipe compiles layer by layer, in place)."""
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.training import set_activation_checkpointing

    model = tiny()
    set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    assert "_checkpoint_wrapped_module" in next(n for n, _ in model.named_modules() if "layers.0." in n)
    assert arch_from_model(model) == ARCH
    for layer in model.layers:
        layer.compile()
    assert arch_from_model(model) == ARCH


def test_spec_that_does_not_match_the_model_is_rejected() -> None:
    model = tiny()
    wrong = ARCH.with_layers([ARCH.layers[0]] * 3 + [type(ARCH.layers[0])(6, 3, 32)])
    with pytest.raises(ValueError, match="does not match"):
        prune(model, wrong, batches(), PruningConfig(target_sparsity=0.2, steps=1))


def test_pruner_state_round_trip_resumes_identically() -> None:
    cfg = PruningConfig(target_sparsity=0.4, steps=2, scorer="random", amplitude=0.05, seed=1)
    model = tiny(10)
    pruner = AdaptivePruner(cfg, ARCH)
    plan, calib = pruner.measure_and_plan(model, ARCH, batches(1), 0.2)
    pruner.commit(plan, calib, 0.2, stage=1, seconds=0.0)
    state = copy.deepcopy(pruner.state_dict())
    resumed = AdaptivePruner(cfg, ARCH)
    resumed.load_state_dict(state)
    a, _ = pruner.measure_and_plan(copy.deepcopy(model), ARCH, batches(1), 0.4)
    b, _ = resumed.measure_and_plan(copy.deepcopy(model), ARCH, batches(1), 0.4)
    assert a.arch == b.arch
    assert all((x is None and y is None) or x.to_dict() == y.to_dict() for x, y in zip(a.keeps, b.keeps))
    assert torch.equal(resumed.planned, pruner.planned)


def test_state_saved_before_planned_sparsity_resumes_from_the_achieved() -> None:
    pruner = AdaptivePruner(PruningConfig(target_sparsity=0.4, steps=2), ARCH)
    state = pruner.state_dict()
    del state["planned_sparsity"]
    state["sparsity"] = [0.1, 0.2, 0.3, 0.2]
    pruner.load_state_dict(state)
    assert pruner.planned.tolist() == [0.1, 0.2, 0.3, 0.2]


def test_bf16_calibration_sums_gradients_in_fp32_and_picks_like_fp32():
    """bf16 training: gradients are summed over calibration batches in fp32, and the Taylor
    scores pick (nearly) the same channels as an fp32 copy of the same model."""
    torch.manual_seed(0)
    arch = DecoderArch.uniform(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_dim=96, max_seq_len=32, rope=RopeSpec("default", 1e4))
    fp32 = decoder_from_arch(arch)
    bf16 = decoder_from_arch(arch).to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    fp32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})  # identical values
    batches = [{"tokens": torch.randint(0, 64, (2, 16))} for _ in range(4)]
    c32, c16 = calibrate(fp32, batches), calibrate(bf16, batches)
    assert c32.grads is None and c16.grads is not None
    assert all(g.dtype == torch.float32 for g in c16.grads.values())
    assert all(p.grad is None for p in bf16.parameters())
    s32 = score_layers(fp32, arch, "taylor")
    s16 = score_layers(bf16, arch, "taylor", summed_grads=c16.grads)
    for a, b in zip(s32, s16):
        k = 48  # keep half the MLP channels
        keep32 = set(a["mlp"].topk(k).indices.tolist())
        keep16 = set(b["mlp"].topk(k).indices.tolist())
        assert len(keep32 & keep16) / k > 0.85
    torch.testing.assert_close(c16.mean_similarity, c32.mean_similarity, rtol=0.02, atol=0.02)


# --------------------------------------------------------------------------- two ranks, FSDP2


def _rank_scores(rank: int, world: int) -> None:
    """Scores of an FSDP2 model on two ranks equal the single-process scores of the same
    model, and come from one all-reduce of per-channel totals: no weight or gradient is
    gathered."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer


    # Uneven shards: 97 MLP rows and 16-row KV biases over 2 ranks; biases (Qwen2) are 1-D.
    arch = DecoderArch.uniform(vocab_size=131, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=1,
                               intermediate_dim=97, max_seq_len=32, rope=RopeSpec("default", 1e4),
                               attn_bias=True)
    torch.manual_seed(0)
    plain = decoder_from_arch(arch)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0.0, 0.1)
    sharded = copy.deepcopy(plain)
    mesh = init_device_mesh("cpu", (world,))
    training.shard_model(sharded, [lambda n, m: isinstance(m, TransformerSelfAttentionLayer)],
                         cpu_offload=False, dp_mesh=mesh)
    batch = {"tokens": torch.randint(0, 131, (2, 16), generator=torch.Generator().manual_seed(3))}
    # The same batch on both ranks: FSDP's averaged gradient is the single-process gradient.
    for model in (plain, sharded):
        next_token_loss(model, batch)[0].backward()
    gathers = []
    all_gather, full_tensor = dist.all_gather_into_tensor, DTensor.full_tensor
    dist.all_gather_into_tensor = lambda *a, **k: gathers.append("all_gather") or all_gather(*a, **k)
    DTensor.full_tensor = lambda self, *a, **k: gathers.append("full_tensor") or full_tensor(self, *a, **k)
    try:
        for scorer in ("taylor", "taylor_vector", "magnitude_l2"):
            expected = score_layers(plain, arch, scorer)
            got = score_layers(sharded, arch, scorer)
            for e, g in zip(expected, got):
                assert e.keys() == g.keys()
                for kind in e:
                    torch.testing.assert_close(g[kind], e[kind], rtol=1e-5, atol=1e-9, msg=f"{scorer} {kind}")
    finally:
        dist.all_gather_into_tensor, DTensor.full_tensor = all_gather, full_tensor
    assert gathers == []


def test_two_rank_scores_match_one_process_without_gathering_weights(tmp_path):
    on_ranks(_rank_scores, 2, tmp_path)


def _rank_calibration_gradients(rank: int, world: int) -> None:
    """Under FSDP2, a calibration pass with only the scored gradients scores as one process
    does, leaves the sharded parameters registered, and the next training backward has every
    gradient again (FSDP2 reads the restored flags at its next all-gather)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer

    plain = tiny(12)
    sharded = copy.deepcopy(plain)
    training.shard_model(sharded, [lambda n, m: isinstance(m, TransformerSelfAttentionLayer)],
                         cpu_offload=False, dp_mesh=init_device_mesh("cpu", (world,)))
    registered = dict(sharded.named_parameters())
    data = batches(2)  # the same batches on both ranks: the averaged gradient is one process's
    calibrate(plain, data)
    calibrate(sharded, data, gradients_of=scored_parameters(ARCH))
    for expected, got in zip(score_layers(plain, ARCH, "taylor"), score_layers(sharded, ARCH, "taylor")):
        for kind in expected:
            torch.testing.assert_close(got[kind], expected[kind], rtol=1e-5, atol=1e-9)
    assert {n: p for n, p in sharded.named_parameters()} == registered
    assert all(isinstance(p, DTensor) and p.requires_grad for p in registered.values())
    assert registered["tok_embeddings.weight"].grad is None
    sharded.zero_grad(set_to_none=True)
    next_token_loss(sharded, data[0])[0].backward()
    assert all(p.grad is not None for p in sharded.parameters())


def test_two_rank_calibration_computes_only_the_scored_gradients(tmp_path):
    on_ranks(_rank_calibration_gradients, 2, tmp_path)
