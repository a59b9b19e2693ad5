"""Layer importance: per-token similarity, signs, normalization and the forward-hook collector."""

import math
from typing import List

import pytest
import torch
from torch import nn

from adapt_prune_tune.importance import (
    IMPORTANCE_NORMALIZATIONS,
    LayerSimilarityCollector,
    collect_layer_similarity,
    expected_max_abs_normal,
    importance_from_similarity,
    layer_importance,
    normalize_importance,
    normalize_mad,
    normalize_rank,
    normalize_zscore,
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


# Î of SmolLM2-135M-Instruct under "max" (benchmarks/results/quality_50steps.json): layer 0 is an
# outlier and 26 of the 30 layers sit within ±0.08. Every normalization is shift/scale invariant,
# so these serve as raw importances too.
SMOLLM2_IMPORTANCE = [
    1.0, 0.0948, -0.0647, -0.0697, -0.0669, -0.0644, -0.0635, -0.0635, -0.0524, -0.0596,
    -0.0529, -0.0535, -0.0659, -0.071, -0.0742, -0.0695, -0.0664, -0.0726, -0.0558, -0.0507,
    -0.0314, -0.0528, -0.0524, -0.0373, 0.1049, -0.0765, -0.0743, -0.0541, -0.04, 0.3565,
]
F64 = torch.float64
METHODS = sorted(IMPORTANCE_NORMALIZATIONS)


@pytest.mark.parametrize("method", METHODS)
def test_every_normalization_has_mean_zero_and_is_shift_and_scale_invariant(method: str) -> None:
    raw = torch.tensor([0.3, -1.2, 0.05, 2.0, 0.7, -0.4], dtype=F64)
    out = normalize_importance(raw, method)
    assert out.dtype == F64 and out.shape == raw.shape
    assert abs(float(out.mean())) < 1e-12
    assert torch.allclose(normalize_importance(3.5 * raw - 7.0, method), out, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_every_normalization_keeps_the_order_of_distinct_layers(method: str) -> None:
    raw = torch.tensor([0.3, -1.2, 0.05, 2.0, 0.7, -0.4], dtype=F64)
    out = normalize_importance(raw, method)
    assert torch.argsort(out).tolist() == torch.argsort(raw).tolist()


@pytest.mark.parametrize("method", METHODS)
def test_all_equal_and_single_layer_give_zeros(method: str) -> None:
    # zeros make the adaptive rule fall back to uniform pruning
    assert torch.equal(normalize_importance(torch.full((7,), -0.42), method), torch.zeros(7, dtype=F64))
    assert torch.equal(normalize_importance(torch.tensor([0.9]), method), torch.zeros(1, dtype=F64))


def test_unknown_normalization_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"one of \('max', 'zscore', 'mad', 'rank'\), got 'minmax'"):
        normalize_importance(torch.tensor([1.0, 2.0]), "minmax")


def test_default_normalization_is_the_papers_max() -> None:
    raw = torch.tensor(SMOLLM2_IMPORTANCE)
    assert torch.equal(normalize_importance(raw), normalize_importance(raw, "max"))
    assert layer_importance(torch.tensor([0.9, 0.5, 0.7]), "cosine", "rank") == pytest.approx([-1.0, 1.0, 0.0])


def test_expected_max_abs_normal_closed_forms_and_a_sample() -> None:
    assert expected_max_abs_normal(1) == pytest.approx(math.sqrt(2 / math.pi), abs=1e-7)  # E|Z|
    assert expected_max_abs_normal(2) == pytest.approx(2 / math.sqrt(math.pi), abs=1e-7)
    values = [expected_max_abs_normal(n) for n in (1, 2, 5, 30, 126)]
    assert values == sorted(values)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(100_000, 30, generator=g, dtype=F64).abs().max(dim=1).values.mean()
    assert expected_max_abs_normal(30) == pytest.approx(float(sample), abs=0.01)
    with pytest.raises(ValueError):
        expected_max_abs_normal(0)


def test_zscore_is_max_with_the_scale_of_all_layers() -> None:
    raw = torch.tensor(SMOLLM2_IMPORTANCE, dtype=F64)
    z = normalize_zscore(raw)
    e30 = expected_max_abs_normal(30)
    assert float(z.pow(2).mean().sqrt()) == pytest.approx(1 / e30)  # population std 1 / E[max |Z|]
    # the same affine map as "max", only the scale differs
    ratio = z / normalize_importance(raw, "max")
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    # the outlier lands beyond 1 (bounded by Samuelson's √(n-1)) instead of squeezing the rest
    assert 1.0 < float(z[0]) <= math.sqrt(29) / e30
    assert float(z[1:].abs().mean()) > 2 * float(normalize_importance(raw, "max")[1:].abs().mean())


def test_zscore_of_a_normal_sample_peaks_near_one() -> None:
    g = torch.Generator().manual_seed(1)
    peaks = [float(normalize_zscore(torch.randn(30, generator=g, dtype=F64)).abs().max()) for _ in range(400)]
    assert sum(peaks) / len(peaks) == pytest.approx(1.0, abs=0.05)


def test_rank_by_hand_and_with_ties() -> None:
    assert normalize_rank(torch.tensor([3.0, 1.0, 2.0, 10.0])).tolist() == pytest.approx([1 / 3, -1, -1 / 3, 1])
    # tied layers share their average rank: ranks 0.5, 0.5, 2, 3
    out = normalize_rank(torch.tensor([1.0, 1.0, 2.0, 3.0]))
    assert out.tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3, 1])
    assert abs(float(out.mean())) < 1e-12
    assert normalize_rank(torch.tensor([5.0, 5.0, 5.0, 9.0])).tolist() == pytest.approx([-1 / 3] * 3 + [1])
    assert normalize_rank(torch.tensor([2.0, 1.0])).tolist() == [1.0, -1.0]


def test_rank_ignores_how_far_an_outlier_is() -> None:
    raw = torch.tensor(SMOLLM2_IMPORTANCE, dtype=F64)
    far = raw.clone()
    far[0] = 1e3
    assert torch.equal(normalize_rank(raw), normalize_rank(far))
    out = normalize_rank(raw)
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0
    assert out[6] == out[7] and out[8] == out[22]  # measured ties (-0.0635, -0.0524) share a rank


def test_mad_by_hand() -> None:
    raw = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0], dtype=F64)
    # median 2, |deviations| [2, 1, 0, 1, 98], MAD 1 -> σ estimate 1.4826
    robust = (raw - 2.0) / (1.482602218505602 * expected_max_abs_normal(5))
    expected = robust.clamp(-1, 1) - robust.clamp(-1, 1).mean()
    assert torch.allclose(normalize_mad(raw), expected, atol=1e-9)
    assert float(robust[4]) > 1  # the outlier was clipped


def test_mad_falls_back_to_mean_absolute_deviation_when_most_layers_tie() -> None:
    raw = torch.tensor([0.0, 0.0, 0.0, 1.0, 5.0], dtype=F64)  # MAD = 0; mean |dev| = 1.2
    robust = raw / (math.sqrt(math.pi / 2) * 1.2 * expected_max_abs_normal(5))
    expected = robust.clamp(-1, 1) - robust.clamp(-1, 1).mean()
    assert torch.allclose(normalize_mad(raw), expected, atol=1e-9)
    assert normalize_mad(raw)[3] > normalize_mad(raw)[0]


def test_mad_outlier_does_not_move_the_bulk() -> None:
    raw = torch.tensor(SMOLLM2_IMPORTANCE, dtype=F64)
    far = raw.clone()
    far[0] = 1e3
    assert torch.allclose(normalize_mad(raw), normalize_mad(far), atol=1e-12)
    out = normalize_mad(raw)
    assert float(out.max()) <= 1 + float(out.abs().mean()) and float(out.min()) >= -1 - float(out.abs().mean())


@pytest.mark.parametrize("method", ["zscore", "mad", "rank"])
def test_alternatives_spread_the_layers_an_outlier_squeezes_under_max(method: str) -> None:
    raw = torch.tensor(SMOLLM2_IMPORTANCE, dtype=F64)
    squeezed = float(normalize_importance(raw, "max")[1:].abs().mean())  # ~0.07
    out = normalize_importance(raw, method)
    assert float(out[1:].abs().mean()) > 2 * squeezed
    assert float(out[0]) == float(out.max())  # still the most important (mad: tied with others at the clip)


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
