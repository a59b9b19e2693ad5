"""lm-eval integration, offline: a tiny torchtune model and tokenizer, local tasks built from a
small held-out JSONL, checked against log-likelihoods computed directly with the model, and
against lm-eval's own HFLM on the same weights exported to a Hugging Face directory."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from adapt_prune_tune.eval_tasks import (
    NEXT_SENTENCE_FILE,
    NEXT_SENTENCE_TASK,
    PERPLEXITY_FILE,
    PERPLEXITY_TASK,
    build_local_tasks,
    next_sentence_examples,
    prose_paragraphs,
    read_jsonl,
    sample_rows,
)
from adapt_prune_tune.evaluation import (
    LOCAL_SIZES,
    LOCAL_TASKS,
    PAPER_TASKS,
    BenchmarkDataUnavailable,
    LocalTaskSize,
    TaskSpec,
    TorchtuneLM,
    describe_local_size,
    evaluate,
    evaluation_markdown,
    load_tasks,
    ratio_stderr,
    resolve_tasks,
    rolling_stderrs,
)
from adapt_prune_tune.models import DecoderArch, decoder_from_arch

# Three small documents in the reStructuredText style of the project's held-out corpus:
# prose paragraphs, a heading, a literal block and a list that the tasks must skip.
DOCUMENTS = {
    "guide/files.rst.txt": """\
Reading and writing files
=========================

Programs keep their results in files so that the work survives the end of the process.
A file is opened with a mode that says whether it will be read, written or extended.
Text files decode their bytes with an encoding, which should always be named explicitly.
Binary files hand over the raw bytes and leave their interpretation to the program.

Closing a file releases the operating system resources that belong to it.
The simplest way to guarantee this is a with statement around the code that uses the file.
When the block ends, the file is closed even if an exception interrupted the work.

Example::

    with open("notes.txt", encoding="utf-8") as f:
        for line in f:
            print(line.rstrip())

Large files are best processed one line at a time instead of being read completely.
Iterating over the file object yields the lines lazily and keeps memory use small.
The newline at the end of every line is kept, so most loops strip it before use.
""",
    "guide/lists.rst.txt": """\
Working with lists
==================

A list holds a sequence of values in a fixed order and can grow or shrink at any time.
New items are appended at the end, which is cheap no matter how long the list already is.
Inserting at the front is slower because every existing element has to move by one place.

* append adds one element
* extend adds many elements

Sorting a list rearranges its elements in place and returns nothing at all.
The sorted function leaves the original alone and builds a new list instead.
Both accept a key function that computes the value each element is compared by.
Ties keep their original order, because the sorting algorithm is stable.

Slices copy a part of a list into a new list of the same type.
Assigning to a slice replaces that part and may change the length of the list.
A slice with a step selects every second or third element in one short expression.
""",
    "guide/environments.rst.txt": """\
Virtual environments
====================

Different projects often need different versions of the same third party package.
A virtual environment gives each project its own directory of installed packages.
Activating the environment puts its interpreter first on the search path of the shell.
Packages installed while it is active never touch the interpreter of the whole system.

An environment is cheap to create and can be thrown away when it is no longer useful.
The list of required packages is usually kept in a file that lives next to the code.
Recreating the environment from that file brings a new machine to the same state quickly.
Pinning exact versions in the file makes the result repeatable months later as well.
""",
}

MAX_SEQ_LEN = 64  # far shorter than the documents: rolling perplexity needs many windows
VOCAB_SIZE = 400
PAD, BOS, EOS = 0, 1, 2


class WrappedTokenizer:
    """The torchtune model-tokenizer API over a ``tokenizers.Tokenizer``, with BOS handling
    like ``HFModelTokenizer`` (``add_bos`` runs the post-processor, which adds nothing here,
    as for SmolLM2)."""

    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text, add_bos=True, add_eos=True):
        ids = self.tokenizer.encode(text, add_special_tokens=add_bos).ids
        return ids + [EOS] if add_eos else ids

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def heldout_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "eval.jsonl"
    rows = [{"text": text, "path": doc, "chunk": 0} for doc, text in DOCUMENTS.items()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def raw_tokenizer():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(DOCUMENTS.values(), trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer(raw_tokenizer):
    return WrappedTokenizer(raw_tokenizer)


def _arch(vocab_size):
    # Model context (RoPE tables) long enough for whole documents in one forward pass.
    return DecoderArch.uniform(
        vocab_size=vocab_size,
        embed_dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_dim=64,
        max_seq_len=2048,
    )


@pytest.fixture(scope="module")
def model(raw_tokenizer):
    torch.manual_seed(0)
    return decoder_from_arch(_arch(raw_tokenizer.get_vocab_size())).eval()


@pytest.fixture(scope="module")
def bigram_model(raw_tokenizer):
    """A model whose prediction depends on the current token only (attention outputs zeroed):
    any correct windowing gives exactly its full-sequence log-likelihood."""
    torch.manual_seed(1)
    model = decoder_from_arch(_arch(raw_tokenizer.get_vocab_size())).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.output_proj.weight.zero_()
    return model


def _token_logprobs(model, tokens):
    """log p(tokens[i] | tokens[:i]) for i >= 1, from one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0]
    return F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def _manual_loglikelihood(model, tokenizer, context, continuation, max_len=MAX_SEQ_LEN):
    """The score of lm-eval's causal models: encode whole, split at the context's tokens,
    keep the last max_len + 1 tokens."""
    whole = tokenizer.encode(context + continuation, add_bos=True, add_eos=False)
    n_context = len(tokenizer.encode(context, add_bos=True, add_eos=False))
    n_continuation = len(whole) - n_context
    return _token_logprobs(model, whole[-(max_len + 1) :])[-n_continuation:].sum().item()


def _requests(kind, arguments):
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def _words(text):
    return len(re.split(r"\s+", text))  # lm-eval's word count for word_perplexity


# ----- local task construction -----


def test_prose_paragraphs_skip_markup_code_and_lists():
    paragraphs = prose_paragraphs(
        DOCUMENTS["guide/files.rst.txt"] + "\n" + DOCUMENTS["guide/lists.rst.txt"]
    )
    assert len(paragraphs) == 6
    assert not any(
        "with open" in p or "append adds" in p or "===" in p or "Example" in p for p in paragraphs
    )
    assert paragraphs[0].startswith("Programs keep their results in files")


def test_next_sentence_examples_are_real_continuations(heldout_jsonl):
    rows = read_jsonl(heldout_jsonl)
    examples = next_sentence_examples(rows)
    assert len(examples) == 8  # one per prose paragraph
    assert examples == next_sentence_examples(rows)  # deterministic
    for example in examples:
        source = DOCUMENTS[example["path"]]
        answer = example["choices"][example["label"]]
        flat = " ".join(source.split())
        assert f"{example['context']} {answer}" in flat  # the true next sentence
        assert len(set(example["choices"])) == 4
        for i, distractor in enumerate(example["choices"]):
            if i != example["label"]:
                assert " ".join(distractor.split()) not in flat  # from another document
    assert len(next_sentence_examples(rows, max_examples=2)) == 2
    assert next_sentence_examples(rows, seed=1) != examples


def test_build_local_tasks_writes_deterministic_task_dir(heldout_jsonl, tmp_path):
    first = build_local_tasks(heldout_jsonl, tmp_path / "tasks")
    files = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    assert set(files) == {
        PERPLEXITY_FILE,
        NEXT_SENTENCE_FILE,
        f"{PERPLEXITY_TASK}.yaml",
        f"{NEXT_SENTENCE_TASK}.yaml",
    }
    assert len(read_jsonl(first / PERPLEXITY_FILE)) == len(DOCUMENTS)
    build_local_tasks(heldout_jsonl, first)
    assert files == {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}


# ----- the torchtune LM against direct computation -----


def test_loglikelihood_matches_direct_computation(model, tokenizer):
    long_context = DOCUMENTS["guide/lists.rst.txt"][
        :600
    ].rstrip()  # longer than max_seq_len: left-truncated
    pairs = [
        ("Programs keep their results", " in files"),
        ("A list holds", " a sequence of values in a fixed order"),
        (long_context, " The end."),
        ("Sorting a list", " rearranges"),
    ]
    lm = TorchtuneLM(model, tokenizer, batch_size=3, max_seq_len=MAX_SEQ_LEN)  # padded batches
    results = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (context, continuation), (logprob, _) in zip(pairs, results):
        assert logprob == pytest.approx(
            _manual_loglikelihood(model, tokenizer, context, continuation), abs=1e-4
        )

    # An empty context conditions on the prefix token (BOS here).
    ((empty, _),) = lm.loglikelihood(_requests("loglikelihood", [("", "Closing a file")]))
    tokens = [BOS] + tokenizer.encode("Closing a file", add_bos=False, add_eos=False)
    assert empty == pytest.approx(_token_logprobs(model, tokens).sum().item(), abs=1e-4)


def test_greedy_flag_is_true_only_for_the_argmax_continuation(model, tokenizer):
    lm = TorchtuneLM(model, tokenizer, max_seq_len=MAX_SEQ_LEN)
    context = tokenizer.encode("A file is opened with", add_bos=True, add_eos=False)
    with torch.no_grad():
        greedy = model(torch.tensor([context]))[0, -1].argmax().item()
    other = (greedy + 1) % VOCAB_SIZE
    (_, is_greedy), (_, not_greedy) = lm._loglikelihood_tokens(
        [(("", ""), context, [greedy]), (("", ""), context, [other])]
    )
    assert is_greedy and not not_greedy


def test_rolling_windows_predict_every_token_once(model, tokenizer):
    lm = TorchtuneLM(model, tokenizer, max_seq_len=8)
    tokens = list(range(10, 40))
    windows = lm.rolling_windows(tokens)
    assert windows[0][0] == [BOS]
    assert [t for _, continuation in windows for t in continuation] == tokens
    for context, continuation in windows:
        assert len(context) + len(continuation) <= 8 + 1
        assert len(context) >= 1


def test_rolling_loglikelihood_equals_full_sequence_for_context_free_model(bigram_model, tokenizer):
    texts = list(DOCUMENTS.values())
    lm = TorchtuneLM(bigram_model, tokenizer, batch_size=4, max_seq_len=MAX_SEQ_LEN)
    results = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    for text, logprob in zip(texts, results):
        tokens = tokenizer.encode(text, add_bos=False, add_eos=False)
        assert len(tokens) > 3 * MAX_SEQ_LEN
        expected = _token_logprobs(bigram_model, [BOS] + tokens).sum().item()
        assert logprob == pytest.approx(expected, rel=1e-5)


def test_generate_until_matches_unbatched_greedy_decoding(model, tokenizer):
    prompts = ["Programs keep", "A virtual environment gives each project its own", "Slices"]
    lm = TorchtuneLM(model, tokenizer, batch_size=3, max_seq_len=MAX_SEQ_LEN)  # left-padded batch
    outputs = lm.generate_until(
        _requests(
            "generate_until", [(p, {"until": ["\u2603"], "max_gen_toks": 6}) for p in prompts]
        )
    )

    def greedy(prompt):
        tokens = tokenizer.encode(prompt, add_bos=True, add_eos=False)
        new = []
        for _ in range(6):
            with torch.no_grad():
                token = model(torch.tensor([tokens + new]))[0, -1].argmax().item()
            if token == EOS:
                break
            new.append(token)
        return tokenizer.decode(new)

    expected = [greedy(p) for p in prompts]
    assert outputs == expected
    # A stop string cuts the text where it first occurs.
    text = expected[1]
    stop = text[len(text) // 2 :]
    if stop:
        (cut,) = lm.generate_until(
            _requests("generate_until", [(prompts[1], {"until": [stop], "max_gen_toks": 6})])
        )
        assert cut == text[: text.find(stop)]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(
            _requests("generate_until", [("x", {"do_sample": True, "temperature": 1.0})])
        )


# ----- whole lm-eval runs -----


def test_evaluate_local_tasks_agrees_with_the_model(
    bigram_model, tokenizer, heldout_jsonl, tmp_path
):
    task_dir = build_local_tasks(heldout_jsonl, tmp_path / "tasks")
    table = evaluate(
        bigram_model,
        "local",
        tokenizer=tokenizer,
        local_task_dir=task_dir,
        batch_size=4,
        max_seq_len=MAX_SEQ_LEN,
    )

    assert set(table) == {PERPLEXITY_TASK, NEXT_SENTENCE_TASK}
    for row in table.values():
        assert all(math.isfinite(v) for v in row.values())

    # Perplexities: exp of the total NLL, computed directly over each whole document.
    texts = [row["text"] for row in read_jsonl(task_dir / PERPLEXITY_FILE)]
    nll = sum(
        -_token_logprobs(bigram_model, [BOS] + tokenizer.encode(t, add_bos=False, add_eos=False))
        .sum()
        .item()
        for t in texts
    )
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    ppl = table[PERPLEXITY_TASK]
    assert ppl["word_perplexity"] == pytest.approx(
        math.exp(nll / sum(_words(t) for t in texts)), rel=1e-4
    )
    assert ppl["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-4)
    assert ppl["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)

    # Multiple choice: accuracies from choice log-likelihoods computed directly.
    examples = read_jsonl(task_dir / NEXT_SENTENCE_FILE)
    hits = hits_norm = 0
    for example in examples:
        scores = [
            _manual_loglikelihood(bigram_model, tokenizer, example["context"], " " + choice)
            for choice in example["choices"]
        ]
        normalized = [s / len(" " + c) for s, c in zip(scores, example["choices"])]
        hits += max(range(len(scores)), key=scores.__getitem__) == example["label"]
        hits_norm += max(range(len(scores)), key=normalized.__getitem__) == example["label"]
    choice = table[NEXT_SENTENCE_TASK]
    assert 0.0 <= choice["acc"] <= 1.0 and choice["acc_stderr"] > 0
    assert choice["acc"] == pytest.approx(hits / len(examples))
    assert choice["acc_norm"] == pytest.approx(hits_norm / len(examples))


def test_hf_export_scores_like_the_model_in_memory(
    raw_tokenizer, tokenizer, heldout_jsonl, tmp_path
):
    from torchtune.models.convert_weights import hf_to_tune
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = raw_tokenizer.get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    torch.manual_seed(2)
    hf_model = LlamaForCausalLM(config)
    with torch.no_grad():  # weights large enough that attention patterns (and RoPE) matter
        for parameter in hf_model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(std=0.3)
    export = tmp_path / "export"
    hf_model.save_pretrained(export)
    PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(export)

    model = decoder_from_arch(_arch(vocab))
    model.load_state_dict(hf_to_tune(hf_model.state_dict(), num_heads=4, num_kv_heads=2, dim=32))
    task_dir = build_local_tasks(heldout_jsonl, tmp_path / "tasks")
    kwargs = dict(local_task_dir=task_dir, batch_size=4, max_seq_len=MAX_SEQ_LEN, device="cpu")
    from_export = evaluate(export, "local", **kwargs)
    in_memory = evaluate(model, "local", tokenizer=tokenizer, **kwargs)

    assert from_export.keys() == in_memory.keys()
    for task, row in in_memory.items():
        for metric, value in row.items():
            assert from_export[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)


def test_per_task_shots_are_applied(heldout_jsonl, tmp_path):
    from lm_eval.tasks import TaskManager

    task_dir = build_local_tasks(heldout_jsonl, tmp_path / "tasks")
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    objects, leaves = load_tasks(
        [TaskSpec(NEXT_SENTENCE_TASK, ("acc",), 2), TaskSpec(PERPLEXITY_TASK)], manager
    )
    assert leaves == {NEXT_SENTENCE_TASK: [NEXT_SENTENCE_TASK], PERPLEXITY_TASK: [PERPLEXITY_TASK]}
    assert objects[0].get_config("num_fewshot") == 2
    assert objects[1].get_config("num_fewshot") is None  # the task's own setting is kept
    with pytest.raises(ValueError, match="no task"):
        load_tasks([TaskSpec("no_such_task_anywhere")], manager)


# ----- presets -----


def test_resolve_tasks_expands_presets_and_names():
    assert resolve_tasks("local") == list(LOCAL_TASKS)
    specs = resolve_tasks(["local", "lambada_openai", TaskSpec("piqa", ("acc",))])
    assert [s.task for s in specs] == [
        PERPLEXITY_TASK,
        NEXT_SENTENCE_TASK,
        "lambada_openai",
        "piqa",
    ]
    assert specs[2] == TaskSpec("lambada_openai")
    with pytest.raises(ValueError):
        resolve_tasks([])


def test_paper_preset_is_the_paper_protocol():
    protocol = {spec.task: (spec.metrics, spec.num_fewshot) for spec in resolve_tasks("paper")}
    assert protocol == {
        "arc_easy": (("acc_norm",), 0),
        "arc_challenge": (("acc_norm",), 0),
        "boolq": (("acc",), 0),
        "hellaswag": (("acc_norm",), 0),
        "openbookqa": (("acc_norm",), 0),
        "piqa": (("acc_norm",), 0),
        "social_iqa": (("acc",), 0),
        "winogrande": (("acc",), 0),
        "wikitext": (("word_perplexity",), 0),
        "bbh_fewshot": (("exact_match",), 3),
        "truthfulqa_mc2": (("acc",), 0),
        "agieval_nous": (("acc_norm",), 0),
        "mmlu": (("acc",), 5),
    }


@pytest.fixture
def offline(monkeypatch):
    """No Hub access, as on machines without network (and fast: no retries)."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_paper_tasks_exist_in_lm_eval(offline):
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    assert [spec.task for spec in PAPER_TASKS if spec.task not in manager.all_tasks] == []
    # A group fails on its first subtask's dataset, and the message names the group.
    with pytest.raises(BenchmarkDataUnavailable, match="'mmlu'"):
        load_tasks([TaskSpec("mmlu")], manager)


def test_paper_preset_without_network_points_to_the_local_preset(offline, model, tokenizer):
    with pytest.raises(BenchmarkDataUnavailable, match="'arc_easy'") as error:
        evaluate(model, "paper", tokenizer=tokenizer)
    assert "need network access" in str(error.value)
    assert "tasks='local'" in str(error.value)


def test_evaluation_markdown_places_models_side_by_side():
    text = evaluation_markdown(
        {
            "original": {
                "piqa": {"acc_norm": 0.6, "acc_norm_stderr": 0.01},
                "wikitext": {"word_perplexity": 14.54},
            },
            "pruned": {"piqa": {"acc_norm": 0.55, "acc_norm_stderr": 0.012}},
        }
    )
    lines = text.strip().split("\n")
    assert lines[0] == "| task | metric | original | pruned |"
    assert "| piqa | acc_norm | 0.6000 ± 0.0100 | 0.5500 ± 0.0120 |" in lines
    assert "| wikitext | word_perplexity | 14.54 | – |" in lines


# ----- the real model on the real held-out corpus -----


@pytest.mark.integration
def test_smollm2_scores_alike_in_memory_and_as_hf_directory(smollm2_dir, python_docs_dir, tmp_path):
    from adapt_prune_tune.models import load_hf_model
    from adapt_prune_tune.tokenizer import hf_tokenizer

    # The real held-out documents, cut to their first 1,200 characters so that one document
    # (a few 128-token windows) and one four-way question take seconds on two CPU cores.
    heldout = tmp_path / "eval.jsonl"
    rows = read_jsonl(python_docs_dir / "eval.jsonl")
    heldout.write_text(
        "".join(json.dumps({**row, "text": row["text"][:1200]}) + "\n" for row in rows)
    )
    task_dir = build_local_tasks(heldout, tmp_path / "tasks")
    specs = [
        TaskSpec(PERPLEXITY_TASK, ("byte_perplexity",)),
        TaskSpec(NEXT_SENTENCE_TASK, ("acc",)),
    ]
    kwargs = dict(local_task_dir=task_dir, batch_size=4, max_seq_len=128, limit=1, device="cpu")
    model, _ = load_hf_model(smollm2_dir, max_seq_len=128)
    in_memory = evaluate(model, specs, tokenizer=hf_tokenizer(str(smollm2_dir)), **kwargs)
    from_dir = evaluate(smollm2_dir, specs, dtype=torch.float32, **kwargs)

    # A trained model reads English prose at well under 2.5 per byte; random weights are far worse.
    assert 1.2 < in_memory[PERPLEXITY_TASK]["byte_perplexity"] < 2.5
    for task, row in in_memory.items():
        for metric, value in row.items():
            assert from_dir[task][metric] == pytest.approx(value, rel=1e-3), (task, metric)


# ----- a default size a person waits for, with standard errors -----


def test_ratio_stderr_by_hand():
    # Two documents: nll 10 over 5 words and 30 over 5 words: R = 40 / 10 = 4;
    # residuals 10 - 20 = -10 and 30 - 20 = 10; variance = 200 / (2 · 1 · 25) = 4.
    ratio, stderr = ratio_stderr([(-10.0, 5), (-30.0, 5)])
    assert ratio == pytest.approx(4.0) and stderr == pytest.approx(2.0)
    # Documents proportional to each other carry no spread.
    assert ratio_stderr([(-2.0, 1), (-6.0, 3)])[1] == pytest.approx(0.0)
    assert math.isnan(ratio_stderr([(-2.0, 1)])[1])
    stderrs = rolling_stderrs(
        [{"word_perplexity": (-10.0, 5), "byte_perplexity": [-10.0, 20], "bits_per_byte": [-10.0, 20]},
         {"word_perplexity": (-30.0, 5), "byte_perplexity": [-30.0, 20], "bits_per_byte": [-30.0, 20]}]
    )
    assert stderrs["word_perplexity_stderr"] == pytest.approx(math.exp(4.0) * 2.0)
    assert stderrs["bits_per_byte_stderr"] == pytest.approx(0.5 / math.log(2))


def test_local_sizes_quick_is_a_fixed_subset_of_the_full_split(heldout_jsonl, tmp_path):
    assert LOCAL_SIZES["quick"].documents < 363 and LOCAL_SIZES["full"].documents is None
    rows = list(range(100))
    subset = sample_rows(rows, 10)
    assert subset == sample_rows(rows, 10) == sorted(subset) and len(set(subset)) == 10
    assert sample_rows(rows, None) == rows == sample_rows(rows, 500)
    task_dir = build_local_tasks(heldout_jsonl, tmp_path / "tasks", max_documents=2, max_next_sentence_examples=3)
    assert len(read_jsonl(task_dir / PERPLEXITY_FILE)) == 2
    assert len(read_jsonl(task_dir / NEXT_SENTENCE_FILE)) == 3
    words = describe_local_size(LOCAL_SIZES["quick"], 363)
    assert words[PERPLEXITY_TASK].startswith("40 of 363 held-out chunks")


def test_evaluate_a_subset_reports_perplexity_with_its_standard_error(bigram_model, tokenizer, heldout_jsonl):
    size = LocalTaskSize(documents=2, examples=3)
    table = evaluate(
        bigram_model, [TaskSpec(PERPLEXITY_TASK, ("word_perplexity",))], tokenizer=tokenizer,
        heldout_jsonl=heldout_jsonl, batch_size=4, max_seq_len=MAX_SEQ_LEN, local_size=size,
    )
    texts = [row["text"] for row in sample_rows(read_jsonl(heldout_jsonl), 2)]
    pairs = [
        (_token_logprobs(bigram_model, [BOS] + tokenizer.encode(t, add_bos=False, add_eos=False)).sum().item(),
         _words(t))
        for t in texts
    ]
    ratio, stderr = ratio_stderr(pairs)
    row = table[PERPLEXITY_TASK]
    assert row["word_perplexity"] == pytest.approx(math.exp(ratio), rel=1e-4)
    assert row["word_perplexity_stderr"] == pytest.approx(math.exp(ratio) * stderr, rel=1e-3)
    with pytest.raises(ValueError, match="local_size"):
        evaluate(bigram_model, "local", tokenizer=tokenizer, local_size="huge")


def test_cli_eval_defaults_to_the_quick_size_and_saves_for_the_card(monkeypatch, tmp_path, capsys):
    from adapt_prune_tune import evaluation
    from adapt_prune_tune.cli import main

    calls = []

    def fake_evaluate(model, tasks, **kwargs):
        calls.append(kwargs)
        return {PERPLEXITY_TASK: {"word_perplexity": 20.0, "word_perplexity_stderr": 1.5}}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    export = tmp_path / "export"
    export.mkdir()
    (export / "adapt_prune.json").write_text("{}")
    main(["eval", str(export)])
    assert calls[-1]["local_size"] == "quick"
    assert "20.00 ± 1.50" in capsys.readouterr().out
    saved = json.loads((export / "eval_results.json").read_text())
    assert saved["results"][PERPLEXITY_TASK]["word_perplexity"] == 20.0
    assert saved["sizes"][PERPLEXITY_TASK].startswith("quick: 40")
    main(["eval", str(export), "--full", "--no-save"])
    assert calls[-1]["local_size"] == "full"
    main(["eval", str(tmp_path), "--tasks", "piqa"])  # not an export: nothing saved
    assert not (tmp_path / "eval_results.json").exists()


def test_a_run_directory_is_refused_with_the_export_command(tmp_path):
    from adapt_prune_tune.evaluation import evaluate

    (tmp_path / "run_record.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"adapt-prune-tune export .* OUT`, then evaluate OUT"):
        evaluate(tmp_path, "local")
