"""What the GPU check's recipe run needs and the GPU machine cannot fetch (it has no network).

SmolLM2's ``config.json`` and tokenizer files (not its 538 MB of weights: the check builds
a random initialization of that shape there) and small slices of the prepared corpora, in
the layout the packaged config reads (``model_dir``, ``data_dir``, ``novels_dir``):

    smollm2/        config.json tokenizer.json tokenizer_config.json generation_config.json
    python-docs/    train.jsonl calibration.jsonl (first rows) eval.jsonl (first tutorial pages)
    austen-novels/  eval.jsonl (the first chapter of each novel)

Run here, after ``adapt-prune-tune prepare`` (``benchmarks/fetch_gpu_wheels.sh`` runs it):

    python benchmarks/gpu_assets.py .whl/assets
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List

from _shapes import CACHE, DATA_DIR, SMOLLM2_DIR

NOVELS_DIR = CACHE / "data" / "austen-novels"
SMOLLM2_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
# Bytes of each split kept: enough samples for a few dozen batches and 2,048 calibration tokens.
SLICE_BYTES = {"train.jsonl": 400_000, "calibration.jsonl": 120_000}
TUTORIAL_CHARS = 30_000  # held-out text: whole tutorial pages, in the sorted order heldout_text reads


def _rows(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(path: Path, rows: List[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def prepare(out: Path, model_dir: Path = SMOLLM2_DIR, data_dir: Path = DATA_DIR,
            novels_dir: Path = NOVELS_DIR) -> Dict[str, int]:
    """Write the assets under ``out`` from the prepared cache; their sizes in bytes by relative path."""
    missing = [p for p in (model_dir / "tokenizer.json", data_dir / "train.jsonl", novels_dir / "eval.jsonl")
               if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing} not found: run `adapt-prune-tune prepare` first")
    model, docs, novels = out / "smollm2", out / "python-docs", out / "austen-novels"
    for d in (model, docs, novels):
        d.mkdir(parents=True, exist_ok=True)
    for name in SMOLLM2_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, model / name)
    for name, limit in SLICE_BYTES.items():
        kept, size = [], 0
        for line in (data_dir / name).read_text().splitlines(keepends=True):
            if size + len(line.encode()) > limit and kept:
                break
            kept.append(line)
            size += len(line.encode())
        (docs / name).write_text("".join(kept))
    tutorial = [r for r in _rows(data_dir / "eval.jsonl") if r["path"].startswith("tutorial/")]
    pages, chars = [], 0
    for path in sorted({r["path"] for r in tutorial}):
        pages.append(path)
        chars += sum(len(r["text"]) for r in tutorial if r["path"] == path)
        if chars >= TUTORIAL_CHARS:
            break
    _write_rows(docs / "eval.jsonl", [r for r in tutorial if r["path"] in pages])
    first = {}
    for r in _rows(novels_dir / "eval.jsonl"):
        if r["novel"] not in first or r["chapter"] < first[r["novel"]]["chapter"]:
            first[r["novel"]] = r
    _write_rows(novels / "eval.jsonl", list(first.values()))
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/gpu_assets.py OUT_DIR")
    sizes = prepare(Path(sys.argv[1]))
    for name, size in sizes.items():
        print(f"{size:>10,}  {name}")
    print(f"{sum(sizes.values()):>10,}  total")
