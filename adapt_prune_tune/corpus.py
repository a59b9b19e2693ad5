"""Real English text, offline: the Python 3.11 documentation sources from Debian.

Debian's ``python3.11-doc`` package ships the reStructuredText sources of the Python docs
(``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``, ~500 documents, ~11 MB). It is
fetched with ``apt-get download`` and unpacked with ``dpkg -x``, so nothing is installed and no
network beyond the Debian mirror is needed.

Documents are split, whole, into disjoint sets:

* ``eval`` (held out): all of ``tutorial/`` (the benchmarks' held-out perplexity text) and
  ~10% of the other documents;
* ``calibration``: ~5% of the other documents, for pruning importance estimates;
* ``train``: the rest (~85%);
* ``faq/`` goes only into ``faq_chat.jsonl``, question/answer conversations for instruction
  tuning. It is kept out of ``train`` too, so that every document is in exactly one split and
  any split can be held out against all others.

Membership is decided by a hash of the document's path, so it is the same on every machine
and does not move when documents are added to or removed from a later Debian revision.
"""

import hashlib
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from adapt_prune_tune.assets import build_atomically, cache_root
from adapt_prune_tune.debian import deb_fields, download_deb, unpack_deb
from adapt_prune_tune.tokenizer import HFModelTokenizer, hf_tokenizer

DEB_PACKAGE = "python3.11-doc"
SOURCES_SUBDIR = Path("usr/share/doc/python3.11/html/_sources")
SOURCE_SUFFIX = ".rst.txt"

HELDOUT_PREFIX = "tutorial/"
FAQ_PREFIX = "faq/"
CALIBRATION_FRACTION = 0.05
EVAL_FRACTION = 0.10
TEXT_SPLITS = ("calibration", "train", "eval")
FAQ_CHAT_FILE = "faq_chat.jsonl"
MANIFEST_FILE = "manifest.json"

# ~1,000 tokens of reStructuredText: long enough for useful context, short enough that a
# document yields several samples and sample counts mean something.
CHUNK_CHARS = 4000

_ADORNMENT = re.compile(r"([=\-~^*+#\"'`:.])\1{2,}")


def python_docs_dir(cache_dir: Optional[Path] = None) -> Path:
    """Where :func:`prepare_python_docs` puts the corpus."""
    return cache_root(cache_dir) / "data" / "python-docs"


def split_file(split: str) -> str:
    """File name of a text split, e.g. ``train.jsonl``."""
    return f"{split}.jsonl"


# --------------------------------------------------------------------------------------------
# Getting the sources
# --------------------------------------------------------------------------------------------


def download_python_docs_deb(directory: Path) -> Path:
    """``apt-get download python3.11-doc`` into ``directory`` (see
    :func:`adapt_prune_tune.debian.download_deb`).

    Raises:
        RuntimeError: without apt, or if the package cannot be downloaded.
    """
    return download_deb(DEB_PACKAGE, directory)


def unpack_python_docs(deb: Path, directory: Path) -> Path:
    """Unpack the package with ``dpkg -x`` (no installation) and return the sources root.

    Raises:
        ValueError: if ``deb`` is not the python3.11-doc package.
    """
    unpack_deb(deb, directory, DEB_PACKAGE)
    return directory / SOURCES_SUBDIR


def read_sources(root: Path) -> Dict[str, str]:
    """Every ``*.rst.txt`` under ``root``, keyed by POSIX path relative to it, sorted."""
    return {
        path.relative_to(root).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(root.rglob(f"*{SOURCE_SUFFIX}"))
    }


# --------------------------------------------------------------------------------------------
# Splitting and chunking
# --------------------------------------------------------------------------------------------


def _unit_hash(text: str) -> float:
    """A uniform number in [0, 1) determined by ``text`` alone."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(relative_path: str) -> str:
    """The split a document belongs to: ``calibration``, ``train``, ``eval`` or ``faq``."""
    if relative_path.startswith(HELDOUT_PREFIX):
        return "eval"
    if relative_path.startswith(FAQ_PREFIX):
        return "faq"
    u = _unit_hash(relative_path)
    if u < CALIBRATION_FRACTION:
        return "calibration"
    if u < CALIBRATION_FRACTION + EVAL_FRACTION:
        return "eval"
    return "train"


def chunk_document(text: str, max_chars: int = CHUNK_CHARS) -> List[str]:
    """Cut a document at paragraph boundaries into chunks of at most ``max_chars``.

    A paragraph longer than ``max_chars`` (a long table or code block) stays whole rather
    than being cut mid-structure. Joining the chunks with ``"\\n\\n"`` gives back ``text``.
    """
    chunks: List[str] = []
    current: List[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if current and size + 2 + len(paragraph) > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        size += len(paragraph) + (2 if current else 0)
        current.append(paragraph)
    chunks.append("\n\n".join(current))
    return chunks


# --------------------------------------------------------------------------------------------
# FAQ as conversations
# --------------------------------------------------------------------------------------------


def _is_heading(lines: List[str], i: int) -> bool:
    """Whether ``lines[i]`` is a section title: text underlined by a punctuation run at
    least as long."""
    title = lines[i].rstrip()
    if not title or title[0].isspace() or _ADORNMENT.fullmatch(title):
        return False
    underline = lines[i + 1].rstrip() if i + 1 < len(lines) else ""
    return bool(_ADORNMENT.fullmatch(underline)) and len(underline) >= len(title)


def _sections(text: str) -> Iterator[Tuple[str, str]]:
    """(title, body) of every section of an RST document; a body ends where the next
    section's title (or its overline) begins."""
    lines = text.splitlines()
    starts = [i for i in range(len(lines)) if _is_heading(lines, i)]
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        if k + 1 < len(starts) and end > 0 and _ADORNMENT.fullmatch(lines[end - 1].rstrip()):
            end -= 1
        yield lines[start].strip(), "\n".join(lines[start + 2 : end])


def _strip_trailing_markup(body: str) -> str:
    """Drop the label (``.. _name:``) and ``.. index::`` blocks at the end of a section body:
    they introduce the *next* section."""
    paragraphs = body.strip().split("\n\n")
    while paragraphs and paragraphs[-1].lstrip().startswith((".. _", ".. index::")):
        paragraphs.pop()
    return "\n\n".join(paragraphs).strip()


def faq_pairs(text: str) -> List[Tuple[str, str]]:
    """(question, answer) pairs of an FAQ document: sections whose title is a question."""
    pairs = []
    for title, body in _sections(text):
        answer = _strip_trailing_markup(body)
        if title.endswith("?") and answer:
            pairs.append((title, answer))
    return pairs


def faq_conversation(question: str, answer: str) -> Dict[str, List[Dict[str, str]]]:
    """One FAQ entry as an OpenAI-style conversation, which torchtune's ``chat_dataset``
    reads with ``conversation_style="openai"``."""
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


# --------------------------------------------------------------------------------------------
# Writing the corpus
# --------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: List[Dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _count_tokens(tokenizer: Optional[HFModelTokenizer], texts: List[str]) -> Optional[int]:
    """Content tokens (no BOS/EOS) of ``texts``, or None without a tokenizer."""
    if tokenizer is None:
        return None
    return sum(len(tokenizer.encode(t, add_bos=False, add_eos=False)) for t in texts)


def _write_corpus(
    out_dir: Path, sources: Dict[str, str], deb_info: Dict[str, str], tokenizer_path: Optional[Path]
) -> Dict:
    """Write the split JSONL files and ``manifest.json``; return the manifest."""
    tokenizer = hf_tokenizer(str(tokenizer_path)) if tokenizer_path else None
    documents: Dict[str, List[str]] = defaultdict(list)
    for path in sources:
        documents[split_of(path)].append(path)

    manifest: Dict = {
        "source": {**deb_info, "sources_dir": SOURCES_SUBDIR.as_posix()},
        "split_rule": {
            "heldout_prefix": HELDOUT_PREFIX,
            "faq_prefix": FAQ_PREFIX,
            "calibration_fraction": CALIBRATION_FRACTION,
            "eval_fraction": EVAL_FRACTION,
            "chunk_chars": CHUNK_CHARS,
        },
        "tokenizer": str(tokenizer_path) if tokenizer_path else None,
        "splits": {},
    }
    for split in TEXT_SPLITS:
        rows = [
            {"text": chunk, "path": path, "chunk": i}
            for path in documents[split]
            for i, chunk in enumerate(chunk_document(sources[path]))
        ]
        _write_jsonl(out_dir / split_file(split), rows)
        texts = [sources[path] for path in documents[split]]
        manifest["splits"][split] = {
            "file": split_file(split),
            "documents": len(texts),
            "samples": len(rows),
            "chars": sum(len(t) for t in texts),
            "tokens": _count_tokens(tokenizer, texts),
        }

    conversations = [
        faq_conversation(question, answer)
        for path in documents["faq"]
        for question, answer in faq_pairs(sources[path])
    ]
    _write_jsonl(out_dir / FAQ_CHAT_FILE, conversations)
    turns = [m["content"] for c in conversations for m in c["messages"]]
    manifest["splits"]["faq_chat"] = {
        "file": FAQ_CHAT_FILE,
        "documents": len(documents["faq"]),
        "samples": len(conversations),
        "chars": sum(len(t) for t in turns),
        "tokens": _count_tokens(tokenizer, turns),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _print_summary(manifest: Dict) -> None:
    for name, split in manifest["splits"].items():
        tokens = "" if split["tokens"] is None else f", {split['tokens']:,} tokens"
        print(
            f"  {name:12s} {split['documents']:4d} documents, {split['samples']:5d} samples, "
            f"{split['chars']:,} chars{tokens}"
        )


def _build_python_docs(out_dir: Path, deb: Optional[Path], tokenizer_path: Optional[Path]) -> None:
    with tempfile.TemporaryDirectory(prefix="python-docs-") as tmp:
        tmp_dir = Path(tmp)
        deb = deb or download_python_docs_deb(tmp_dir)
        sources = read_sources(unpack_python_docs(deb, tmp_dir / "unpacked"))
        manifest = _write_corpus(out_dir, sources, deb_fields(deb), tokenizer_path)
    _print_summary(manifest)


def _manifest_tokenizer(directory: Path) -> Optional[str]:
    manifest = directory / MANIFEST_FILE
    return json.loads(manifest.read_text())["tokenizer"] if manifest.is_file() else None


def prepare_python_docs(
    cache_dir: Optional[Path] = None,
    force: bool = False,
    deb: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
) -> Path:
    """Prepare the Python-docs corpus in ``<cache>/data/python-docs``, once.

    Writes ``calibration.jsonl``, ``train.jsonl``, ``eval.jsonl`` (``{"text", "path",
    "chunk"}`` per line, for torchtune's ``text_completion_dataset(source="json",
    data_files=..., column="text")``), ``faq_chat.jsonl`` (``{"messages": [...]}``, for
    ``chat_dataset(source="json", conversation_column="messages",
    conversation_style="openai")``) and ``manifest.json`` (files, document, sample, character
    and token counts), and prints the counts.

    Args:
        cache_dir (Optional[Path]): cache root; default
            :data:`adapt_prune_tune.assets.DEFAULT_CACHE_DIR`.
        force (bool): rebuild even if the corpus is cached. Default False.
        deb (Optional[Path]): an already downloaded ``python3.11-doc_*.deb``, for machines
            without access to a Debian mirror.
        tokenizer_path (Optional[Path]): a checkpoint directory whose tokenizer counts the
            tokens of each split. A cached corpus counted with another tokenizer (or none)
            is rebuilt.

    Returns:
        Path: the corpus directory.
    """
    target = python_docs_dir(cache_dir)
    tokenizer = str(tokenizer_path) if tokenizer_path else None
    stale_counts = tokenizer is not None and _manifest_tokenizer(target) != tokenizer
    return build_atomically(
        target,
        lambda out_dir: _build_python_docs(
            out_dir, Path(deb) if deb else None, Path(tokenizer_path) if tokenizer_path else None
        ),
        force=force or stale_counts,
        description="Python 3.11 docs corpus",
    )


def _read_jsonl(path: Path) -> Iterator[Dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def heldout_text(
    cache_dir: Optional[Path] = None, prefix: str = HELDOUT_PREFIX, data_dir: Optional[Path] = None
) -> str:
    """The held-out documents under ``prefix`` (default: the tutorial), whole and in sorted
    path order, joined by blank lines: a fixed text for perplexity benchmarks.

    ``data_dir`` names the corpus directory directly (as configs do); otherwise it is
    :func:`python_docs_dir` of ``cache_dir``.

    Raises:
        FileNotFoundError: if the corpus has not been prepared.
        ValueError: if no held-out document starts with ``prefix``.
    """
    eval_file = (Path(data_dir) if data_dir else python_docs_dir(cache_dir)) / split_file("eval")
    if not eval_file.is_file():
        raise FileNotFoundError(
            f"{eval_file} not found; prepare the corpus first with "
            "adapt_prune_tune.corpus.prepare_python_docs()"
        )
    chunks: Dict[str, List[Tuple[int, str]]] = defaultdict(list)
    for row in _read_jsonl(eval_file):
        if row["path"].startswith(prefix):
            chunks[row["path"]].append((row["chunk"], row["text"]))
    if not chunks:
        raise ValueError(f"No held-out (eval) document path starts with {prefix!r}")
    documents = ["\n\n".join(text for _, text in sorted(chunks[path])) for path in sorted(chunks)]
    return "\n\n".join(documents)
