"""Carrying weights and AdamW state across a resize: one process, and FSDP2 on two ranks (gloo)."""

import pytest
import torch
from _gloo import on_ranks

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


# --------------------------------------------------------------------------- two ranks, FSDP2


def _fsdp_decoder(arch, mesh, meta: bool = False):
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer

    with torch.device("meta" if meta else "cpu"):
        model = decoder_from_arch(arch)
    if not meta:
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.1)
    training.shard_model(model, [lambda n, m: isinstance(m, TransformerSelfAttentionLayer)],
                         cpu_offload=False, dp_mesh=mesh)
    if meta:
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    return model


def _rank_resize(rank: int, world: int, optimizer_cls: str) -> None:
    """A resize under FSDP2 on two ranks, checked against gathering, cutting and re-sharding every tensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torchtune import training

    from adapt_prune_tune import resize
    from adapt_prune_tune.optimizer_state import dense_moment, is_quantized, new_moment
    from adapt_prune_tune.surgery import LayerKeep

    with torch.compiler.set_stance("force_eager"):
        mesh = init_device_mesh("cpu", (world,))
        # Odd sizes: uneven shards before (vocab 131) and after the cut (301 MLP rows, 1 KV head).
        arch = DecoderArch.uniform(vocab_size=131, embed_dim=64, num_layers=3, num_heads=4, num_kv_heads=2,
                                   intermediate_dim=512, max_seq_len=32, rope=RopeSpec("default", 1e4))
        torch.manual_seed(0)
        model = _fsdp_decoder(arch, mesh)
        if optimizer_cls == "AdamW":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        else:
            import torchao.optim

            opt = getattr(torchao.optim, optimizer_cls)(model.parameters(), lr=1e-2)
        batch = {"tokens": torch.randint(0, 131, (2, 16), generator=torch.Generator().manual_seed(rank))}
        for _ in range(2):
            next_token_loss(model, batch)[0].backward()
            opt.step()
            opt.zero_grad()
        g = torch.Generator().manual_seed(1)  # the same keeps on both ranks
        keeps = [
            LayerKeep(torch.tensor([2, 3]), torch.tensor([1]), torch.arange(256)),
            LayerKeep(torch.arange(4), torch.arange(2), torch.randperm(512, generator=g)[:301].sort().values),
            None,
        ]
        slices = full_slice_map(arch, keeps)
        new_arch = arch.with_layers([k.arch() if k is not None else a for k, a in zip(keeps, arch.layers)])
        old_params = resize.named_parameters(model)
        old_state = optimizer_state_by_name(model, opt)
        old_shapes = parameter_shapes(model)

        def cut(name, full):
            return slice_tensor(full, *slices[name]) if name in slices else full

        expected_weights = {n: cut(n, p.detach().full_tensor()) for n, p in old_params.items()}
        expected_dense = {n: {k: cut(n, dense_moment(v).full_tensor()) for k, v in e.items() if v.dim()}
                          for n, e in old_state.items()}

        collectives, full_tensor_calls = [], []
        originals = {name: getattr(dist, name) for name in ("all_to_all_single", "all_gather_into_tensor",
                                                            "all_gather", "broadcast")}

        def counting(name):
            return lambda *a, **k: collectives.append(name) or originals[name](*a, **k)

        for name in originals:
            setattr(dist, name, counting(name))
        full_tensor = DTensor.full_tensor
        DTensor.full_tensor = lambda self, *a, **k: full_tensor_calls.append(1) or full_tensor(self, *a, **k)
        try:
            new = _fsdp_decoder(new_arch, mesh, meta=True)
            training.load_from_full_model_state_dict(new, PrunedStateView(model, slices), torch.device("cpu"),
                                                     strict=True)
            weight_collectives = list(collectives)
            rebind_optimizer_(opt, new, old_state, slices, old_shapes)
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
            DTensor.full_tensor = full_tensor
        # One all-to-all per cut layer for the weights and one for the moments; nothing is gathered.
        assert weight_collectives == ["all_to_all_single"] * 2
        assert (collectives, len(full_tensor_calls)) == (["all_to_all_single"] * 4, 0)

        new_params = resize.named_parameters(new)
        for name, p in new_params.items():
            assert torch.equal(p.detach().full_tensor(), expected_weights[name]), name
            for key, value in opt.state[p].items():
                old = old_state[name][key]
                if not value.dim():
                    assert value is old
                    continue
                # What the per-parameter path made: gather, cut, re-quantize from the full tensor.
                reference = new_moment(opt, p, key, expected_dense[name][key])
                a, b = value.to_local(), reference.to_local()
                assert type(a) is type(b) and is_quantized(value) == is_quantized(reference), (name, key)
                if is_quantized(value):
                    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), (name, key)
                else:
                    assert torch.equal(a, b), (name, key)
        if optimizer_cls != "AdamW":
            assert any(is_quantized(v) for e in opt.state.values() for v in e.values())
        next_token_loss(new, batch)[0].backward()  # the new model trains on
        opt.step()


@pytest.mark.parametrize("optimizer_cls", ["AdamW", "AdamW8bit"])
def test_two_rank_resize_moves_rows_per_layer_and_matches_per_parameter_gathers(tmp_path, optimizer_cls):
    """FSDP2 on 2 ranks (gloo): weights and moments bitwise as gathered, cut and re-sharded one by one."""
    if optimizer_cls != "AdamW":
        pytest.importorskip("torchao.optim")
    on_ranks(_rank_resize, 2, tmp_path, optimizer_cls)


def _rank_cut_rows(rank: int, world: int) -> None:
    """``cut_rows`` on three ranks: uneven old and new shards, ranks holding no rows before or
    after, two dtypes (two all-to-alls), each result placed as FSDP2 would place the cut tensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from adapt_prune_tune.resize import cut_rows

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)  # the same tensors and indices on every rank
    fulls = [torch.randn(7, 5, generator=g), torch.randn(2, 3, generator=g),
             torch.randn(11, generator=g).to(torch.bfloat16), torch.randn(9, 2, 2, generator=g)]
    indices = [torch.tensor([0, 3, 4, 6]), torch.tensor([1]),
               torch.randperm(11, generator=g)[:6].sort().values, torch.arange(9)]
    sharded = [distribute_tensor(f, mesh, [Shard(0)]) for f in fulls]
    sent = []
    all_to_all = dist.all_to_all_single
    dist.all_to_all_single = lambda *a, **k: sent.append(1) or all_to_all(*a, **k)
    try:
        cut = cut_rows(sharded, indices)
    finally:
        dist.all_to_all_single = all_to_all
    assert len(sent) == 2  # fp32 and bf16
    for full, index, got in zip(fulls, indices, cut):
        expected = distribute_tensor(full.index_select(0, index), mesh, [Shard(0)])
        assert got.shape == expected.shape and got.placements == expected.placements
        assert got.to_local().shape == expected.to_local().shape
        assert torch.equal(got.to_local(), expected.to_local())


def test_cut_rows_on_three_ranks_matches_cut_then_shard(tmp_path):
    on_ranks(_rank_cut_rows, 3, tmp_path)


def _rank_arch_check(rank: int, world: int) -> None:
    """The recipe's after-resize check: silent when every rank holds the same widths, and every
    rank raises when one of them differs (so all stop together)."""
    import adapt_prune_recipe as apr

    arch = tiny()[1]
    apr._check_same_arch_everywhere(arch, torch.device("cpu"))
    layers = list(arch.layers)
    if rank == 1:  # one layer one MLP channel narrower on one rank
        layers[1] = type(layers[1])(layers[1].num_heads, layers[1].num_kv_heads, layers[1].intermediate_dim - 1)
    with pytest.raises(RuntimeError, match="different architectures"):
        apr._check_same_arch_everywhere(arch.with_layers(layers), torch.device("cpu"))


def test_ranks_holding_different_architectures_all_stop(tmp_path):
    on_ranks(_rank_arch_check, 2, tmp_path)


def _rank_broadcast_keeps(rank: int, world: int) -> None:
    """Every rank ends with rank 0's cut, uncut layers (None) included, whatever it planned itself."""
    import adapt_prune_recipe as apr
    from adapt_prune_tune.surgery import LayerKeep

    rank0 = [LayerKeep(torch.tensor([0, 2, 3]), torch.tensor([1]), torch.tensor([4, 9, 17])), None,
             LayerKeep(torch.arange(4), torch.arange(2), torch.arange(100, 301))]
    other = [None, LayerKeep(torch.tensor([1]), torch.tensor([0]), torch.tensor([5])), None]
    got = apr._broadcast_keeps(rank0 if rank == 0 else other, torch.device("cpu"))
    assert [k is None for k in got] == [False, True, False]
    for a, b in zip(got, rank0):
        if b is not None:
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("q", "kv", "mlp"))
    assert apr._broadcast_keeps([None, None, None] if rank == 0 else other, torch.device("cpu")) == [None] * 3


def test_every_rank_cuts_as_rank_0(tmp_path):
    on_ranks(_rank_broadcast_keeps, 2, tmp_path)
