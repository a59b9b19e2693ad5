"""Held-out perplexity over fixed token windows, inside a run and in the benchmarks.

A pruning run needs one cheap number that moves with what a cut costs and what recovery
training gives back. The calibration loss cannot be it: the same windows steer every prune
step, so it is measured on data the pruner has fitted. Perplexity on a fixed held-out text,
cut into fixed non-overlapping windows, is comparable between the original model, every stage
of a run, a prune-only run and the quality benchmark, because all of them read the same
tokens the same way.

Under FSDP every rank must run the same number of forward passes (each one all-gathers the
layers' shards), so the windows are dealt round-robin to the ranks, short ranks repeat a batch
with zero weight, and the summed NLL and token counts are all-reduced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from adapt_prune_tune.errors import error_text
from adapt_prune_tune.pruner import next_token_nll
from adapt_prune_tune.resize import reshard


def jsonl_text(data_files: Union[str, Path], column: str = "text") -> str:
    """The ``column`` of every row of a JSONL file, in file order, joined by blank lines."""
    rows = Path(data_files).read_text(encoding="utf-8").splitlines()
    return "\n\n".join(json.loads(line)[column] for line in rows if line.strip())


def dataset_text(
    source: str, split: str, column: str = "text", separator: Optional[str] = None, **load_dataset_kwargs: Any
) -> str:
    """One column of a ``datasets`` split as one text: any held-out text a run can read.

    Local files through ``datasets``' builders (``source: text`` with ``data_files: notes.txt``,
    one row per line; ``json``, ``csv``, ``parquet``), or a Hub dataset (``source:
    Salesforce/wikitext``, ``name: wikitext-2-raw-v1``, ``split: test``: the usual held-out
    perplexity text). Rows are joined by ``separator``: a newline for ``text`` (its rows are the
    file's lines), a blank line otherwise (rows are documents). Null rows (a missing field, an
    empty cell) hold no text and are left out, not scored as the word "None".
    """
    from datasets import load_dataset

    data = load_dataset(source, split=split, **load_dataset_kwargs)
    if column not in data.column_names:
        raise ValueError(f"column {column!r} is not in {source} ({split}): its columns are {data.column_names}")
    if separator is None:
        separator = "\n" if source == "text" else "\n\n"
    return separator.join(str(row) for row in data[column] if row is not None)


def heldout_windows(section: Optional[Mapping[str, Any]], tokenizer: Any) -> Dict[str, torch.Tensor]:
    """Token windows of every text a ``heldout:`` section names (none for ``heldout: null``).

    ``texts`` names several (the first is the run's headline figure, e.g. the training domain;
    others show what recovery on that domain costs elsewhere); ``text`` is a single one, named
    ``heldout``. Each text is a component returning a string.
    """
    from torchtune import config

    if section is None:
        return {}
    if (section.get("texts") is None) == (section.get("text") is None):
        raise ValueError("heldout: give either `text:` (one text) or `texts:` (name: text, ...), not both")
    several = section.get("texts") is not None
    nodes = section["texts"] if several else {"heldout": section["text"]}
    num_tokens, window = int(section["num_tokens"]), int(section["window"])
    windows = {}
    for name, node in nodes.items():
        key = f"heldout.texts.{name}" if several else "heldout.text"
        try:
            text = config.instantiate(node)
        except Exception as e:  # noqa: BLE001 - the component's own words, under its key
            raise ValueError(f"{key}: {node.get('_component_')} cannot be built: {error_text(e, key)}") from e
        try:
            windows[str(name)] = text_windows(tokenizer, text, num_tokens, window)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from e
    return windows


def text_windows(tokenizer: Any, text: str, num_tokens: int, window: int) -> torch.Tensor:
    """The first ``num_tokens`` tokens of ``text`` (no BOS/EOS) as ``[num_tokens // window, window]``.

    Raises:
        ValueError: if ``num_tokens`` is not a positive multiple of ``window`` or the text is
            shorter than ``num_tokens`` tokens.
    """
    if window < 2 or num_tokens < window or num_tokens % window:
        raise ValueError(
            f"heldout.num_tokens ({num_tokens}) must be a positive multiple of heldout.window ({window}), "
            "and window >= 2"
        )
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    if len(ids) < num_tokens:
        raise ValueError(
            f"the text has {len(ids):,} tokens, fewer than heldout.num_tokens={num_tokens:,}; "
            "lower heldout.num_tokens or give a longer text"
        )
    return torch.tensor(ids[:num_tokens]).view(num_tokens // window, window)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL): every window predicts its last ``window - 1`` tokens.

    Collective under ``torch.distributed``: call it on every rank with the same windows; all
    ranks get the same value. The model's train/eval mode is restored afterwards.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = windows[rank::world]
    batches = math.ceil(math.ceil(windows.size(0) / world) / batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed NLL, predicted tokens
    try:
        for b in range(batches):
            x = mine[b * batch_size : (b + 1) * batch_size]
            weight = 1.0
            if x.size(0) == 0:  # this rank ran out: keep the collectives in step, count nothing
                x, weight = windows[:1], 0.0
            nll, count = next_token_nll(model, x.to(device))
            totals[0] += weight * nll.double()
            totals[1] += weight * count
    finally:
        model.train(was_training)
        reshard(model)  # no backward resharded the units (fsdp_reshard_after_forward: False)
    if world > 1:
        dist.all_reduce(totals)
    return math.exp(float(totals[0] / totals[1]))
