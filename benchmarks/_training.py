"""Training in this process the way the recipe trains at world size 1 (the GPU check's sections).

``rebuild`` is the recipe's ``_resize`` without a process group: the model built at its new
widths on the meta device, weights loaded through a sliced view of the old model
(torchtune's ``load_from_full_model_state_dict``), AdamW moments sliced and re-bound to the
same optimizer. ``train_step`` is the stock recipe's inner step (forward, chunked
cross-entropy, backward, clip, optimizer step), and ``tokens_per_second`` times steady
steps after warm-up ones (allocator, lazy inits, compilation).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Dict, List, Tuple

from _harness import median, sync


def adamw(model, device):
    """The optimizer of the packaged configs: AdamW at the paper's LR, fused on a GPU (8B config)."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0,
                             fused=torch.device(device).type == "cuda")


def rebuild(model, arch, new_arch, keeps, device, dtype, optimizer=None):
    """A new model at ``new_arch``'s widths holding ``model``'s kept weights (and moments)."""
    import torch
    from torchtune import training

    from adapt_prune_tune.models import decoder_from_arch
    from adapt_prune_tune.resize import PrunedStateView, optimizer_state_by_name, parameter_shapes, rebind_optimizer_
    from adapt_prune_tune.surgery import full_slice_map

    slices = full_slice_map(arch, keeps)
    shapes = parameter_shapes(model)
    state = optimizer_state_by_name(model, optimizer) if optimizer is not None else {}
    if optimizer is not None:
        optimizer.state = defaultdict(dict)  # the old entries live on only in `state`
    with training.set_default_dtype(dtype), torch.device("meta"):
        new = decoder_from_arch(new_arch)
    with training.set_default_dtype(dtype), torch.device(device):
        for m in new.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    training.load_from_full_model_state_dict(new, PrunedStateView(model, slices), torch.device(device), strict=True)
    if optimizer is not None:
        rebind_optimizer_(optimizer, new, state, slices, shapes, consume=True)
    return new


def chunked_loss(compiled: bool = False):
    """torchtune's chunked cross-entropy, its upcast + CE compiled as the recipe does with compile."""
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    loss_fn = CEWithChunkedOutputLoss()
    return training.compile_loss(loss_fn, verbose=False) if compiled else loss_fn


def train_step(model, optimizer, loss_fn, tokens, device) -> float:
    """One optimizer step on ``tokens`` [B, T] (next-token targets, last position ignored), seconds."""
    import torch
    from torchtune import training

    sync(device)
    t0 = time.perf_counter()
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], loss_fn.ignore_index)], dim=1)
    n = (labels != loss_fn.ignore_index).sum()
    logits = model(tokens)
    if not isinstance(logits, list):
        logits, labels = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    loss = loss_fn(logits, labels) * n
    del logits
    loss.backward()
    training.scale_grads(model, 1 / n)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def tokens_per_second(model, optimizer, loss_fn, device, vocab: int, batch: int, seq: int, steps: int,
                      warmup: int = 2, seed: int = 1) -> Dict[str, Any]:
    """Steady tokens/s over ``steps`` steps after ``warmup`` ones (random tokens: speed only).

    ``first_step_excess_s``: the first step's time minus a steady step's (compilation, when
    the model's layers are compiled).
    """
    import torch

    model.set_num_output_chunks(loss_fn.num_output_chunks)
    g = torch.Generator().manual_seed(seed)
    secs: List[float] = []
    for _ in range(warmup + steps):
        tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        secs.append(train_step(model, optimizer, loss_fn, tokens, device))
    model.set_num_output_chunks(0)
    steady = median(secs[warmup:])
    return {"tokens_per_s": batch * (seq - 1) / steady, "steady_step_s": steady,
            "first_step_excess_s": secs[0] - steady, "step_seconds": [round(s, 4) for s in secs],
            "batch": batch, "seq": seq, "warmup": warmup}


def linear_shapes(model) -> List[Tuple[int, int]]:
    """(in, out) features of every linear layer inside the decoder layers."""
    from torch import nn

    return [(m.in_features, m.out_features) for m in model.layers.modules() if isinstance(m, nn.Linear)]
