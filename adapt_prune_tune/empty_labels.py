"""A token loss that micro-batches without a single label token cannot poison.

torchtune's cross-entropy losses average over the tokens that have a label. A micro-batch in
which every label is ``ignore_index`` (instruction data whose responses ``max_seq_len`` cuts
off) gives 0 / 0 = NaN, the stock loop multiplies it by the micro-batch's zero token count
(still NaN), and backward writes NaN into every gradient: under FSDP2 the reduce-scatter
carries it to every rank, the optimizer into every weight, and the run's next prune meets NaN
scores. When no rank has a label token the stock loop also scales the step's gradients by
``world_size / 0``. Such micro-batches hold nothing to learn:

* a rank without label tokens while another rank has some adds exactly zero loss and zero
  gradient (its backward still runs: FSDP2's reduce-scatter needs every rank);
* when no rank has one, the loss is a zero leaf outside the model: backward leaves the
  gradients as they are, so an optimizer step made only of such micro-batches has none and
  changes no weight (the stock loop logs its loss as nan: 0 tokens).

Every other micro-batch is computed exactly as before (the same labels, times one). Knowing
whether *any* rank has a label costs one all-reduce of one integer and a host sync per
micro-batch under FSDP (one process: the sync only).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


class EmptyLabelsSafeLoss(nn.Module):
    """``loss_fn`` with micro-batches that have no label token contributing nothing.

    A rank's micro-batch without labels gets one stand-in label (token 0 at its first
    position) so the wrapped loss stays finite, and the result is multiplied by zero; a loss
    that is already finite and gradient-free there (``finite_without_labels``, as
    ``DistillationLoss``) sees it unchanged, which keeps its logged parts free of the stand-in.
    ``ignore_index`` and ``num_output_chunks`` are the wrapped loss's, as the stock loop and
    the model's chunked output read them.
    """

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__()
        self.inner = loss_fn
        self.finite_without_labels = bool(getattr(loss_fn, "finite_without_labels", False))
        self.ignore_index = loss_fn.ignore_index
        if hasattr(loss_fn, "num_output_chunks"):
            self.num_output_chunks = loss_fn.num_output_chunks
        self.skipped = 0  # micro-batches without a label token on any rank, this process

    def forward(self, logits, labels: torch.Tensor) -> torch.Tensor:
        count = (labels != self.ignore_index).sum()
        everywhere = count.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(everywhere)
        if int(everywhere) == 0:
            self.skipped += 1
            if self.skipped == 1 or self.skipped % 100 == 0:
                log.warning("%d micro-batch(es) so far without a label token on any rank: nothing to learn, "
                            "no gradient (their logged loss is nan)", self.skipped)
            return torch.zeros((), device=labels.device, requires_grad=True)
        if self.finite_without_labels:
            return self.inner(logits, labels)
        empty = count == 0
        first = torch.zeros_like(labels, dtype=torch.bool)
        first.view(-1)[0] = True
        stand_in = torch.where(empty & first, torch.zeros_like(labels), labels)
        return self.inner(logits, stand_in) * (~empty)
