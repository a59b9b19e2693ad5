"""The config sections this recipe adds, as one table: every key, its type, range and meaning.

torchtune checks its own components when it instantiates them; the keys this plugin
adds (``pruning.method``, ``pruning.calibration``, ``adapt``, ``heldout``, ``distill``
and a few top-level ones) are plain values that would otherwise be read deep inside a
run, after an 8B checkpoint has loaded. Each key is one ``Setting`` row here and each
rule between keys (exactly one of two, a multiple of another, at most the model's width)
one ``Relation``; a new section is one more ``Section`` in ``SECTIONS``. Everything
else reads this table:

* ``check_sections`` finds every problem of a config at once: unknown keys and
  misspelled sections (with the closest valid name), wrong types, values out of range
  and broken relations, so that one message lists them all;
* ``PruningConfig`` and ``DistillConfig`` validate through it (the table takes their
  defaults, so each default and each rule is written once);
* ``render_markdown`` writes the README's config reference, which a test keeps equal
  to the table: ``python -m adapt_prune_tune.config_schema --markdown`` prints it,
  ``--update-readme README.md`` rewrites it in place.

Top-level keys are ours, the stock ``full_finetune_distributed`` recipe's
(``STOCK_KEYS``), the packaged configs' interpolation helpers (``cache_dir``,
``model_dir``, ...), or helpers of the user's own that the config itself uses through
``${...}``: a top-level key that none of these explains is a typo that nothing would
ever read (``prunning.method.amplitude=0.1`` on the command line creates a new section
``prunning``), and is refused.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from adapt_prune_tune.data import rank_calibration_batch
from adapt_prune_tune.distillation import CALIBRATION_LOSSES, DistillConfig
from adapt_prune_tune.importance import IMPORTANCE_NORMALIZATIONS, SIMILARITY_METRICS
from adapt_prune_tune.pruner import PruningConfig, resolve_target_sparsity
from adapt_prune_tune.scoring import SCORERS
from adapt_prune_tune.sparsity import smallest_mlp_width

REQUIRED = object()  # a Setting's default when the key must be given

# Top-level keys torchtune 0.6.1's recipes/full_finetune_distributed.py (and the
# CheckpointClient it builds) read; tests/test_config_schema.py checks this list
# against the installed file.
STOCK_KEYS = (
    "ac_mode", "ac_option", "batch_size", "checkpointer", "clip_grad_norm", "collate_fn", "compile",
    "cudnn_deterministic_mode", "custom_sharded_layers", "dataset", "device", "dtype",
    "enable_activation_checkpointing", "enable_activation_offloading", "enable_async_checkpointing",
    "epochs", "fsdp_cpu_offload", "fsdp_reshard_after_forward", "gradient_accumulation_steps",
    "log_every_n_steps", "log_peak_memory_stats", "loss", "lr_scheduler", "max_steps_per_epoch",
    "metric_logger", "model", "optimizer", "optimizer_in_bwd", "output_dir", "profiler",
    "resume_from_checkpoint", "seed", "shuffle", "tensor_parallel_dim", "tensor_parallel_plan", "tokenizer",
)


# --------------------------------------------------------------------------- the row types


@dataclass(frozen=True)
class Range:
    """An interval of numbers; ``None`` ends are unbounded, ``open`` ends exclusive."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""


ANY = Range()
# Kinds of value: scalars, a torchtune component (a mapping with ``_component_``), or a
# mapping of names to components.
KINDS = ("int", "float", "bool", "str", "component", "components")


@dataclass(frozen=True)
class Setting:
    """One key of a section: what it holds, what it may be, what it does."""

    name: str
    kind: str  # one of KINDS; "str" with choices is a choice
    default: Any
    doc: str
    range: Range = ANY
    choices: Tuple[str, ...] = ()
    nullable: bool = False  # null allowed (one of a pair, an optional component)
    why: str = ""  # appended to the range in messages, e.g. "0: labels only, 1: teacher only"

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def expectation(self) -> str:
        """What a valid value is, in words: 'an integer >= 1', 'in [0, 1)', "one of ('ce', 'kl')"."""
        if self.choices:
            text = f"one of {self.choices!r}"
        elif self.kind == "int":
            text = "an integer" + (f" {self.range}" if str(self.range) else "")
        elif self.kind == "float":
            bounded = self.range.low is not None and self.range.high is not None
            text = str(self.range) if bounded else "a finite number" + (f" {self.range}" if str(self.range) else "")
        elif self.kind == "bool":
            text = "True or False"
        elif self.kind == "str":
            text = "a string"
        elif self.kind == "component":
            text = "a component (a mapping with _component_)"
        else:
            text = "a mapping of names to components"
        return text + (" or null" if self.nullable else "")

    def problem(self, key: str, value: Any) -> Optional[str]:
        """Why ``value`` is not valid for this setting (``key``: its dotted name), or None."""
        if value is None:
            return None if self.nullable else self._refuse(key, value)
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v in self.range,
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and v in self.range,
            "bool": lambda v: isinstance(v, bool),
            "str": lambda v: isinstance(v, str) and (not self.choices or v in self.choices),
            "component": _is_component,
            "components": lambda v: isinstance(v, (Mapping, DictConfig))
            and len(v) > 0
            and all(_is_component(c) for c in v.values()),
        }[self.kind]
        return None if ok(value) else self._refuse(key, value)

    def _refuse(self, key: str, value: Any) -> str:
        why = f" ({self.why})" if self.why else ""
        shown = _show(value)
        if isinstance(value, str) and self.kind in ("int", "float", "bool"):
            shown += " (a string)"
        return f"{key} must be {self.expectation()}{why}, got {shown}"


def _is_component(value: Any) -> bool:
    return isinstance(value, (Mapping, DictConfig)) and isinstance(value.get("_component_", None), str)


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value)


@dataclass(frozen=True)
class Context:
    """What relations may look at besides their own section."""

    values: Mapping[str, Optional[Dict[str, Any]]]  # every section's valid values (None: absent/invalid)
    world_size: Optional[int] = None  # data-parallel ranks of the run
    arch: Any = None  # the base model's DecoderArch (built on the meta device)


@dataclass(frozen=True)
class Relation:
    """A rule between keys: ``check(values, context)`` returns the problem, or None.

    ``keys`` are the settings it reads (empty: all of its section's); it runs when they
    are all valid, so one wrong key does not hide the other problems. ``needs`` names what
    else it reads: ``world_size``, ``model`` or another section's path; it runs only when
    those are known and valid.
    """

    doc: str
    check: Callable[[Dict[str, Any], Context], Optional[str]]
    keys: Tuple[str, ...] = ()
    needs: Tuple[str, ...] = ()

    def ready(self, bad: Set[str], ctx: Context) -> bool:
        blocking = bad & set(self.keys) if self.keys else bad
        if blocking:
            return False
        for need in self.needs:
            if need == "world_size" and ctx.world_size is None:
                return False
            if need == "model" and ctx.arch is None:
                return False
            if need not in ("world_size", "model") and ctx.values.get(need) is None:
                return False
        return True


@dataclass(frozen=True)
class Section:
    """A mapping of settings at ``path`` ('' = the top level) and the relations between them."""

    path: str
    doc: str
    settings: Tuple[Setting, ...]
    relations: Tuple[Relation, ...] = ()
    optional: bool = False  # absent or null: the feature is off

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.settings]

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def defaults(self) -> Dict[str, Any]:
        return {s.name: s.default for s in self.settings if not s.required}

    def validate(self, values: Mapping[str, Any]) -> Tuple[List[str], Dict[str, Any], Set[str]]:
        """Unknown and missing keys, wrong types and ranges: (problems, valid values with defaults, bad keys)."""
        problems = [] if not self.path else unknown_keys(values, self.names, self.path)
        bad: Set[str] = set()
        for s in self.settings:
            problem = None
            if s.name in values:
                problem = s.problem(self.key(s.name), values[s.name])
            elif s.required:
                problem = f"{self.key(s.name)} is missing: {s.doc}"
            if problem:
                problems.append(problem)
                bad.add(s.name)
        good = {**self.defaults(), **{k: v for k, v in values.items() if k in self.names and k not in bad}}
        return problems, good, bad

    def problems(self, values: Mapping[str, Any]) -> List[str]:
        """Every problem of the section alone: its keys, then the relations between them.

        What a dataclass of the section checks; ``check_sections`` adds the relations that read
        other sections, the number of ranks or the model.
        """
        problems, good, bad = self.validate(values)
        ctx = Context(values={})
        for relation in self.relations:
            if not relation.needs and relation.ready(bad, ctx):
                problem = relation.check(good, ctx)
                if problem:
                    problems.append(problem)
        return problems


def closest(name: str, known: Sequence[str]) -> Optional[str]:
    match = difflib.get_close_matches(str(name), list(known), n=1)
    return match[0] if match else None


def section(cfg: DictConfig, path: str) -> Any:
    """The mapping at ``path``, or an empty one where the config has something else there
    (the config table reports that; a check reading one key must not crash on it first)."""
    node = OmegaConf.select(cfg, path, default=None, throw_on_resolution_failure=False)
    return node if isinstance(node, DictConfig) else {}


def unknown_keys(values: Mapping[str, Any], known: Sequence[str], path: str) -> List[str]:
    """``path.key: unknown key (did you mean path.closest?)`` for every key not in ``known``."""
    out = []
    for key in values:
        if key not in known:
            close = closest(key, known)
            hint = f"did you mean {path}.{close}?" if close else f"{path} takes {', '.join(known)}"
            out.append(f"{path}.{key}: unknown key ({hint})")
    return out


# --------------------------------------------------------------------------- relations


def exactly_one(a: str, b: str, path: str, why: str = "") -> Relation:
    def check(v: Dict[str, Any], ctx: Context) -> Optional[str]:
        if (v[a] is None) == (v[b] is None):
            return f"{path}: set exactly one of {a} or {b}{why} (got {_show(v[a])} and {_show(v[b])})"
        return None

    return Relation(f"exactly one of `{a}` and `{b}` is set", check, (a, b))


def stage_steps_problem(total_steps: int, stages: int) -> Optional[str]:
    """A run's optimizer steps must be none (prune only) or at least one per stage."""
    if total_steps < 0:
        return f"adapt.total_tokens/total_steps must be >= 0, got {total_steps}"
    if 0 < total_steps < stages:
        return (
            f"The token budget gives {total_steps} optimizer steps for {stages} stages; every stage needs at "
            "least one: raise adapt.total_tokens/total_steps or lower adapt.stages"
        )
    return None


def _widest(arch, width: Callable[[Any], int]) -> int:
    return max(width(layer) for layer in arch.layers)


def _min_kv_heads(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    model = _widest(ctx.arch, lambda layer: layer.num_kv_heads)
    if v["prune_attention"] and v["min_kv_heads"] > model:
        return (
            f"pruning.method.min_kv_heads={v['min_kv_heads']} exceeds the model's {model} KV heads per layer: "
            f"no KV group could ever be removed; use at most {model} (or prune_attention=False)"
        )
    return None


def _min_q_per_kv(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    model = _widest(ctx.arch, lambda layer: layer.num_heads // layer.num_kv_heads)
    if v["prune_attention"] and v["min_q_per_kv"] > model:
        return (
            f"pruning.method.min_q_per_kv={v['min_q_per_kv']} exceeds the model's {model} query heads per KV "
            f"head: use at most {model} (or prune_attention=False)"
        )
    return None


def _min_mlp_width(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    model = _widest(ctx.arch, lambda layer: layer.intermediate_dim)
    smallest = smallest_mlp_width(v["min_mlp_channels"], v["round_to"])
    if v["prune_mlp"] and smallest > model:
        return (
            f"pruning.method.min_mlp_channels={v['min_mlp_channels']} rounded up to round_to={v['round_to']} "
            f"({smallest}) exceeds the model's MLP width ({model}): lower them (or prune_mlp=False)"
        )
    return None


def _reachable_target(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    try:
        cfg = PruningConfig(**v)
    except ValueError:
        return None  # the section's own problems, reported by its rows and relations
    try:
        resolve_target_sparsity(ctx.arch, cfg)
    except ValueError as e:
        return str(e)
    return None


def _calibration_split(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    try:
        rank_calibration_batch(v["num_samples"], v["batch_size"], ctx.world_size)
    except ValueError as e:
        return str(e)
    return None


def _training_steps(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    return None if v["total_steps"] is None else stage_steps_problem(v["total_steps"], v["stages"])


def _windows(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    if v["num_tokens"] % v["window"]:
        return (
            f"heldout.num_tokens ({v['num_tokens']}) must be a positive multiple of heldout.window ({v['window']}): "
            "the text is read as num_tokens // window windows"
        )
    return None


def _something_to_distil_into(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    adapt = ctx.values["adapt"]
    if v["enabled"] and v["calibration_loss"] == "ce" and 0 in (adapt["total_tokens"], adapt["total_steps"]):
        return (
            "distill.enabled=True but adapt.total_tokens/total_steps is 0 (prune only): there is no "
            "training to distil into; set distill.enabled=False, give a token budget, or use "
            "distill.calibration_loss=kl to score groups against the teacher"
        )
    return None


def _resume_or_overwrite(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    if v["resume_from_checkpoint"] and v["overwrite_output_dir"]:
        return (
            "resume_from_checkpoint=True and overwrite_output_dir=True contradict each other: resume continues "
            "the run in output_dir, overwrite deletes it; set one"
        )
    return None


def _either_text(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    if (v["text"] is None) == (v["texts"] is None):
        return "heldout: give either `text:` (one text) or `texts:` (name: text, ...), not both"
    return None


# --------------------------------------------------------------------------- the table

_P = PruningConfig  # the method's defaults live on its dataclass, with the paper's values noted
_D = DistillConfig

TOP_LEVEL = Section(
    "",
    "Top-level keys the recipe reads itself (besides torchtune's).",
    (
        Setting("output_dir", "str", REQUIRED, "the run's directory: `checkpoints/`, `final/`, `run_record.json`, "
                "`report.md`, `logs/`"),
        Setting("resume_from_checkpoint", "bool", False, "continue from `output_dir/checkpoints/latest`; "
                "False starts a fresh run, refused where `output_dir` already holds one"),
        Setting("overwrite_output_dir", "bool", False, "a fresh run may replace the run in `output_dir`: its "
                "`checkpoints/`, `final/`, `run_record.json` and report are deleted once every check has passed"),
        Setting("compile_widths", "str", "dynamic", "with `compile: True`, how graphs meet pruned widths: "
                "dynamic = MLP widths are symbolic from the first trace, so one graph serves every width and a "
                "resize compiles nothing new (a changed head count still does); static = one graph per "
                "distinct layer shape, rebuilt after every resize",
                choices=("dynamic", "static")),
        Setting("enable_fp8_training", "bool", False, "decoder projections train with torchao float8 matmuls, "
                "re-converted after every resize; needs a CUDA GPU of compute capability >= 8.9 and "
                "`pruning.method.round_to` a multiple of 16"),
    ),
    (
        Relation("not both `resume_from_checkpoint` and `overwrite_output_dir`", _resume_or_overwrite,
                 keys=("resume_from_checkpoint", "overwrite_output_dir")),
    ),
)

PRUNING_METHOD = Section(
    "pruning.method",
    "The Adapt-Pruner method's knobs (`adapt_prune_tune.pruner.PruningConfig`).",
    (
        Setting("target_sparsity", "float", _P.target_sparsity, "fraction of the prunable (attention + MLP "
                "projection) parameters to remove", Range(0, 1, high_open=True), nullable=True),
        Setting("target_params", "int", _P.target_params, "or: whole-model parameter count to stop at "
                "(embeddings are never pruned)", Range(1), nullable=True),
        Setting("steps", "int", _P.steps, "prune steps of the single-process `prune` driver (paper: 50); the "
                "recipe takes `adapt.stages × adapt.steps_per_stage`", Range(1)),
        Setting("amplitude", "float", _P.amplitude, "A: how far layer importance moves a layer's sparsity per "
                "step; 0 = uniform (LLM-Pruner), paper best 0.02 at 50 steps", Range(0)),
        Setting("similarity", "str", _P.similarity, "layer importance from the similarity of its input and "
                "output hidden states", choices=SIMILARITY_METRICS),
        Setting("importance_normalization", "str", _P.importance_normalization, "scale of layer importance "
                "before A multiplies it (max: paper, mean 0 and max |I| = 1)",
                choices=tuple(IMPORTANCE_NORMALIZATIONS)),
        Setting("scorer", "str", _P.scorer, "group score (taylor: |W·∂L/∂W| summed per group, the paper's)",
                choices=SCORERS),
        Setting("max_layer_sparsity", "float", _P.max_layer_sparsity, "no layer loses more than this fraction "
                "(official code: 0.99)", Range(0, 1, low_open=True, high_open=True)),
        Setting("prune_attention", "bool", _P.prune_attention, "remove whole KV groups and equal query heads "
                "per group (GQA-consistent)"),
        Setting("prune_mlp", "bool", _P.prune_mlp, "remove MLP channels (w1/w3 rows with w2 columns)"),
        Setting("min_kv_heads", "int", _P.min_kv_heads, "KV heads every layer keeps", Range(1)),
        Setting("min_q_per_kv", "int", _P.min_q_per_kv, "query heads per KV head every layer keeps", Range(1)),
        Setting("min_mlp_channels", "int", _P.min_mlp_channels, "MLP channels every layer keeps", Range(1)),
        Setting("round_to", "int", _P.round_to, "MLP widths in multiples of this (64 on GPUs); 1 = any width",
                Range(1), why="MLP widths are kept at multiples of it; 1 = any width"),
        Setting("attention_allocation", "str", _P.attention_allocation, "split of a layer's budget between "
                "heads and MLP channels: by Taylor score, or the same fraction of each",
                choices=("score", "proportional")),
        Setting("seed", "int", _P.seed, "seed of the random scorer and of tie breaks"),
    ),
    (
        exactly_one("target_sparsity", "target_params", "pruning.method"),
        Relation(
            "`prune_attention` or `prune_mlp` (or both) is True",
            lambda v, ctx: None if v["prune_attention"] or v["prune_mlp"] else
            "pruning.method: enable prune_attention and/or prune_mlp (both are False: nothing to prune)",
            keys=("prune_attention", "prune_mlp"),
        ),
        Relation("`min_kv_heads` ≤ the model's KV heads per layer (with `prune_attention`)", _min_kv_heads,
                 keys=("prune_attention", "min_kv_heads"), needs=("model",)),
        Relation("`min_q_per_kv` ≤ the model's query heads per KV head (with `prune_attention`)", _min_q_per_kv,
                 keys=("prune_attention", "min_q_per_kv"), needs=("model",)),
        Relation("`min_mlp_channels` rounded up to `round_to` ≤ the model's MLP width (with `prune_mlp`)",
                 _min_mlp_width, keys=("prune_mlp", "min_mlp_channels", "round_to"), needs=("model",)),
        Relation("the target is reachable: `target_params` lies between what cannot be pruned and the model's "
                 "size, and the target sparsity within what the minimum widths and `max_layer_sparsity` allow",
                 _reachable_target, needs=("model",)),
    ),
)


def _window_fits_the_model(key: str) -> Callable[[Dict[str, Any], Context], Optional[str]]:
    """A window of n tokens is scored as n - 1 positions (each predicts the next token), which
    the model's RoPE cache must cover: a longer one fails its first forward, after the weights loaded."""
    leaf = key.rsplit(".", 1)[1]

    def check(v: Dict[str, Any], ctx: Context) -> Optional[str]:
        n, most = v[leaf], ctx.arch.max_seq_len
        if n - 1 > most:
            return (f"{key}={n}: a window of {n} tokens feeds {n - 1} positions to the model, whose max_seq_len "
                    f"is {most}; set {key} to at most {most + 1}")
        return None

    return check


PRUNING_CALIBRATION = Section(
    "pruning.calibration",
    "The calibration windows every prune step measures importance and Taylor scores on (the same windows "
    "at every step).",
    (
        Setting("dataset", "component", REQUIRED, "a torchtune dataset component (its tokenized samples are "
                "concatenated and cut into windows)"),
        Setting("num_samples", "int", REQUIRED, "windows per prune step, over all ranks (paper code: 512)",
                Range(1)),
        Setting("seq_len", "int", REQUIRED, "tokens per window (paper code: 64)", Range(2)),
        Setting("batch_size", "int", REQUIRED,
                "most windows per forward/backward on one rank (memory only: a rank's share runs in equal batches, "
                "the largest divisor of it up to this; a resume may lower it, the cut stays the same)",
                Range(1)),
    ),
    (
        Relation("`num_samples` is a multiple of the data-parallel ranks (each rank runs its share in equal "
                 "batches: the largest divisor up to `batch_size`)", _calibration_split,
                 keys=("num_samples", "batch_size"), needs=("world_size",)),
        Relation("`seq_len` - 1 ≤ the model's `max_seq_len`", _window_fits_the_model("pruning.calibration.seq_len"),
                 keys=("seq_len",), needs=("model",)),
    ),
)

ADAPT = Section(
    "adapt",
    "Adapt-Accel's interleaving: stages of pruning, each followed by recovery training.",
    (
        Setting("stages", "int", REQUIRED, "N: stage k prunes to k/N of the target, then trains", Range(1)),
        Setting("steps_per_stage", "int", 1, "adaptive prune steps inside each stage", Range(1)),
        Setting("total_tokens", "int", None, "recovery tokens over all stages; stage k trains on 2k/(N(N+1)) "
                "of them", Range(0), nullable=True),
        Setting("total_steps", "int", None, "or: optimizer steps over all stages (0 = prune only)", Range(0),
                nullable=True),
        Setting("checkpoint_every_n_steps", "int", 50, "a resumable checkpoint every this many training steps "
                "(and after every stage's prune)", Range(1)),
        Setting("keep_last_checkpoints", "int", 2, "checkpoints kept in `output_dir/checkpoints` (0 = all)",
                Range(0)),
        Setting("optimizer_state", "str", "slice", "at a resize: carry the kept channels' optimizer state "
                "(slice) or start fresh (reset; needed for state not shaped like its parameter, e.g. Adafactor's)",
                choices=("slice", "reset")),
    ),
    (
        exactly_one("total_tokens", "total_steps", "adapt", " (0 = prune only)"),
        Relation("`total_steps` is 0 or at least `stages` (every stage trains at least one step)",
                 _training_steps, keys=("total_steps", "stages")),
    ),
)

HELDOUT = Section(
    "heldout",
    "Held-out perplexity of the original model, after every stage's prune and after its training; "
    "`heldout: null` skips it.",
    (
        Setting("text", "component", None, "one text: a component returning a string (named `heldout`)",
                nullable=True),
        Setting("texts", "components", None, "or: several, `name: component`; the first is the run's headline "
                "figure", nullable=True),
        Setting("num_tokens", "int", REQUIRED, "the first this many tokens of each text", Range(2)),
        Setting("window", "int", REQUIRED, "tokens per evaluation window", Range(2)),
        Setting("batch_size", "int", 4, "windows per forward", Range(1)),
        Setting("at_checkpoints", "bool", False, "also evaluate at every mid-stage checkpoint"),
    ),
    (
        Relation("exactly one of `text` and `texts` is set", _either_text, keys=("text", "texts")),
        Relation("`num_tokens` is a multiple of `window`", _windows, keys=("num_tokens", "window")),
        Relation("`window` - 1 ≤ the model's `max_seq_len`", _window_fits_the_model("heldout.window"),
                 keys=("window",), needs=("model",)),
    ),
    optional=True,
)

DISTILL = Section(
    "distill",
    "Knowledge distillation from the unpruned model during every stage's training "
    "(`adapt_prune_tune.distillation.DistillConfig`); absent or null: off.",
    (
        Setting("enabled", "bool", _D.enabled, "distil from the base checkpoint (or `teacher_checkpointer`)"),
        Setting("alpha", "float", _D.alpha, "weight of the KL term", Range(0, 1),
                why="0: labels only, 1: teacher only"),
        Setting("temperature", "float", _D.temperature, "T; the KL term is scaled by T²",
                Range(0, low_open=True), why="1 = no softening"),
        Setting("calibration_loss", "str", _D.calibration_loss, "Taylor scores from next-token CE (paper) or "
                "from the KL to the teacher", choices=CALIBRATION_LOSSES),
        Setting("teacher_model", "component", None, "another teacher than the base model (same tokenizer "
                "family); default: `model`", nullable=True),
        Setting("teacher_checkpointer", "component", None, "its weights; default: the run's `checkpointer`",
                nullable=True),
    ),
    (
        Relation("with `enabled` and `calibration_loss: ce`, the run trains (`adapt.total_tokens/total_steps` "
                 "not 0)", _something_to_distil_into, keys=("enabled", "calibration_loss"), needs=("adapt",)),
    ),
    optional=True,
)

def _speed_fits_the_model(v: Dict[str, Any], ctx: Context) -> Optional[str]:
    if v["seq_len"] > ctx.arch.max_seq_len:
        return f"speed.seq_len={v['seq_len']} exceeds the model's max_seq_len ({ctx.arch.max_seq_len})"
    return None


SPEED = Section(
    "speed",
    "Forward and generation speed and peak memory of the original and the pruned model, measured at the end "
    "of the run (report and model card); `speed: null` skips it.",
    (
        Setting("seq_len", "int", 512, "tokens per sequence of the timed forward batch", Range(1)),
        Setting("batch_size", "int", 1, "sequences of the timed forward batch", Range(1)),
        Setting("new_tokens", "int", 64, "tokens generated greedily at batch 1 (one prefill, then decode steps)",
                Range(2)),
    ),
    (
        Relation("`seq_len` ≤ the model's `max_seq_len`", _speed_fits_the_model, keys=("seq_len",),
                 needs=("model",)),
    ),
    optional=True,
)

SECTIONS: Tuple[Section, ...] = (TOP_LEVEL, PRUNING_METHOD, PRUNING_CALIBRATION, ADAPT, HELDOUT, DISTILL, SPEED)
SCHEMA: Dict[str, Section] = {s.path: s for s in SECTIONS}


def _containers() -> Dict[str, List[str]]:
    """Every section path's parent and the children it takes: {'': [pruning, adapt, ...], 'pruning': [...]}."""
    out: Dict[str, List[str]] = {}
    for s in SECTIONS:
        parts = s.path.split(".") if s.path else []
        for depth in range(len(parts)):
            parent, child = ".".join(parts[:depth]), parts[depth]
            out.setdefault(parent, [])
            if child not in out[parent]:
                out[parent].append(child)
    return out


# --------------------------------------------------------------------------- checking a config

_REFERENCE = re.compile(r"\$\{\s*([A-Za-z_]\w*)((?:\.\w+|\[[^\]]*\])*)\s*\}")
_SELECT = re.compile(r"\$\{\s*oc\.select\s*:\s*([A-Za-z_]\w*)")


def interpolated_keys(cfg: DictConfig) -> set:
    """Top-level names the config reads through ``${name...}`` or ``${oc.select:name,...}`` (unresolved)."""
    found = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            found.update(m.group(1) for m in _REFERENCE.finditer(node))
            found.update(m.group(1) for m in _SELECT.finditer(node))

    walk(OmegaConf.to_container(cfg, resolve=False))
    return found


@lru_cache(maxsize=None)
def packaged_helper_keys() -> Tuple[str, ...]:
    """Top-level helpers the packaged configs define for interpolation (``cache_dir``, ``model_dir``, ...).

    Known in every config: one copied from a packaged config keeps them even after its
    paths are made absolute and nothing uses them any more.
    """
    from adapt_prune_tune import configs

    ours = set(_containers()[""]) | set(TOP_LEVEL.names) | set(STOCK_KEYS)
    helpers: Dict[str, None] = {}
    for name in configs.available():
        cfg = OmegaConf.load(configs.resolve(name))
        for key in cfg.keys():
            if key not in ours and key in interpolated_keys(cfg):
                helpers[str(key)] = None
    return tuple(helpers)


def known_top_level_keys() -> List[str]:
    return sorted(set(_containers()[""]) | set(TOP_LEVEL.names) | set(STOCK_KEYS) | set(packaged_helper_keys()))


def _read(node: Any, path: str, keys: Optional[Sequence[str]] = None) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """A section's keys (or only ``keys``) with interpolations resolved one by one.

    A broken interpolation is a problem of its key, not a crash of the whole check.
    """
    if not isinstance(node, DictConfig):
        return None, [f"{path} must be a section (a mapping of keys), got {_show(node)}"]
    values, problems = {}, []
    for key in node.keys():
        if keys is not None and key not in keys:
            continue
        try:
            values[str(key)] = node[key]
        except Exception as e:  # noqa: BLE001 - any resolution error is the user's to fix
            name = f"{path}.{key}" if path else str(key)
            problems.append(f"{name}: cannot resolve its value ({type(e).__name__}: {str(e).splitlines()[0]})")
    return values, problems


def _interpolations(node: Any) -> Dict[str, str]:
    """A section's keys whose value is a ``${...}`` reference, with the reference as written."""
    if not isinstance(node, DictConfig):
        return {}
    out = {}
    for key in node.keys():
        if OmegaConf.is_interpolation(node, str(key)):
            out[str(key)] = str(node._get_node(key)._value())
    return out


def _name_source(problem: str, path: str, interpolated: Mapping[str, str]) -> str:
    """A key's problem, naming the key its value comes from when it is a reference.

    E.g. the packaged configs set ``pruning.method.seed: ${seed}``; after ``seed=null`` the
    user should read that it is ``seed`` to change, not a key they never wrote.
    """
    for key, source in interpolated.items():
        name = f"{path}.{key}" if path else key
        if problem.startswith(f"{name} "):
            return f"{problem} (this config sets it to {source}: change that key, or give {name} a value of its own)"
    return problem


@dataclass
class SchemaResult:
    problems: List[str]
    values: Dict[str, Optional[Dict[str, Any]]]  # per section path: valid values with defaults, None otherwise

    def config(self, path: str) -> Optional[Dict[str, Any]]:
        return self.values.get(path)


def check_sections(cfg: DictConfig, world_size: Optional[int] = None, arch: Any = None) -> SchemaResult:
    """Every problem of ``cfg``'s top-level keys and of our sections, and their valid values.

    Relations that need the data-parallel ``world_size`` or the model's ``arch`` run when
    those are given (the recipe gives both; unit tests may leave them out).
    """
    problems: List[str] = []
    known, referenced = known_top_level_keys(), interpolated_keys(cfg)
    for key in cfg.keys():
        if isinstance(key, str) and key.startswith("+") and key[1:] in cfg:
            # Hydra's `+key=value`: torchtune's parser keeps the '+' as part of a new top-level key.
            node = cfg.get(key)
            leaves = sorted(OmegaConf.to_container(node, resolve=False).keys()) if isinstance(node, DictConfig) else []
            written = ", ".join(f"{key[1:]}.{leaf}=..." for leaf in leaves) or f"{key[1:]}=..."
            problems.append(f"{key}: tune run adds a key with a plain `key=value`, without Hydra's '+': write {written}")
            continue
        if key not in known and key not in referenced:
            close = closest(key, known + sorted(referenced))
            problems.append(
                f"{key}: unknown top-level key, nothing reads it"
                + (f" (did you mean {close}?)" if close else "")
                + "; a helper key of your own is fine once the config uses it through ${...}"
            )
    for parent, children in _containers().items():
        if parent and parent not in SCHEMA:  # a section of sections, e.g. pruning: {method, calibration}
            node = OmegaConf.select(cfg, parent, default=None, throw_on_resolution_failure=False)
            if isinstance(node, DictConfig):
                problems += unknown_keys({k: None for k in node.keys()}, children, parent)

    raw: Dict[str, Optional[Dict[str, Any]]] = {}
    interpolated: Dict[str, Dict[str, str]] = {}
    for section in SECTIONS:
        node = cfg if not section.path else OmegaConf.select(
            cfg, section.path, default=None, throw_on_resolution_failure=False
        )
        if node is None:
            raw[section.path] = None
            if not section.optional:
                problems.append(f"missing section `{section.path}:` (configs/smollm2/135M_adapt.yaml has one)")
            continue
        values, read_problems = _read(node, section.path, section.names if not section.path else None)
        problems += read_problems
        raw[section.path] = values if not read_problems else None
        interpolated[section.path] = _interpolations(node)

    # First every section alone, then the relations that read other sections, ranks or the model.
    checked: Dict[str, Tuple[Dict[str, Any], Set[str]]] = {}
    valid: Dict[str, Optional[Dict[str, Any]]] = {}
    for section in SECTIONS:
        values = raw.get(section.path)
        valid[section.path] = None
        if values is not None:
            own, good, bad = section.validate(values)
            problems += [_name_source(p, section.path, interpolated.get(section.path, {})) for p in own]
            checked[section.path] = (good, bad)
            valid[section.path] = None if bad else good
    ctx = Context(values=valid, world_size=world_size, arch=arch)
    for section in SECTIONS:
        if section.path not in checked:
            continue
        good, bad = checked[section.path]
        for relation in section.relations:
            if relation.ready(bad, ctx):
                problem = relation.check(good, ctx)
                if problem:
                    problems.append(problem)
    return SchemaResult(problems, valid)


def pruning_config(values: Mapping[str, Any]) -> PruningConfig:
    return PruningConfig(**{k: values[k] for k in PRUNING_METHOD.names})


def distill_config(values: Optional[Mapping[str, Any]]) -> DistillConfig:
    if values is None:
        return DistillConfig()
    return DistillConfig(**{f.name: values[f.name] for f in fields(DistillConfig)})


# --------------------------------------------------------------------------- the reference

MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")


def _default_text(s: Setting) -> str:
    if s.required:
        return "required"
    if s.default is None:
        return "`null`"
    return f"`{s.default}`"


def _type_text(s: Setting) -> str:
    base = {"int": "int", "float": "float", "bool": "bool", "str": "choice" if s.choices else "str",
            "component": "component", "components": "name: component"}[s.kind]
    return base + (" or null" if s.nullable else "")


def _allowed_text(s: Setting) -> str:
    if s.choices:
        return " \\| ".join(f"`{c}`" for c in s.choices)
    return str(s.range).replace("in ", "", 1) if str(s.range) else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """The README's config reference, from the table (no trailing newline)."""
    stock = ", ".join(f"`{k}`" for k in STOCK_KEYS)
    lines = [
        "<!-- generated from adapt_prune_tune/config_schema.py: edit the table there, then run "
        "`python -m adapt_prune_tune.config_schema --update-readme README.md` -->",
        "",
        "Checked when `tune run adapt_prune_recipe` starts, before the model or any data loads, and by "
        "`adapt-prune-tune plan` (which reports file problems as warnings); one message lists every problem found.",
        "",
        "- **Keys.** A key these tables do not list is refused with the closest valid name. A top-level key "
        f"must be one of ours (below), one the stock `full_finetune_distributed` recipe reads ({stock}), or a "
        "helper that the config uses through `${...}` interpolation: the packaged configs' ("
        + ", ".join(f"`{k}`" for k in packaged_helper_keys())
        + ") or your own.",
        "- **Files.** The base checkpoint (`checkpointer.checkpoint_dir` and its `checkpoint_files`), the "
        "tokenizer's files, local data files (`source: json` and the like, with `data_files`) and held-out "
        "texts exist; `output_dir` is writable and its disk has room for one run checkpoint (the weights and "
        "two AdamW moments, in the training dtype; fp32 moments for torchao's low-bit optimizers) and for "
        "packed training text a `cache_dir` will keep (6 bytes a token of `max_tokens`; on another disk, that "
        "disk has room for it).",
        "- **Earlier runs.** A fresh run does not start in an `output_dir` that holds a run (`checkpoints/` with "
        "a complete checkpoint, `final/` or `run_record.json`): `resume_from_checkpoint=True` continues it, "
        "`overwrite_output_dir=True` replaces it.",
        "- **torchtune's keys.** Those a resize cannot carry are refused (`optimizer_in_bwd`, "
        "`tensor_parallel_dim` > 1, `enable_async_checkpointing`), and so are `epochs` other than 1 and "
        "`max_steps_per_epoch`: the run's length is `adapt.total_tokens` or `adapt.total_steps`. "
        "`custom_sharded_layers` must name modules of the model exactly, and not the embedding of a model "
        "with tied embeddings (its output projection reads that weight outside the embedding's FSDP unit); "
        "`fsdp_cpu_offload` needs `device: cuda`. A run that trains needs `tokenizer.max_seq_len` set and "
        "within the model's `max_seq_len`.",
    ]
    tags = {"model": " — against the model, built on the meta device", "world_size": " — for the run's ranks"}
    for section in SECTIONS:
        title = "top level" if not section.path else f"`{section.path}`"
        optional = " Optional." if section.optional else ""
        lines += ["", f"### {title}", "", section.doc + optional, ""]
        lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for s in section.settings:
            lines.append(
                f"| `{s.name}` | {_type_text(s)} | {_default_text(s)} | {_allowed_text(s)} | {_cell(s.doc)} |"
            )
        if section.relations:
            lines += ["", "Checked together:", ""]
            for r in section.relations:
                lines.append(f"- {r.doc}{''.join(tags.get(n, '') for n in r.needs)}")
    return "\n".join(lines)


def readme_reference(text: str) -> str:
    """What README text holds between the reference markers."""
    start, end = MARKERS
    if start not in text or end not in text:
        raise ValueError(f"README has no {start} ... {end} block")
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def update_readme(path: Path) -> bool:
    """Rewrite the block between the markers from the table; True if it changed."""
    text = path.read_text(encoding="utf-8")
    old = readme_reference(text)
    new = render_markdown()
    if old == new:
        return False
    start, end = MARKERS
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{new}\n{end}{tail}", encoding="utf-8")
    return True


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adapt_prune_tune.config_schema", description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the config reference (Markdown)")
    parser.add_argument("--update-readme", type=Path, metavar="README", help="rewrite the reference in this file")
    args = parser.parse_args(argv)
    if args.update_readme:
        changed = update_readme(args.update_readme)
        print(f"{args.update_readme}: {'updated' if changed else 'already up to date'}")
    if args.markdown or not args.update_readme:
        print(render_markdown())


if __name__ == "__main__":
    main()
