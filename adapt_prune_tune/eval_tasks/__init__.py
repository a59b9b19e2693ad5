"""lm-eval tasks built from held-out text on disk, so evaluation runs offline on real data.

The paper's benchmarks need the Hugging Face Hub. These two tasks need only a held-out JSONL
corpus (``{"text": ..., "path": ...}`` a line, e.g. the Python-docs ``eval.jsonl`` of
:mod:`adapt_prune_tune.corpus`) and exercise lm-eval's two scoring paths:

* ``heldout_perplexity``: ``loglikelihood_rolling`` over each held-out text; word and byte
  perplexity and bits per byte, as lm-eval reports WikiText;
* ``heldout_next_sentence``: multiple choice, "which sentence continues this paragraph?",
  the real next sentence against sentences of similar length from other documents; acc and
  acc_norm, as lm-eval reports HellaSwag-style tasks.

:func:`build_local_tasks` writes their data files and YAML configs into one directory for
``TaskManager(include_path=...)``; everything is deterministic, so a held-out file always gives
the same tasks.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

PERPLEXITY_TASK = "heldout_perplexity"
NEXT_SENTENCE_TASK = "heldout_next_sentence"
PERPLEXITY_FILE = "heldout_text.jsonl"
NEXT_SENTENCE_FILE = "next_sentence.jsonl"

# A sentence ends at ., ! or ? after a lowercase letter, digit or closing bracket and is
# followed by a capitalized word; this keeps "e.g. Foo" and "3.11" mostly intact.
_SENTENCE_BREAK = re.compile(r"(?<=[a-z0-9)\]`][.!?])\s+(?=[A-Z])")
# Section adornments of reStructuredText headings (=====, -----, ~~~~~ ...).
_ADORNMENT = re.compile(r"([=\-~^*+#\"'`:.])\1{2,}")
# Block starts that are markup, lists or code rather than running prose.
_NON_PROSE_START = re.compile(r"(\.\.|[*\-+#|>:=]|\d+[.)]\s|[a-z]\)\s)")
# Directives whose body is code even though no "::" paragraph introduces it.
_CODE_DIRECTIVE = re.compile(
    r"\.\.\s+(code-block|code|sourcecode|doctest|testcode|testoutput|productionlist)::"
)
MIN_SENTENCE_CHARS = 40
MAX_SENTENCE_CHARS = 300


def read_jsonl(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """All rows of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows as JSONL (UTF-8, one object a line)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def prose_paragraphs(text: str) -> List[str]:
    """Paragraphs of running prose in reStructuredText, each joined onto one line.

    Literal blocks (everything indented under a paragraph ending in ``::`` or under a code
    directive), headings, directives, lists, tables and blocks of mixed indentation are
    skipped: the "next sentence" of code or markup is not something a reader infers from
    context. Prose indented under a directive (a function's description) is kept.
    """
    paragraphs = []
    literal_indent: Optional[int] = None  # indentation of the line that opened a literal region
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line.rstrip() for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        indent = min(_indent(line) for line in lines)
        if literal_indent is not None:
            if indent > literal_indent:
                continue
            literal_indent = None
        stripped = [line.strip() for line in lines]
        if stripped[-1].endswith("::") or _CODE_DIRECTIVE.match(stripped[0]):
            literal_indent = indent
            continue
        if any(_indent(line) != indent for line in lines):
            continue
        if _NON_PROSE_START.match(stripped[0]) or any(
            _ADORNMENT.fullmatch(line) for line in stripped
        ):
            continue
        paragraphs.append(" ".join(stripped))
    return paragraphs


def split_sentences(paragraph: str) -> List[str]:
    """Sentences of a prose paragraph (heuristic, see ``_SENTENCE_BREAK``)."""
    return [s.strip() for s in _SENTENCE_BREAK.split(paragraph) if s.strip()]


def is_candidate_sentence(sentence: str) -> bool:
    """Whether a sentence can be an answer or a distractor: complete and of moderate length,
    so that choices differ in content rather than in being fragments."""
    return MIN_SENTENCE_CHARS <= len(sentence) <= MAX_SENTENCE_CHARS and sentence[-1] in ".!?"


def _stable_rng(*key: Any) -> random.Random:
    """A generator seeded from ``key`` alone, so each example is the same on every machine
    and does not change when other documents are added or removed."""
    digest = hashlib.sha256(repr(key).encode("utf-8")).hexdigest()
    return random.Random(int(digest[:16], 16))


def next_sentence_examples(
    rows: Sequence[Mapping[str, Any]],
    num_choices: int = 4,
    max_examples: Optional[int] = 1000,
    seed: int = 0,
) -> List[Dict[str, Any]]:
    """Multiple-choice examples "which sentence comes next?" from real documents.

    For every prose paragraph with a candidate sentence after its first, the context is the
    paragraph up to the last such sentence and the answer is that sentence. Distractors are
    candidate sentences from *other* documents with lengths closest to the answer's, so that
    neither summed nor length-normalized log-likelihood can win on length alone.

    Args:
        rows: held-out rows with ``text`` and ``path`` (the document; distractors never come
            from the answer's own document). Rows without ``path`` count as one document each.
        num_choices: choices per example, the answer included. Default 4.
        max_examples: keep a deterministic subset of at most this many examples; None keeps
            all. Default 1000.
        seed: varies distractors, shuffling and subset. Default 0.

    Returns:
        List[Dict[str, Any]]: ``{"context", "choices", "label", "path"}`` per example.
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be at least 2, got {num_choices}")
    answers: List[Tuple[str, str, str]] = []  # (document, context, answer)
    pool: List[Tuple[int, str, str]] = []  # (length, sentence, document)
    for index, row in enumerate(rows):
        document = str(row.get("path", f"row-{index}"))
        for paragraph in prose_paragraphs(row["text"]):
            sentences = split_sentences(paragraph)
            candidates = [i for i, s in enumerate(sentences) if is_candidate_sentence(s)]
            pool.extend((len(sentences[i]), sentences[i], document) for i in candidates)
            last = max((i for i in candidates if i > 0), default=None)
            if last is not None:
                answers.append((document, " ".join(sentences[:last]), sentences[last]))

    examples = []
    for document, context, answer in answers:
        rng = _stable_rng(seed, document, context, answer)
        others = [(abs(n - len(answer)), s) for n, s, d in pool if d != document and s != answer]
        # Distinct sentences by distance in length, ties by text: the same on every machine.
        nearest = sorted({s: k for k, s in others}.items(), key=lambda item: (item[1], item[0]))
        nearest = [s for s, _ in nearest[: 8 * num_choices]]
        if len(nearest) < num_choices - 1:
            continue
        choices = rng.sample(nearest, num_choices - 1) + [answer]
        rng.shuffle(choices)
        examples.append(
            {
                "context": context,
                "choices": choices,
                "label": choices.index(answer),
                "path": document,
            }
        )
    if max_examples is not None and len(examples) > max_examples:
        keep = sorted(_stable_rng(seed, "subset").sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in keep]
    return examples


def _dataset_kwargs(data_file: Path, out_dir: Path) -> Dict[str, Any]:
    # The HF datasets cache goes next to the task files, so building tasks in a temporary
    # directory leaves nothing behind in ~/.cache/huggingface.
    return {"data_files": {"test": str(data_file)}, "cache_dir": str(out_dir / "hf_datasets_cache")}


def local_task_configs(out_dir: Path) -> Dict[str, Dict[str, Any]]:
    """lm-eval YAML configs of the local tasks whose data files are in ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    return {
        PERPLEXITY_TASK: {
            "task": PERPLEXITY_TASK,
            "dataset_path": "json",
            "dataset_kwargs": _dataset_kwargs(out_dir / PERPLEXITY_FILE, out_dir),
            "test_split": "test",
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            # A column name, not a template: the text is scored exactly as stored.
            "doc_to_target": "text",
            "metric_list": [
                {
                    "metric": "word_perplexity",
                    "aggregation": "weighted_perplexity",
                    "higher_is_better": False,
                },
                {
                    "metric": "byte_perplexity",
                    "aggregation": "weighted_perplexity",
                    "higher_is_better": False,
                },
                {
                    "metric": "bits_per_byte",
                    "aggregation": "bits_per_byte",
                    "higher_is_better": False,
                },
            ],
            "metadata": {"version": 1.0},
        },
        NEXT_SENTENCE_TASK: {
            "task": NEXT_SENTENCE_TASK,
            "dataset_path": "json",
            "dataset_kwargs": _dataset_kwargs(out_dir / NEXT_SENTENCE_FILE, out_dir),
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "context",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "target_delimiter": " ",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": 1.0},
        },
    }


def sample_rows(rows: Sequence[Any], count: Optional[int], seed: int = 0) -> List[Any]:
    """A deterministic random subset of ``count`` rows in their original order (all rows when
    ``count`` is None or not smaller): the same on every machine, so results of a subset are
    comparable between models, and random, so its mean estimates the whole split's."""
    if count is None or count >= len(rows):
        return list(rows)
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    keep = sorted(_stable_rng(seed, "rows", len(rows)).sample(range(len(rows)), count))
    return [rows[i] for i in keep]


def build_local_tasks(
    heldout_jsonl: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    max_documents: Optional[int] = None,
    max_next_sentence_examples: Optional[int] = 1000,
    seed: int = 0,
) -> Path:
    """Write the local lm-eval tasks (data files and YAMLs) built from held-out text.

    The result is a directory for ``TaskManager(include_path=...)``. Building is
    deterministic: the same held-out file and ``out_dir`` give byte-identical task files.

    Args:
        heldout_jsonl: JSONL with a ``text`` field per row (and ``path``, the document it
            comes from), e.g. ``<cache>/data/python-docs/eval.jsonl``.
        out_dir: where to write the task directory (created if needed).
        max_documents: score only a deterministic random subset of this many held-out rows
            (:func:`sample_rows`) in the perplexity task; None scores all. Default None.
        max_next_sentence_examples: cap on the multiple-choice examples. Default 1000.
        seed: seed of the multiple-choice construction and of the subset. Default 0.

    Returns:
        Path: ``out_dir``.
    """
    rows = read_jsonl(heldout_jsonl)
    texts = [
        {"text": row["text"], "path": row.get("path", "")} for row in rows if row["text"].strip()
    ]
    if not texts:
        raise ValueError(f"{heldout_jsonl} holds no text")
    texts = sample_rows(texts, max_documents, seed)
    examples = next_sentence_examples(rows, max_examples=max_next_sentence_examples, seed=seed)
    if not examples:
        raise ValueError(
            f"{heldout_jsonl} holds no prose paragraphs to build next-sentence examples from"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / PERPLEXITY_FILE, texts)
    write_jsonl(out_dir / NEXT_SENTENCE_FILE, examples)
    for name, config in local_task_configs(out_dir).items():
        (out_dir / f"{name}.yaml").write_text(
            yaml.safe_dump(config, sort_keys=False), encoding="utf-8"
        )
    return out_dir


def default_heldout_jsonl() -> Path:
    """The project's held-out split (see :func:`adapt_prune_tune.corpus.prepare_python_docs`)."""
    from adapt_prune_tune.corpus import python_docs_dir, split_file

    return python_docs_dir() / split_file("eval")
