"""Physical surgery on tiny random models of the three supported families.

The central check: zeroing the groups that will be removed (MLP channels' down
columns, removed query heads' output-projection columns) in the *original*
model gives exactly the logits of the physically pruned model, so surgery
removes those groups and nothing else, and the kept heads still read the right
KV heads after re-indexing.
"""

import copy
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import torch
from torch import nn

from adapt_prune_tune.models import DecoderArch, LayerArch, RopeSpec, arch_from_model, decoder_from_arch
from adapt_prune_tune.scoring import select_attention
from adapt_prune_tune.surgery import (
    LayerKeep,
    full_slice_map,
    layer_slice_map,
    prune_decoder_,
    prune_optimizer_state,
    prune_state_dict,
    slice_tensor,
)


pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB, DIM, LAYERS, SEQ = 64, 48, 3, 64


def llama3_style() -> nn.Module:
    from torchtune.models.llama3_2._component_builders import llama3_2

    return llama3_2(vocab_size=VOCAB, num_layers=LAYERS, num_heads=6, num_kv_heads=2, embed_dim=DIM,
                    max_seq_len=SEQ, intermediate_dim=40, scale_factor=32, tie_word_embeddings=False)


def qwen2_style() -> nn.Module:
    from torchtune.models.qwen2._component_builders import qwen2

    return qwen2(vocab_size=VOCAB, num_layers=LAYERS, num_heads=6, num_kv_heads=2, embed_dim=DIM,
                 intermediate_dim=40, max_seq_len=SEQ, tie_word_embeddings=True)


def smollm2_style() -> nn.Module:
    arch = DecoderArch.uniform(vocab_size=VOCAB, embed_dim=DIM, num_layers=LAYERS, num_heads=6, num_kv_heads=3,
                               intermediate_dim=40, max_seq_len=SEQ, rope=RopeSpec("default", 1e5),
                               tie_word_embeddings=True)
    return decoder_from_arch(arch)


FAMILIES: Dict[str, Callable[[], nn.Module]] = {
    "llama3": llama3_style, "qwen2": qwen2_style, "smollm2": smollm2_style,
}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    with torch.no_grad():
        for p in model.parameters():  # larger than default init so every group matters
            p.normal_(0.0, 0.2)
    return model.eval()


def make_keeps(arch: DecoderArch, seed: int = 0) -> List[Optional[LayerKeep]]:
    """Layer 0 loses a KV group, a query head per group and MLP channels; layer 1 is untouched;
    layer 2 keeps every KV group but drops a query head per group and MLP channels."""
    g = torch.Generator().manual_seed(seed)
    keeps: List[Optional[LayerKeep]] = []
    for i, layer in enumerate(arch.layers):
        if i == 1:
            keeps.append(None)
            continue
        qpk = layer.num_heads // layer.num_kv_heads
        num_kv = layer.num_kv_heads - 1 if i == 0 else layer.num_kv_heads
        kv_keep, q_keep, _ = select_attention(
            torch.rand(layer.num_kv_heads, generator=g), torch.rand(layer.num_heads, generator=g), num_kv, qpk - 1
        )
        mlp = torch.randperm(layer.intermediate_dim, generator=g)[: layer.intermediate_dim * 3 // 5].sort().values
        keeps.append(LayerKeep(q_keep, kv_keep, mlp))
    return keeps


def zero_removed_(model: nn.Module, arch: DecoderArch, keeps: List[Optional[LayerKeep]]) -> None:
    """Silence the groups ``keeps`` removes without changing any shape."""
    hd = arch.head_dim
    with torch.no_grad():
        for i, keep in enumerate(keeps):
            if keep is None:
                continue
            layer, la = model.layers[i], arch.layers[i]
            gone_mlp = sorted(set(range(la.intermediate_dim)) - set(keep.mlp.tolist()))
            layer.mlp.w1.weight[gone_mlp] = 0
            layer.mlp.w3.weight[gone_mlp] = 0
            layer.mlp.w2.weight[:, gone_mlp] = 0
            for h in sorted(set(range(la.num_heads)) - set(keep.q.tolist())):
                layer.attn.output_proj.weight[:, h * hd:(h + 1) * hd] = 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_model_equals_zeroed_original(family: str) -> None:
    model = build(family)
    arch = arch_from_model(model)
    keeps = make_keeps(arch)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    zeroed = copy.deepcopy(model)
    zero_removed_(zeroed, arch, keeps)
    with torch.no_grad():
        full_logits = model(tokens)
        expected = zeroed(tokens)
    new_arch = prune_decoder_(model, arch, keeps)
    with torch.no_grad():
        got = model(tokens)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, full_logits, atol=1e-2)  # the removed groups mattered

    # shapes, fields and the spec read back off the model agree
    hd = arch.head_dim
    assert arch_from_model(model) == new_arch
    assert new_arch.layers[1] == arch.layers[1]
    for i, la in enumerate(new_arch.layers):
        layer = model.layers[i]
        assert la.num_heads % la.num_kv_heads == 0
        assert (layer.attn.num_heads, layer.attn.num_kv_heads) == (la.num_heads, la.num_kv_heads)
        assert layer.attn.q_proj.weight.shape == (la.num_heads * hd, DIM)
        assert layer.attn.k_proj.weight.shape == (la.num_kv_heads * hd, DIM)
        assert layer.attn.v_proj.weight.shape == (la.num_kv_heads * hd, DIM)
        assert layer.attn.output_proj.weight.shape == (DIM, la.num_heads * hd)
        assert layer.mlp.w1.weight.shape == layer.mlp.w3.weight.shape == (la.intermediate_dim, DIM)
        assert layer.mlp.w2.weight.shape == (DIM, la.intermediate_dim)
        if arch.attn_bias:
            assert layer.attn.q_proj.bias.shape == (la.num_heads * hd,)
            assert layer.attn.k_proj.bias.shape == (la.num_kv_heads * hd,)
    assert new_arch.layers[0] == LayerArch(
        (arch.layers[0].num_kv_heads - 1) * (arch.layers[0].num_heads // arch.layers[0].num_kv_heads - 1),
        arch.layers[0].num_kv_heads - 1, 24,
    )
    assert new_arch.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_path_matches_in_place_surgery(family: str) -> None:
    model = build(family, seed=3)
    arch = arch_from_model(model)
    keeps = make_keeps(arch, seed=3)
    pruned_sd = prune_state_dict(model.state_dict(), full_slice_map(arch, keeps))
    rebuilt = decoder_from_arch(prune_decoder_(copy.deepcopy(model), arch, keeps))
    rebuilt.load_state_dict(pruned_sd, strict=True)
    prune_decoder_(model, arch, keeps)
    tokens = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(tokens), model(tokens))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_decoding_after_pruning_matches_full_forward(family: str) -> None:
    model = build(family, seed=5)
    arch = arch_from_model(model)
    model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=24)
    prune_decoder_(model, arch, make_keeps(arch, seed=5))  # drops the caches of the old shapes
    # every layer, including the untouched layer 1: no half-cached model
    assert not any(layer.caches_are_setup() for layer in model.layers)
    reference = copy.deepcopy(model)
    model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=24)
    causal = torch.tril(torch.ones(24, 24, dtype=torch.bool))
    tokens = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(tokens, mask=causal[None, :6], input_pos=torch.arange(6)[None])
        for _ in range(3):  # greedy decode one token at a time from the cache
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            pos = tokens.size(1)
            tokens = torch.cat([tokens, nxt], dim=1)
            logits = model(nxt, mask=causal[None, pos:pos + 1], input_pos=torch.tensor([[pos]]))
            full = reference(tokens)
            assert torch.allclose(logits[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_rebuild_load_gives_identical_logits(family: str, tmp_path: Path) -> None:
    model = build(family, seed=7)
    arch = arch_from_model(model)
    new_arch = prune_decoder_(model, arch, make_keeps(arch, seed=7))
    new_arch.save(tmp_path / "arch.json")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = model(tokens)
    loaded = DecoderArch.load(tmp_path / "arch.json")
    assert loaded == new_arch
    for source in (tmp_path / "arch.json", new_arch.to_dict(), loaded):
        rebuilt = decoder_from_arch(source)
        rebuilt.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
        with torch.no_grad():
            assert torch.equal(rebuilt.eval()(tokens), expected)


def test_rebuild_when_pruned_head_count_does_not_divide_embed_dim() -> None:
    """Llama-3.1-8B keeping 7 of 8 GQA groups has 28 heads and 4096 % 28 != 0: the resize and
    the export's rebuild must still build it (torchtune's constructor check is bypassed)."""
    from torchtune.models.llama3_2._component_builders import llama3_2

    torch.manual_seed(11)
    model = llama3_2(vocab_size=VOCAB, num_layers=2, num_heads=8, num_kv_heads=4, embed_dim=64,
                     max_seq_len=SEQ, intermediate_dim=40, scale_factor=32, tie_word_embeddings=False).eval()
    arch = arch_from_model(model)
    g = torch.Generator().manual_seed(11)
    kv_keep, q_keep, _ = select_attention(torch.rand(4, generator=g), torch.rand(8, generator=g), 3, 2)
    keeps = [LayerKeep(q_keep, kv_keep, torch.arange(40)), None]
    pruned_sd = prune_state_dict(model.state_dict(), full_slice_map(arch, keeps))
    new_arch = prune_decoder_(model, arch, keeps)
    assert (new_arch.layers[0].num_heads, new_arch.layers[0].num_kv_heads) == (6, 3)  # 64 % 6 != 0
    rebuilt = decoder_from_arch(new_arch)
    rebuilt.load_state_dict(pruned_sd, strict=True)
    assert (rebuilt.layers[0].attn.num_heads, rebuilt.layers[0].attn.num_kv_heads) == (6, 3)
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(tokens), model(tokens))


def test_optimizer_state_follows_the_parameter_slices() -> None:
    model = build("qwen2", seed=9).train()
    arch = arch_from_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(torch.randint(0, VOCAB, (2, 8))).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    by_param = {p: n for n, p in model.named_parameters()}
    state = {by_param[p]: s for p, s in opt.state.items()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    keeps = make_keeps(arch, seed=9)
    slices = full_slice_map(arch, keeps)
    new_state = prune_optimizer_state(state, slices, shapes)
    prune_decoder_(model, arch, keeps)
    for name, p in model.named_parameters():
        entry = new_state[name]
        assert entry["exp_avg"].shape == p.shape and entry["exp_avg_sq"].shape == p.shape, name
        assert torch.equal(entry["step"], state[name]["step"])
        if name in slices:
            assert torch.equal(entry["exp_avg"], slice_tensor(state[name]["exp_avg"], *slices[name]))
        else:
            assert entry["exp_avg"] is state[name]["exp_avg"]
    # e.g. a kept MLP channel's down-projection moment column is the original one
    dim, idx = slices["layers.0.mlp.w2.weight"]
    assert dim == 1
    assert torch.equal(new_state["layers.0.mlp.w2.weight"]["exp_avg"][:, 0],
                       state["layers.0.mlp.w2.weight"]["exp_avg"][:, int(idx[0])])


def test_layer_keep_spec_and_gqa_divisibility() -> None:
    keep = LayerKeep(torch.tensor([0, 1, 4, 5]), torch.tensor([0, 2]), torch.tensor([3, 7]))
    assert keep.arch() == LayerArch(4, 2, 2)
    assert LayerKeep.from_dict(keep.to_dict()).to_dict() == keep.to_dict()
    full = LayerArch(6, 3, 10)
    assert LayerKeep.everything(full).arch() == full
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LayerKeep(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.tensor([0])).arch()
    # slice map of head units: kept KV head 2 of head_dim 4 is rows 8..11
    sm = layer_slice_map(full, LayerKeep(torch.tensor([4, 5]), torch.tensor([2]), torch.tensor([1])), 4, bias=True)
    assert sm["attn.k_proj.weight"][1].tolist() == [8, 9, 10, 11]
    assert sm["attn.k_proj.bias"][1].tolist() == [8, 9, 10, 11]
    assert sm["attn.output_proj.weight"][0] == 1
    assert sm["attn.output_proj.weight"][1].tolist() == list(range(16, 24))
    assert sm["mlp.w2.weight"][0] == 1 and sm["mlp.w2.weight"][1].tolist() == [1]


def test_surgery_through_activation_checkpoint_wrappers() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = build("smollm2", seed=11)
    arch = arch_from_model(model)
    keeps = make_keeps(arch, seed=11)
    tokens = torch.randint(0, VOCAB, (1, 8))
    plain = copy.deepcopy(model)
    prune_decoder_(plain, arch, keeps)
    for i, layer in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(layer)
    assert arch_from_model(model) == arch
    prune_decoder_(model, arch, keeps)
    with torch.no_grad():
        assert torch.allclose(model(tokens), plain(tokens), atol=1e-6)


def test_the_three_families_are_what_they_claim() -> None:
    specs = {family: arch_from_model(build(family)) for family in FAMILIES}
    assert specs["llama3"].rope.kind == "llama3_scaled" and not specs["llama3"].tie_word_embeddings
    assert specs["qwen2"].rope.kind == "qwen2" and specs["qwen2"].attn_bias and specs["qwen2"].tie_word_embeddings
    assert specs["smollm2"].rope == RopeSpec("default", 1e5) and specs["smollm2"].tie_word_embeddings
    assert {f: (s.layers[0].num_heads, s.layers[0].num_kv_heads) for f, s in specs.items()} == {
        "llama3": (6, 2), "qwen2": (6, 2), "smollm2": (6, 3)}
