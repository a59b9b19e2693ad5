"""A readable report of a pruning run: ``report.md`` with PNG figures next to it.

The pruning code and the recipe write a JSON-able *record* of a run (see
:func:`write_report` for its fields); this module only renders it, so a report can be
re-rendered from a saved record without the model. Every section is optional except the
architecture before and after pruning: a prune-only run has no training log, a run without
network has no benchmark table, and the report shows what there is.

Figures are drawn with matplotlib's object-oriented API on Agg canvases, never through
``pyplot``: no display is needed, and the global backend of a process that also trains (or
runs notebooks) is left alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from adapt_prune_tune import run_record as rr
from adapt_prune_tune.base_model import BaseModelUnknown, resolve_base_model
from adapt_prune_tune.run_record import format_perplexity
from adapt_prune_tune.models import DecoderArch

WIDTHS_PNG = "layer_widths.png"
PRUNE_STEPS_PNG = "prune_steps.png"
TRAINING_PNG = "training.png"
HELDOUT_PNG = "heldout.png"


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def format_count(n: float) -> str:
    """A parameter count in the unit people quote models in (135.0M, 1.24B)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_bytes(n: Optional[float]) -> str:
    """A memory size in binary units (515.1 MiB, 15.02 GiB)."""
    if n is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(n)} B"


def format_seconds(seconds: Optional[float]) -> str:
    """A duration as people say it: 42 s, 11.1 min, 3.25 h."""
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _number(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 10**digits:  # large values (tokens/s) in full, grouped, not as 1.2e+04
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; the first column left-aligned, the others right-aligned (numbers)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _ratio(after: Optional[float], before: Optional[float]) -> str:
    if after is None or not before:
        return "–"
    return f"{after / before:.3f}×"


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def plot_layer_widths(before: DecoderArch, after: DecoderArch, path: Path) -> None:
    """Bars of attention heads, KV heads and MLP width per layer, before and after pruning."""
    layers = list(range(before.num_layers))
    panels = (
        ("attention heads", "num_heads"),
        ("KV heads", "num_kv_heads"),
        ("MLP width", "intermediate_dim"),
    )
    figure = Figure(figsize=(max(6.0, 0.3 * len(layers) + 2), 8))
    axes = figure.subplots(len(panels), 1, sharex=True)
    width = 0.4
    for ax, (title, field) in zip(axes, panels):
        ax.bar(
            [i - width / 2 for i in layers],
            [getattr(l, field) for l in before.layers],
            width,
            label="before",
        )
        ax.bar(
            [i + width / 2 for i in layers],
            [getattr(l, field) for l in after.layers],
            width,
            label="after",
        )
        ax.set_ylabel(title)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", alpha=0.3)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(loc="upper right")
    axes[0].set_title("Per-layer widths")
    axes[-1].set_xlabel("layer")
    _save(figure, path)


def _step_labels(prune_steps: Sequence[Mapping[str, Any]]) -> List[str]:
    return [f"{step.get('stage', '?')}:{step.get('step', i)}" for i, step in enumerate(prune_steps)]


def plot_prune_steps(prune_steps: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Heatmaps of layer importance and assigned sparsity: a row per prune step, a column
    per layer, so drifts of importance and the sparsity that follows them read together."""
    labels = _step_labels(prune_steps)
    figure = Figure(figsize=(10, max(3.0, 0.18 * len(prune_steps) + 2)))
    axes = figure.subplots(1, 2, sharey=True)
    panels = (
        ("layer importance", "layer_importance", "viridis"),
        ("layer sparsity", "layer_sparsity", "magma"),
    )
    for ax, (title, field, cmap) in zip(axes, panels):
        values = [step[field] for step in prune_steps]
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap)
        figure.colorbar(image, ax=ax)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    stride = max(1, len(labels) // 20)
    axes[0].set_yticks(range(0, len(labels), stride))
    axes[0].set_yticklabels(labels[::stride])
    axes[0].set_ylabel("stage:step")
    _save(figure, path)


def stage_starts(train_log: Sequence[Mapping[str, Any]]) -> List[Tuple[int, int]]:
    """``(step, stage)`` where each stage's training begins in the log."""
    starts = []
    for entry in train_log:
        if not starts or entry["stage"] != starts[-1][1]:
            starts.append((entry["step"], entry["stage"]))
    return starts


def prune_points(train_log: Sequence[Mapping[str, Any]]) -> List[Tuple[float, int]]:
    """``(x, stage)``: where each stage's cut falls on the step axis, half a step before its
    first training step (the cut happens between two optimizer steps)."""
    return [(step - 0.5, stage) for step, stage in stage_starts(train_log)]


def smoothing_window(num_steps: int) -> int:
    """Steps per moving-average window: a 25th of the run, at least 1, at most 200, so a
    curve shows about 25 independent points whatever the run's length."""
    return max(1, min(200, round(num_steps / 25)))


def moving_average(
    values: Sequence[float], window: int, segments: Optional[Sequence[Any]] = None
) -> List[float]:
    """Trailing mean of the last ``window`` values (fewer at the start), restarting wherever
    ``segments`` changes: a stage's curve never averages over the cut that began it."""
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    sums = [0.0, *accumulate(values)]
    out, start = [], 0
    for i in range(len(values)):
        if segments is not None and i > 0 and segments[i] != segments[i - 1]:
            start = i
        lo = max(start, i + 1 - window)
        out.append((sums[i + 1] - sums[lo]) / (i + 1 - lo))
    return out


@dataclass(frozen=True)
class LossCurve:
    """One logged quantity over training steps, raw and smoothed within each stage."""

    steps: List[int]
    raw: List[float]
    smooth: List[float]
    window: int


# train_log keys drawn, with their labels; the distillation parts exist only in distillation runs.
LOSS_KEYS = {
    "loss": "training loss",
    "ce_loss": "student cross-entropy",
    "teacher_ce_loss": "teacher cross-entropy",
    "kd_loss": "KL(teacher ‖ student)",
}


def training_curves(train_log: Sequence[Mapping[str, Any]]) -> Dict[str, LossCurve]:
    """The loss curves of a training log (:data:`LOSS_KEYS` present in it), each smoothed by a
    moving average of :func:`smoothing_window` steps that restarts at every stage."""
    window = smoothing_window(len(train_log))
    curves = {}
    for key in LOSS_KEYS:
        rows = [entry for entry in train_log if entry.get(key) is not None]
        if rows:
            raw = [float(entry[key]) for entry in rows]
            curves[key] = LossCurve(
                [entry["step"] for entry in rows],
                raw,
                moving_average(raw, window, [entry["stage"] for entry in rows]),
                window,
            )
    return curves


def _draw_curve(ax: Any, curve: LossCurve, label: str, color: str) -> None:
    ax.plot(curve.steps, curve.raw, lw=0.6, alpha=0.25, color=color)
    ax.plot(curve.steps, curve.smooth, lw=1.4, color=color, label=label)


def plot_training(train_log: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Loss (faint: every step; line: moving average within each stage), the distillation
    parts when logged (student and teacher cross-entropy, KL), and the learning rate; the
    prune points (stage boundaries) dashed."""
    curves = training_curves(train_log)
    distilled = "ce_loss" in curves or "kd_loss" in curves
    panels = 4 if distilled else 2
    figure = Figure(figsize=(9, 2.6 * panels + 1))
    axes = figure.subplots(panels, 1, sharex=True)
    loss_ax, lr_ax = axes[0], axes[-1]
    if "loss" in curves:
        _draw_curve(loss_ax, curves["loss"], LOSS_KEYS["loss"], "tab:blue")
    loss_ax.set_ylabel("training loss")
    if distilled:
        ce_ax, kl_ax = axes[1], axes[2]
        for key, color in (("ce_loss", "tab:blue"), ("teacher_ce_loss", "tab:green")):
            if key in curves:
                _draw_curve(ce_ax, curves[key], LOSS_KEYS[key], color)
        ce_ax.set_ylabel("cross-entropy")
        ce_ax.legend(loc="upper right", fontsize=8)
        if "kd_loss" in curves:
            _draw_curve(kl_ax, curves["kd_loss"], LOSS_KEYS["kd_loss"], "tab:purple")
        kl_ax.set_ylabel("KL(teacher ‖ student)")
    steps = [entry["step"] for entry in train_log if "lr" in entry]
    lr_ax.plot(steps, [entry["lr"] for entry in train_log if "lr" in entry], lw=1, color="tab:orange")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    for x, stage in prune_points(train_log):
        for ax in axes:
            ax.axvline(x, color="gray", ls="--", lw=0.8)
        loss_ax.annotate(
            f"prune {stage}",
            (x, 1),
            xycoords=("data", "axes fraction"),
            xytext=(2, -12),
            textcoords="offset points",
            fontsize=8,
        )
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(figure, path)


def heldout_curve(record: Mapping[str, Any]) -> List[Tuple[str, float]]:
    """Held-out perplexity in run order: original, then each stage's cut and its training."""
    points = []
    original = record.get("perplexity", {}).get("original")
    if original is not None:
        points.append(("original", original))
    for stage in record.get("stages", []):
        for key, what in (("heldout_ppl_after_prune", "pruned"), ("heldout_ppl_after_train", "trained")):
            if stage.get(key) is not None:
                points.append((f"stage {stage['stage']} {what}", stage[key]))
    return points


_EVENT_MARKERS = {"original": "*", "pruned": "v", "checkpoint": ".", "trained": "o"}
_EVENT_LABELS = {
    "original": "original model",
    "pruned": "after a stage's cut",
    "checkpoint": "at a checkpoint",
    "trained": "after a stage's training",
}


def plot_heldout_tokens(
    series: Mapping[str, Sequence[rr.HeldoutPoint]],
    path: Path,
    styles: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> None:
    """Held-out perplexity of each text over training tokens: every cut is a vertical jump up
    (marked ▼ and dotted), training brings it down (● at each stage's end, · at checkpoints).
    ``styles`` gives a line's matplotlib keywords (color, ls) by its label."""
    figure = Figure(figsize=(9, 4))
    ax = figure.subplots()
    values = [p.ppl for points in series.values() for p in points]
    for name, points in series.items():
        style = dict((styles or {}).get(name, {}))
        (line,) = ax.plot([p.tokens for p in points], [p.ppl for p in points], lw=1, label=name, **style)
        for event, marker in _EVENT_MARKERS.items():
            chosen = [p for p in points if p.event == event]
            ax.plot(
                [p.tokens for p in chosen], [p.ppl for p in chosen], marker, color=line.get_color(),
                ms=9 if marker == "*" else 6, ls="none",
            )
    cuts = sorted({p.tokens for points in series.values() for p in points if p.event == "pruned"})
    for x in cuts:
        ax.axvline(x, color="gray", ls=":", lw=0.8)
    if values and min(values) > 0 and max(values) / min(values) > 4:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1000 else f"{value:.4g}")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        # Over a narrow range the minor ticks are needed as labels; over a wide one they crowd.
        ax.yaxis.set_minor_formatter(plain if max(values) / min(values) < 5 else NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity")
    events = {p.event for points in series.values() for p in points}
    handles, _ = ax.get_legend_handles_labels()
    handles = [h for h in handles if not h.get_label().startswith("_")]
    for event, marker in _EVENT_MARKERS.items():
        if event in events:
            (proxy,) = ax.plot([], [], marker, color="gray", ls="none", label=_EVENT_LABELS[event])
            handles.append(proxy)
    ax.legend(handles=handles, fontsize=8)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)


def plot_heldout(points: Sequence[Tuple[str, float]], path: Path) -> None:
    """The saw-tooth of a run: each cut raises held-out perplexity, each stage's training lowers it."""
    figure = Figure(figsize=(9, 3.5))
    ax = figure.subplots()
    ax.plot(range(len(points)), [value for _, value in points], marker="o", lw=1)
    ax.set_xticks(range(len(points)), [label for label, _ in points], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out perplexity")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def base_model_name(record: Mapping[str, Any]) -> str:
    """The base model as a reader knows it: its Hub id where the checkpoint identifies one.

    Runs record the checkpoint directory they read (``~/.cache/.../SmolLM2-135M-Instruct``),
    which says little to someone reading the report elsewhere; the id is found the way the
    model card finds it, and the recorded value stands when nothing identifies a Hub model.
    """
    recorded = str(record["base_model"])
    try:
        hub_id, _ = resolve_base_model(recorded)
    except BaseModelUnknown:
        return recorded
    return hub_id or recorded


def _run_section(record: Mapping[str, Any]) -> str:
    lines = []
    if "base_model" in record:
        name, recorded = base_model_name(record), record["base_model"]
        lines.append(f"- Base model: `{name}`" + (f" (read from `{recorded}`)" if name != recorded else ""))
    command = rr.reproduce_command(record)
    if command:
        lines.append(f"- Command: `{command}`")
    text = "\n".join(lines) + "\n" if lines else ""
    if "config" in record:
        text += "\n<details><summary>Config</summary>\n\n```json\n"
        text += json.dumps(record["config"], indent=2, default=str) + "\n```\n\n</details>\n"
    return text


def _size_section(record: Mapping[str, Any], before: DecoderArch, after: DecoderArch) -> str:
    params = (
        record.get("params_before", before.num_params()),
        record.get("params_after", after.num_params()),
    )
    prunable = (
        record.get("prunable_params_before", before.prunable_params()),
        record.get("prunable_params_after", after.prunable_params()),
    )
    rows = [
        [
            "parameters",
            format_count(params[0]),
            format_count(params[1]),
            _ratio(params[1], params[0]),
        ],
        [
            "prunable parameters",
            format_count(prunable[0]),
            format_count(prunable[1]),
            _ratio(prunable[1], prunable[0]),
        ],
    ]
    note = ""
    if record.get("speed"):
        speed_rows_, note = speed_rows(record["speed"])
        rows += speed_rows_
    elif "throughput" in record:
        speed = record["throughput"]
        original, pruned = speed.get("original_tokens_per_second"), speed.get(
            "pruned_tokens_per_second"
        )
        rows.append(
            ["tokens/s (forward)", _number(original), _number(pruned), _ratio(pruned, original)]
        )
        note = (
            f"\nThroughput: forward passes without autograd, batch {speed.get('batch_size', '?')} "
            f"× {speed.get('seq_len', '?')} tokens.\n"
        )
    if "perplexity" in record:
        ppl = record["perplexity"]
        rows.append(
            [
                "perplexity",
                _number(ppl.get("original")),
                _number(ppl.get("pruned")),
                _ratio(ppl.get("pruned"), ppl.get("original")),
            ]
        )
        if "recovered" in ppl:
            rows.append(
                [
                    "perplexity after recovery training",
                    "",
                    _number(ppl["recovered"]),
                    _ratio(ppl["recovered"], ppl.get("original")),
                ]
            )
    return markdown_table(["", "original", "pruned", "pruned / original"], rows) + note


_SPEED_ROWS = (
    ("tokens/s (forward)", "forward_tokens_per_second", _number),
    ("tokens/s (generation)", "generate_tokens_per_second", _number),
    ("peak memory (forward)", "forward_peak_memory_bytes", format_bytes),
    ("peak memory (generation)", "generate_peak_memory_bytes", format_bytes),
)


def speed_rows(speed: Mapping[str, Any]) -> Tuple[List[List[str]], str]:
    """Rows of the measured speed and memory (see :mod:`adapt_prune_tune.speed`) and a note
    saying how they were measured."""
    original, pruned = speed.get("original") or {}, speed.get("pruned") or {}
    rows = [
        [title, fmt(original.get(key)), fmt(pruned.get(key)), _ratio(pruned.get(key), original.get(key))]
        for title, key, fmt in _SPEED_ROWS
        if key in original or key in pruned
    ]
    settings = pruned or original
    note = (
        f"\nMeasured on {speed.get('device', settings.get('device', '?'))} in {settings.get('dtype', '?')}: "
        f"forward: batch {settings.get('batch_size', '?')} × {settings.get('seq_len', '?')} tokens, no autograd; "
        f"generation: batch 1, {settings.get('new_tokens', '?')} new tokens greedy after a "
        f"{settings.get('prompt_len', '?')}-token prompt with a KV cache (prefill not counted); "
        f"memory: weights plus the peak the measurement added ({settings.get('memory_measure', '?')}).\n"
    )
    return rows, note


def worth_it_rows(record: Mapping[str, Any], before: DecoderArch, after: DecoderArch) -> List[List[str]]:
    """What the run spent and what came out of it, one row each: ``[group, what, value]``."""
    spent: List[Tuple[str, str]] = []
    if record.get("seconds_run") is not None:
        resumes = int(record.get("resumes", 0))
        spent.append(("wall time", format_seconds(record["seconds_run"]) + (
            f" (resumed {resumes}×; time lost after the last checkpoint before each stop is not counted)"
            if resumes else "")))
    share = rr.prune_share(record)
    if share is not None:
        spent.append(
            ("pruning's share of it", f"{share:.1%} ({format_seconds(rr.prune_seconds(record))})")
        )
    tokens = rr.training_tokens(record)
    if tokens is not None:
        spent.append(("training tokens", f"≈ {tokens:,}"))

    got: List[Tuple[str, str]] = []
    params = (
        record.get("params_before", before.num_params()),
        record.get("params_after", after.num_params()),
    )
    got.append(
        ("parameters", f"{format_count(params[0])} → {format_count(params[1])} ({_ratio(params[1], params[0])})")
    )
    for name, row in rr.perplexity_by_text(record).items():
        stages = [key for key in ("original", "pruned", "recovered") if row.get(key) is not None]
        got.append((
            f"held-out perplexity, {name} ({' → '.join(stages)})",
            " → ".join(format_perplexity(row[key]) for key in stages),
        ))
    ratios = rr.speed_ratios(record)
    for key, what in (("forward", "forward speed"), ("generate", "generation speed")):
        if key in ratios:
            got.append((f"{what}, pruned ÷ original", f"{ratios[key]:.2f}×"))
    if "memory" in ratios:
        got.append(("peak memory (generation), pruned ÷ original", f"{ratios['memory']:.2f}×"))
    rows = [["spent" if i == 0 else "", what, value] for i, (what, value) in enumerate(spent)]
    rows += [["got" if i == 0 else "", what, value] for i, (what, value) in enumerate(got)]
    return rows


def _worth_it_section(record: Mapping[str, Any], before: DecoderArch, after: DecoderArch) -> str:
    rows = worth_it_rows(record, before, after)
    lines = ["| | | |", "|---|---|---:|"] + ["| " + " | ".join(row) + " |" for row in rows]
    note = ""
    if rr.perplexity_by_text(record):
        note = (
            "\nHeld-out perplexity: *pruned* after the last stage's cut, before its training; "
            "*recovered* at the end of the run.\n"
        )
    return "\n".join(lines) + "\n" + note


def _layer_params(arch: DecoderArch, i: int) -> int:
    return arch.layer_attention_params(i) + arch.layer_mlp_params(i)


def _architecture_section(before: DecoderArch, after: DecoderArch, figure: str) -> str:
    rows = [
        [
            i,
            f"{b.num_heads} → {a.num_heads}",
            f"{b.num_kv_heads} → {a.num_kv_heads}",
            f"{b.intermediate_dim} → {a.intermediate_dim}",
            f"{_layer_params(after, i) / _layer_params(before, i):.3f}",
        ]
        for i, (b, a) in enumerate(zip(before.layers, after.layers))
    ]
    return f"![per-layer widths]({figure})\n\n" + markdown_table(
        ["layer", "heads", "KV heads", "MLP width", "params kept"], rows
    )


def _prune_steps_section(prune_steps: Sequence[Mapping[str, Any]], figure: str) -> str:
    rows = [
        [
            step.get("step", i),
            step.get("stage", "–"),
            format_count(step["params"]) if "params" in step else "–",
            _number(step.get("calib_loss")),
            _number(step.get("seconds"), 3),
        ]
        for i, step in enumerate(prune_steps)
    ]
    return f"![layer importance and sparsity per prune step]({figure})\n\n" + markdown_table(
        ["step", "stage", "params", "calibration loss", "seconds"], rows
    )


def _stages_section(stages: Sequence[Mapping[str, Any]]) -> str:
    columns = (
        ("stage", "stage"),
        ("tokens", "tokens"),
        ("train steps", "train_steps"),
        ("params", "params"),
        ("calib. loss before prune", "calib_loss_before_prune"),
        ("calib. loss after prune", "calib_loss_after_prune"),
        ("train loss at end", "train_loss_end"),
        ("held-out ppl after prune", "heldout_ppl_after_prune"),
        ("held-out ppl after training", "heldout_ppl_after_train"),
        ("prune s", "seconds_prune"),
        ("train s", "seconds_train"),
    )
    rows = []
    for stage in stages:
        row = []
        for _, key in columns:
            value = stage.get(key)
            row.append(
                format_count(value)
                if key in ("params", "tokens") and value is not None
                else _number(value)
            )
        rows.append(row)
    return markdown_table([title for title, _ in columns], rows)


def _training_section(train_log: Sequence[Mapping[str, Any]], figure: str) -> str:
    # torchtune logs tokens_per_second_per_gpu; older records of ours tokens_per_second.
    key = "tokens_per_second_per_gpu" if "tokens_per_second_per_gpu" in train_log[0] else "tokens_per_second"
    speeds = [entry[key] for entry in train_log if key in entry]
    curves = training_curves(train_log)
    window = smoothing_window(len(train_log))
    text = f"![loss and learning rate]({figure})\n\n"
    if window > 1:
        text += (
            f"Faint: every step; lines: mean of the last {window} steps (a 25th of the "
            f"{len(train_log)} logged steps), restarting at every prune (dashed lines). "
        )
    else:
        text += f"Every one of the {len(train_log)} logged steps (too few to smooth); prunes dashed. "
    if "kd_loss" in curves or "ce_loss" in curves:
        text += (
            "Distillation: the training loss mixes the student's cross-entropy and the KL "
            "divergence from the unpruned teacher; the teacher's cross-entropy on the same "
            "batches is the floor the student is pulled towards. "
        )
    text += f"Final loss {_number(train_log[-1]['loss'])}"
    if speeds:
        per = " per device" if key.endswith("_per_gpu") else ""
        text += f", mean training throughput {_number(sum(speeds) / len(speeds))} tokens/s{per}"
    return text + ".\n"


def _heldout_section(record: Mapping[str, Any], figure: str) -> str:
    series = rr.heldout_series(record)
    settings = record.get("heldout") or {}
    names = list(series)
    rows = []
    for i, point in enumerate(series[names[0]]):
        if point.event == "checkpoint":
            continue
        label = point.event if point.event == "original" else f"stage {point.stage} {point.event}"
        values = [format_perplexity(series[name][i].ppl) if i < len(series[name]) else "–" for name in names]
        rows.append([label, f"{int(point.tokens):,}", *values])
    checkpoints = sum(point.event == "checkpoint" for point in series[names[0]])
    text = f"![held-out perplexity through the run]({figure})\n\n"
    text += (
        f"{settings.get('num_tokens', '?')} held-out tokens per text in windows of "
        f"{settings.get('window', '?')}; training tokens are the recipe's estimate "
        "(optimizer steps × samples per step × mean sample length)"
    )
    text += f"; {checkpoints} evaluations at checkpoints are in the figure only.\n\n" if checkpoints else ".\n\n"
    return text + markdown_table(["", "training tokens", *names], rows)


def write_report(record: Mapping[str, Any], out_dir: Union[str, Path]) -> Path:
    """Render a run record into ``out_dir/report.md`` and its PNG figures.

    The record (JSON-able; every key but the two architectures is optional)::

        {"base_model": str, "command": str, "config": {...},
         "arch_before": DecoderArch.to_dict(), "arch_after": DecoderArch.to_dict(),
         "params_before": int, "params_after": int,
         "prunable_params_before": int, "prunable_params_after": int,
         "prune_steps": [{"step", "stage", "layer_importance": [float]*L,
                          "layer_sparsity": [float]*L, "calib_loss", "params", "seconds"}],
         "stages": [{"stage", "tokens", "train_steps", "params", "calib_loss_before_prune",
                     "calib_loss_after_prune", "train_loss_end", "heldout_ppl_after_prune",
                     "heldout_ppl_after_train", "seconds_prune", "seconds_train"}],
         "train_log": [{"step", "stage", "loss", "lr", "tokens_per_second_per_gpu",
                        "ce_loss", "kd_loss", "teacher_ce_loss" (distillation)}],
         "seconds_run": float, "resumes": int,  # the run's wall time over every process
         "evaluation": {"<model label>": {"<task>": {"<metric>": float}}},
         "speed": {"original": speed.measure_speed(...), "pruned": ..., "device": str},
         "throughput": {"original_tokens_per_second", "pruned_tokens_per_second",
                        "seq_len", "batch_size"},  # records before "speed"
         "perplexity": {"original", "pruned", "recovered"},  # the first held-out text's
         "perplexity_by_text": {"<text>": {"original", "pruned", "recovered"}},
         "heldout": {"num_tokens", "window", "texts"},
         "heldout_log": [{"step", "tokens", "stage", "event", "ppl": {"<text>": float}}],
         "config_name": str, "overrides": [str], "launch": {"nnodes", "nproc_per_node"}}

    Right under the title one table says what the run spent (wall time, pruning's share,
    training tokens) and what came out (parameters, held-out perplexity, speed); the
    details follow.

    Args:
        record: the run record.
        out_dir: directory for ``report.md`` and the figures (created if needed).

    Returns:
        Path: the path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = DecoderArch.from_dict(record["arch_before"])
    after = DecoderArch.from_dict(record["arch_after"])
    if before.num_layers != after.num_layers:
        raise ValueError(
            f"arch_before has {before.num_layers} layers, arch_after {after.num_layers}"
        )

    title = f"# Pruning report: {base_model_name(record)}" if "base_model" in record else "# Pruning report"
    title += "\n\n" + _worth_it_section(record, before, after)
    sections: List[Tuple[str, str]] = []
    run = _run_section(record)
    if run:
        sections.append(("Run", run))
    sections.append(("Size and speed", _size_section(record, before, after)))
    plot_layer_widths(before, after, out_dir / WIDTHS_PNG)
    sections.append(("Architecture", _architecture_section(before, after, WIDTHS_PNG)))
    if record.get("prune_steps"):
        plot_prune_steps(record["prune_steps"], out_dir / PRUNE_STEPS_PNG)
        sections.append(
            ("Prune steps", _prune_steps_section(record["prune_steps"], PRUNE_STEPS_PNG))
        )
    if record.get("stages"):
        sections.append(("Stages", _stages_section(record["stages"])))
    series = rr.heldout_series(record)
    if sum(len(points) for points in series.values()) > len(series):
        if any(point.tokens for points in series.values() for point in points):
            plot_heldout_tokens(series, out_dir / HELDOUT_PNG)
        else:  # a prune-only run: no training tokens to spread the evaluations over
            plot_heldout(heldout_curve(record), out_dir / HELDOUT_PNG)
        sections.append(("Held-out perplexity", _heldout_section(record, HELDOUT_PNG)))
    if record.get("train_log"):
        plot_training(record["train_log"], out_dir / TRAINING_PNG)
        sections.append(("Training", _training_section(record["train_log"], TRAINING_PNG)))
    if record.get("evaluation"):
        # Imported here: evaluation imports lm-eval, which a run without an evaluation (a
        # machine that trains only, such as the GPU check's) need not have.
        from adapt_prune_tune.evaluation import evaluation_markdown

        sections.append(("Evaluation", evaluation_markdown(record["evaluation"])))

    text = title + "\n\n" + "\n".join(f"## {name}\n\n{body}" for name, body in sections)
    path = out_dir / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
