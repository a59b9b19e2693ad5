"""Bounded, compact packing: torchtune's packs, only as many as asked, grown on demand."""

import json
import math

import pytest
import torch
from torchtune.datasets import PackedDataset, TextCompletionDataset

from adapt_prune_tune.packing import (
    BLOCK,
    OURS,
    TextPacks,
    packed_text_dataset,
    piece_lengths,
    whole_corpus_packing,
)


class Docs(torch.utils.data.Dataset):
    """Text-completion-like samples (labels = tokens) of the given lengths."""

    def __init__(self, lengths, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.samples = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return {"tokens": self.samples[i], "labels": list(self.samples[i])}


def assert_same_packs(ours, theirs, count=None):
    count = len(theirs) if count is None else count
    assert len(ours) >= count
    for i in range(count):
        a, b = ours[i], theirs[i]
        assert a.keys() == b.keys()
        for key in b:
            assert a[key].dtype == b[key].dtype == torch.long, key
            assert torch.equal(a[key], b[key]), (i, key)


LENGTHS = [5, 40, 17, 33, 16, 100, 1, 16, 9, 70, 3, 31, 15, 2]  # some longer than a pack, some exactly one


@pytest.mark.parametrize("max_seq_len", [16, 37])
def test_the_same_packs_as_torchtune(max_seq_len):
    ds = Docs(LENGTHS)
    theirs = PackedDataset(ds, max_seq_len=max_seq_len, split_across_pack=True)
    ours = TextPacks(ds, max_seq_len, list(range(len(ds))))
    assert len(ours) == len(theirs) and ours.exhausted
    assert_same_packs(ours, theirs)
    assert_same_packs(TextPacks(ds, max_seq_len, list(range(len(ds))), max_packs=5),
                      PackedDataset(ds, max_seq_len=max_seq_len, split_across_pack=True, max_packs=5))


def test_growing_continues_where_packing_stopped():
    ds = Docs(LENGTHS * 3)
    whole = TextPacks(ds, 16, list(range(len(ds))))
    grown = TextPacks(ds, 16, list(range(len(ds))), max_packs=3)
    assert len(grown) == 3 and not grown.exhausted
    grown.grow_to(11)
    assert len(grown) == 11
    grown.grow_to(None)
    assert grown.exhausted and len(grown) == len(whole)
    assert_same_packs(grown, whole)
    assert grown[-1]["seq_lens"].sum() == 16 and grown[len(grown) - 1]["labels"][-1] == -100  # the padded tail
    with pytest.raises(IndexError):
        grown[len(grown)]


def test_storage_is_six_bytes_a_token():
    ds = Docs([300] * 1000)
    packs = TextPacks(ds, 256, list(range(len(ds))))
    stored = sum(t.numel() * t.element_size() for block in packs._blocks for t in block.values())
    assert stored / (len(packs) * 256) < 6.1  # int32 tokens + int16 positions (torchtune: 4 × int64)
    assert len(packs._blocks) == math.ceil(len(packs) / BLOCK) == 2


class Untouchable(Docs):
    def __getitem__(self, i):
        raise AssertionError("a cached pack was tokenized again")


def test_a_cache_is_read_instead_of_packing_again_and_grows_on(tmp_path):
    ds, order = Docs(LENGTHS * 5), list(range(len(LENGTHS) * 5))
    whole = TextPacks(ds, 16, order)
    first = TextPacks(ds, 16, order, max_packs=9, cache=tmp_path / "packs.pt")
    first.save()
    again = TextPacks(Untouchable(LENGTHS * 5), 16, order, max_packs=9, cache=tmp_path / "packs.pt")
    assert len(again) == 9
    assert_same_packs(again, whole, count=9)
    again.ds = ds  # on past the cached packs: from where the first run stopped, buffer and all
    again.grow_to(None)
    assert_same_packs(again, whole)
    again.save()
    assert_same_packs(TextPacks(Untouchable([]), 16, order, cache=tmp_path / "packs.pt"), whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packs.pt"]  # written whole, under its name


class Prompted(Docs):
    """Instruction-style samples: the prompt's labels are ignored."""

    def __getitem__(self, i):
        return {"tokens": self.samples[i], "labels": [-100] * 5 + self.samples[i][5:]}


def test_other_labels_are_refused():
    with pytest.raises(ValueError, match="labels = tokens"):
        TextPacks(Prompted([20, 20]), 16, [0, 1])


def test_builder_packs_what_it_is_asked_in_a_seeded_order(tmp_path, smollm2_dir):
    from adapt_prune_tune.tokenizer import smollm2_tokenizer

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "words " * (i % 50)}) + "\n" for i in range(400)))
    tok = smollm2_tokenizer(str(smollm2_dir), max_seq_len=64)
    kw = dict(source="json", data_files=str(path), column="text", split="train")
    some = packed_text_dataset(tok, packed=True, max_tokens=640, seed=1, cache_dir=str(tmp_path / "packs"), **kw)
    assert len(some) == 10 and not some.exhausted  # 640 tokens = 10 packs of 64
    some.save()
    again = packed_text_dataset(tok, packed=True, max_tokens=640, seed=1, cache_dir=str(tmp_path / "packs"), **kw)
    assert again.cache == some.cache and again._saved_len == 10  # read from the cache
    assert_same_packs(some, again)
    fewer = packed_text_dataset(tok, packed=True, max_tokens=640, seed=1, cache_dir=str(tmp_path / "packs"),
                                **{**kw, "split": "train[:300]"})
    assert fewer.cache != some.cache and fewer._saved_len == -1  # another corpus: another file, packed anew
    other = packed_text_dataset(tok, packed=True, max_tokens=640, seed=2, **kw)
    assert not torch.equal(some[0]["tokens"], other[0]["tokens"])  # another sample of the corpus
    docs = packed_text_dataset(tok, packed=False, **kw)
    assert isinstance(docs, TextCompletionDataset) and len(docs) == 400
    order = torch.randperm(400, generator=torch.Generator().manual_seed(1)).tolist()
    reference = PackedDataset(torch.utils.data.Subset(docs, order), max_seq_len=64, split_across_pack=True)
    everything = packed_text_dataset(tok, packed=True, seed=1, **kw)
    assert everything.exhausted and len(everything) == len(reference)
    assert_same_packs(everything, reference)


def test_long_documents_are_packed_whole_in_pieces(tmp_path, smollm2_dir):
    """split_long_documents: every token of every document is in a pack, a long one as pieces of
    max_seq_len that each start at position 0; torchtune's way (the default) keeps max_seq_len - 1."""
    from adapt_prune_tune.tokenizer import smollm2_tokenizer

    assert piece_lengths(torch.tensor([5, 64, 130, 1]), 64).tolist() == [5, 64, 64, 64, 2, 1]
    path = tmp_path / "docs.jsonl"
    texts = [f"document {i}: " + " ".join(f"w{j}" for j in range(7 * i + 3)) for i in range(40)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = smollm2_tokenizer(str(smollm2_dir), max_seq_len=64)
    kw = dict(source="json", data_files=str(path), column="text", split="train", packed=True, seed=3)
    lengths = [len(tok.encode(t, add_bos=True, add_eos=True)) for t in texts]
    assert max(lengths) > 3 * 64
    whole = packed_text_dataset(tok, split_long_documents=True, **kw)
    cut = packed_text_dataset(tok, **kw)
    real = lambda packs: sum(int((packs[i]["labels"] != -100).sum()) for i in range(len(packs)))  # noqa: E731
    assert real(whole) == sum(lengths) and real(cut) == sum(min(n, 63) for n in lengths)
    for i in range(len(whole)):
        pack = whole[i]
        assert int(pack["seq_lens"].max()) <= 64 and int(pack["seq_lens"].sum()) == 64
        starts = torch.cat([torch.zeros(1, dtype=torch.long), pack["seq_lens"].cumsum(0)[:-1]])
        firsts = pack["input_pos"][starts]  # each piece's first position: 0, or where its last pack left it
        if int((pack["labels"] == -100).sum()):
            firsts = firsts[:-1]  # the corpus's last pack: padding, a sequence of its own, goes on counting
        assert all(int(p) == 0 for p in firsts[1:]) and int(pack["input_pos"].max()) < 64
    # Another corpus to the cache: the option is part of the file's name.
    a = packed_text_dataset(tok, split_long_documents=True, cache_dir=str(tmp_path / "c"), max_tokens=256, **kw)
    b = packed_text_dataset(tok, cache_dir=str(tmp_path / "c"), max_tokens=256, **kw)
    assert a.cache != b.cache
    with pytest.raises(ValueError, match="split_long_documents .* needs packed: True"):
        packed_text_dataset(tok, **{**kw, "packed": False}, split_long_documents=True)


def test_whole_corpus_packing_is_named_with_the_setting_that_avoids_it():
    from omegaconf import OmegaConf

    stock = OmegaConf.create({"_component_": "torchtune.datasets.text_completion_dataset", "packed": True})
    assert "packs the whole corpus on every rank" in whole_corpus_packing("dataset", stock)
    assert OURS in whole_corpus_packing("dataset", stock)
    stock.packed = False
    assert whole_corpus_packing("dataset", stock) is None
    ours = OmegaConf.create({"_component_": OURS, "packed": True, "max_tokens": None})
    assert whole_corpus_packing("dataset[1]", ours).startswith("dataset[1].max_tokens is null: in a list")
    assert whole_corpus_packing("dataset", ours) is None  # the recipe sizes it (below)
    ours.max_tokens = 1000
    assert whole_corpus_packing("dataset[1]", ours) is None


def test_the_recipe_sizes_a_packed_text_left_unsized():
    from omegaconf import OmegaConf

    from adapt_prune_tune.packing import sized_by_the_run

    ours = OmegaConf.create({"_component_": OURS, "packed": True, "max_tokens": None, "source": "json"})
    sized = sized_by_the_run(ours)
    assert sized.max_tokens == 0 and ours.max_tokens is None  # one pack to start from; the config untouched
    ours.max_tokens = 1000
    assert sized_by_the_run(ours) is ours
    stock = OmegaConf.create({"_component_": "torchtune.datasets.text_completion_dataset", "packed": True})
    assert sized_by_the_run(stock) is stock


def test_worker_processes_make_the_same_packs():
    ds = Docs(LENGTHS * 40)  # 560 samples: several chunks a worker, read ahead and dropped at the end
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3)).tolist()
    here = TextPacks(ds, 37, order)
    pooled = TextPacks(ds, 37, order, max_packs=30, workers=2)
    assert len(pooled) == 30 and not pooled.exhausted
    pooled.grow_to(None)  # on from where the pool stopped, though it had read further ahead
    assert pooled.exhausted
    assert_same_packs(pooled, here)


def test_tokenizing_processes_share_the_node(monkeypatch):
    from adapt_prune_tune.packing import POOL_MIN_TOKENS, tokenize_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert tokenize_workers(POOL_MIN_TOKENS, None) == 4  # 32 CPUs among 8 ranks
    assert tokenize_workers(POOL_MIN_TOKENS - 1, None) == 0  # too little to be worth starting processes
    assert tokenize_workers(10, 3) == 3  # as set
    assert tokenize_workers(POOL_MIN_TOKENS, None, share=False) == 32  # it packs for the whole node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert tokenize_workers(POOL_MIN_TOKENS, None) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 256)  # the launcher pinned this rank to 32 of the node's CPUs
    assert tokenize_workers(POOL_MIN_TOKENS, None) == 32
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(256)), raising=False)
    assert tokenize_workers(POOL_MIN_TOKENS, None, share=False) == 64  # a bound on the processes' memory


class Dies(Docs):
    """A sample whose reading kills the process reading it, as a crash or the OOM killer would."""

    def __getitem__(self, i):
        import os

        os._exit(3)


def test_a_dying_worker_is_named_with_the_fix():
    with pytest.raises(RuntimeError, match="tokenize_workers: 0"):
        TextPacks(Dies([5, 5]), 16, [0, 1], workers=2)


def test_one_rank_of_a_node_packs_and_the_others_read_its_file(tmp_path):
    import threading

    ds, order, cache = Docs(LENGTHS * 5), list(range(len(LENGTHS) * 5)), tmp_path / "packs.pt"
    whole = TextPacks(ds, 16, order)
    waiting = {}

    def other_rank():
        waiting["packs"] = packs = TextPacks(Untouchable(LENGTHS * 5), 16, order, max_packs=9, cache=cache,
                                             node_rank=(1, 2))
        packs.grow_to(None)

    reader = threading.Thread(target=other_rank)
    reader.start()  # before anything is written: it waits for the file
    packing = TextPacks(ds, 16, order, max_packs=9, cache=cache, node_rank=(0, 2))
    assert cache.is_file()  # written for the node at once, not only when the recipe saves
    packing.grow_to(None)
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert_same_packs(waiting["packs"], whole)
    assert waiting["packs"].exhausted and not waiting["packs"].packs_here


def test_a_packing_rank_that_cannot_write_says_so(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache directory should be
    with pytest.raises(OSError, match="node's other ranks wait"):
        TextPacks(Docs(LENGTHS), 16, list(range(len(LENGTHS))), cache=blocked / "packs.pt", node_rank=(0, 4))
    assert TextPacks(Docs(LENGTHS), 16, list(range(len(LENGTHS))), cache=blocked / "packs.pt").exhausted  # alone: no need
