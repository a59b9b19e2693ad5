"""Coupled groups and their scores, checked against loops over hand-made weights."""

from typing import Dict, Optional, Tuple

import pytest
import torch

from adapt_prune_tune.groups import layer_group_sets, unit_elements
from adapt_prune_tune.models import LayerArch
from adapt_prune_tune.scoring import (
    coupled_param_names,
    group_scores,
    layer_scores,
    needs_gradients,
    select_attention,
    select_channels,
    slice_totals,
)


pytestmark = pytest.mark.usefixtures("one_thread")


DIM, HD = 6, 3
LAYER = LayerArch(num_heads=4, num_kv_heads=2, intermediate_dim=5)
Params = Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]


def layer_params(bias: bool, seed: int = 0) -> Params:
    g = torch.Generator().manual_seed(seed)
    q, kv, hidden = LAYER.num_heads * HD, LAYER.num_kv_heads * HD, LAYER.intermediate_dim
    shapes = {
        "attn.q_proj.weight": (q, DIM),
        "attn.k_proj.weight": (kv, DIM),
        "attn.v_proj.weight": (kv, DIM),
        "attn.output_proj.weight": (DIM, q),
        "mlp.w1.weight": (hidden, DIM),
        "mlp.w3.weight": (hidden, DIM),
        "mlp.w2.weight": (DIM, hidden),
    }
    if bias:
        shapes.update({"attn.q_proj.bias": (q,), "attn.k_proj.bias": (kv,), "attn.v_proj.bias": (kv,)})
    return {n: (torch.randn(s, generator=g), torch.randn(s, generator=g)) for n, s in shapes.items()}


def hand_products(p: Params, bias: bool) -> Dict[str, list]:
    """Per group, the list of every element-wise w·g product it owns (written out with loops)."""
    prod = {n: w * g for n, (w, g) in p.items()}
    mlp = []
    for j in range(LAYER.intermediate_dim):
        mlp.append(torch.cat([prod["mlp.w1.weight"][j], prod["mlp.w3.weight"][j], prod["mlp.w2.weight"][:, j]]))
    kv = []
    for h in range(LAYER.num_kv_heads):
        rows = slice(h * HD, (h + 1) * HD)
        parts = [prod["attn.k_proj.weight"][rows].flatten(), prod["attn.v_proj.weight"][rows].flatten()]
        if bias:
            parts += [prod["attn.k_proj.bias"][rows], prod["attn.v_proj.bias"][rows]]
        kv.append(torch.cat(parts))
    q = []
    for h in range(LAYER.num_heads):
        rows = slice(h * HD, (h + 1) * HD)
        parts = [prod["attn.q_proj.weight"][rows].flatten(), prod["attn.output_proj.weight"][:, rows].flatten()]
        if bias:
            parts.append(prod["attn.q_proj.bias"][rows])
        q.append(torch.cat(parts))
    return {"mlp": mlp, "kv": kv, "q": q}


@pytest.mark.parametrize("bias", [False, True])
def test_taylor_is_the_elementwise_abs_sum_per_group(bias: bool) -> None:
    p = layer_params(bias)
    sets = layer_group_sets(LAYER, HD, bias)
    scores = layer_scores(p, sets, "taylor")
    for kind, groups in hand_products(p, bias).items():
        expected = torch.tensor([float(x.abs().sum()) for x in groups], dtype=torch.float64)
        assert torch.allclose(scores[kind], expected, rtol=1e-5), kind


@pytest.mark.parametrize("bias", [False, True])
def test_taylor_vector_is_the_abs_of_the_group_sum(bias: bool) -> None:
    p = layer_params(bias, seed=1)
    scores = layer_scores(p, layer_group_sets(LAYER, HD, bias), "taylor_vector")
    for kind, groups in hand_products(p, bias).items():
        expected = torch.tensor([abs(float(x.sum())) for x in groups], dtype=torch.float64)
        assert torch.allclose(scores[kind], expected, rtol=1e-4, atol=1e-6), kind
    # vector <= element-wise (triangle inequality)
    elem = layer_scores(p, layer_group_sets(LAYER, HD, bias), "taylor")
    assert all(bool((scores[k] <= elem[k] + 1e-9).all()) for k in scores)


def test_magnitude_scores_ignore_gradients() -> None:
    p = layer_params(False)
    no_grads = {n: (w, None) for n, (w, _) in p.items()}
    mlp = layer_group_sets(LAYER, HD, False)["mlp"]
    w1, w3, w2 = (p[f"mlp.{n}.weight"][0] for n in ("w1", "w3", "w2"))
    l1 = w1.abs().sum(1) + w3.abs().sum(1) + w2.abs().sum(0)
    l2 = (w1 ** 2).sum(1) + (w3 ** 2).sum(1) + (w2 ** 2).sum(0)
    assert torch.allclose(group_scores(no_grads, mlp, "magnitude_l1"), l1.double(), rtol=1e-5)
    assert torch.allclose(group_scores(no_grads, mlp, "magnitude_l2"), l2.double(), rtol=1e-5)
    assert not needs_gradients("magnitude_l2") and needs_gradients("taylor")


def test_taylor_needs_gradients_and_names_are_checked() -> None:
    p = {n: (w, None) for n, (w, _) in layer_params(False).items()}
    mlp = layer_group_sets(LAYER, HD, False)["mlp"]
    with pytest.raises(RuntimeError, match="no gradient"):
        group_scores(p, mlp, "taylor")
    with pytest.raises(ValueError, match="scorer"):
        group_scores(p, mlp, "hessian")


def test_random_scores_are_reproducible_with_a_seeded_generator() -> None:
    p = layer_params(False)
    mlp = layer_group_sets(LAYER, HD, False)["mlp"]
    a = group_scores(p, mlp, "random", torch.Generator().manual_seed(7))
    b = group_scores(p, mlp, "random", torch.Generator().manual_seed(7))
    c = group_scores(p, mlp, "random", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (LAYER.intermediate_dim,)


def test_group_definitions() -> None:
    sets = layer_group_sets(LAYER, HD, bias=True)
    assert {k: gs.count for k, gs in sets.items()} == {"mlp": 5, "kv": 2, "q": 4}
    assert coupled_param_names(sets) == sorted([
        "attn.k_proj.bias", "attn.k_proj.weight", "attn.output_proj.weight", "attn.q_proj.bias",
        "attn.q_proj.weight", "attn.v_proj.bias", "attn.v_proj.weight",
        "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight",
    ])
    assert "attn.q_proj.bias" not in coupled_param_names(layer_group_sets(LAYER, HD, bias=False))
    assert unit_elements(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert unit_elements(torch.tensor([4, 1]), 1).tolist() == [4, 1]
    w2 = torch.arange(12.0).view(2, 6)  # [dim, hidden]: groups along dim 1
    assert slice_totals(w2, None, sets["mlp"].slices[2].dim, "magnitude_l1")[3].item() == 3.0 + 9.0


def test_select_attention_keeps_gqa_consistent_and_picks_the_best() -> None:
    kv = torch.tensor([1.0, 10.0, 2.0])
    q = torch.tensor([5.0, 0.0, 1.0,    # group 0: best two are heads 0, 2 -> 1 + 6 = 7
                      0.5, 0.0, 3.0,    # group 1: heads 3, 5 -> 10 + 3.5 = 13.5
                      4.0, 4.5, 0.1])   # group 2: heads 6, 7 -> 2 + 8.5 = 10.5
    kv_keep, q_keep, retained = select_attention(kv, q, num_kv=2, q_per_kv=2)
    assert kv_keep.tolist() == [1, 2]
    assert q_keep.tolist() == [3, 5, 6, 7]
    assert retained == pytest.approx(13.5 + 10.5)
    # new head i reads new KV head i // 2, which must be the old group of the kept query head
    for i, h in enumerate(q_keep.tolist()):
        assert kv_keep[i // 2] == h // 3
    kv_keep, q_keep, retained = select_attention(kv, q, num_kv=1, q_per_kv=3)
    assert kv_keep.tolist() == [1] and q_keep.tolist() == [3, 4, 5]
    assert retained == pytest.approx(13.5)


def test_select_channels_keeps_the_top_in_original_order() -> None:
    scores = torch.tensor([0.3, 2.0, 0.1, 5.0, 1.0])
    assert select_channels(scores, 3).tolist() == [1, 3, 4]
    assert select_channels(scores, 5).tolist() == [0, 1, 2, 3, 4]
