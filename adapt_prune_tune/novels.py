"""A second held-out text, ordinary English prose: Jane Austen's six novels, from Debian.

Pruning quality measured only on the Python docs (:mod:`adapt_prune_tune.corpus`) says how
well a model keeps the domain it is recovered on. Narrative prose tells how much of the general
language it loses and gets back. The whole text is held out: it is never used for training or
calibration, so its perplexity measures what recovery on the Python docs transfers.

Debian's ``r-cran-janeaustenr`` (version 1.0.0-1, bookworm) carries the six novels as R
character vectors, one string per hard-wrapped line, with the Project Gutenberg header and
licence already removed (the novels are in the public domain; the package is MIT-licensed). It
is fetched and unpacked without installing anything (:mod:`adapt_prune_tune.debian`) and read
without R (:mod:`adapt_prune_tune.rdata`). The version is pinned: the chapter rule below is
checked against its chapter counts, and perplexities are comparable only on the same text.

Each novel is cut into chapters at its heading lines (``CHAPTER I``, ``Chapter 1``); the
headings, the front matter before the first chapter, ``VOLUME ...`` lines, the editors'
bracketed notes where a volume ended, the closing ``THE END``/``FINIS`` and the editors' "A
NOTE ON THE TEXT" after Northanger Abbey are dropped. Hard-wrapped lines are joined into one
line per paragraph, with a blank line between paragraphs and single spaces inside (Persuasion
puts two after a full stop). Only an indented block whose every line starts with a capital
keeps its line breaks: verse, or a letter's place and salutation; an indented letter body is
hard-wrapped prose like the rest. Gutenberg marks italics as ``_word_`` in three of the six
novels only; the underscores are removed, so that no novel spends tokens on markup a reader
never sees and all six read as the same kind of plain prose.
"""

import json
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from adapt_prune_tune.assets import build_atomically, cache_root, sha256_file
from adapt_prune_tune.corpus import (
    CHUNK_CHARS,
    MANIFEST_FILE,
    _count_tokens,
    _manifest_tokenizer,
    _read_jsonl,
    _write_jsonl,
    chunk_document,
)
from adapt_prune_tune.debian import deb_fields, download_deb, unpack_deb
from adapt_prune_tune.rdata import read_lazyload_db
from adapt_prune_tune.tokenizer import hf_tokenizer

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
RDATA_BASE = Path("usr/lib/R/site-library/janeaustenr/data/Rdata")
LICENSE = (
    "The novels are in the public domain (Project Gutenberg texts, headers removed); the "
    "janeaustenr package and its Debian packaging are under the MIT licence."
)
EVAL_FILE = "eval.jsonl"

# (R object name, title, chapters), in order of publication: the order of each round of
# heldout_text, and the order of janeaustenr's own austen_books().
NOVELS = (
    ("sensesensibility", "Sense and Sensibility", 50),
    ("prideprejudice", "Pride and Prejudice", 61),
    ("mansfieldpark", "Mansfield Park", 48),
    ("emma", "Emma", 55),
    ("northangerabbey", "Northanger Abbey", 31),
    ("persuasion", "Persuasion", 24),
)

CHAPTER_HEADING = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?\s*$")
VOLUME_HEADING = re.compile(r"^(VOLUME|Volume) [0-9IVXLC]+\.?\s*$")
END_OF_NOVEL = re.compile(r"^(THE END|FINIS|Finis|A NOTE ON THE TEXT)\s*$")
VOLUME_NOTE = re.compile(r"^\[.*\bvolume\b.*\]$", re.IGNORECASE | re.DOTALL)
ITALICS = re.compile(r"_([^_]+)_")
VERSE_LINE = re.compile(r"""^\s*["'(]?[A-Z]""")


def novels_dir(cache_dir: Optional[Path] = None) -> Path:
    """Where :func:`prepare_novels` puts the corpus."""
    return cache_root(cache_dir) / "data" / "austen-novels"


# --------------------------------------------------------------------------------------------
# From text lines to chapters
# --------------------------------------------------------------------------------------------


def _paragraph(lines: List[str]) -> str:
    """One paragraph of hard-wrapped lines: prose joined into one line, indented verse line by
    line; italics underscores removed."""
    if lines[0][:1].isspace() and all(VERSE_LINE.match(line) for line in lines):
        text = "\n".join(" ".join(line.split()) for line in lines)
    else:
        text = " ".join(" ".join(lines).split())
    return ITALICS.sub(r"\1", text)


def chapter_text(lines: Sequence[str]) -> str:
    """The text of a chapter's lines (heading excluded): paragraphs separated by blank lines,
    the editors' volume-break notes left out."""
    paragraphs: List[str] = []
    block: List[str] = []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line)
        elif block:
            paragraph = _paragraph(block)
            if not VOLUME_NOTE.match(paragraph):
                paragraphs.append(paragraph)
            block = []
    return "\n\n".join(paragraphs)


def novel_chapters(lines: Sequence[Optional[str]]) -> List[str]:
    """A novel's chapters from its text lines (``None`` for R's ``NA`` reads as a blank line):
    front matter before the first heading, headings, ``VOLUME`` lines and everything from the
    end mark (``THE END``, ``FINIS``, an editors' note) on are left out."""
    chapters: List[List[str]] = []
    for line in lines:
        line = line or ""
        if END_OF_NOVEL.match(line):
            break
        if CHAPTER_HEADING.match(line):
            chapters.append([])
        elif chapters and not VOLUME_HEADING.match(line):
            chapters[-1].append(line)
    return [chapter_text(chapter) for chapter in chapters]


def read_novels(rdata_base: Path) -> Dict[str, List[str]]:
    """The chapters of each novel in the package's ``Rdata`` database, by title, in
    :data:`NOVELS` order.

    Raises:
        ValueError: if a novel is missing or its chapter count is not the expected one (the
            chapter rule was checked on version 1.0.0-1 only).
    """
    objects = read_lazyload_db(rdata_base)
    novels: Dict[str, List[str]] = {}
    for name, title, expected in NOVELS:
        if name not in objects:
            raise ValueError(f"{rdata_base}: no {name!r} among {sorted(objects)}")
        chapters = novel_chapters(objects[name])
        if len(chapters) != expected:
            raise ValueError(f"{title}: {len(chapters)} chapters found, expected {expected}")
        novels[title] = chapters
    return novels


# --------------------------------------------------------------------------------------------
# Writing and reading the corpus
# --------------------------------------------------------------------------------------------


def _write_novels(
    out_dir: Path,
    novels: Dict[str, List[str]],
    source: Dict[str, str],
    tokenizer_path: Optional[Path],
) -> Dict:
    """Write ``eval.jsonl`` and ``manifest.json``; return the manifest."""
    tokenizer = hf_tokenizer(str(tokenizer_path)) if tokenizer_path else None
    rows = [
        {"text": text, "novel": title, "chapter": number}
        for title, chapters in novels.items()
        for number, text in enumerate(chapters, start=1)
    ]
    _write_jsonl(out_dir / EVAL_FILE, rows)
    per_novel = {
        title: {
            "chapters": len(chapters),
            "words": sum(len(text.split()) for text in chapters),
            "chars": sum(len(text) for text in chapters),
            "tokens": _count_tokens(tokenizer, chapters),
        }
        for title, chapters in novels.items()
    }
    manifest = {
        "source": source,
        "license": LICENSE,
        "use": "held out: evaluation only, never training or calibration",
        "file": EVAL_FILE,
        "tokenizer": str(tokenizer_path) if tokenizer_path else None,
        "novels": per_novel,
        "total": {
            "chapters": len(rows),
            "words": sum(n["words"] for n in per_novel.values()),
            "chars": sum(n["chars"] for n in per_novel.values()),
            "tokens": None if tokenizer is None else sum(n["tokens"] for n in per_novel.values()),
        },
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _print_summary(manifest: Dict) -> None:
    for title, novel in {**manifest["novels"], "total": manifest["total"]}.items():
        tokens = "" if novel["tokens"] is None else f", {novel['tokens']:,} tokens"
        print(f"  {title:22s} {novel['chapters']:3d} chapters, {novel['words']:,} words{tokens}")


def _build_novels(out_dir: Path, deb: Optional[Path], tokenizer_path: Optional[Path]) -> None:
    with tempfile.TemporaryDirectory(prefix="austen-novels-") as tmp:
        tmp_dir = Path(tmp)
        deb = deb or download_deb(DEB_PACKAGE, tmp_dir, version=DEB_VERSION)
        unpack_deb(deb, tmp_dir / "unpacked", DEB_PACKAGE, version=DEB_VERSION)
        novels = read_novels(tmp_dir / "unpacked" / RDATA_BASE)
        source = {**deb_fields(deb), "sha256": sha256_file(deb), "data": RDATA_BASE.as_posix()}
        manifest = _write_novels(out_dir, novels, source, tokenizer_path)
    _print_summary(manifest)


def prepare_novels(
    cache_dir: Optional[Path] = None,
    force: bool = False,
    deb: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
) -> Path:
    """Prepare the Austen corpus in ``<cache>/data/austen-novels``, once.

    Writes ``eval.jsonl`` (``{"text", "novel", "chapter"}`` per chapter, chapters numbered
    from 1 in each novel) and ``manifest.json`` (source package, version and SHA-256, licence,
    chapter, word, character and token counts per novel), and prints the counts.

    Args:
        cache_dir (Optional[Path]): cache root; default
            :data:`adapt_prune_tune.assets.DEFAULT_CACHE_DIR`.
        force (bool): rebuild even if the corpus is cached. Default False.
        deb (Optional[Path]): an already downloaded ``r-cran-janeaustenr_1.0.0-1_all.deb``,
            for machines without access to a Debian mirror.
        tokenizer_path (Optional[Path]): a checkpoint directory whose tokenizer counts the
            tokens of each novel. A cached corpus counted with another tokenizer (or none)
            is rebuilt.

    Returns:
        Path: the corpus directory.

    Raises:
        ValueError: if ``deb`` is not r-cran-janeaustenr 1.0.0-1.
    """
    target = novels_dir(cache_dir)
    tokenizer = str(tokenizer_path) if tokenizer_path else None
    stale_counts = tokenizer is not None and _manifest_tokenizer(target) != tokenizer
    return build_atomically(
        target,
        lambda out_dir: _build_novels(
            out_dir, Path(deb) if deb else None, Path(tokenizer_path) if tokenizer_path else None
        ),
        force=force or stale_counts,
        description="Jane Austen corpus",
    )


def heldout_text(
    data_dir: Optional[Path] = None,
    cache_dir: Optional[Path] = None,
    passage_chars: Optional[int] = CHUNK_CHARS,
) -> str:
    """The whole corpus, dealt round-robin across the novels, joined by blank lines.

    Each novel's chapters, in order, are cut at paragraph boundaries into passages of at most
    ``passage_chars`` characters (:func:`adapt_prune_tune.corpus.chunk_document`; ~900 tokens
    by default); then come passage 1 of each novel in :data:`NOVELS` order, passage 2 of each,
    and so on (a novel out of passages drops out of the rounds). A perplexity measurement reads
    only the first tokens of the text, and these must come from all six novels: dealt whole,
    the first chapters alone hold some 16,000 SmolLM2 tokens, so that the first 8,192 would never
    reach Northanger Abbey or Persuasion. ``passage_chars=None`` deals whole chapters.

    ``data_dir`` names the corpus directory directly (as configs do); otherwise it is
    :func:`novels_dir` of ``cache_dir``.

    Raises:
        FileNotFoundError: if the corpus has not been prepared.
    """
    eval_file = (Path(data_dir) if data_dir else novels_dir(cache_dir)) / EVAL_FILE
    if not eval_file.is_file():
        raise FileNotFoundError(
            f"{eval_file} not found; prepare the corpus first with `adapt-prune-tune prepare` "
            "(or adapt_prune_tune.novels.prepare_novels())"
        )
    passages: Dict[str, List[str]] = {title: [] for _, title, _ in NOVELS}
    for row in sorted(_read_jsonl(eval_file), key=lambda row: row["chapter"]):
        text = row["text"]
        passages[row["novel"]] += chunk_document(text, passage_chars) if passage_chars else [text]
    rounds = max(len(p) for p in passages.values())
    return "\n\n".join(p[i] for i in range(rounds) for p in passages.values() if i < len(p))
