"""HFModelTokenizer against the reference implementations (tokenizers, transformers)."""

import json
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer
from torchtune import config as tt_config
from torchtune.data import Message, padded_collate_sft

from adapt_prune_tune.tokenizer import (
    ChatMLFormat,
    HFModelTokenizer,
    detect_chatml,
    hf_tokenizer,
    message_spans,
    render_chat_template,
    smollm2_tokenizer,
)

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

TEXTS = [
    "The capital of France is",
    "In 2024, 12345 items cost $3.50 (x²³).",
    "def f(x):\n\treturn x  # comment\n\n\n    indented 42\n",
    "ünïcödé — “quotes” 日本語 🙂",
    "   leading and trailing spaces   ",
    "",
]

CONVERSATIONS: List[List[Tuple[str, str]]] = [
    [("user", "Hi")],
    [("user", "What is 2 + 2?"), ("assistant", "4")],
    [("system", "Be brief."), ("user", "Name a prime."), ("assistant", "7")],
    [
        ("user", "  \n\nleading whitespace"),
        ("assistant", "\n answer with  12  34 \n"),
        ("user", "And?"),
        ("assistant", "Done."),
    ],
]

# Written for these tests in the shape of each format, not copied from any model.
PLAIN_CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_STYLE_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def _messages(conversation: List[Tuple[str, str]]) -> List[Message]:
    return [Message(role=r, content=c, masked=r != "assistant") for r, c in conversation]


def _dicts(conversation: List[Tuple[str, str]]) -> List[Dict[str, str]]:
    return [{"role": r, "content": c} for r, c in conversation]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> HFModelTokenizer:
    return smollm2_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="module")
def hf(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _checkpoint_copy(smollm2_dir: Path, directory: Path, files: Dict[str, str]) -> Path:
    """A checkpoint directory with SmolLM2's tokenizer.json and the given other files."""
    directory.mkdir()
    shutil.copy(smollm2_dir / "tokenizer.json", directory / "tokenizer.json")
    for name, content in files.items():
        (directory / name).write_text(content)
    return directory


def test_special_ids(tokenizer: HFModelTokenizer) -> None:
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    assert tokenizer.vocab_size == 49152
    assert tokenizer.stop_tokens == [2]
    assert tokenizer.special_tokens["<|im_start|>"] == 1
    assert tokenizer.special_tokens["<|im_end|>"] == 2
    assert tokenizer.special_tokens["<|endoftext|>"] == 0
    assert tokenizer.default_system_prompt == SMOLLM_SYSTEM


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_references(tokenizer: HFModelTokenizer, hf, smollm2_dir, text) -> None:
    reference = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(text).ids
    assert tokenizer.encode(text, add_bos=False, add_eos=False) == reference
    # SmolLM2's tokenizer adds no BOS: add_bos=True must agree with transformers.
    assert tokenizer.encode(text, add_bos=True, add_eos=False) == hf(text)["input_ids"]
    assert tokenizer.encode(text) == hf(text)["input_ids"] + [tokenizer.eos_id]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tokenizer: HFModelTokenizer, hf, text) -> None:
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    assert tokenizer.decode(ids) == text == hf.decode(ids)


def test_decode_special_tokens(tokenizer: HFModelTokenizer) -> None:
    ids = tokenizer.encode("Hello")
    assert tokenizer.decode(ids) == "Hello"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "Hello<|im_end|>"


def test_encode_real_documents(tokenizer: HFModelTokenizer, hf, python_docs_dir: Path) -> None:
    rows = (python_docs_dir / "eval.jsonl").read_text().splitlines()[:40]
    for row in rows:
        text = json.loads(row)["text"]
        ids = tokenizer.encode(text, add_bos=False, add_eos=False)
        assert ids == hf(text)["input_ids"]
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_token_exact(tokenizer: HFModelTokenizer, hf, conversation) -> None:
    tokens, mask = tokenizer.tokenize_messages(_messages(conversation))
    expected = hf.apply_chat_template(_dicts(conversation), tokenize=True, return_dict=False)
    assert tokens == expected
    assert len(mask) == len(tokens)


@pytest.mark.parametrize("conversation", [c for c in CONVERSATIONS if c[-1][0] == "user"])
def test_generation_prompt_token_exact(tokenizer: HFModelTokenizer, hf, conversation) -> None:
    messages = _messages(conversation) + [Message(role="assistant", content="")]
    sample = tokenizer({"messages": messages}, inference=True)
    expected = hf.apply_chat_template(
        _dicts(conversation), tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert sample["tokens"] == expected
    assert "messages" not in sample


def test_masks_follow_messages(tokenizer: HFModelTokenizer) -> None:
    conversation = [("user", "Question?"), ("assistant", "Answer.")]
    tokens, mask = tokenizer.tokenize_messages(_messages(conversation))
    trained = [t for t, m in zip(tokens, mask) if not m]
    masked = [t for t, m in zip(tokens, mask) if m]
    assert tokenizer.decode(trained, skip_special_tokens=False) == (
        "<|im_start|>assistant\nAnswer.<|im_end|>\n"
    )
    assert tokenizer.decode(masked, skip_special_tokens=False) == (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n<|im_start|>user\nQuestion?<|im_end|>\n"
    )
    # The injected system turn stays masked even when inputs are trained on.
    unmasked = [Message(role=r, content=c, masked=False) for r, c in conversation]
    tokens, mask = tokenizer.tokenize_messages(unmasked)
    system_len = len(tokenizer.tokenize_messages([Message("system", SMOLLM_SYSTEM)])[0])
    assert all(mask[:system_len]) and not any(mask[system_len:])


def test_explicit_system_replaces_default(tokenizer: HFModelTokenizer) -> None:
    tokens, _ = tokenizer.tokenize_messages(_messages(CONVERSATIONS[2]))
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert SMOLLM_SYSTEM not in text


def test_truncation(smollm2_dir: Path) -> None:
    conversation = _messages([("user", "Tell me a long story."), ("assistant", "Once " * 50)])
    full, _ = smollm2_tokenizer(str(smollm2_dir)).tokenize_messages(conversation)
    short = smollm2_tokenizer(str(smollm2_dir), max_seq_len=40)
    tokens, mask = short.tokenize_messages(conversation)
    assert len(tokens) == len(mask) == 40
    assert tokens[:39] == full[:39] and tokens[-1] == short.eos_id and mask[-1] is True
    tokens, _ = short.tokenize_messages(conversation, add_end_tokens=False)
    assert tokens == full[:40]
    # Fitting sequences keep their last token (the "\n" after <|im_end|>).
    roomy = smollm2_tokenizer(str(smollm2_dir), max_seq_len=len(full))
    assert roomy.tokenize_messages(conversation)[0] == full


def test_collate_chat_samples(tokenizer: HFModelTokenizer) -> None:
    samples = [
        tokenizer({"messages": _messages(c)}) for c in CONVERSATIONS if c[-1][0] == "assistant"
    ]
    for sample in samples:
        sample["labels"] = [-100 if m else t for t, m in zip(sample["tokens"], sample["mask"])]
    batch = padded_collate_sft(samples, padding_idx=tokenizer.pad_id)
    longest = max(len(s["tokens"]) for s in samples)
    assert batch["tokens"].shape == (len(samples), longest)
    assert (batch["tokens"][0, len(samples[0]["tokens"]) :] == tokenizer.pad_id).all()


def test_prompt_template(smollm2_dir: Path) -> None:
    tokenizer = smollm2_tokenizer(
        str(smollm2_dir), prompt_template={"user": ("Question: ", "\nAnswer briefly.")}
    )
    tokens, _ = tokenizer.tokenize_messages(_messages([("user", "Why?")]))
    assert "<|im_start|>user\nQuestion: Why?\nAnswer briefly.<|im_end|>" in tokenizer.decode(
        tokens, skip_special_tokens=False
    )


def test_config_instantiation(smollm2_dir: Path) -> None:
    cfg = OmegaConf.create(
        {
            "_component_": "adapt_prune_tune.tokenizer.smollm2_tokenizer",
            "path": str(smollm2_dir),
            "max_seq_len": 64,
        }
    )
    tokenizer = tt_config.instantiate(cfg)
    assert isinstance(tokenizer, HFModelTokenizer) and tokenizer.max_seq_len == 64


def test_unsupported_roles(tokenizer: HFModelTokenizer) -> None:
    with pytest.raises(NotImplementedError, match="'ipython'"):
        tokenizer.tokenize_messages([Message(role="ipython", content="{}")])


def test_detect_chatml() -> None:
    assert detect_chatml(PLAIN_CHATML_TEMPLATE) == ChatMLFormat(default_system_prompt=None)
    assert detect_chatml(LLAMA3_STYLE_TEMPLATE) is None
    assert detect_chatml(None) is None
    assert detect_chatml("{% for m in messages %}{{ raise_exception('no') }}{% endfor %}") is None
    assert detect_chatml("{% if %}") is None
    assert render_chat_template("{{ strftime_now('%Y') }}", [], False).isdigit()  # as transformers defines it


# In the shape of DeepSeek-R1's template: BOS and the system text written before any turn, turn
# markers as special tokens with no newline between turns, reasoning cut from assistant turns.
R1_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + m['content'].split('</think>')[-1] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)
R1_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]


@pytest.fixture(scope="module")
def r1_style_dir(smollm2_dir: Path, tmp_path_factory) -> Path:
    """SmolLM2's vocabulary plus R1's turn tokens, with an R1-style template and special tokens."""
    directory = tmp_path_factory.mktemp("r1") / "R1-style"
    directory.mkdir()
    vocabulary = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    vocabulary.add_special_tokens(R1_SPECIALS)
    vocabulary.save(str(directory / "tokenizer.json"))
    config = {"bos_token": R1_SPECIALS[0], "eos_token": R1_SPECIALS[1], "chat_template": R1_STYLE_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_any_template_token_exact(r1_style_dir: Path, conversation) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(r1_style_dir)
    tokenizer = hf_tokenizer(str(r1_style_dir))
    tokens, mask = tokenizer.tokenize_messages(_messages(conversation))
    assert tokens == reference.apply_chat_template(_dicts(conversation), tokenize=True, return_dict=False)
    assert len(mask) == len(tokens)
    if conversation[-1][0] == "user":
        messages = _messages(conversation) + [Message(role="assistant", content="")]
        prompt = reference.apply_chat_template(
            _dicts(conversation), tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert tokenizer({"messages": messages}, inference=True)["tokens"] == prompt


def test_any_template_masks_by_message(r1_style_dir: Path) -> None:
    tokenizer = hf_tokenizer(str(r1_style_dir))
    conversation = [("system", "Be brief."), ("user", "Name a prime."), ("assistant", "<think>2?</think>7")]
    tokens, mask = tokenizer.tokenize_messages(_messages(conversation))
    trained = [t for t, m in zip(tokens, mask) if not m]
    ignored = [t for t, m in zip(tokens, mask) if m]
    assert tokenizer.decode(trained, skip_special_tokens=False) == "<｜Assistant｜>7<｜end▁of▁sentence｜>"
    assert tokenizer.decode(ignored, skip_special_tokens=False) == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Name a prime."


def test_llama3_style_template(smollm2_dir: Path, tmp_path: Path) -> None:
    config = {"eos_token": "<|im_end|>", "chat_template": LLAMA3_STYLE_TEMPLATE}
    directory = _checkpoint_copy(
        smollm2_dir, tmp_path / "Llama-style", {"tokenizer_config.json": json.dumps(config)}
    )
    tokens, mask = hf_tokenizer(str(directory)).tokenize_messages(_messages([("user", "Hi"), ("assistant", "Yo")]))
    expected = render_chat_template(LLAMA3_STYLE_TEMPLATE, _dicts([("user", "Hi"), ("assistant", "Yo")]), False)
    assert Tokenizer.from_file(str(directory / "tokenizer.json")).decode(tokens, skip_special_tokens=False) == expected
    assert mask.count(False) > 0 and mask[0] is True


def test_templates_without_message_spans_are_refused(smollm2_dir: Path, tmp_path: Path) -> None:
    rewrites = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(NotImplementedError, match="re-renders earlier turns"):
        message_spans(rewrites, _dicts([("user", "a"), ("assistant", "b")]), False)
    directory = _checkpoint_copy(
        smollm2_dir, tmp_path / "No-template", {"tokenizer_config.json": json.dumps({"eos_token": "<|im_end|>"})}
    )
    with pytest.raises(NotImplementedError, match="No-template has no chat template"):
        hf_tokenizer(str(directory)).tokenize_messages(_messages([("user", "Hi")]))


def test_qwen_style_config(smollm2_dir: Path, tmp_path: Path) -> None:
    """No BOS, a pad token of its own, several EOS ids, the template in chat_template.jinja."""
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": {"content": "<|endoftext|>"},
    }
    directory = _checkpoint_copy(
        smollm2_dir,
        tmp_path / "Qwen-style",
        {
            "tokenizer_config.json": json.dumps(config),
            "generation_config.json": json.dumps({"eos_token_id": [2, 0]}),
            "chat_template.jinja": PLAIN_CHATML_TEMPLATE,
        },
    )
    tokenizer = hf_tokenizer(str(directory))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (None, 2, 0)
    assert tokenizer.stop_tokens == [0, 2]
    assert tokenizer.default_system_prompt is None
    tokens, _ = tokenizer.tokenize_messages(_messages([("user", "Hi")]))
    assert tokenizer.decode(tokens, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No tokenizer.json"):
        hf_tokenizer(str(tmp_path))


def test_templates_render_in_a_fresh_process() -> None:
    """``jinja2.ext`` is imported by the tokenizer itself, not by whatever ran before it: without
    it every template failed to render and ChatML went undetected, silently."""
    import subprocess
    import sys

    code = (
        "from adapt_prune_tune.tokenizer import detect_chatml; import sys; "
        f"sys.exit(0 if detect_chatml({PLAIN_CHATML_TEMPLATE!r}) is not None else 1)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
