"""What a run record says: what the run spent and what came out of it.

The recipe writes ``output_dir/run_record.json`` (fields: :func:`adapt_prune_tune.report.write_report`).
The report, the model card and ``adapt-prune-tune compare`` read the same derived figures from
it through this module, so they agree, and each falls back the same way for records written
before a field existed (no ``heldout_log``, no ``perplexity_by_text``, no ``speed``, no
``config_name``).
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

RECORD_FILE = "run_record.json"
# The recipe's name for a single `heldout.text`, for records without per-text results.
DEFAULT_TEXT = "heldout"


def load_record(run: Union[str, Path]) -> Dict[str, Any]:
    """A run's record, from its output directory or the JSON file itself."""
    path = Path(run)
    if path.is_dir():
        path = path / RECORD_FILE
    if not path.is_file():
        if (path.parent / "checkpoints").is_dir():  # a run that has not reached its end
            raise FileNotFoundError(
                f"{path} not found: the run in {path.parent} has not finished (the record is written at its "
                "end). Continue it with resume_from_checkpoint=True; `adapt-prune-tune export` takes its newest "
                "checkpoint meanwhile"
            )
        raise FileNotFoundError(f"{path} not found: not a run directory of adapt_prune_recipe")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Spent
# --------------------------------------------------------------------------------------------


def training_tokens(record: Mapping[str, Any]) -> Optional[int]:
    """Recovery-training tokens of all stages (the recipe's estimate: steps × mean sample
    length), or None for a record without stages."""
    tokens = [stage["tokens"] for stage in record.get("stages", []) if stage.get("tokens") is not None]
    return sum(tokens) if tokens else None


def prune_seconds(record: Mapping[str, Any]) -> Optional[float]:
    """Seconds spent pruning (calibration passes, scoring, surgery) in all stages."""
    seconds = [s["seconds_prune"] for s in record.get("stages", []) if s.get("seconds_prune") is not None]
    return sum(seconds) if seconds else None


def prune_share(record: Mapping[str, Any]) -> Optional[float]:
    """Pruning's share of the run's wall time (``seconds_run``)."""
    spent, total = prune_seconds(record), record.get("seconds_run")
    return spent / total if spent is not None and total else None


# --------------------------------------------------------------------------------------------
# Got: held-out perplexity
# --------------------------------------------------------------------------------------------


def heldout_texts(record: Mapping[str, Any]) -> List[str]:
    """Names of the held-out texts, the primary (``perplexity``'s) first."""
    if record.get("perplexity_by_text"):
        return list(record["perplexity_by_text"])
    names = (record.get("heldout") or {}).get("texts")
    return list(names) if names else [DEFAULT_TEXT]


def perplexity_by_text(record: Mapping[str, Any]) -> Dict[str, Dict[str, float]]:
    """``{text: {"original", "pruned", "recovered"}}``, keys present where measured.

    ``pruned`` is after the last stage's cut, before its training; ``recovered`` after it.
    Records without per-text results give their one ``perplexity`` under the text's name.
    """
    if record.get("perplexity_by_text"):
        return {
            name: {k: v for k, v in row.items() if v is not None}
            for name, row in record["perplexity_by_text"].items()
        }
    ppl = record.get("perplexity")
    if not ppl:
        return {}
    return {heldout_texts(record)[0]: {k: v for k, v in ppl.items() if v is not None}}


def format_perplexity(value: Optional[float]) -> str:
    """Two decimals where they matter (14.36), whole and grouped above 100 (20,639)."""
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


class HeldoutPoint(NamedTuple):
    """One held-out evaluation: training tokens so far, perplexity, and what had just happened."""

    tokens: float
    ppl: float
    event: str  # original | pruned | checkpoint | trained
    stage: int


def heldout_series(record: Mapping[str, Any]) -> Dict[str, List[HeldoutPoint]]:
    """Every held-out evaluation of each text in run order, over training tokens.

    From ``heldout_log`` when the record has one; older records get the same shape from their
    stages (original at 0 tokens, each stage's cut at the tokens before it, its training at the
    tokens after it), with the stage token counts summed.
    """
    series: Dict[str, List[HeldoutPoint]] = {}
    if record.get("heldout_log"):
        for entry in record["heldout_log"]:
            for name, value in entry["ppl"].items():
                series.setdefault(name, []).append(
                    HeldoutPoint(entry.get("tokens", 0), value, entry["event"], entry.get("stage", 0))
                )
        return series
    name = heldout_texts(record)[0]
    points: List[HeldoutPoint] = []
    original = (record.get("perplexity") or {}).get("original")
    if original is not None:
        points.append(HeldoutPoint(0, original, "original", 0))
    seen = 0
    for stage in record.get("stages", []):
        k = stage.get("stage", 0)
        if stage.get("heldout_ppl_after_prune") is not None:
            points.append(HeldoutPoint(seen, stage["heldout_ppl_after_prune"], "pruned", k))
        seen += stage.get("tokens") or 0
        if stage.get("heldout_ppl_after_train") is not None:
            points.append(HeldoutPoint(seen, stage["heldout_ppl_after_train"], "trained", k))
    return {name: points} if points else {}


# --------------------------------------------------------------------------------------------
# Got: speed
# --------------------------------------------------------------------------------------------


def speed_ratios(record: Mapping[str, Any]) -> Dict[str, float]:
    """Pruned ÷ original of each measured figure: ``forward`` and ``generate`` (tokens/s,
    > 1 is faster) and ``memory`` (generation peak, < 1 is smaller), where measured."""
    speed = record.get("speed") or {}
    original, pruned = speed.get("original") or {}, speed.get("pruned") or {}
    ratios = {}
    for label, key in (
        ("forward", "forward_tokens_per_second"),
        ("generate", "generate_tokens_per_second"),
        ("memory", "generate_peak_memory_bytes"),
    ):
        if original.get(key) and pruned.get(key) is not None:
            ratios[label] = pruned[key] / original[key]
    old = record.get("throughput") or {}  # records before ``speed``: forward only
    if "forward" not in ratios and old.get("original_tokens_per_second") and old.get("pruned_tokens_per_second"):
        ratios["forward"] = old["pruned_tokens_per_second"] / old["original_tokens_per_second"]
    return ratios


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _packaged_config_name(path: str) -> str:
    """``smollm2/135M_adapt`` for the resolved path of a packaged config; other paths unchanged."""
    from importlib import resources

    from adapt_prune_tune import configs

    root = Path(str(resources.files(configs))).resolve()
    try:
        relative = Path(path).resolve().relative_to(root)
    except (ValueError, OSError):
        return path
    return relative.as_posix()[: -len(".yaml")] if relative.suffix == ".yaml" else path


def _parse_command(command: Optional[str]) -> Optional[Tuple[str, List[str]]]:
    """(config, overrides) of a recorded ``sys.argv`` (``... --config PATH key=value ...``)."""
    if not command:
        return None
    try:
        args = shlex.split(command)
    except ValueError:
        return None
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        return None
    i = args.index("--config")
    return _packaged_config_name(args[i + 1]), args[i + 2 :]


_RECIPE = "adapt_prune_recipe"


def launcher_prefix(argv: Sequence[str]) -> Optional[List[str]]:
    """The launch part of a launcher's command line, up to and including the recipe, as typed:
    ``tune run --nnodes 4 --rdzv_endpoint HEAD:29500 ... adapt_prune_recipe`` from the ``tune``
    process's ``argv`` (``torchrun ... recipes/adapt_prune_recipe.py`` from torchrun's or
    ``python -m torch.distributed.run``'s), or ``None`` for a command that is neither.

    Worker processes see only the world size torchrun gives them; a multi-node run cannot be
    repeated without its rendezvous flags, nor a preempted one without its signal handling.
    """
    args = list(argv)
    for i, arg in enumerate(args):
        if Path(arg).name == "tune" and args[i + 1 : i + 2] == ["run"]:
            head, rest = ["tune", "run"], args[i + 2 :]
            break
        if Path(arg).name == "torchrun":
            head, rest = ["torchrun"], args[i + 1 :]
            break
        if arg == "-m" and args[i + 1 : i + 2] == ["torch.distributed.run"]:
            head, rest = ["torchrun"], args[i + 2 :]
            break
    else:
        return None
    for j, arg in enumerate(rest):
        if Path(arg).name in (_RECIPE, f"{_RECIPE}.py"):
            return head + rest[: j + 1]
    return None


def reproduce_command(record: Mapping[str, Any], launcher_flags: bool = True) -> Optional[str]:
    """The ``tune run`` command a person types to redo the run.

    Built from ``config_name`` (the ``--config`` argument as typed), ``overrides`` (the
    ``key=value`` arguments as typed) and ``launch``: its ``prefix`` (the launcher's command
    up to the recipe, :func:`launcher_prefix`) where the launcher's command line could be
    read and ``launcher_flags``, else ``{"nnodes", "nproc_per_node"}`` (a public model card
    names the world's shape, not the cluster's rendezvous host). Records without them are read
    from ``command``, mapping a packaged config's resolved path back to its name; a command
    without ``--config`` is returned as recorded.
    """
    name, overrides = record.get("config_name"), record.get("overrides")
    if name is None:
        parsed = _parse_command(record.get("command"))
        if parsed is None:
            return record.get("command")
        name, overrides = parsed
    launch = record.get("launch") or {}
    nnodes, nproc = int(launch.get("nnodes", 1)), int(launch.get("nproc_per_node", 1))
    parts = list(launch.get("prefix") or []) if launcher_flags else []
    if not parts:
        parts = ["tune", "run"]
        if nnodes > 1:
            parts += ["--nnodes", str(nnodes)]
        if nnodes > 1 or nproc > 1:
            parts += ["--nproc_per_node", str(nproc)]
        parts.append(_RECIPE)
    parts += ["--config", name, *(overrides or [])]
    return " ".join(shlex.quote(part) for part in parts)
