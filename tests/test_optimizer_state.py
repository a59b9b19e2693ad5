"""torchao low-bit AdamW state through resizes and checkpoints (dequantize → slice → re-quantize)."""

from __future__ import annotations

import pytest
import torch

torchao_optim = pytest.importorskip("torchao.optim")

from adapt_prune_tune import checkpointing as ckpt  # noqa: E402
from adapt_prune_tune.models import DecoderArch, RopeSpec, decoder_from_arch  # noqa: E402
from adapt_prune_tune.optimizer_state import dense_moment, is_quantized  # noqa: E402
from adapt_prune_tune.pruner import AdaptivePruner, PruningConfig, next_token_loss  # noqa: E402
from adapt_prune_tune.resize import (  # noqa: E402
    PrunedStateView,
    optimizer_state_by_name,
    parameter_shapes,
    rebind_optimizer_,
)
from adapt_prune_tune.surgery import full_slice_map, slice_tensor  # noqa: E402


@pytest.fixture(autouse=True)
def eager():
    """torchao compiles its step per parameter shape; eager keeps these tests fast (same math)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def model_and_optimizer(cls_name: str, seed: int = 0):
    torch.manual_seed(seed)
    arch = DecoderArch.uniform(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_dim=512, max_seq_len=32, rope=RopeSpec("default", 1e4))
    model = decoder_from_arch(arch)
    opt = getattr(torchao_optim, cls_name)(model.parameters(), lr=1e-2)
    batch = {"tokens": torch.randint(0, 128, (2, 16))}
    for _ in range(2):
        next_token_loss(model, batch)[0].backward()
        opt.step()
        opt.zero_grad()
    return model, arch, opt, batch


@pytest.mark.parametrize("cls_name", ["AdamW8bit", "AdamW4bit", "AdamWFp8"])
def test_resize_requantizes_sliced_moments(cls_name):
    model, arch, opt, batch = model_and_optimizer(cls_name)
    name = "layers.0.mlp.w1.weight"
    p = dict(model.named_parameters())[name]
    assert is_quantized(opt.state[p]["exp_avg"]) and is_quantized(opt.state[p]["exp_avg_sq"])
    pruner = AdaptivePruner(PruningConfig(target_sparsity=0.5, steps=1, prune_attention=False, round_to=4), arch)
    plan, _ = pruner.measure_and_plan(model, arch, [batch], 0.5)
    slices = full_slice_map(arch, plan.keeps)
    old = {n: {k: dense_moment(v).clone() if v.dim() else v.clone() for k, v in e.items()}
           for n, e in optimizer_state_by_name(model, opt).items()}
    new = decoder_from_arch(plan.arch)
    new.load_state_dict(dict(PrunedStateView(model, slices)))
    rebind_optimizer_(opt, new, optimizer_state_by_name(model, opt), slices, parameter_shapes(model))

    q = dict(new.named_parameters())[name]
    dim, idx = slices[name]
    state = opt.state[q]
    expected = slice_tensor(old[name]["exp_avg"], dim, idx)
    # Re-quantized with the optimizer's own block size: equal up to one quantization step.
    assert type(state["exp_avg"]) is type(opt._new_buffer(q, True))
    assert state["exp_avg"].block_size == opt.block_size
    got = dense_moment(state["exp_avg"])
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= (0.2 if cls_name == "AdamW4bit" else 0.05) * scale
    assert torch.equal(state["step"], old[name]["step"])
    # Small parameters stay float, like torchao's own rule (< 4096 elements).
    norm = dict(new.named_parameters())["layers.0.mlp_norm.scale"]
    assert not is_quantized(opt.state[norm]["exp_avg"])
    # Training continues with the same optimizer object.
    next_token_loss(new, batch)[0].backward()
    opt.step()
    assert torch.isfinite(dense_moment(opt.state[q]["exp_avg"])).all()


@pytest.mark.parametrize("cls_name", ["AdamW8bit", "AdamW4bit", "AdamWFp8"])
def test_checkpoint_round_trip_is_exact(tmp_path, cls_name):
    """Dense moments in the checkpoint re-quantize to the very same codes and scales."""
    model, arch, opt, _ = model_and_optimizer(cls_name)
    ckpt.save_run_checkpoint(tmp_path, "step_0000002_prune_0000", arch, model, opt, {}, ckpt.capture_rng())
    loaded = ckpt.load_latest(tmp_path)
    fresh = getattr(torchao_optim, cls_name)(model.parameters(), lr=3.0)
    ckpt.restore_optimizer_(fresh, model, loaded["optimizer"])
    assert float(fresh.param_groups[0]["lr"]) == pytest.approx(1e-2)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt.state[p][key], fresh.state[p][key]
            assert type(a) is type(b)
            if is_quantized(a):
                assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
            else:
                assert torch.equal(a, b)
        assert torch.equal(opt.state[p]["step"], fresh.state[p]["step"])
