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
  filesystem they share) maps instead of tokenizing again;
* tokenizes in worker processes when there is much to pack (``tokenize_workers``), and cuts the
  tokens into packs with tensor operations rather than per-token Python;
* with ``split_long_documents``, keeps every token of a document longer than a pack, as pieces of
  ``max_seq_len`` tokens that pack like documents of their own, where torchtune cuts it at
  ``max_seq_len`` and drops the rest (on a web corpus the long documents, books, papers and code,
  hold a large share of the tokens: dropped, they skew the mix towards short pages).
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
import multiprocessing
import os
import time
from array import array
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset
from torchtune import utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import TextCompletionDataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer

log = utils.get_logger("INFO")

BLOCK = 1024  # packs per storage block: few tensors for a million packs, little slack per block
CHUNK = 64  # samples a tokenizing worker reads per task: ~64 k tokens, far above the task overhead
POOL_MIN_TOKENS = 16_000_000  # below this, tokenizing here beats starting worker processes (~20 s on 2 cores)
MAX_AUTO_WORKERS = 64  # a bound on their memory: each holds an interpreter with torch (~0.5 GB)
PROGRESS_EVERY_S = 60.0
WAIT_POLL_S = 2.0  # how often a rank waiting for its node's packs looks at the cache file
WAIT_WARN_S = 600.0  # a rank that has not seen the file by then says what may be wrong


def _empty_buffer(pos_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Tokens read but not yet in a pack, their positions, and the lengths of their samples' pieces."""
    return {"tokens": torch.zeros(0, dtype=torch.int32), "input_pos": torch.zeros(0, dtype=pos_dtype),
            "seq_lens": torch.zeros(0, dtype=torch.int64)}


def cut_packs(tokens: torch.Tensor, input_pos: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
              packs: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The first ``packs`` packs of a token stream, and the rest of the stream.

    With ``split_across_pack`` a pack is simply the next ``max_seq_len`` tokens of the samples
    laid end to end: what is left to work out is which pieces of samples each pack holds (a
    sample cut by a pack boundary counts as one sequence on each side). ``seq_lens``: the
    lengths of the stream's pieces of samples, in order (they sum to ``len(tokens)``).
    """
    cut = packs * max_seq_len
    ends = seq_lens.cumsum(0)
    bounds = torch.unique(torch.cat([ends[(ends > 0) & (ends < cut)], torch.arange(max_seq_len, cut + 1, max_seq_len)]))
    starts = torch.cat([bounds.new_zeros(1), bounds[:-1]])
    per_pack = torch.bincount(torch.div(starts, max_seq_len, rounding_mode="floor"), minlength=packs)
    left_ends = ends[ends > cut] - cut
    block = {
        "tokens": tokens[:cut].view(packs, max_seq_len).clone(),
        "input_pos": input_pos[:cut].view(packs, max_seq_len).clone(),
        "seq_lens": (bounds - starts).to(torch.int32),
        "seq_offsets": torch.cat([per_pack.new_zeros(1), per_pack.cumsum(0)]).to(torch.int32),
        "pad": torch.zeros(packs, dtype=torch.int32),
    }
    rest = {"tokens": tokens[cut:].clone(), "input_pos": input_pos[cut:].clone(),
            "seq_lens": torch.diff(left_ends, prepend=left_ends.new_zeros(1))}
    return block, rest


def sample_positions(lengths: torch.Tensor, max_seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Each token's position in its sample, as torchtune packs them (modulo ``max_seq_len``)."""
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return ((torch.arange(int(lengths.sum())) - starts) % max_seq_len).to(dtype)


def piece_lengths(lengths: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """Documents of ``lengths`` tokens as consecutive pieces of at most ``max_seq_len`` (every
    one full but each document's last), in order: the lengths that pack a long document whole,
    each piece a sequence of its own (positions from 0, masked from the others)."""
    full = torch.div(lengths, max_seq_len, rounding_mode="floor")
    rest = lengths - full * max_seq_len
    counts = full + (rest > 0).long()
    out = torch.full((int(counts.sum()),), max_seq_len, dtype=lengths.dtype)
    last = counts.cumsum(0) - 1
    out[last[rest > 0]] = rest[rest > 0]
    return out


def read_samples(ds: Dataset, indices: Sequence[int]) -> Tuple[bytes, List[int]]:
    """The tokens of ``ds``'s samples ``indices``, end to end as int32 bytes, and their lengths.

    Bytes because this is what a tokenizing worker process sends back: 4 bytes a token,
    where a pickled list of ints takes about twice that and far longer to build.
    """
    flat, lengths = array("i"), []
    for i in indices:
        sample = ds[int(i)]
        tokens = sample["tokens"]
        if list(sample["labels"]) != list(tokens):
            raise ValueError("packed_text_dataset packs text completion samples (labels = tokens); "
                             f"sample {int(i)} has other labels: use torchtune's packed=True for this dataset")
        flat.extend(tokens)
        lengths.append(len(tokens))
    return flat.tobytes(), lengths


_WORKER_DS: Optional[Dataset] = None  # a tokenizing worker's copy of the dataset


def _start_worker(ds: Dataset) -> None:
    global _WORKER_DS
    torch.set_num_threads(1)  # it tokenizes; the node's cores are shared among many workers
    _WORKER_DS = ds


def _worker_read(indices: List[int]) -> Tuple[bytes, List[int]]:
    return read_samples(_WORKER_DS, indices)


class _Samples:
    """The samples from ``order[start]`` on, a chunk at a time, tokenized here or, with
    ``workers`` > 1, by that many worker processes a few chunks ahead, delivered in order.

    Workers are spawned (not forked: the training process may hold CUDA and NCCL threads),
    each with its own copy of the dataset (a memory-mapped Arrow table pickles as its path).
    Chunks read ahead and not taken are dropped when the reader closes.
    """

    def __init__(self, ds: Dataset, order: Sequence[int], start: int, workers: int) -> None:
        self.ds, self.order, self.start = ds, order, start
        self._pool: Optional[ProcessPoolExecutor] = None
        self._ahead: Deque[Future] = deque()
        self._submitted = start
        if workers > 1:
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(ds,))
            self._depth = 4 * workers

    def _chunk(self, first: int) -> List[int]:
        return [int(i) for i in self.order[first : first + CHUNK]]

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next chunk's tokens (int32) and the lengths of its samples."""
        if self._pool is None:
            data, lengths = read_samples(self.ds, self._chunk(self.start))
        else:
            while len(self._ahead) < self._depth and self._submitted < len(self.order):
                self._ahead.append(self._pool.submit(_worker_read, self._chunk(self._submitted)))
                self._submitted += CHUNK
            try:
                data, lengths = self._ahead.popleft().result()
            except BrokenProcessPool as e:
                raise RuntimeError(
                    "a process tokenizing the training text died. Spawned processes import the main script again: "
                    "a script that packs text must keep its top level under `if __name__ == \"__main__\":`; "
                    "or set the dataset's tokenize_workers: 0 to tokenize in the training process"
                ) from e
        self.start += len(lengths)
        tokens = torch.frombuffer(bytearray(data), dtype=torch.int32) if data else torch.zeros(0, dtype=torch.int32)
        return tokens, torch.tensor(lengths, dtype=torch.int64)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def tokenize_workers(tokens_to_go: float, workers: Optional[int], share: bool = True) -> int:
    """How many processes tokenize: ``workers`` if set, else none for less than
    ``POOL_MIN_TOKENS`` (starting them costs seconds) and otherwise the CPUs this process may
    use: all of them if the launcher pinned it to its own, or if it packs for the whole node
    (``share`` false), else its part of the node's, shared with the node's other ranks
    (``LOCAL_WORLD_SIZE``, which torchrun sets); at most ``MAX_AUTO_WORKERS``."""
    if workers is not None:
        return int(workers)
    if tokens_to_go < POOL_MIN_TOKENS:
        return 0
    node = os.cpu_count() or 1
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else node
    if share and mine == node:
        mine //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(mine, MAX_AUTO_WORKERS)


class _Progress:
    """Says, on the first rank and at most once a minute, how far a long packing has come."""

    def __init__(self, done: int, packs: Optional[int], max_seq_len: int, workers: int) -> None:
        self.first, self.packs, self.max_seq_len, self.workers = done, packs, max_seq_len, workers
        self.t0 = self.last = time.monotonic()
        self.quiet = int(os.environ.get("RANK", "0")) != 0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.quiet or now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = (done - self.first) * self.max_seq_len / (now - self.t0)
        of = "" if self.packs is None else f" of {self.packs:,} ({100 * done / self.packs:.0f} %)"
        by = f"{self.workers} tokenizing processes" if self.workers > 1 else "tokenizing in this process"
        log.info(f"packing training text: {done:,} packs{of}, {rate / 1e6:.2f} M tokens/s, {by}")


class TextPacks(Dataset):
    """Packs of ``max_seq_len`` tokens over ``ds``'s samples, read in the order ``order`` gives.

    A sample that overflows a pack continues in the next one (torchtune's ``split_across_pack``);
    the corpus's last, partial pack is padded with ``padding_idx``. Packing stops at
    ``max_packs`` and resumes where it stopped on :meth:`grow_to`. ``ds``'s samples must have
    labels equal to their tokens (text completion), which lets a pack store its tokens once.
    ``cache``: a file holding packs of this corpus, order and length (a previous run's), read
    instead of packing them again; :meth:`save` writes it. ``workers``: processes that tokenize
    (:func:`tokenize_workers`; ``None`` decides by the amount to pack). ``node_rank``: this
    process's (rank, ranks) on its node: with a ``cache``, the node's rank 0 packs, with all the
    node's CPUs, and writes the file, and the others wait for it and read it.
    ``split_long_documents``: ``ds``'s samples may be longer than ``max_seq_len`` (its tokenizer
    does not cut them) and are packed as pieces of ``max_seq_len`` (:func:`piece_lengths`).
    """

    packed = True  # the stock recipe's collate reads the config's `packed`; this says it for lists

    def __init__(self, ds: Dataset, max_seq_len: int, order: Sequence[int], max_packs: Optional[int] = None,
                 padding_idx: int = 0, cache: Optional[Path] = None, workers: Optional[int] = None,
                 node_rank: Optional[Tuple[int, int]] = None, split_long_documents: bool = False) -> None:
        self.ds, self.max_seq_len, self.padding_idx, self.workers = ds, max_seq_len, padding_idx, workers
        self.split_long_documents = split_long_documents
        # With ranks beside it on the node and a cache file, one rank packs and writes, the others read.
        local_rank, local_world = node_rank or (0, 1)
        self.shares = cache is not None and local_world > 1
        self.packs_here = not self.shares or local_rank == 0
        self._order, self._next = order, 0  # documents in packing order, and the next one to read
        self._pos_dtype = torch.int16 if max_seq_len <= torch.iinfo(torch.int16).max + 1 else torch.int32
        self._blocks: List[Dict[str, torch.Tensor]] = []  # blocks of up to BLOCK packs
        self._starts: List[int] = [0]  # index of each block's first pack, then the count
        self._buffer = _empty_buffer(self._pos_dtype)  # tokens read but not yet in a pack
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
        corpus is used up, a block of packs at a time; or, on a rank that does not pack, wait
        for the rank that does to have written them."""
        if self.exhausted or (packs is not None and len(self) >= packs):
            return
        if not self.packs_here:
            self._wait_for(packs)
            return
        self._pack(packs)
        if self.shares:
            try:
                self.save()
            except OSError as e:
                raise OSError(e.errno, f"the packed training text could not be written to {self.cache}, where the "
                              f"node's other ranks wait for it ({e.strerror}): give the dataset's cache_dir room "
                              f"(6 bytes a token) or set it to null for every rank to pack its own") from e

    def _pack(self, packs: Optional[int]) -> None:
        """Tokenize and cut packs here until there are ``packs`` (``None``: all) or the corpus ends."""
        to_go = (len(self._order) - self._next if packs is None else packs - len(self)) * self.max_seq_len
        workers = tokenize_workers(to_go, self.workers, share=not self.shares)
        reader = _Samples(self.ds, self._order, self._next, workers)
        report = _Progress(len(self), packs, self.max_seq_len, workers)
        if workers > 1 and not report.quiet:
            log.info(f"packing training text: {to_go / 1e6:,.0f} M tokens at most, tokenized by {workers} processes")
        try:
            while not self.exhausted and (packs is None or len(self) < packs):
                want = BLOCK if packs is None else min(BLOCK, packs - len(self))
                pieces, have = [self._buffer], len(self._buffer["tokens"])
                while have < want * self.max_seq_len and reader.start < len(self._order):
                    tokens, lengths = reader.next()
                    if self.split_long_documents:
                        lengths = piece_lengths(lengths, self.max_seq_len)
                    pieces.append({"tokens": tokens, "input_pos": sample_positions(lengths, self.max_seq_len, self._pos_dtype),
                                   "seq_lens": lengths})
                    have += len(tokens)
                stream = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
                self._next = reader.start
                pad = 0
                if have < want * self.max_seq_len:  # the corpus is used up: its last pack is padded
                    self.exhausted = True
                    want = math.ceil(have / self.max_seq_len)
                    pad = want * self.max_seq_len - have
                    if pad:
                        stream = self._padded(stream, pad)
                if want:
                    block, self._buffer = cut_packs(stream["tokens"], stream["input_pos"], stream["seq_lens"],
                                                    self.max_seq_len, want)
                    block["pad"][-1] = pad
                    self._blocks.append(block)
                    self._starts.append(self._starts[-1] + want)
                    report(len(self))
        finally:
            reader.close()

    def _padded(self, stream: Dict[str, torch.Tensor], pad: int) -> Dict[str, torch.Tensor]:
        """The stream's last, partial pack padded as torchtune pads it: padding as one more
        sequence, its positions going on from the last token's (up to ``max_seq_len - 1``)."""
        last = int(stream["input_pos"][-1])
        return {
            "tokens": torch.cat([stream["tokens"], torch.full((pad,), self.padding_idx, dtype=torch.int32)]),
            "input_pos": torch.cat([stream["input_pos"],
                                    (last + 1 + torch.arange(pad)).clamp(max=self.max_seq_len - 1).to(self._pos_dtype)]),
            "seq_lens": torch.cat([stream["seq_lens"], torch.tensor([pad])]),
        }

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
                 "buffer": json.dumps({k: v.tolist() for k, v in self._buffer.items()})}
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_name(f"{self.cache.name}.tmp{os.getpid()}")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.cache)
        finally:
            tmp.unlink(missing_ok=True)  # a partial file, when writing failed
        self._saved_len = len(self)

    def _load(self, path: Path) -> None:
        self._adopt(torch.load(path, mmap=True, weights_only=True))  # pages are read as packs are

    def _adopt(self, state: Dict[str, Any]) -> None:
        """Take the packs and packing position of a cache file's ``state``."""
        self._blocks = state["blocks"]
        self._starts = [0]
        for block in self._blocks:
            self._starts.append(self._starts[-1] + block["tokens"].size(0))
        self._next, self.exhausted = int(state["next"]), bool(state["exhausted"])
        dtypes = {"tokens": torch.int32, "input_pos": self._pos_dtype, "seq_lens": torch.int64}
        self._buffer = {k: torch.tensor(v, dtype=dtypes[k]) for k, v in json.loads(state["buffer"]).items()}
        self._saved_len = self.cached = len(self)

    def _wait_for(self, packs: Optional[int]) -> None:
        """Take the packs from the cache file once the node's packing rank has written enough.

        Polls the file rather than waiting in a collective: packing can take longer than a
        collective's timeout. The packing rank writes each file whole (a rename), and a rank that
        fails takes the others down with it (torchrun stops a failed run's processes).
        """
        seen, since = None, time.monotonic()
        while True:
            try:
                stat = self.cache.stat()
                mark = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            except FileNotFoundError:
                mark = None
            if mark is None and since is not None and time.monotonic() - since > WAIT_WARN_S:
                since = None
                log.warning(f"still waiting for {self.cache}, which the node's rank 0 writes once it has packed the "
                            "training text; if this rank does not see the files that one writes, give the dataset a "
                            "cache_dir the node's ranks share, or null for every rank to pack its own")
            if mark is not None and mark != seen:
                seen = mark
                state = torch.load(self.cache, mmap=True, weights_only=True)
                have = sum(block["tokens"].size(0) for block in state["blocks"])
                if bool(state["exhausted"]) or (packs is not None and have >= packs):
                    self._adopt(state)
                    return
            time.sleep(WAIT_POLL_S)


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
    tokenize_workers: Optional[int] = None,
    split_long_documents: bool = False,
    **load_dataset_kwargs: Any,
) -> Union[TextPacks, TextCompletionDataset]:
    """Pre-training text packed into ``tokenizer.max_seq_len`` tokens, ``max_tokens`` worth.

    ``text_completion_dataset``'s arguments (each document is cut at ``max_seq_len`` as there),
    plus ``max_tokens`` (``None``: the whole corpus, as torchtune packs, but the adapt-prune
    recipe then packs just what its steps consume, and more than ``max_tokens`` when they need
    more), ``seed`` (the documents' order), ``cache_dir`` (where the
    packs are kept for a resumed run and, under torchrun, written by the node's first rank for
    the others to read; the packaged configs use ``${output_dir}/packs``) and
    ``tokenize_workers`` (processes that tokenize; ``None``: the packing rank's CPUs once there
    are millions of tokens to pack, see :func:`tokenize_workers`) and ``split_long_documents``
    (``True``: a document longer than a pack is packed whole, in pieces of ``max_seq_len``
    tokens, instead of cut at ``max_seq_len``; packs only).
    ``packed`` has no default because the stock recipe reads it from the config to pick the
    collate (document masks for packs): ``False`` gives the documents unpacked, as
    ``text_completion_dataset`` does.
    """
    if split_long_documents and not packed:
        raise ValueError("packed_text_dataset: split_long_documents packs long documents in pieces; it needs "
                         "packed: True (unpacked, every document is one sample, cut at tokenizer.max_seq_len)")
    if packed and tokenizer.max_seq_len is None:
        raise ValueError("packed_text_dataset needs tokenizer.max_seq_len: the length of a pack")
    reader = tokenizer
    if split_long_documents:  # the documents whole: TextCompletionDataset cuts at its tokenizer's max_seq_len
        reader = copy.copy(tokenizer)
        reader.max_seq_len = None
    ds = TextCompletionDataset(tokenizer=reader, source=source, column=column, add_eos=add_eos, split=split,
                               filter_fn=filter_fn, **load_dataset_kwargs)
    if not packed:
        return ds
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
            **({"split_long_documents": True} if split_long_documents else {}),  # older caches stay valid
            # The tokenizer by what it does: another vocabulary or normalization gives other ids.
            "tokenizer": tokenizer.encode(_PROBE, add_bos=True, add_eos=True),
        }
        key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        cache = Path(cache_dir).expanduser() / f"packs-{key}.pt"
    node_rank = (int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return TextPacks(ds, tokenizer.max_seq_len, order, max_packs=packs, cache=cache, workers=tokenize_workers,
                     node_rank=node_rank, split_long_documents=split_long_documents)


_PROBE = "Packed text, 2024: naïve café — 東京 🙂 def f(x):\n\treturn x ** 2  # ok"


OURS = "adapt_prune_tune.packing.packed_text_dataset"


def packs_file_bytes(node: Any, max_seq_len: Optional[int]) -> Optional[int]:
    """What the cache file of the packed training text ``node`` will take on disk, about (its
    tokens and positions; the per-pack counts add well under 1 %); ``None`` if it keeps none or
    its size is not known up front (the whole corpus)."""
    if not hasattr(node, "get") or node.get("_component_") != OURS or node.get("packed", False) is not True:
        return None
    max_tokens = node.get("max_tokens", None)
    if node.get("cache_dir", None) is None or max_tokens is None:
        return None
    long = max_seq_len is not None and int(max_seq_len) > torch.iinfo(torch.int16).max + 1
    return int(max_tokens) * (4 + (4 if long else 2))


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
    if component == OURS and node.get("max_tokens", None) is None and name != "dataset":
        return (f"{name}.max_tokens is null: in a list of datasets the recipe cannot size each one, and the whole "
                "corpus is packed before the first step; set max_tokens to what the run should read from it")
    return None


def sized_by_the_run(node: Any) -> Any:
    """The training dataset ``node``, with ``max_tokens: null`` (the whole corpus) for our packer
    turned into one pack: the recipe tops it up to exactly what its steps consume once it knows
    their number, so that ``adapt.total_steps`` packs no more than ``adapt.total_tokens`` does.
    Other nodes are returned as they are."""
    if not hasattr(node, "get") or node.get("_component_") != OURS or node.get("packed", False) is not True:
        return node
    if node.get("max_tokens", None) is not None:
        return node
    sized = node.copy()
    sized.max_tokens = 0  # one pack, for the recipe's first look at a sample
    return sized
