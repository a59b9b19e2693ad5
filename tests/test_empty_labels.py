"""A micro-batch without label tokens adds nothing; every other one is computed exactly as before."""

import pytest
import torch
from _gloo import on_ranks
from torchtune.modules.loss import CEWithChunkedOutputLoss

from adapt_prune_tune.empty_labels import EmptyLabelsSafeLoss

IGNORE = -100


def logits_and_labels(masked: bool, chunked: bool):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[:, :2] = IGNORE
    if masked:
        labels[:] = IGNORE
    if chunked:
        return logits, list(logits.chunk(3, dim=1)), labels
    return logits, logits.reshape(-1, 11), labels.reshape(-1)


@pytest.mark.parametrize("chunked", [True, False])
def test_batch_with_labels_is_bitwise_the_wrapped_loss(chunked):
    inner = CEWithChunkedOutputLoss(num_output_chunks=3) if chunked else torch.nn.CrossEntropyLoss()
    grads = []
    for loss_fn in (inner, EmptyLabelsSafeLoss(inner)):
        leaf, logits, labels = logits_and_labels(masked=False, chunked=chunked)
        loss = loss_fn(logits, labels)
        loss.backward()
        grads.append((loss.detach(), leaf.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("chunked", [True, False])
def test_batch_without_labels_leaves_the_gradients_alone(chunked):
    inner = CEWithChunkedOutputLoss(num_output_chunks=3) if chunked else torch.nn.CrossEntropyLoss()
    leaf, logits, labels = logits_and_labels(masked=True, chunked=chunked)
    assert torch.isnan(inner(logits, labels))  # what the stock loop would back-propagate
    safe = EmptyLabelsSafeLoss(inner)
    loss = safe(logits, labels) * 0  # the stock loop multiplies by the micro-batch's token count
    loss.backward()
    assert loss.item() == 0.0 and leaf.grad is None and safe.skipped == 1
    assert torch.equal(labels, torch.full_like(labels, IGNORE))  # the caller's labels are untouched
    assert safe.ignore_index == IGNORE and getattr(safe, "num_output_chunks", 3) == 3


def _two_ranks(rank: int, world: int, chunked: bool) -> None:
    """Rank 1 has no label token, rank 0 has some: rank 1 still back-propagates, zeros."""
    inner = CEWithChunkedOutputLoss(num_output_chunks=3) if chunked else torch.nn.CrossEntropyLoss()
    leaf, logits, labels = logits_and_labels(masked=rank == 1, chunked=chunked)
    safe = EmptyLabelsSafeLoss(inner)
    loss = safe(logits, labels)
    loss.backward()
    assert leaf.grad is not None and safe.skipped == 0
    if rank == 1:
        assert loss.item() == 0.0 and torch.count_nonzero(leaf.grad) == 0
    else:
        expect = inner(*logits_and_labels(masked=False, chunked=chunked)[1:])
        assert torch.equal(loss.detach(), expect.detach())


@pytest.mark.parametrize("chunked", [True, False])
def test_rank_without_labels_adds_zero_loss_and_zero_gradient(tmp_path, chunked):
    on_ranks(_two_ranks, 2, tmp_path, chunked)


def test_a_loss_finite_without_labels_sees_the_labels_unchanged():
    """DistillationLoss averages over max(count, 1): no stand-in label enters its logged parts."""
    seen = []

    class Finite(torch.nn.Module):
        finite_without_labels = True
        ignore_index = IGNORE

        def forward(self, logits, labels):
            seen.append(labels)
            return (logits * 0).sum()

    leaf, logits, labels = logits_and_labels(masked=True, chunked=False)
    safe = EmptyLabelsSafeLoss(Finite())
    safe(logits, labels)  # one process: "no rank has labels", skipped before the inner loss
    assert seen == [] and safe.skipped == 1
    labels[0] = 3
    safe(logits, labels)
    assert len(seen) == 1 and seen[0] is labels
