"""Held-out perplexity: windows, the value itself, chunked output and the multi-rank split."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _gloo import on_ranks

from adapt_prune_tune.models import DecoderArch, decoder_from_arch
from adapt_prune_tune.perplexity import jsonl_text, perplexity, text_windows

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50


class CharTokenizer:
    """One token per character (mod VOCAB): enough of the model-tokenizer API for windows."""

    def encode(self, text, add_bos=True, add_eos=True):
        return [ord(c) % VOCAB for c in text]


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    arch = DecoderArch.uniform(vocab_size=VOCAB, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_dim=32, max_seq_len=64)
    return decoder_from_arch(arch).eval()


def direct_perplexity(model, windows) -> float:
    with torch.no_grad():
        logits = model(windows[:, :-1])
    return math.exp(float(F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))))


def test_windows_are_the_first_tokens_in_order():
    windows = text_windows(CharTokenizer(), "abcdefghij" * 3, num_tokens=12, window=4)
    assert windows.shape == (3, 4)
    assert windows.flatten().tolist() == [ord(c) % VOCAB for c in ("abcdefghij" * 3)[:12]]


@pytest.mark.parametrize("num_tokens, window", [(10, 4), (2, 4), (4, 1)])
def test_windows_refuse_bad_sizes(num_tokens, window):
    with pytest.raises(ValueError, match="heldout.num_tokens"):
        text_windows(CharTokenizer(), "x" * 100, num_tokens, window)


def test_windows_refuse_short_text():
    with pytest.raises(ValueError, match="fewer than heldout.num_tokens=64"):
        text_windows(CharTokenizer(), "x" * 20, 64, 16)


def test_jsonl_text_joins_rows_in_order(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(["one", "two"])))
    assert jsonl_text(path) == "one\n\ntwo"


def test_perplexity_matches_direct_computation_and_restores_mode():
    model = tiny_model().train()
    windows = torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(1))
    expected = direct_perplexity(model, windows)
    assert perplexity(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-6)
    assert model.training


def test_perplexity_reads_chunked_output():
    model = tiny_model()
    windows = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    expected = perplexity(model, windows)
    model.set_num_output_chunks(4)
    assert perplexity(model, windows) == pytest.approx(expected, rel=1e-6)


def _rank_perplexity(rank: int, world: int, out_file: str) -> None:
    windows = torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(3))
    value = perplexity(tiny_model(), windows, batch_size=2)
    with open(f"{out_file}.{rank}", "w") as f:
        f.write(repr(value))


def test_two_ranks_with_uneven_windows_agree_with_one_process(tmp_path):
    """5 windows on 2 ranks: rank 1 has fewer and must still join every collective."""
    windows = torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(3))
    expected = perplexity(tiny_model(), windows)
    out = str(tmp_path / "ppl")
    on_ranks(_rank_perplexity, 2, tmp_path, out)
    values = [float(open(f"{out}.{rank}").read()) for rank in range(2)]
    assert values[0] == values[1] == pytest.approx(expected, rel=1e-6)


def test_heldout_section_gives_windows_per_text_and_names_the_short_one(tmp_path):
    from omegaconf import OmegaConf

    from adapt_prune_tune.perplexity import heldout_windows

    for name, words in (("long", 400), ("short", 30)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": " ".join(["word"] * words)}) + "\n")

    def node(name):
        return {"_component_": "adapt_prune_tune.perplexity.jsonl_text", "data_files": str(tmp_path / f"{name}.jsonl")}

    section = OmegaConf.create({"texts": {"a": node("long"), "b": node("long")}, "num_tokens": 64, "window": 16})
    windows = heldout_windows(section, CharTokenizer())
    assert list(windows) == ["a", "b"] and windows["a"].shape == (4, 16)
    assert heldout_windows(None, CharTokenizer()) == {}
    section.texts.b = node("short")
    section.num_tokens = 256
    with pytest.raises(ValueError, match=r"^heldout\.texts\.b: the text has"):
        heldout_windows(section, CharTokenizer())


def test_dataset_text_reads_local_files_through_datasets(tmp_path):
    from adapt_prune_tune.perplexity import dataset_text

    (tmp_path / "notes.txt").write_text("first line\nsecond line\n\nafter a blank\n")
    assert dataset_text("text", "train", data_files=str(tmp_path / "notes.txt")) == (
        "first line\nsecond line\n\nafter a blank")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    assert dataset_text("json", "train", column="body", data_files=str(tmp_path / "docs.jsonl")) == "one\n\ntwo"
    with pytest.raises(ValueError, match=r"column 'text' is not in json \(train\): its columns are \['body'\]"):
        dataset_text("json", "train", data_files=str(tmp_path / "docs.jsonl"))
    rows = [{"text": "kept"}, {"text": None}, {}, {"text": ""}, {"text": "last"}]
    (tmp_path / "holes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert dataset_text("json", "train", data_files=str(tmp_path / "holes.jsonl")) == "kept\n\n\n\nlast"


def test_a_held_out_text_that_cannot_be_read_is_named_with_its_cause(tmp_path):
    """``datasets`` wraps a file that is not UTF-8 in "An error occurred while generating the
    dataset"; the key, the byte and the option that reads it are what a user can act on."""
    from omegaconf import OmegaConf

    from adapt_prune_tune.perplexity import heldout_windows

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 na\xefve r\xe9sum\xe9\n".encode("latin-1") * 50)
    node = {"_component_": "adapt_prune_tune.perplexity.dataset_text", "source": "text",
            "data_files": str(tmp_path / "latin1.txt"), "split": "train"}
    section = OmegaConf.create({"texts": {"notes": node}, "num_tokens": 64, "window": 16})
    with pytest.raises(ValueError) as raised:
        heldout_windows(section, CharTokenizer())
    message = str(raised.value)
    assert message.startswith("heldout.texts.notes: adapt_prune_tune.perplexity.dataset_text cannot be built: "
                              "DatasetGenerationError")
    assert "caused by UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9" in message
    assert message.endswith("give its encoding, e.g. heldout.texts.notes.encoding=latin-1")
    section.texts.notes.encoding = "latin-1"
    assert heldout_windows(section, CharTokenizer())["notes"].shape == (4, 16)


def _rank_passes_without_backward(rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from adapt_prune_tune.pruner import calibrate

    model = tiny_model()
    for layer in model.layers:
        fully_shard(layer, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=False)
    sharded = {name: id(p) for name, p in model.named_parameters()}
    windows = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(4))
    perplexity(model, windows)
    assert {name: id(p) for name, p in model.named_parameters()} == sharded
    calibrate(model, [{"tokens": windows}], with_gradients=False)
    assert {name: id(p) for name, p in model.named_parameters()} == sharded
    assert all(isinstance(p, DTensor) for p in model.parameters())


def test_passes_without_backward_leave_fsdp_parameters_sharded(tmp_path):
    """With reshard_after_forward=False a unit stays unsharded until its backward; a measurement
    has none, and the optimizer, checkpoints and resizes find parameters by identity."""
    on_ranks(_rank_passes_without_backward, 2, tmp_path)
