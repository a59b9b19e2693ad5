"""Splitting a layer's budget between GQA heads and MLP channels."""

import torch

from adapt_prune_tune.models import DecoderArch, LayerArch
from adapt_prune_tune.sparsity import _attention_params, choose_attention_by_score, choose_attention_widths

BASE = DecoderArch.uniform(vocab_size=16, embed_dim=64, num_layers=1, num_heads=6, num_kv_heads=2,
                           intermediate_dim=100, max_seq_len=16)
LAYER = BASE.layers[0]


def attn(kv, qpk):
    return _attention_params(64, BASE.head_dim, kv, qpk, False)


def test_proportional_picks_the_closest_size():
    full = attn(2, 3)
    assert choose_attention_widths(BASE, LAYER, LAYER, 1.0) == (2, 3)
    assert choose_attention_widths(BASE, LAYER, LAYER, attn(2, 2) / full) == (2, 2)
    assert choose_attention_widths(BASE, LAYER, LAYER, attn(1, 2) / full + 1e-3) == (1, 2)
    # Equal sizes (1 group of 3 vs 2 groups of 1) tie-break toward more KV groups.
    assert choose_attention_widths(BASE, LAYER, LAYER, attn(1, 3) / full) == (2, 1)


def test_score_split_keeps_heads_when_they_matter_more():
    budget = attn(2, 3) + 3 * 64 * 40  # all heads + 40 channels, or fewer heads + more channels
    mlp_cheap = torch.full((100,), 1e-6).cumsum(0)
    heads_valuable = lambda kv, qpk: 10.0 * kv * qpk
    assert choose_attention_by_score(BASE, LAYER, budget, heads_valuable, mlp_cheap) == (2, 3)


def test_score_split_drops_heads_when_channels_matter_more():
    budget = attn(2, 3) + 3 * 64 * 40
    mlp_valuable = torch.full((100,), 5.0).cumsum(0)
    heads_cheap = lambda kv, qpk: 1e-6 * kv * qpk
    kv, qpk = choose_attention_by_score(BASE, LAYER, budget, heads_cheap, mlp_valuable)
    assert kv * qpk == 1  # the smallest attention buys the most channels


def test_score_split_respects_minimum_mlp_width():
    tiny_budget = attn(2, 3) + 3 * 64 * 2
    choice = choose_attention_by_score(BASE, LayerArch(6, 2, 100), tiny_budget,
                                       lambda kv, qpk: 1.0 * kv * qpk, torch.ones(100).cumsum(0),
                                       min_mlp_channels=4)
    kv, qpk = choice
    assert tiny_budget - attn(kv, qpk) >= 3 * 64 * 4


def test_score_split_scores_mlp_widths_in_whole_units():
    budget = attn(2, 3) + 3 * 64 * 40  # all heads leave 40 channels: less than one unit of 64
    heads_valuable = lambda kv, qpk: 10.0 * kv * qpk
    mlp = torch.ones(100).cumsum(0)
    assert choose_attention_by_score(BASE, LAYER, budget, heads_valuable, mlp) == (2, 3)
    kv, qpk = choose_attention_by_score(BASE, LAYER, budget, heads_valuable, mlp, round_to=64)
    assert budget - attn(kv, qpk) >= 3 * 64 * 64  # the heads kept still leave one whole unit
    assert kv * qpk == 3  # the most heads that do (1 group of 3 beats 2 groups of 1)
