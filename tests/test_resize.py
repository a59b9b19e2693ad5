"""Carrying weights and AdamW state across a resize (single process; FSDP runs in tests/recipes)."""

import torch

from adapt_prune_tune.models import DecoderArch, RopeSpec, decoder_from_arch
from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig, next_token_loss
from adapt_prune_tune.resize import (
    PrunedStateView,
    optimizer_state_by_name,
    parameter_shapes,
    rebind_optimizer_,
)
from adapt_prune_tune.surgery import full_slice_map, slice_tensor


def tiny(seed=0):
    torch.manual_seed(seed)
    arch = DecoderArch.uniform(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_dim=48, max_seq_len=32, rope=RopeSpec("default", 1e4))
    model = decoder_from_arch(arch)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model, arch


def rebuild(old, new_arch, slices):
    new = decoder_from_arch(new_arch)
    new.load_state_dict(dict(PrunedStateView(old, slices)), strict=True)
    return new


def test_resize_slices_weights_and_adam_moments():
    model, arch = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = [{"tokens": torch.randint(0, 64, (2, 16))}]
    for _ in range(2):
        next_token_loss(model, batches[0])[0].backward()
        opt.step()
        opt.zero_grad()
    pruner = AdaptivePruner(PruningConfig(target_sparsity=0.5, steps=1), arch)
    plan, _ = pruner.measure_and_plan(model, arch, batches, 0.5)
    slices = full_slice_map(arch, plan.keeps)
    old_state = optimizer_state_by_name(model, opt)
    old_shapes = parameter_shapes(model)
    new = rebuild(model, plan.arch, slices)
    rebind_optimizer_(opt, new, old_state, slices, old_shapes)

    name = "layers.0.mlp.w2.weight"
    dim, idx = slices[name]
    new_p = dict(new.named_parameters())[name]
    assert torch.equal(opt.state[new_p]["exp_avg"], slice_tensor(old_state[name]["exp_avg"], dim, idx))
    assert torch.equal(opt.state[new_p]["step"], old_state[name]["step"])
    assert opt.param_groups[0]["params"][0] is dict(new.named_parameters())["tok_embeddings.weight"]
    # Training continues on the smaller model with the same optimizer object.
    next_token_loss(new, batches[0])[0].backward()
    opt.step()
