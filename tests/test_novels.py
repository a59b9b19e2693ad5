"""The held-out Austen novels: the R data reader, the chapter rules and the prepared corpus."""

import gzip
import json
import re
import struct
import subprocess
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from adapt_prune_tune import assets, novels, rdata
from adapt_prune_tune.debian import download_deb
from adapt_prune_tune.tokenizer import smollm2_tokenizer

CHAPTERS = {
    "Emma": 55,
    "Mansfield Park": 48,
    "Northanger Abbey": 31,
    "Persuasion": 24,
    "Pride and Prejudice": 61,
    "Sense and Sensibility": 50,
}
OPENINGS = {  # the first words of chapter 1, in the round-robin order
    "Sense and Sensibility": "The family of Dashwood had long been settled in Sussex.",
    "Pride and Prejudice": "It is a truth universally acknowledged,",
    "Mansfield Park": "About thirty years ago Miss Maria Ward, of Huntingdon,",
    "Emma": "Emma Woodhouse, handsome, clever, and rich,",
    "Northanger Abbey": "No one who had ever seen Catherine Morland in her infancy",
    "Persuasion": "Sir Walter Elliot, of Kellynch Hall, in Somersetshire,",
}


def _read_jsonl(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------------------------
# R serialization, written by hand
# --------------------------------------------------------------------------------------------


def _ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _string(text: Optional[str]) -> bytes:
    """A CHARSXP: NA, or ASCII / UTF-8 flagged in its levels as R writes them."""
    if text is None:
        return _ints(rdata.CHARSXP, -1)
    data = text.encode("utf-8")
    levels = 64 if text.isascii() else 8
    return _ints(rdata.CHARSXP | levels << 12, len(data)) + data


def _strings(texts: List[Optional[str]]) -> bytes:
    return _ints(rdata.STRSXP, len(texts)) + b"".join(_string(t) for t in texts)


def _names(names: List[str], first: bool) -> bytes:
    """A ``names`` attribute pairlist; after its first use, the symbol is a back-reference."""
    symbol = _ints(rdata.SYMSXP) + _string("names") if first else _ints(rdata.REFSXP | 1 << 8)
    return _ints(rdata.LISTSXP | 1 << 10) + symbol + _strings(names) + _ints(rdata.NILVALUE_SXP)


def _named_list(items: Dict[str, bytes], first: bool) -> bytes:
    header = _ints(rdata.VECSXP | 1 << 9, len(items))
    return header + b"".join(items.values()) + _names(list(items), first)


def _serialization(item: bytes) -> bytes:
    return b"X\n" + _ints(3, 0x040201, 0x030500, 5) + b"UTF-8" + item


LINES = ["It is a truth universally acknowledged,", None, "her £20,000, café"]


def test_unserialize_character_vector_with_na_and_utf8() -> None:
    assert rdata.unserialize(_serialization(_strings(LINES))) == LINES


def test_read_lazyload_db(tmp_path: Path) -> None:
    """An index and a zlib-compressed entry laid out as R's ``Rdata.rdx``/``.rdb``."""
    data = _serialization(_strings(LINES))
    entry = struct.pack(">I", len(data)) + zlib.compress(data)
    (tmp_path / "Rdata.rdb").write_bytes(b"\0" * 7 + entry)  # another entry before ours
    variables = _named_list({"lines": _ints(rdata.INTSXP, 2, 7, len(entry))}, first=True)
    index = {
        "variables": variables,
        "references": _named_list({}, first=False),
        "compressed": _ints(rdata.LGLSXP, 1, 1),
    }
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialization(_named_list(index, False))))
    assert rdata.read_lazyload_db(tmp_path / "Rdata") == {"lines": LINES}


@pytest.mark.parametrize(
    "data, error",
    [
        (_serialization(_ints(14, 1) + struct.pack(">d", 1.5)), "unsupported SEXP type 14"),
        (b"A\n" + _strings(LINES), "not start with 'X"),
        (_serialization(_strings(LINES) + _ints(0)), "4 bytes after the object"),
        (_serialization(_strings(LINES))[:-3], "truncated"),
        (_serialization(_ints(rdata.REFSXP | 1 << 8)), "bad back-reference 1"),
    ],
)
def test_unserialize_fails_clearly(data: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        rdata.unserialize(data)


def test_unserialize_rejects_attributes_other_than_names() -> None:
    tag = _ints(rdata.SYMSXP) + _string("class")
    attributes = _ints(rdata.LISTSXP | 1 << 10) + tag + _strings(["x"]) + _ints(254)
    vector = _ints(rdata.STRSXP | 1 << 9, 1) + _string("a") + attributes
    with pytest.raises(ValueError, match=r"unsupported attributes \['class'\]"):
        rdata.unserialize(_serialization(vector))


# --------------------------------------------------------------------------------------------
# From lines to chapters
# --------------------------------------------------------------------------------------------


def test_novel_chapters_rules() -> None:
    # fmt: off
    lines = [
        "EMMA", "", "By Jane Austen", "", "VOLUME I", "",
        "CHAPTER I", "", "",
        "It is a _truth_ universally", "acknowledged.  That a", "single man.",
        "", "    My first displays the wealth", "      Lords of the earth!", "",
        "     \"I have just had the honour of", "     receiving your letter.", "",
        "VOLUME II", "",
        "Chapter 2.", "", "Next  chapter.", None,
        "[End volume one of this edition.", "  the Edinburgh University Press]", "",
        "THE END", "", "A NOTE ON THE TEXT", "An editor wrote this.",
    ]
    # fmt: on
    assert novels.novel_chapters(lines) == [
        "It is a truth universally acknowledged. That a single man.\n\n"
        "My first displays the wealth\nLords of the earth!\n\n"
        '"I have just had the honour of receiving your letter.',
        "Next chapter.",
    ]


# --------------------------------------------------------------------------------------------
# The prepared corpus
# --------------------------------------------------------------------------------------------


def test_corpus_files_and_manifest(novels_dir: Path, smollm2_dir: Path) -> None:
    assert novels_dir == novels.novels_dir()
    assert {p.name for p in novels_dir.iterdir()} == {".complete", "eval.jsonl", "manifest.json"}
    assert assets.is_complete(novels_dir)
    manifest = json.loads((novels_dir / "manifest.json").read_text())
    source = manifest["source"]
    assert (source["package"], source["version"]) == ("r-cran-janeaustenr", "1.0.0-1")
    assert re.fullmatch(r"[0-9a-f]{64}", source["sha256"])
    assert "public domain" in manifest["license"]
    assert manifest["tokenizer"] == str(smollm2_dir)
    assert {title: n["chapters"] for title, n in manifest["novels"].items()} == CHAPTERS
    for novel in manifest["novels"].values():
        assert novel["words"] > 70_000 and novel["tokens"] > novel["words"]
    total = manifest["total"]
    assert total["chapters"] == sum(CHAPTERS.values())
    assert total["tokens"] == sum(n["tokens"] for n in manifest["novels"].values())


def test_one_row_per_chapter(novels_dir: Path) -> None:
    chapters: Dict[str, List[int]] = defaultdict(list)
    for row in _read_jsonl(novels_dir / "eval.jsonl"):
        assert set(row) == {"text", "novel", "chapter"}
        chapters[row["novel"]].append(row["chapter"])
    assert {title: numbers for title, numbers in chapters.items()} == {
        title: list(range(1, n + 1)) for title, n in CHAPTERS.items()
    }


def test_text_is_clean_prose(novels_dir: Path) -> None:
    rows = _read_jsonl(novels_dir / "eval.jsonl")
    text = "\n\n".join(row["text"] for row in rows)
    assert not re.search(r"^(CHAPTER|Chapter|VOLUME|Volume) [0-9IVXLC]+", text, re.MULTILINE)
    for leftover in ("Gutenberg", "GUTENBERG", "THE END", "FINIS", "A NOTE ON THE TEXT", "_"):
        assert leftover not in text
    assert "\n\n\n" not in text and "  " not in text
    assert all(row["text"] == row["text"].strip() and len(row["text"]) > 1000 for row in rows)
    first = {row["novel"]: row["text"] for row in rows if row["chapter"] == 1}
    assert all(first[title].startswith(opening) for title, opening in OPENINGS.items())
    northanger = [row["text"] for row in rows if row["novel"] == "Northanger Abbey"][-1]
    assert northanger.endswith("Vol. II, Rambler.")  # Austen's own footnote, not the editors'


def test_heldout_text_deals_novels_round_robin(novels_dir: Path, smollm2_dir: Path) -> None:
    rows = _read_jsonl(novels_dir / "eval.jsonl")
    order = list(OPENINGS)
    by_chapters = novels.heldout_text(novels_dir, passage_chars=None)
    dealt = sorted(rows, key=lambda row: (row["chapter"], order.index(row["novel"])))
    assert by_chapters == "\n\n".join(row["text"] for row in dealt)

    text = novels.heldout_text(novels_dir)
    assert text == novels.heldout_text(cache_dir=novels_dir.parent.parent)
    assert sorted(text.split("\n\n")) == sorted(by_chapters.split("\n\n"))  # nothing lost
    starts = [text.index(opening) for opening in OPENINGS.values()]
    assert starts == sorted(starts) and starts[0] == 0  # round 1: each novel's first passage
    first_chapter = rows[0]["text"]  # Sense and Sensibility's
    first_passage = text[: starts[1] - 2]
    assert first_chapter.startswith(first_passage) and len(first_passage) <= novels.CHUNK_CHARS
    second_passage = first_chapter[len(first_passage) + 2 :][:200]
    assert text.index(second_passage) > starts[-1]  # round 2 comes after Persuasion's first

    # How configs use it: the first 8,192 tokens reach all six novels.
    tokenizer = smollm2_tokenizer(str(smollm2_dir))
    head = tokenizer.decode(tokenizer.encode(text, add_bos=False, add_eos=False)[:8192])
    assert all(opening in head for opening in OPENINGS.values())


def test_heldout_text_needs_prepare(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapt-prune-tune prepare"):
        novels.heldout_text(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="adapt-prune-tune prepare"):
        novels.heldout_text(cache_dir=tmp_path)


def test_prepare_novels_is_idempotent(novels_dir: Path, smollm2_dir: Path, capsys) -> None:
    files = {p.name: p.stat().st_mtime_ns for p in novels_dir.iterdir()}
    capsys.readouterr()
    assert novels.prepare_novels(tokenizer_path=smollm2_dir) == novels_dir
    assert "cached" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in novels_dir.iterdir()} == files


def test_prepare_novels_redoes_incomplete(tmp_path: Path, capsys) -> None:
    deb = download_deb(novels.DEB_PACKAGE, tmp_path, version=novels.DEB_VERSION)
    cache = tmp_path / "cache"
    target = novels.prepare_novels(cache_dir=cache, deb=deb)
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    assert json.loads(files["manifest.json"])["total"]["tokens"] is None

    (target / assets.COMPLETE_MARKER).unlink()  # interrupted before sealing
    capsys.readouterr()
    novels.prepare_novels(cache_dir=cache, deb=deb)
    assert "rebuilding" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files

    (target / "eval.jsonl").write_text("truncat")  # damaged afterwards
    partial = target.parent / f".{target.name}.partial"
    partial.mkdir()  # left by a killed run
    (partial / "eval.jsonl").write_text("half")
    novels.prepare_novels(cache_dir=cache, deb=deb)
    assert "rebuilding" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files
    assert not partial.exists()


def test_other_package_version_is_rejected(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: r-cran-janeaustenr\nVersion: 0.1.5-1\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: test package\n"
    )
    deb = tmp_path / "r-cran-janeaustenr_0.1.5-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(package), str(deb)], check=True, capture_output=True)
    with pytest.raises(ValueError, match="version '0.1.5-1', not '1.0.0-1'"):
        novels.prepare_novels(cache_dir=tmp_path / "cache", deb=deb)
    assert not novels.novels_dir(tmp_path / "cache").exists()
