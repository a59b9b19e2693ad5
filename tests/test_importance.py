"""Layer importance: per-token similarity, signs, normalization and the forward-hook collector."""

from typing import List

import pytest
import torch
from torch import nn

from adapt_prune_tune.importance import (
    LayerSimilarityCollector,
    collect_layer_similarity,
    importance_from_similarity,
    layer_importance,
    normalize_importance,
    token_similarity,
)
from adapt_prune_tune.models import DecoderArch, RopeSpec, decoder_from_arch


pytestmark = pytest.mark.usefixtures("one_thread")


class Affine(nn.Module):
    """A stand-in layer y = a·x + b (no parameters: the numbers are the test's)."""

    def __init__(self, scale: float, shift: float = 0.0) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.shift


def test_normalize_has_mean_zero_and_unit_max_magnitude() -> None:
    out = normalize_importance(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    # centered: [-2, -1, 0, 3], largest |.| = 3
    assert torch.allclose(out, torch.tensor([-2 / 3, -1 / 3, 0.0, 1.0], dtype=torch.float64))
    assert abs(float(out.mean())) < 1e-12
    assert float(out.abs().max()) == pytest.approx(1.0)


def test_normalize_negative_extreme_sets_the_scale() -> None:
    out = normalize_importance(torch.tensor([0.0, 0.0, 0.0, -4.0]))
    assert torch.allclose(out, torch.tensor([1 / 3, 1 / 3, 1 / 3, -1.0], dtype=torch.float64))


def test_normalize_all_equal_gives_zeros() -> None:
    out = normalize_importance(torch.full((5,), 0.731))
    assert torch.equal(out, torch.zeros(5, dtype=torch.float64))


def test_token_similarity_cosine_and_distances_by_hand() -> None:
    x = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0, 4.0], [2.0, 2.0]])
    assert torch.allclose(token_similarity(x, y, "cosine"), torch.tensor([0.0, 1.0]))
    assert torch.allclose(token_similarity(x, y, "euclidean"), torch.tensor([5.0, 2 ** 0.5]))
    assert torch.allclose(token_similarity(x, y, "manhattan"), torch.tensor([7.0, 2.0]))
    with pytest.raises(ValueError, match="similarity metric"):
        token_similarity(x, y, "dot")


def test_cosine_sign_similar_layers_are_unimportant() -> None:
    # Layer 0 barely changes its input (sim 0.99), layer 1 rotates it (sim 0.2).
    imp = importance_from_similarity(torch.tensor([0.99, 0.2, 0.6]), "cosine")
    assert imp[0] < imp[2] < imp[1]
    # I = -sim = [-0.9, -0.5, -0.7]: mean -0.7, centered [-0.2, 0.2, 0] -> [-1, 1, 0].
    assert layer_importance(torch.tensor([0.9, 0.5, 0.7]), "cosine") == pytest.approx([-1.0, 1.0, 0.0])


@pytest.mark.parametrize("metric", ["euclidean", "manhattan"])
def test_distance_sign_bigger_change_is_more_important(metric: str) -> None:
    imp = importance_from_similarity(torch.tensor([0.1, 5.0, 1.0]), metric)
    assert imp[0] < imp[2] < imp[1]
    assert layer_importance(torch.tensor([1.0, 3.0, 2.0]), metric) == pytest.approx([-1.0, 1.0, 0.0])


def test_collector_means_over_tokens_and_respects_mask() -> None:
    layers = nn.ModuleList([Affine(1.0), Affine(-1.0), Affine(2.0, 1.0)])
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # [B=1, T=3, H=2]
    with collect_layer_similarity(list(layers), "cosine") as col:
        h = x
        for layer in layers:
            h = layer(h)
        # identity -> 1, negation -> -1, third layer sees -x: cos(-x, -2x+1) per token
        sims = nn.functional.cosine_similarity(-x, -2 * x + 1, dim=-1)
        expected = torch.tensor([1.0, -1.0, float(sims.mean())], dtype=torch.float64)
        assert torch.allclose(col.mean(), expected)
        # A second pass with only the first token counted: sums add, counts add 1 token.
        col.set_token_mask(torch.tensor([[1.0, 0.0, 0.0]]))
        h = x
        for layer in layers:
            h = layer(h)
        assert torch.equal(col.counts, torch.full((3,), 4.0, dtype=torch.float64))
        third = (sims.sum() + sims[0, 0]) / 4
        assert float(col.mean()[2]) == pytest.approx(float(third))
    # hooks are gone after the context
    before = col.counts.clone()
    layers[0](x)
    assert torch.equal(col.counts, before)


def test_collector_disabled_counts_nothing_and_empty_mean_raises() -> None:
    layers = [Affine(1.0), Affine(3.0)]
    col = LayerSimilarityCollector(layers, "euclidean")
    col.enabled = False
    layers[0](torch.ones(1, 2, 4))
    with pytest.raises(RuntimeError, match="No calibration tokens"):
        col.mean()
    col.enabled = True
    layers[0](torch.ones(1, 2, 4))
    layers[1](torch.ones(1, 2, 4))
    # identity: distance 0; tripling [1,1,1,1]: |2·[1,1,1,1]|_2 = 4
    assert torch.allclose(col.mean(), torch.tensor([0.0, 4.0], dtype=torch.float64))
    col.remove()
    with pytest.raises(ValueError, match="similarity metric"):
        LayerSimilarityCollector(layers, "angle")


def _manual_layer_cosines(model: nn.Module, tokens: torch.Tensor) -> List[float]:
    """Run the decoder's layers by hand and average cos(input, output) over tokens."""
    h = model.tok_embeddings(tokens)
    out = []
    for layer in model.layers:
        y = layer(h)
        out.append(float(nn.functional.cosine_similarity(h, y, dim=-1).mean()))
        h = y
    return out


def test_collector_on_a_real_decoder_matches_hand_computation() -> None:
    torch.manual_seed(0)
    arch = DecoderArch.uniform(vocab_size=50, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                               intermediate_dim=40, max_seq_len=32, rope=RopeSpec("default", 1e4))
    model = decoder_from_arch(arch).eval()
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad(), collect_layer_similarity(list(model.layers), "cosine") as col:
        model(tokens)
        measured = col.mean()
        expected = _manual_layer_cosines(model, tokens)
    assert measured.tolist() == pytest.approx(expected, abs=1e-5)
