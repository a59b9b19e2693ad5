"""Several runs side by side: one table and one held-out-perplexity figure.

``adapt-prune-tune compare RUN_A RUN_B ...`` reads each run directory's ``run_record.json``
(older records too, see :mod:`adapt_prune_tune.run_record`) and writes ``compare.md`` and
``compare_heldout.png`` into one directory: what each run spent (training tokens, wall time,
pruning's share) against what it got (parameters, held-out perplexity of every text original →
pruned → recovered), and every run's held-out perplexity over training tokens in one figure,
a color per run and a line style per text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from adapt_prune_tune import run_record as rr
from adapt_prune_tune.report import format_count, format_seconds, markdown_table, plot_heldout_tokens
from adapt_prune_tune.run_record import format_perplexity

COMPARE_MD = "compare.md"
COMPARE_PNG = "compare_heldout.png"
_LINE_STYLES = ("-", "--", ":", "-.")


def run_labels(run_dirs: Sequence[Union[str, Path]]) -> List[str]:
    """Each run's directory name, or its whole path where two runs share a name."""
    names = [Path(d).name or str(d) for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def _flatten(config: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(config, Mapping):
        out: Dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: config}


# Keys that differ between any two runs without making them different experiments.
_RUN_LOCAL = ("output_dir", "log_dir", "resume_from_checkpoint")


def config_differences(records: Mapping[str, Mapping[str, Any]]) -> Dict[str, List[str]]:
    """Per run, the ``key=value`` settings (dotted, as overrides are written) whose values
    differ between the runs: what makes each run an arm of the comparison."""
    flat = {label: _flatten(record.get("config") or {}) for label, record in records.items()}
    keys = sorted({key for config in flat.values() for key in config})
    differing = [
        key
        for key in keys
        if not any(part in key for part in _RUN_LOCAL)
        and len({repr(config.get(key, "<unset>")) for config in flat.values()}) > 1
    ]
    return {label: [f"{key}={config.get(key, '<unset>')}" for key in differing if _said(key, config)]
            for label, config in flat.items()}


def _said(key: str, config: Mapping[str, Any]) -> bool:
    """Whether ``key`` belongs in a run's list: set there, or unset where neither its section's
    keys (``heldout.window`` for ``heldout``) nor a value in its section's place (``heldout: null``
    for ``heldout.window``) already say what the run has."""
    if key in config:
        return True
    if any(other.startswith(key + ".") for other in config):
        return False
    parts = key.split(".")
    return not any(".".join(parts[:i]) in config for i in range(1, len(parts)))


def _params(record: Mapping[str, Any]) -> str:
    before, after = record.get("params_before"), record.get("params_after")
    if before is None or after is None:
        return "–"
    return f"{format_count(before)} → {format_count(after)} ({after / before:.3f}×)"


def comparison_table(records: Mapping[str, Mapping[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows: one row per run, one held-out column per text any run measured."""
    texts: List[str] = []
    for record in records.values():
        texts += [name for name in rr.perplexity_by_text(record) if name not in texts]
    header = [
        "run",
        "parameters",
        *[f"{name}: original → pruned → recovered" for name in texts],
        "training tokens",
        "wall time",
        "prune share",
    ]
    rows = []
    for label, record in records.items():
        ppl = rr.perplexity_by_text(record)
        cells = [
            " → ".join(format_perplexity(ppl[name].get(k)) for k in ("original", "pruned", "recovered"))
            if name in ppl
            else "–"
            for name in texts
        ]
        tokens, share = rr.training_tokens(record), rr.prune_share(record)
        rows.append([
            label,
            _params(record),
            *cells,
            f"{tokens:,}" if tokens is not None else "–",
            format_seconds(record.get("seconds_run")),
            f"{share:.1%}" if share is not None else "–",
        ])
    return header, rows


def plot_comparison(records: Mapping[str, Mapping[str, Any]], path: Path) -> bool:
    """Every run's held-out perplexity over training tokens in one figure; False when no run
    has held-out results (nothing drawn)."""
    from matplotlib import colormaps

    colors = colormaps["tab10"].colors
    series: Dict[str, List[rr.HeldoutPoint]] = {}
    styles: Dict[str, Dict[str, Any]] = {}
    texts: List[str] = []
    for i, (label, record) in enumerate(records.items()):
        for name, points in rr.heldout_series(record).items():
            if name not in texts:
                texts.append(name)
            key = f"{label} · {name}"
            series[key] = points
            styles[key] = {"color": colors[i % len(colors)], "ls": _LINE_STYLES[texts.index(name) % len(_LINE_STYLES)]}
    if not series:
        return False
    plot_heldout_tokens(series, path, styles)
    return True


def compare_runs(
    run_dirs: Sequence[Union[str, Path]], out_dir: Union[str, Path], labels: Optional[Sequence[str]] = None
) -> Path:
    """Write ``compare.md`` (and ``compare_heldout.png`` when any run has held-out results).

    Args:
        run_dirs: run output directories (or their ``run_record.json`` files).
        out_dir: where to write (created if needed).
        labels: a name per run; default :func:`run_labels`.

    Returns:
        Path: the Markdown file.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    labels = list(labels) if labels is not None else run_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    records = {label: rr.load_record(d) for label, d in zip(labels, run_dirs)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    text = "# Runs compared\n\n" + markdown_table(*comparison_table(records))
    text += (
        "\nHeld-out perplexity: *pruned* after the last stage's cut, before its training; "
        "*recovered* at the end of the run. Training tokens are the recipe's estimate.\n"
    )
    if plot_comparison(records, out_dir / COMPARE_PNG):
        text += f"\n![held-out perplexity over training tokens]({COMPARE_PNG})\n"
    differences = config_differences(records)
    if any(differences.values()):
        text += "\nSettings that differ between the runs:\n\n" + "".join(
            f"- {label}: " + ", ".join(f"`{item}`" for item in items) + "\n"
            for label, items in differences.items()
        )
    commands = [(label, rr.reproduce_command(record)) for label, record in records.items()]
    if any(command for _, command in commands):
        text += "\nCommands:\n\n" + "".join(f"- {label}: `{command}`\n" for label, command in commands if command)
    path = out_dir / COMPARE_MD
    path.write_text(text, encoding="utf-8")
    return path
