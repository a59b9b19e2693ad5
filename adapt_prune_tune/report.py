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
import time
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from adapt_prune_tune.evaluation import evaluation_markdown
from adapt_prune_tune.models import DecoderArch

WIDTHS_PNG = "layer_widths.png"
PRUNE_STEPS_PNG = "prune_steps.png"
TRAINING_PNG = "training.png"
HELDOUT_PNG = "heldout.png"


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


def measure_throughput(
    model: nn.Module, vocab_size: int, seq_len: int = 256, batch_size: int = 4, steps: int = 3
) -> float:
    """Forward-pass throughput in tokens per second (no autograd, eval mode).

    One untimed warm-up pass absorbs lazy initialization (CUDA context, kernels, RoPE
    caches); then ``steps`` passes over fixed random tokens are timed, synchronizing the
    device so that queued GPU work is counted. The model's training mode is restored.

    Args:
        model (nn.Module): a decoder taking ``[batch, seq]`` token ids.
        vocab_size (int): token ids are drawn below this.
        seq_len (int): tokens per sequence. Default 256.
        batch_size (int): sequences per pass. Default 4.
        steps (int): timed passes. Default 3.

    Returns:
        float: tokens per second.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocab_size, (batch_size, seq_len), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(tokens)
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                model(tokens)
            _synchronize(device)
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return batch_size * seq_len * steps / elapsed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def format_count(n: float) -> str:
    """A parameter count in the unit people quote models in (135.0M, 1.24B)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


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


def plot_training(train_log: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Loss and learning rate over training steps, stage boundaries dashed."""
    steps = [entry["step"] for entry in train_log]
    figure = Figure(figsize=(9, 6))
    loss_ax, lr_ax = figure.subplots(2, 1, sharex=True)
    loss_ax.plot(steps, [entry["loss"] for entry in train_log], lw=1)
    loss_ax.set_ylabel("training loss")
    lr_ax.plot(steps, [entry["lr"] for entry in train_log], lw=1, color="tab:orange")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    for step, stage in stage_starts(train_log):
        for ax in (loss_ax, lr_ax):
            ax.axvline(step, color="gray", ls="--", lw=0.8)
        loss_ax.annotate(
            f"stage {stage}",
            (step, 1),
            xycoords=("data", "axes fraction"),
            xytext=(2, -12),
            textcoords="offset points",
            fontsize=8,
        )
    for ax in (loss_ax, lr_ax):
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


def _run_section(record: Mapping[str, Any]) -> str:
    lines = []
    if "base_model" in record:
        lines.append(f"- Base model: `{record['base_model']}`")
    if "command" in record:
        lines.append(f"- Command: `{record['command']}`")
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
    if "throughput" in record:
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
    speeds = [entry["tokens_per_second"] for entry in train_log if "tokens_per_second" in entry]
    text = f"![loss and learning rate]({figure})\n\n"
    text += f"{len(train_log)} logged steps, final loss {_number(train_log[-1]['loss'])}"
    if speeds:
        text += f", mean training throughput {_number(sum(speeds) / len(speeds))} tokens/s"
    return text + ".\n"


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
         "train_log": [{"step", "stage", "loss", "lr", "tokens_per_second"}],
         "evaluation": {"<model label>": {"<task>": {"<metric>": float}}},
         "throughput": {"original_tokens_per_second", "pruned_tokens_per_second",
                        "seq_len", "batch_size"},
         "perplexity": {"original", "pruned", "recovered"}}

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

    title = (
        f"# Pruning report: {record['base_model']}"
        if "base_model" in record
        else "# Pruning report"
    )
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
    curve = heldout_curve(record)
    if len(curve) > 1:
        plot_heldout(curve, out_dir / HELDOUT_PNG)
        settings = record.get("heldout", {})
        sections.append((
            "Held-out perplexity",
            f"![held-out perplexity through the run]({HELDOUT_PNG})\n\n"
            f"{settings.get('num_tokens', '?')} held-out tokens in windows of {settings.get('window', '?')}: "
            + ", ".join(f"{label} {_number(value)}" for label, value in curve) + ".\n",
        ))
    if record.get("train_log"):
        plot_training(record["train_log"], out_dir / TRAINING_PNG)
        sections.append(("Training", _training_section(record["train_log"], TRAINING_PNG)))
    if record.get("evaluation"):
        sections.append(("Evaluation", evaluation_markdown(record["evaluation"])))

    text = title + "\n\n" + "\n".join(f"## {name}\n\n{body}" for name, body in sections)
    path = out_dir / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
