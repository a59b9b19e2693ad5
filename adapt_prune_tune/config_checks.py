"""Up-front checks of a recipe config, shared by the recipe and ``adapt-prune-tune plan``.

Everything here reads the config and the file system, not the weights: models are built
on the meta device, which is enough to know whether a target is reachable, whether a
teacher can teach the student and how large a checkpoint will be. The recipe calls
``check_inputs`` before any work (a bad config fails in seconds, not after loading an 8B
checkpoint); the planner calls the same function, so a plan fails exactly where the run
would, with the same message. ``check_inputs`` collects every problem it finds — the
table of our sections (``config_schema``), recipe features a resize cannot carry, the
stock recipe's own config checks, the model against the pruning settings and the
teacher, then the files (the base checkpoint: ``checkpoint_checks``; the data's files:
``data_checks``) — and raises one ``ConfigError`` that lists them all. The data itself is
read by ``data_checks.dataset_problems``, which needs the tokenizer.

Files are the one difference: the recipe must refuse a missing checkpoint, tokenizer or
data file, an unusable output directory or one that already holds a run, while a plan is
made on a machine that may not hold the model yet. Given ``warn`` (a callable), file
problems are reported through it instead.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Set, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils

from adapt_prune_tune import checkpointing as ckpt
from adapt_prune_tune.checkpoint_checks import (
    checkpoint_arch_problems,
    checkpoint_file_problems,
    meta_output_problem,
    model_type_problem,
    output_inside_checkpoint_problem,
)
from adapt_prune_tune.config_schema import (
    REQUIRED,
    Range,
    SchemaResult,
    Setting,
    check_sections,
    distill_config,
    pruning_config,
    section,
    stage_steps_problem,
)
from adapt_prune_tune.data_checks import data_problems, packed_text_caches
from adapt_prune_tune.distillation import DistillConfig
from adapt_prune_tune.errors import error_text
from adapt_prune_tune.fp8 import fp8_problems
from adapt_prune_tune.models import DecoderArch, arch_from_model
from adapt_prune_tune.pruner import PruningConfig


Warn = Optional[Callable[[str], None]]


GIB = float(1 << 30)


DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


log = utils.get_logger("INFO")


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(
            f"adapt_prune_recipe cannot run this config ({n} problem{'s' if n != 1 else ''}):\n  - "
            + "\n  - ".join(self.problems)
        )


@dataclass(frozen=True)
class CheckedConfig:
    """What the checks built on the way: the method's settings and the base model's spec."""

    pruning: PruningConfig
    distill: DistillConfig
    arch: DecoderArch


def expand_home(cfg: DictConfig) -> DictConfig:
    """``~`` at the start of a path means the home directory, as in a shell.

    YAML does not expand it and torchtune does not either: ``output_dir: ~/runs/x`` wrote the
    run into a directory literally named ``~`` under the current one, reported paths under
    ``~/`` where nothing was, and the up-front checks (which expand it) looked elsewhere.
    Interpolations are kept: they resolve to the expanded values they name.
    """
    def expand(value: Any) -> Any:
        if isinstance(value, str) and (value == "~" or value.startswith("~/")):
            return os.path.expanduser(value)
        if isinstance(value, dict):
            return {key: expand(item) for key, item in value.items()}
        if isinstance(value, list):
            return [expand(item) for item in value]
        return value

    return OmegaConf.create(expand(OmegaConf.to_container(cfg, resolve=False)))


def merge_overrides(path: Path, overrides: Sequence[str]) -> DictConfig:
    """The YAML at ``path`` with ``key=value`` overrides merged exactly as ``tune run`` merges them.

    torchtune's merge stops at the first override OmegaConf cannot apply with a bare
    ``TypeError``/``ValueError`` that names neither the override nor the fix (a list given
    for a section, a value for a mapping). Here each override is tried alone and every one
    that fails is named in one ``ConfigError``.
    """
    from argparse import Namespace

    from omegaconf.errors import OmegaConfBaseException
    from torchtune.config._utils import _merge_yaml_and_cli_args

    def merged(args: Sequence[str]) -> DictConfig:
        yaml_args = Namespace(**OmegaConf.to_container(OmegaConf.load(path), resolve=False))
        return _merge_yaml_and_cli_args(yaml_args, list(args))

    try:
        return merged(overrides)
    except (OmegaConfBaseException, TypeError, ValueError) as first:
        problems = []
        for override in overrides:
            try:
                merged([override])
            except (OmegaConfBaseException, TypeError, ValueError) as e:
                key = override.split("=", 1)[0].lstrip("~")
                if override.startswith("~"):
                    problems.append(f"override `{override}`: {path.name} has no key `{key}` to remove")
                    continue
                problems.append(
                    f"override `{override}` cannot be applied to {path.name}: {str(e).splitlines()[0]}. "
                    f"Overrides are `key=value` and keep the type at `{key}`: a section stays a section "
                    f"(set its keys one by one, `{key}.NAME=...`), a value stays a value; for larger changes "
                    "edit a copy of the config (`tune cp`)"
                )
        raise ConfigError(problems or [f"the overrides cannot be applied to {path.name}: {first}"]) from first


def launch_world_size() -> int:
    """Ranks of the run being launched (torchrun's WORLD_SIZE; one process without it).

    Tensor parallelism is refused, so every rank is a data-parallel rank.
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_inputs(cfg: DictConfig, world_size: Optional[int] = None, warn: Warn = None) -> CheckedConfig:
    """Every problem of ``cfg`` before any work, in one ``ConfigError``; file problems to ``warn`` if given.

    The model is built on the meta device (no memory, no weights), which is enough to know
    whether the target is reachable at all and how large a checkpoint is.
    """
    world_size = launch_world_size() if world_size is None else world_size
    arch, model_problem, modules = meta_model(cfg)
    schema = check_sections(cfg, world_size=world_size, arch=arch)
    problems = list(schema.problems) + unsupported_features(cfg) + stock_setting_problems(cfg)
    problems += stock_value_problems(cfg) + component_problems(cfg) + metric_logger_problems(cfg)
    problems += sharding_problems(cfg, arch, modules)
    problems += sample_length_problems(cfg, arch)
    if model_problem:
        problems.append(model_problem)
    if cfg.get("enable_fp8_training", False) is True:
        method = schema.config("pruning.method")
        problems += fp8_problems(str(cfg.get("device", "cpu")), method["round_to"] if method else None)
    distill = schema.config("distill")
    if arch is not None and distill is not None and distill["enabled"]:
        problems += distillation_problems(cfg, arch)
    files = file_problems(cfg, schema, arch)
    if warn is None:
        problems += files
    else:
        for problem in files:
            warn(problem)
    if problems:
        raise ConfigError(problems)
    return CheckedConfig(pruning_config(schema.config("pruning.method")), distill_config(distill), arch)


def meta_model(cfg: DictConfig) -> Tuple[Optional[DecoderArch], Optional[str], Set[str]]:
    """The base model's spec, built on the meta device, or why it could not be built; and the
    names of its modules (what ``custom_sharded_layers`` matches)."""
    if cfg.get("model", None) is None:
        return None, "missing `model:` (a torchtune model builder, e.g. torchtune.models.llama3_1.llama3_1_8b)", set()
    try:
        with torch.device("meta"):
            model = config.instantiate(cfg.model)
            return arch_from_model(model), None, {name for name, _ in model.named_modules()}
    except Exception as e:  # noqa: BLE001 - reported with the other problems
        problem = f"model: cannot build {cfg.model.get('_component_', cfg.model)!s}: {error_text(e)}"
        return None, problem, set()


def component_problems(cfg: DictConfig) -> List[str]:
    """The optimizer and LR schedule as the recipe will build them, on a dummy parameter: a
    class the installed packages lack, or an argument it does not take, fails here, not after
    the model loaded."""
    problems = []
    try:  # a matrix: optimizer_state_problems steps it to see the state's shapes
        optimizer = config.instantiate(cfg.optimizer, [torch.nn.Parameter(torch.zeros(64, 64))])
    except Exception as e:  # noqa: BLE001 - whatever the constructor says, with the key to change
        hint = ""
        if "fused" in str(e):
            hint = " (this optimizer takes no `fused`: remove it with `~optimizer.fused`)"
        problems.append(f"optimizer: {cfg.optimizer.get('_component_')} cannot be built: {error_text(e)}{hint}")
        return problems
    component = str(cfg.optimizer.get("_component_", ""))
    round_to = section(cfg, "pruning.method").get("round_to", 1)
    round_to = round_to if isinstance(round_to, int) and round_to > 0 else 1  # else the table reports it
    world = launch_world_size()
    if component.startswith("torchao.optim") and world > 1 and round_to % world:
        # torchao compiles its step per parameter; with torch 2.13 + torchao 0.14.1 a graph built for
        # one rank's uneven FSDP2 shard was reused for another of a different length (seen here).
        problems.append(
            f"optimizer: {component} under FSDP2 needs every pruned width to shard evenly over the "
            f"{world} ranks (its compiled step mis-handles uneven shards): set pruning.method.round_to "
            f"to a multiple of {world} (got {round_to}; the GPU configs use 64)"
        )
    if cfg.get("lr_scheduler", None) is not None:
        try:
            config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=1, last_epoch=-1)
        except Exception as e:  # noqa: BLE001
            problems.append(f"lr_scheduler: {cfg.lr_scheduler.get('_component_')} cannot be built: {error_text(e)}")
    return optimizer_state_problems(cfg, optimizer) + problems


# The package each of torchtune's metric loggers imports when it is built.
_LOGGER_PACKAGES = {"WandBLogger": "wandb", "TensorBoardLogger": "tensorboard", "CometLogger": "comet_ml",
                    "MLFlowLogger": "mlflow"}


def metric_logger_problems(cfg: DictConfig) -> List[str]:
    """The metric logger's class and the package it logs through are installed.

    The stock setup builds the logger after the data was read, and torchtune's loggers import
    their package only then. The logger is not built here: building one starts a remote run.
    """
    node = cfg.get("metric_logger", None)
    if not isinstance(node, DictConfig) or node.get("_component_", None) is None:
        return []
    component = str(node._component_)
    try:
        from torchtune.config._utils import _get_component_from_path

        _get_component_from_path(component)
    except Exception as e:  # noqa: BLE001 - a typo or a module that is not installed
        return [f"metric_logger: {component} cannot be found: {error_text(e)}"]
    package = _LOGGER_PACKAGES.get(component.rsplit(".", 1)[-1])
    if package is None or importlib.util.find_spec(package) is not None:
        return []
    return [f"metric_logger: {component} logs through `{package}`, which is not installed: `pip install {package}`, "
            "or log to files with metric_logger._component_=torchtune.training.metric_logging.DiskLogger"]


def optimizer_state_problems(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> List[str]:
    """State a resize cannot slice, found by one step on a dummy matrix before any work.

    ``adapt.optimizer_state: slice`` cuts every state tensor shaped like its parameter (AdamW's
    moments, SGD's momentum, Adagrad's sums; torchao's block-quantized moments through their
    dense form). A factored state such as Adafactor's row and column statistics has another
    shape: it would survive a resize unchanged and fail at the first step after it, hours into
    a run. Only ``reset`` (fresh state at every resize) can carry such an optimizer.
    ``optimizer``: the config's, built over one 64 x 64 parameter (``component_problems``).
    """
    if section(cfg, "adapt").get("optimizer_state", "slice") != "slice":
        return []
    from adapt_prune_tune.optimizer_state import is_quantized, uses_quantized_state

    if uses_quantized_state(optimizer):
        return []  # torchao's moments: dense or block-quantized, parameter-shaped; its step compiles (s)
    (param,) = optimizer.param_groups[0]["params"]
    try:
        param.grad = torch.full_like(param, 1e-3)
        optimizer.step()
    except Exception as e:  # noqa: BLE001 - the optimizer's own words, with the key to change
        return [f"optimizer: {cfg.optimizer.get('_component_')} cannot take a step on a 64 x 64 parameter: "
                f"{type(e).__name__}: {e}"]
    odd = {key: tuple(value.shape) for key, value in optimizer.state[param].items()
           if isinstance(value, torch.Tensor) and value.dim() > 0
           and value.shape != param.shape and not is_quantized(value)}
    if not odd:
        return []
    shapes = ", ".join(f"`{key}` {shape}" for key, shape in odd.items())
    return [f"optimizer: {cfg.optimizer.get('_component_')} keeps state shaped otherwise than its parameter "
            f"({shapes} for a (64, 64) parameter), which a resize cannot slice: set "
            "adapt.optimizer_state=reset (fresh state at every resize), or use an optimizer with per-element "
            "state (torch.optim.AdamW, SGD, Adagrad; torchao.optim.AdamW8bit / AdamW4bit / AdamWFp8)"]


def unsupported_features(cfg: DictConfig) -> List[str]:
    """Recipe features a resize cannot carry yet."""
    problems = []
    if cfg.get("optimizer_in_bwd", False):
        problems.append("optimizer_in_bwd=True (per-parameter optimizers cannot be resized); set it to False")
    if cfg.get("tensor_parallel_dim", 1) > 1:
        problems.append("tensor_parallel_dim > 1 (pruned layers have uneven head counts); use FSDP only")
    if cfg.get("enable_async_checkpointing", False):
        problems.append("enable_async_checkpointing=True (run checkpoints carry per-layer shapes); set it to False")
    ignored = {k: cfg.get(k) for k, unset in (("epochs", 1), ("max_steps_per_epoch", None)) if cfg.get(k, unset) != unset}
    if ignored:  # the stock recipe's run length; here the stages own the steps
        settings = ", ".join(f"{k}={v}" for k, v in ignored.items())
        problems.append(
            f"{settings}: this recipe does not count epochs; the run's length is adapt.total_tokens (or "
            "adapt.total_steps) spread over adapt.stages. For a shorter run set adapt.total_steps=N (N optimizer "
            "steps in all) or a smaller adapt.total_tokens, and keep epochs: 1, max_steps_per_epoch: null"
        )
    return problems


def sharding_problems(cfg: DictConfig, arch: Optional[DecoderArch], modules: Set[str]) -> List[str]:
    """FSDP2 settings that would fail at process-group creation or at the first forward.

    ``custom_sharded_layers`` names modules by their exact path (torchtune's
    ``get_shard_conditions``): a name the model lacks shards nothing, silently, and with tied
    embeddings ``tok_embeddings`` cannot be a unit of its own: the output projection reads its
    weight outside the embedding's forward, where FSDP2 has already resharded it (a mixed
    ``Tensor``/``DTensor`` matmul in the first forward). One process never shards, so it runs
    there and fails only when launched on several: refused everywhere.
    """
    problems = []
    device = str(cfg.get("device", "cuda"))
    if cfg.get("fsdp_cpu_offload", False) is True and not device.startswith("cuda"):
        problems.append(
            f"fsdp_cpu_offload=True with device={device}: it keeps a GPU run's shards in host memory, where a "
            f"{device} run's shards already are (torch refuses its process group, 'cpu:gloo,cpu:gloo'); "
            "set fsdp_cpu_offload=False"
        )
    names = cfg.get("custom_sharded_layers", None) or []
    if isinstance(names, str):  # torchtune would match it as a substring of every module path
        return problems + [f"custom_sharded_layers must be a list of module names, e.g. ['{names}'], not a string"]
    if arch is None or not modules:
        return problems
    tied = [n for n in names if arch.tie_word_embeddings and n in ("tok_embeddings", "output")]
    if tied:
        problems.append(
            f"custom_sharded_layers={list(names)}: this model ties its output projection to tok_embeddings "
            "(tie_word_embeddings), so the embedding cannot be an FSDP unit of its own (the output reads its "
            "weight after the embedding's unit has resharded it) and there is no `output` module; remove "
            + " and ".join(f"'{n}'" for n in tied)
            + " (custom_sharded_layers=null keeps the tied embedding in the root unit)"
        )
    unknown = [n for n in names if n not in modules and n not in tied]
    if unknown:
        top = sorted(n for n in modules if n and "." not in n)
        problems.append(
            f"custom_sharded_layers: {unknown} name no module of this model, so nothing would be sharded "
            f"separately; names are exact module paths, e.g. one of {top}"
        )
    return problems


def sample_length_problems(cfg: DictConfig, arch: Optional[DecoderArch]) -> List[str]:
    """Training samples the model can take: ``tokenizer.max_seq_len`` set, and within the model's
    ``max_seq_len`` (its RoPE cache). A longer sample fails the first training step, which comes
    after stage 1's prune."""
    tokenizer, adapt = cfg.get("tokenizer", None), section(cfg, "adapt")
    trains = any(isinstance(adapt.get(k), (int, float)) and adapt.get(k) > 0 for k in ("total_tokens", "total_steps"))
    if arch is None or not isinstance(tokenizer, DictConfig) or not trains:
        return []
    length = tokenizer.get("max_seq_len", None)
    if length is None:
        return [f"tokenizer.max_seq_len is null: training samples would not be cut, and one longer than the "
                f"model's max_seq_len ({arch.max_seq_len:,}) fails the first training step; set it (the packaged "
                "configs use 256 or 1,024)"]
    if isinstance(length, int) and length > arch.max_seq_len:
        return [f"tokenizer.max_seq_len={length:,} exceeds the model's max_seq_len ({arch.max_seq_len:,}): a "
                f"sample that long fails the first training step; set it to at most {arch.max_seq_len:,}"]
    return []


# Checkpoint model types that share a tokenizer: a teacher must come from the student's family.
TOKENIZER_FAMILIES = {"LLAMA3": "llama3", "LLAMA3_2": "llama3", "QWEN2": "qwen2"}


def distillation_problems(cfg: DictConfig, student: DecoderArch) -> List[str]:
    """A teacher the run can distil from: a cross-entropy loss, the student's vocabulary and family."""
    problems: List[str] = []
    loss = config.instantiate(cfg.loss)
    if not hasattr(loss, "ignore_index"):
        problems.append(
            f"distill needs a cross-entropy `loss` with an ignore_index (got {cfg.loss._component_}); "
            "use torchtune.modules.loss.CEWithChunkedOutputLoss"
        )
    distill_node = cfg.distill
    try:
        with torch.device("meta"):
            teacher = config.instantiate(distill_node.get("teacher_model") or cfg.model)
    except Exception as e:  # noqa: BLE001 - reported with the other problems
        return problems + [f"distill.teacher_model: cannot build it: {error_text(e)}"]
    vocab = teacher.tok_embeddings.num_embeddings
    if vocab != student.vocab_size:
        problems.append(
            f"distill.teacher_model has a vocabulary of {vocab:,} tokens, the student {student.vocab_size:,}: "
            "distillation compares distributions token by token, so the teacher must share the "
            "student's tokenizer; pick a teacher of the same model family or drop distill.teacher_model"
        )
    if distill_node.get("teacher_checkpointer") is not None:
        mine = TOKENIZER_FAMILIES.get(str(cfg.checkpointer.get("model_type")), cfg.checkpointer.get("model_type"))
        theirs_type = distill_node.teacher_checkpointer.get("model_type")
        theirs = TOKENIZER_FAMILIES.get(str(theirs_type), theirs_type)
        if mine != theirs:
            problems.append(
                f"distill.teacher_checkpointer.model_type={theirs_type} is another architecture family than "
                f"checkpointer.model_type={cfg.checkpointer.get('model_type')}; its tokenizer differs, so its "
                "distributions cannot teach this student: use a teacher of the same family"
            )
    return problems


def stock_setting_problems(cfg: DictConfig) -> List[str]:
    """The config checks of torchtune 0.6.1's ``FullFinetuneRecipeDistributed.__init__``, same messages.

    The recipe runs them again itself (through ``super().__init__``); the planner cannot
    construct the stock recipe (it opens a process group and checks the hardware), and here
    they join the one message. Only those that depend on the config alone.
    """
    from torchtune import training

    problems = []
    try:
        dtype = training.get_dtype(cfg.get("dtype", None), device=torch.device("cpu"))
    except (ValueError, RuntimeError) as e:
        return [f"dtype: {e}"]
    if dtype == torch.float16:
        problems.append("full fp16 training is not supported with this recipe. Please use bf16 or fp32 instead.")
    if cfg.get("enable_activation_offloading", False):
        if cfg.get("device", "cuda") != "cuda":
            problems.append("enable_activation_offloading should only be True when training on CUDA")
        if not cfg.get("enable_activation_checkpointing", False):
            problems.append(
                "enable_activation_offloading should only be True when enable_activation_checkpointing is True"
            )
    return problems


# Top-level numbers the stock recipe reads without checking them: a 0 batch divides by zero
# in the token budget, a 0 accumulation never steps the optimizer, and either surfaces much later.
# Checked by the config table's own ``Setting`` rows; not part of the table, which documents our keys.
_STOCK_NUMBERS = (
    Setting("batch_size", "int", REQUIRED, "", Range(1), why="samples per rank per forward"),
    Setting("gradient_accumulation_steps", "int", 1, "", Range(1), why="forwards per optimizer step"),
    Setting("epochs", "int", 1, "", Range(1), why="passes over the dataset"),
    Setting("log_every_n_steps", "int", 1, "", Range(1), nullable=True,
            why="optimizer steps between metric-logger rows"),
    Setting("max_steps_per_epoch", "int", None, "", Range(1), nullable=True, why="optimizer steps per epoch"),
    Setting("clip_grad_norm", "float", None, "", Range(0, low_open=True), nullable=True, why="null: no clipping"),
)


def stock_value_problems(cfg: DictConfig) -> List[str]:
    """Torchtune's own top-level numbers (``batch_size``, ``gradient_accumulation_steps``, ...) in
    range, and the checkpointers' ``model_type`` a name torchtune knows."""
    found = [s.problem(s.name, cfg.get(s.name)) for s in _STOCK_NUMBERS if s.name in cfg]
    for key in ("checkpointer", "distill.teacher_checkpointer"):
        found.append(model_type_problem(section(cfg, key), key))
    return [problem for problem in found if problem is not None]


# --------------------------------------------------------------------------- files


def file_problems(cfg: DictConfig, schema: SchemaResult, arch: Optional[DecoderArch]) -> List[str]:
    """Files the run reads and writes: each missing or unusable one, named with the fix."""
    problems: List[str] = []
    resume = cfg.get("resume_from_checkpoint", False) is True
    for key in ("checkpointer", "distill.teacher_checkpointer"):
        if problem := output_inside_checkpoint_problem(section(cfg, key), key):
            problems.append(problem)
    if not resume and isinstance(cfg.get("checkpointer", None), DictConfig):
        problems += checkpoint_file_problems(cfg.checkpointer, "checkpointer")
    if arch is not None and isinstance(cfg.get("checkpointer", None), DictConfig):
        problems += checkpoint_arch_problems(cfg.checkpointer, arch)
        if not resume and (problem := meta_output_problem(cfg.checkpointer, arch, "checkpointer")):
            problems.append(problem)
    distill = schema.config("distill")
    if distill is not None and distill["enabled"]:
        if cfg.distill.get("teacher_checkpointer") is not None:
            problems += checkpoint_file_problems(cfg.distill.teacher_checkpointer, "distill.teacher_checkpointer")
        elif resume:  # resuming still reads the base checkpoint, for the teacher
            problems += checkpoint_file_problems(cfg.checkpointer, "checkpointer (the distillation teacher)")
    problems += tokenizer_problems(cfg)
    problems += data_problems(cfg)
    if cfg.get("output_dir", None) is not None:
        problems += output_dir_problems(cfg, schema, arch)
    return problems


def tokenizer_problems(cfg: DictConfig) -> List[str]:
    """The tokenizer's files (``path``, ``*_file``, ``*_path``) exist."""
    node = cfg.get("tokenizer", None)
    if not isinstance(node, DictConfig):
        return []
    problems = []
    for key in node.keys():
        if key == "path" or key.endswith("_file") or key.endswith("_path"):
            value = node.get(key)
            if isinstance(value, str) and not Path(value).expanduser().exists():
                problems.append(
                    f"tokenizer.{key} not found: {value} (download the model first: the config's header has the "
                    "command; for the embedded SmolLM2 default run `adapt-prune-tune prepare`)"
                )
    return problems


def device_problems(cfg: DictConfig) -> List[str]:
    """The run's ``device`` exists on this machine (the planner, which plans GPU runs anywhere,
    does not ask): without it the stock setup fails inside process-group creation."""
    name = str(cfg.get("device", "cpu"))
    try:
        kind = torch.device(name).type
    except RuntimeError as e:
        return [f"device: {name!r} is not a torch device ({e}); e.g. cpu, cuda, cuda:1"]
    backend = getattr(torch, kind, None)
    if kind != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        return [f"device={name}, but this machine has no {kind} device available to torch {torch.__version__}: "
                "set device=cpu, or run where the accelerator (and a torch build for it) is"]
    return []


# --------------------------------------------------------------------------- the output directory


def previous_run(output_dir: Path) -> List[Path]:
    """What marks ``output_dir`` as holding a run: a complete checkpoint, ``final/``, ``run_record.json``."""
    marks = []
    if ckpt.latest_checkpoint(output_dir / "checkpoints") is not None:
        marks.append(output_dir / "checkpoints")
    marks += [p for p in (output_dir / "final", output_dir / "run_record.json") if p.exists()]
    return marks


def run_outputs(output_dir: Path) -> List[Path]:
    """Everything a run writes that a new run must not mistake for its own.

    ``checkpoints/``, ``final/``, ``run_record.json``, ``report.md`` and the figures it
    links (named by the report itself, so a new figure needs no change here); the metric
    logs stay (every run writes its own file).
    """
    paths = [output_dir / name for name in ("checkpoints", "final", "run_record.json")]
    report = output_dir / "report.md"
    if report.is_file():
        linked = re.findall(r"!\[[^\]]*\]\(([^)\s/\\]+)\)", report.read_text(encoding="utf-8", errors="replace"))
        paths += [output_dir / name for name in dict.fromkeys(linked)] + [report]
    return [p for p in paths if p.exists() or p.is_symlink()]


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_element_bytes(cfg: DictConfig) -> Tuple[int, int]:
    """Bytes per parameter of a run checkpoint's weights (the training dtype) and of each AdamW
    moment (torch keeps them in the parameters' dtype; torchao's low-bit ones are stored in fp32)."""
    dtype_bytes = DTYPE_BYTES.get(str(cfg.get("dtype", "fp32")), 4)
    optimizer = str((cfg.get("optimizer", None) or {}).get("_component_", ""))
    return dtype_bytes, 4 if optimizer.startswith("torchao") else dtype_bytes


def checkpoint_bytes(arch: DecoderArch, dtype_bytes: int, moment_bytes: int, trains: bool) -> int:
    """One run checkpoint (``checkpointing.py``): the weights in the training dtype and, once
    training has run, AdamW's two moments (torch keeps them in the parameters' dtype; torchao's
    low-bit moments are stored dequantized, in fp32). The base model is the largest the run holds."""
    return arch.num_params() * (dtype_bytes + (2 * moment_bytes if trains else 0))


def output_dir_problems(cfg: DictConfig, schema: SchemaResult, arch: Optional[DecoderArch]) -> List[str]:
    """``output_dir`` is writable, holds no run unless told what to do with it, and has room for a checkpoint."""
    out = Path(str(cfg.output_dir)).expanduser()
    top = schema.config("") or {}
    resume, overwrite = top.get("resume_from_checkpoint", False), top.get("overwrite_output_dir", False)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if out.exists() and not out.is_dir():
        return [f"output_dir {out} exists and is not a directory: choose another output_dir"]
    if not existing.is_dir():
        return [f"output_dir {out} cannot be created: {existing} is not a directory; choose another output_dir"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"output_dir {out} is not writable ({existing} is not writable by this user): choose another output_dir"]
    problems = []
    marks = previous_run(out) if out.is_dir() else []
    if resume and ckpt.latest_checkpoint(out / "checkpoints") is None:
        problems.append(
            f"resume_from_checkpoint=True but {out / 'checkpoints'} holds no complete checkpoint; "
            "start without resume_from_checkpoint"
        )
    elif marks and not resume and not overwrite:
        problems.append(
            f"output_dir {out} already holds a run ({', '.join(p.name for p in marks)}): set "
            "resume_from_checkpoint=True to continue it, overwrite_output_dir=True to replace it (its checkpoints/, "
            "final/, run_record.json and report are deleted before the new run starts), or choose another output_dir"
        )
    if arch is not None:
        adapt = schema.config("adapt")
        trains = adapt is None or 0 not in (adapt["total_tokens"], adapt["total_steps"])
        dtype_bytes, moment_bytes = checkpoint_element_bytes(cfg)
        need = checkpoint_bytes(arch, dtype_bytes, moment_bytes, trains)
        free = shutil.disk_usage(existing).free
        if overwrite and not resume and out.is_dir():
            free += sum(_size(p) for p in run_outputs(out))  # deleted before the run starts
        packs, elsewhere = packs_on_disk(cfg, existing)
        problems += elsewhere
        if free < need + packs:
            keep = (adapt or {}).get("keep_last_checkpoints", 2)
            what = (
                f"× ({dtype_bytes} + 2 × {moment_bytes}) bytes: weights + 2 AdamW moments" if trains
                else f"× {dtype_bytes} bytes: weights only, prune only"
            )
            kept = f"up to {keep + 1} of them at once" if keep else "all of them (keep_last_checkpoints=0)"
            also = f", and the packed training text another ~{packs / GIB:.2f} GiB (6 bytes a token)" if packs else ""
            problems.append(
                f"output_dir {out}: {free / GIB:.2f} GiB free, but one run checkpoint needs ~{need / GIB:.2f} GiB "
                f"({arch.num_params():,} parameters {what}){also}; the run keeps {kept}, plus final/: free disk "
                "space or choose another output_dir"
            )
    return problems


def packs_on_disk(cfg: DictConfig, output_disk: Path) -> Tuple[int, List[str]]:
    """Bytes of packed training text to be written on ``output_disk``'s filesystem (counted with
    the checkpoint), and problems of those that go to another disk without room for them.

    A cache directory that already holds packs (a resumed run's) is taken to have what it needs.
    """
    same_disk, problems = 0, []
    for name, cache_dir, size in packed_text_caches(cfg):
        if cache_dir.is_dir() and any(cache_dir.glob("packs-*.pt")):
            continue
        existing = cache_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"{name}.cache_dir {cache_dir} cannot be written ({existing} is not a writable "
                            "directory): choose another cache_dir, or null for no file (every rank then packs its own)")
        elif os.stat(existing).st_dev == os.stat(output_disk).st_dev:
            same_disk += size
        elif shutil.disk_usage(existing).free < size:
            problems.append(f"{name}.cache_dir {cache_dir}: {shutil.disk_usage(existing).free / GIB:.2f} GiB free, "
                            f"but the packed training text needs ~{size / GIB:.2f} GiB (6 bytes a token of "
                            f"{name}.max_tokens): free disk space or choose another cache_dir")
    return same_disk, problems


def clear_previous_run(cfg: DictConfig) -> List[Path]:
    """With ``overwrite_output_dir=True`` on a fresh run, delete the previous run's outputs (rank 0).

    Call only once every check has passed: old checkpoints must not be mistaken for the
    new run's (a later ``resume_from_checkpoint=True`` would continue the old run).
    """
    if cfg.get("overwrite_output_dir", False) is not True or cfg.get("resume_from_checkpoint", False) is True:
        return []
    if int(os.environ.get("RANK", "0")) != 0:
        return []
    out = Path(str(cfg.output_dir)).expanduser()
    removed = run_outputs(out) if out.is_dir() else []
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if removed:
        log.warning(
            f"overwrite_output_dir=True: deleted the previous run's {', '.join(p.name for p in removed)} "
            f"in {out} before starting (all checks passed)"
        )
    return removed


# --------------------------------------------------------------------------- run length


def mean_sample_length(dataset, seed: int, probe: int = 64) -> float:
    """Mean token count of up to ``probe`` samples drawn in a seeded order (the token budget's unit)."""
    probe = min(len(dataset), probe)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:probe]
    return sum(len(dataset[int(i)]["tokens"]) for i in order) / max(1, probe)


def steps_for_tokens(total_tokens: int, samples_per_step: int, mean_sample_len: float) -> int:
    """Optimizer steps that consume ``total_tokens`` at ``samples_per_step`` samples of the mean length."""
    return round(int(total_tokens) / (samples_per_step * mean_sample_len))


def check_total_steps(total: int, num_stages: int) -> int:
    """The run's optimizer steps: none (prune only) or at least one per stage."""
    problem = stage_steps_problem(total, num_stages)
    if problem:
        raise ValueError(problem)
    return total
