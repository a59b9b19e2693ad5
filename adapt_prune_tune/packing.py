"""Packed pre-training text, only as much as the run trains on, in a fraction of torchtune's memory.

torchtune's ``text_completion_dataset(packed=True)`` packs the *whole* corpus when it is built,
on every rank, before the first step and again at every resume, and keeps each pack as four
int64 tensors (24 bytes per token of tensor data, 28 of process memory: ``benchmarks/packing.py``).
For the GPU configs' corpus, SlimPajama-6B (5.5 M documents, up to 5.6 B tokens once each is cut
at 1,024), that is hours of tokenizing on every rank and up to ~150 GB of host memory per rank,
for a run that trains on 1 B tokens.

:func:`packed_text_dataset` packs the same way (the same packs, token for token, as
``PackedDataset(split_across_pack=True)`` given the documents in the same order) but

* draws documents in a seeded random order, so a partial pass is a random sample of the corpus
  rather than its first documents (corpora are often stored grouped by source);
* packs ``max_tokens`` worth (``${adapt.total_tokens}`` in the packaged configs), and the recipe
  tops it up to exactly what its optimizer steps consume (:meth:`TextPacks.grow_to`);
* stores tokens as int32 and positions as int16 in blocks of packs (6 bytes per token), and
  rebuilds torchtune's int64 pack (labels = tokens, padding ignored) when a sample is read;
* with ``cache_dir``, keeps the packs in a file there that a resumed run (and every rank on a
  filesystem they share) maps instead of tokenizing again.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import TextCompletionDataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer

BLOCK = 1024  # packs per storage block: few tensors for a million packs, little slack per block


def _empty_buffer() -> Dict[str, list]:
    """Tokens read but not yet in a pack, their positions, and their samples' lengths."""
    return {"tokens": [], "input_pos": [], "seq_lens": []}


class TextPacks(Dataset):
    """Packs of ``max_seq_len`` tokens over ``ds``'s samples, read in the order ``order`` gives.

    A sample that overflows a pack continues in the next one (torchtune's ``split_across_pack``);
    the corpus's last, partial pack is padded with ``padding_idx``. Packing stops at
    ``max_packs`` and resumes where it stopped on :meth:`grow_to`. ``ds``'s samples must have
    labels equal to their tokens (text completion), which lets a pack store its tokens once.
    ``cache``: a file holding packs of this corpus, order and length (a previous run's), read
    instead of packing them again; :meth:`save` writes it.
    """

    packed = True  # the stock recipe's collate reads the config's `packed`; this says it for lists

    def __init__(self, ds: Dataset, max_seq_len: int, order: Sequence[int], max_packs: Optional[int] = None,
                 padding_idx: int = 0, cache: Optional[Path] = None) -> None:
        self.ds, self.max_seq_len, self.padding_idx = ds, max_seq_len, padding_idx
        self._order, self._next = order, 0  # documents in packing order, and the next one to read
        self._pos_dtype = torch.int16 if max_seq_len <= torch.iinfo(torch.int16).max + 1 else torch.int32
        self._blocks: List[Dict[str, torch.Tensor]] = []  # sealed blocks of up to BLOCK packs
        self._starts: List[int] = [0]  # index of each block's first pack, then the count
        self._open: List[Dict[str, Any]] = []  # packs of the block being filled
        self._buffer: Dict[str, list] = _empty_buffer()  # tokens read but not yet in a pack
        self.exhausted = False  # every document is in a pack
        self.cache, self._saved_len = cache, -1
        self.cached = 0  # packs read from the cache file
        if cache is not None and cache.is_file():
            self._load(cache)
        self.grow_to(max_packs)

    def __len__(self) -> int:
        return self._starts[-1]

    def grow_to(self, packs: Optional[int]) -> None:
        """Pack further until there are ``packs`` packs (``None``: the whole corpus) or the
        corpus is used up."""
        while not self.exhausted and (packs is None or len(self) + len(self._open) < packs):
            buf = self._buffer
            if len(buf["tokens"]) > self.max_seq_len:  # a full pack, and the overflow carried on
                head = self.max_seq_len - sum(buf["seq_lens"][:-1])  # the overflowing sample's part here
                self._add(buf["tokens"][: self.max_seq_len], buf["input_pos"][: self.max_seq_len],
                          buf["seq_lens"][:-1] + ([head] if head > 0 else []))
                rest = buf["tokens"][self.max_seq_len :]
                self._buffer = {"tokens": rest, "input_pos": buf["input_pos"][self.max_seq_len :],
                                "seq_lens": [len(rest)]}
                continue
            if self._next == len(self._order):  # the corpus is used up: its last, partial pack
                self.exhausted = True
                if buf["tokens"]:
                    self._add(buf["tokens"], buf["input_pos"], buf["seq_lens"])
                    self._buffer = _empty_buffer()
                break
            i = int(self._order[self._next])
            self._next += 1
            sample = self.ds[i]
            tokens = list(sample["tokens"])
            if list(sample["labels"]) != tokens:
                raise ValueError("packed_text_dataset packs text completion samples (labels = tokens); "
                                 f"sample {i} has other labels: use torchtune's packed=True for this dataset")
            self._buffer = {"tokens": buf["tokens"] + tokens,
                            "input_pos": buf["input_pos"] + [x % self.max_seq_len for x in range(len(tokens))],
                            "seq_lens": buf["seq_lens"] + [len(tokens)]}
        self._seal()

    def _add(self, tokens: List[int], input_pos: List[int], seq_lens: List[int]) -> None:
        """One pack, padded as torchtune pads it: padding as a last sequence, positions going on."""
        pad = self.max_seq_len - len(tokens)
        if pad:
            last = input_pos[-1]
            input_pos = input_pos + [min(last + 1 + k, self.max_seq_len - 1) for k in range(pad)]
            tokens = tokens + [self.padding_idx] * pad
            seq_lens = seq_lens + [pad]
        # As tensors at once: a block's packs as Python lists would hold ~70 bytes per token.
        self._open.append({"tokens": torch.tensor(tokens, dtype=torch.int32),
                           "input_pos": torch.tensor(input_pos, dtype=self._pos_dtype),
                           "seq_lens": torch.tensor(seq_lens, dtype=torch.int32), "pad": pad})
        if len(self._open) == BLOCK:
            self._seal()

    def _seal(self) -> None:
        """Turn the open packs into one storage block."""
        if not self._open:
            return
        counts = torch.tensor([0] + [len(p["seq_lens"]) for p in self._open])
        self._blocks.append({
            "tokens": torch.stack([p["tokens"] for p in self._open]),
            "input_pos": torch.stack([p["input_pos"] for p in self._open]),
            "seq_lens": torch.cat([p["seq_lens"] for p in self._open]),
            "seq_offsets": counts.cumsum(0).to(torch.int32),
            "pad": torch.tensor([p["pad"] for p in self._open], dtype=torch.int32),
        })
        self._starts.append(self._starts[-1] + len(self._open))
        self._open = []

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"pack {idx} of {len(self)}")
        b = bisect.bisect_right(self._starts, idx) - 1  # a block sealed by grow_to may be short
        block, row = self._blocks[b], idx - self._starts[b]
        tokens = block["tokens"][row].long()
        lo, hi = int(block["seq_offsets"][row]), int(block["seq_offsets"][row + 1])
        seq_lens = block["seq_lens"][lo:hi].long()
        labels = tokens.clone()
        pad = int(block["pad"][row])
        if pad:
            labels[-pad:] = CROSS_ENTROPY_IGNORE_IDX
        return {"tokens": tokens, "labels": labels, "input_pos": block["input_pos"][row].long(), "seq_lens": seq_lens}

    # ------------------------------------------------------------------ cache
    def save(self) -> None:
        """Write the packs to ``cache`` (atomically) if it is set and they changed since read."""
        if self.cache is None or self._saved_len == len(self):
            return
        state = {"blocks": self._blocks, "next": self._next, "exhausted": self.exhausted,
                 "buffer": json.dumps(self._buffer)}
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_name(f"{self.cache.name}.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.cache)
        self._saved_len = len(self)

    def _load(self, path: Path) -> None:
        state = torch.load(path, mmap=True, weights_only=True)  # pages are read as packs are
        self._blocks = state["blocks"]
        for block in self._blocks:
            self._starts.append(self._starts[-1] + block["tokens"].size(0))
        self._next, self.exhausted = int(state["next"]), bool(state["exhausted"])
        self._buffer = json.loads(state["buffer"])
        self._saved_len = self.cached = len(self)


def packed_text_dataset(
    tokenizer: ModelTokenizer,
    source: str,
    column: str = "text",
    split: str = "train",
    *,
    packed: bool,
    max_tokens: Optional[int] = None,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    add_eos: bool = True,
    filter_fn: Optional[Callable] = None,
    **load_dataset_kwargs: Any,
) -> Union[TextPacks, TextCompletionDataset]:
    """Pre-training text packed into ``tokenizer.max_seq_len`` tokens, ``max_tokens`` worth.

    ``text_completion_dataset``'s arguments (each document is cut at ``max_seq_len`` as there),
    plus ``max_tokens`` (``None``: the whole corpus, as torchtune packs; the recipe packs more
    when its steps need more), ``seed`` (the documents' order) and ``cache_dir`` (where the
    packs are kept for a resumed run; the packaged configs use ``${output_dir}/packs``).
    ``packed`` has no default because the stock recipe reads it from the config to pick the
    collate (document masks for packs): ``False`` gives the documents unpacked, as
    ``text_completion_dataset`` does.
    """
    ds = TextCompletionDataset(tokenizer=tokenizer, source=source, column=column, add_eos=add_eos, split=split,
                               filter_fn=filter_fn, **load_dataset_kwargs)
    if not packed:
        return ds
    if tokenizer.max_seq_len is None:
        raise ValueError("packed_text_dataset needs tokenizer.max_seq_len: the length of a pack")
    # A tensor, not a list: 5.5 M documents as Python ints would take ~200 MB a rank.
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    # At least one pack: the recipe measures a sample before it knows how many its steps need.
    packs = None if max_tokens is None else max(1, math.ceil(int(max_tokens) / tokenizer.max_seq_len))
    cache = None
    if cache_dir is not None:
        identity = {
            "source": source, "column": column, "split": split, "load": repr(sorted(load_dataset_kwargs.items())),
            "filter": getattr(filter_fn, "__qualname__", repr(filter_fn)), "add_eos": add_eos, "documents": len(ds),
            "max_seq_len": tokenizer.max_seq_len, "seed": seed,
            # The tokenizer by what it does: another vocabulary or normalization gives other ids.
            "tokenizer": tokenizer.encode(_PROBE, add_bos=True, add_eos=True),
        }
        key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        cache = Path(cache_dir).expanduser() / f"packs-{key}.pt"
    return TextPacks(ds, tokenizer.max_seq_len, order, max_packs=packs, cache=cache)


_PROBE = "Packed text, 2024: naïve café — 東京 🙂 def f(x):\n\treturn x ** 2  # ok"


OURS = "adapt_prune_tune.packing.packed_text_dataset"


def whole_corpus_packing(name: str, node: Any) -> Optional[str]:
    """Why the training dataset ``node`` (config key ``name``) packs its whole corpus when the run
    starts, and the setting that packs only what the run trains on; ``None`` if it does not."""
    if not hasattr(node, "get") or node.get("packed", False) is not True:
        return None
    component = node.get("_component_")
    if component == "torchtune.datasets.text_completion_dataset":
        return (f"{name}: torchtune's text_completion_dataset with packed: True packs the whole corpus on every rank "
                "before the first step and again at every resume, at 24 bytes a token (SlimPajama-6B: up to ~150 GB "
                f"and hours a rank); _component_: {OURS} with max_tokens: ${{adapt.total_tokens}} makes the same packs "
                "of only what the run trains on, at 6 bytes a token, and cache_dir: ${output_dir}/packs keeps them for a resume")
    if component == OURS and node.get("max_tokens", None) is None:
        return (f"{name}.max_tokens is null: the whole corpus is packed on every rank before the first step; set it "
                "to ${adapt.total_tokens} or, with adapt.total_steps, to a number (the recipe packs more if its steps "
                "need more)")
    return None
