"""Model cards and Hugging Face Hub uploads for exported pruned models.

``write_model_card`` documents an export (``adapt_prune_tune.export``) from the
provenance record every export carries plus whatever the caller knows about the
run (command, training tokens, evaluation). ``publish`` validates everything it
can offline first (repo name, export contents, token) so that a typo or a
missing login fails in a second, not after minutes of hashing, and it never
modifies the export beyond writing its ``README.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from adapt_prune_tune import run_record as rr
from adapt_prune_tune.base_model import License, license_for, parse_license, resolve_base_model
from adapt_prune_tune.data_checks import LOCAL_BUILDERS
from adapt_prune_tune.export import EXPORT_RECORD
from adapt_prune_tune.models import DecoderArch

log = logging.getLogger(__name__)

_REPO_PART = re.compile(r"[A-Za-z0-9._-]{1,96}")

CARD_TAGS = ("pruned", "adapt-pruner", "torchtune")

_METHOD = (
    "This model was compressed with structured pruning following Adapt-Pruner: pruning proceeds "
    "in many small steps, and at each step every decoder layer's sparsity moves by the step's "
    "share of the target minus a term in the layer's importance (how much the layer changes its "
    "input on calibration data), so layers that change their input least lose the most width. "
    "Within a layer, whole attention heads (key/value heads together with their query heads, "
    "keeping grouped-query attention consistent) and MLP channels are removed by their estimated "
    "effect on the calibration loss (first-order Taylor scores by default). Following "
    "Adapt-Accel, pruning is interleaved with training in stages, later stages getting more "
    "training tokens, under one learning-rate schedule. Hidden size, head size and the number of "
    "layers are unchanged; each layer ends up with its own number of attention heads and MLP channels."
)


class PublishError(RuntimeError):
    """Publishing failed; the message says why and what to do, and the export is intact."""


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` uploaded (or, for a dry run, would upload)."""

    repo_id: str
    files: Tuple[Tuple[str, int], ...]  # (path in repo, size in bytes)
    url: Optional[str] = None  # the commit URL; None for a dry run
    dry_run: bool = False


def validate_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``namespace/name`` Hub model id, else a clear ValueError.

    huggingface_hub's own check runs too, but it accepts a bare name and any
    Unicode letter, which the Hub then rejects after the upload has started.
    """
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    rules = (
        "use ASCII letters, digits, '-', '_' and '.', at most 96 characters per part, "
        "no '--' or '..', not starting or ending with '-' or '.', not ending with '.git'"
    )
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(
            f"Repository id must look like 'namespace/name' (your user or org name first), got {repo_id!r}"
        )
    if not all(_REPO_PART.fullmatch(part) for part in repo_id.split("/")):
        raise ValueError(f"Invalid repository id {repo_id!r}: {rules}")
    try:
        hub_validate(repo_id)
    except HFValidationError as e:
        raise ValueError(f"Invalid repository id {repo_id!r}: {rules} ({e})") from None
    return repo_id


# --------------------------------------------------------------------------- card
def _export_record(export_dir: Path) -> Dict[str, Any]:
    path = export_dir / EXPORT_RECORD
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {export_dir} is not an export written by adapt_prune_tune.export"
        )
    return json.loads(path.read_text())


def _fmt_params(n: Optional[int]) -> str:
    return "unknown" if n is None else f"{n:,} ({n / 1e6:.1f}M)"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _evaluation_table(evaluation: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]) -> str:
    """Rows of dicts (any columns), or ``{task: value}`` / ``{task: {column: value}}``."""
    if isinstance(evaluation, Mapping):
        evaluation = [
            {"task": task, **(value if isinstance(value, Mapping) else {"score": value})}
            for task, value in evaluation.items()
        ]
    header: List[str] = []
    for row in evaluation:
        header += [k for k in row if k not in header]
    return _table(header, [[_cell(row.get(k)) for k in header] for row in evaluation])


def _cell(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) else value


# Results the recipe and ``adapt-prune-tune eval`` leave behind, read into the card.
EVAL_RESULTS = "eval_results.json"


def card_base_model_and_license(
    context: Mapping[str, Any], meta: Mapping[str, Any]
) -> Tuple[Optional[str], License]:
    """The base model's Hub id and the license the card declares.

    The id: ``context["base_model"]`` (an id the user gave), else the recorded values
    (``context["base_model_candidates"]``: a run's base model and checkpoint directory; the
    export's ``base_model``), read by :func:`adapt_prune_tune.base_model.resolve_base_model`.
    The license: ``context["license"]``, else the base model's (known bases), else the
    export's recorded one.

    Raises:
        ValueError: only local paths were recorded (pass ``--base-model``), or no license is
            known (pass ``--license``).
    """
    candidates = [context.get("base_model"), *context.get("base_model_candidates", ()), meta.get("base_model")]
    base_model, _ = resolve_base_model(*candidates)
    given = context.get("license")
    if given:
        license_ = given if isinstance(given, License) else parse_license(str(given))
    else:
        license_ = license_for(base_model) or (License(meta["license"]) if meta.get("license") else None)
    if license_ is None:
        raise ValueError(
            f"No license known for the base model {base_model or '(not recorded)'}: a pruned model is a "
            "derivative and ships under its base model's license. Pass --license ID (a Hub license id such "
            "as apache-2.0, llama3.1 or llama3.2, or other:NAME:URL for a custom license)."
        )
    return base_model, license_


def _final_perplexity(row: Mapping[str, float]) -> Optional[float]:
    return row.get("recovered", row.get("pruned"))


def model_index(
    name: str,
    perplexity_by_text: Mapping[str, Mapping[str, float]],
    heldout: Optional[Mapping[str, Any]] = None,
    lm_eval: Optional[Mapping[str, Mapping[str, float]]] = None,
) -> List[Dict[str, Any]]:
    """The card's ``model-index`` (the Hub's evaluation-results metadata): this model's
    held-out perplexity per text and its lm-eval metrics, one result per dataset."""
    from adapt_prune_tune.evaluation import TASK_DATASETS

    task = {"type": "text-generation", "name": "Text Generation"}
    heldout = heldout or {}
    results = []
    for text, row in perplexity_by_text.items():
        value = _final_perplexity(row)
        if value is not None:
            dataset = {
                "name": f"held-out {text}: {heldout.get('num_tokens', '?')} tokens in "
                f"{heldout.get('window', '?')}-token windows",
                "type": text,
            }
            metric = {"type": "perplexity", "value": round(float(value), 4), "name": "perplexity"}
            results.append({"task": dict(task), "dataset": dataset, "metrics": [metric]})
    for lm_task, metrics in (lm_eval or {}).items():
        dataset_id, config = TASK_DATASETS.get(lm_task, (lm_task, None))
        dataset = {"name": lm_task, "type": dataset_id, **({"config": config} if config else {})}
        values = [
            {"type": metric, "value": round(float(value), 4), "name": metric}
            for metric, value in metrics.items()
            if not metric.endswith("_stderr")
        ]
        results.append({"task": dict(task), "dataset": dataset, "metrics": values})  # copies: no YAML anchors
    return [{"name": name, "results": results}] if results else []


def _heldout_text(perplexity_by_text: Mapping[str, Mapping[str, float]], heldout: Mapping[str, Any]) -> str:
    rows = [
        [text, *(rr.format_perplexity(v) for v in (row.get("original"), row.get("pruned"), _final_perplexity(row)))]
        for text, row in perplexity_by_text.items()
    ]
    return (
        _table(["held-out text", "base model", "after the last cut", "this model"], rows)
        + f"\n\nPerplexity on {heldout.get('num_tokens', '?')} held-out tokens per text in windows of "
        f"{heldout.get('window', '?')} tokens, measured during the run: the base model, right after the last "
        "pruning step, and at the end (after recovery training)."
    )


def _lm_eval_text(lm_eval: Mapping[str, Mapping[str, float]], sizes: Optional[Mapping[str, str]]) -> str:
    from adapt_prune_tune.evaluation import evaluation_markdown

    text = evaluation_markdown({"this model": lm_eval}).strip()
    if sizes:
        text += "\n\nScored on: " + "; ".join(f"{task}: {size}" for task, size in sizes.items()) + "."
    return text


def _speed_text(speed: Mapping[str, Any]) -> str:
    from adapt_prune_tune.report import markdown_table, speed_rows

    rows, note = speed_rows(speed)
    return markdown_table(["", "base model", "this model", "this ÷ base"], rows).strip() + "\n" + note.rstrip()


def _load_snippet(repo: str, mode: str) -> str:
    remote = ", trust_remote_code=True" if mode == "compact" else ""
    return (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo}"{remote})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}"{remote})\n'
        "```"
    )


def _quantization_text(quantization: Mapping[str, Any]) -> str:
    """The card's Quantization section: scheme, what was quantized and why loading needs torchao."""
    ao_type = quantization.get("torchao_config", {}).get("_type", "torchao")
    return (
        f"Weights quantized with [torchao](https://github.com/pytorch/ao) {quantization.get('torchao_version', '')} "
        f"`{ao_type}`, scheme **{quantization['scheme']}**: {quantization.get('description', '')}. "
        f"Quantized: every decoder layer's {', '.join(quantization.get('quantized_modules', []))} projections; "
        "embeddings, output projection and norms keep the float dtype. The quantized tensors are stored as "
        "their plain components (int8 values, scales) in safetensors, no pickle, and `modeling_adapt_torchao.py` "
        "rebuilds the torchao tensors on load, so loading needs `torchao` installed and `trust_remote_code=True`."
    )


def render_model_card(record: Mapping[str, Any], context: Optional[Mapping[str, Any]] = None) -> str:
    """The README.md text for an export record (see ``write_model_card`` for ``context``)."""
    context = dict(context or {})
    arch = DecoderArch.from_dict(record["arch"])
    original = DecoderArch.from_dict(record["original_arch"]) if record.get("original_arch") else None
    # The pruned spec's provenance wins; empty values (unknown) never hide the base's.
    meta = {k: v for source in (original.meta if original else {}, arch.meta) for k, v in source.items() if v}
    mode = record["mode"]
    quantization = record.get("quantization")
    base_model, license_ = card_base_model_and_license(context, meta)
    params_before = context.get("params_before") or (original.num_params() if original else None)
    params_after = context.get("params_after") or arch.num_params()

    front: Dict[str, Any] = dict(license_.front_matter())
    if base_model:
        front["base_model"] = base_model
    tags = list(CARD_TAGS) + (["quantized", "torchao", quantization["scheme"]] if quantization else [])
    front.update(tags=tags, library_name="transformers", pipeline_tag="text-generation")
    if quantization:
        front["quantization"] = {"method": "torchao", "scheme": quantization["scheme"]}
    if context.get("datasets"):
        front["datasets"] = list(context["datasets"])

    title = context.get("repo_id") or (f"{base_model.split('/')[-1]}, pruned" if base_model else "Pruned model")
    perplexities = context.get("perplexity_by_text") or {}
    index = model_index(title.split("/")[-1], perplexities, context.get("heldout"), context.get("lm_eval"))
    if index:
        front["model-index"] = index
    parts = [f"---\n{yaml.safe_dump(front, sort_keys=False)}---", f"# {title}", "## Method", _METHOD]

    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "Not recorded."
    parts += ["## Base model", base_link]

    size = [f"- Parameters before: {_fmt_params(params_before)}", f"- Parameters after: {_fmt_params(params_after)}"]
    if params_before:
        size.append(f"- Kept: {params_after / params_before:.1%} of all parameters")
    if original is not None:
        size.append(
            f"- Prunable (attention + MLP) parameters: {_fmt_params(original.prunable_params())} -> "
            f"{_fmt_params(arch.prunable_params())} ({arch.prunable_params() / original.prunable_params():.1%})"
        )
    if context.get("target") is not None:
        size.insert(0, f"- Target: {context['target']}")
    if mode == "padded":
        size.append(
            "- This is the **padded** export: pruned weights zero-padded to the base model's shapes so stock "
            "transformers loads it. It computes the same outputs as the pruned model but is as large as the base."
        )
    if quantization:
        size.append(f"- Weights: {quantization['scheme']} ({quantization.get('description', '')})")
    parts += ["## Size", "\n".join(size)]
    if quantization:
        parts += ["## Quantization", _quantization_text(quantization)]

    base_layer = original.layers[0] if original is not None and len(set(original.layers)) == 1 else None
    header = ["Layer", "Attention heads", "KV heads", "MLP width"]
    rows = [[i, layer.num_heads, layer.num_kv_heads, layer.intermediate_dim] for i, layer in enumerate(arch.layers)]
    if base_layer is not None:
        rows.append(["base (every layer)", base_layer.num_heads, base_layer.num_kv_heads, base_layer.intermediate_dim])
    parts += ["## Per-layer widths", f"Head size {arch.head_dim}, hidden size {arch.embed_dim}.", _table(header, rows)]

    training = []
    if context.get("training_tokens") is not None:
        tokens = context["training_tokens"]
        training.append(f"Trained on {tokens:,} tokens during pruning." if isinstance(tokens, int) else str(tokens))
    if context.get("training_data"):
        training.append("Data: " + "; ".join(context["training_data"]) + ".")
    if context.get("training_setup"):
        training.append(context["training_setup"])
    if training:
        parts += ["## Training", " ".join(training)]
    evaluation = []
    if perplexities:
        evaluation += ["### Held-out perplexity", _heldout_text(perplexities, context.get("heldout") or {})]
    if context.get("lm_eval"):
        evaluation += ["### lm-evaluation-harness", _lm_eval_text(context["lm_eval"], context.get("lm_eval_sizes"))]
    if context.get("evaluation"):
        evaluation.append(_evaluation_table(context["evaluation"]))
    if evaluation:
        parts += ["## Evaluation", *evaluation]
    if context.get("speed"):
        parts += ["## Speed", _speed_text(context["speed"])]

    parts += ["## How to load", _load_snippet(context.get("repo_id") or "path/to/this/model", mode)]
    if mode == "compact":
        parts.append(
            "The per-layer widths need the small modeling file shipped in this repository "
            "(`modeling_adapt.py`, stock Llama/Qwen2 code with resized layers), hence `trust_remote_code=True` "
            "(the tokenizer needs it too because transformers reads `config.json` to pick it)."
        )
    if context.get("command"):
        parts += ["## Reproduce", "This model was produced by:", f"```bash\n{context['command']}\n```"]
    return "\n\n".join(parts) + "\n"


def write_model_card(export_dir: Union[str, Path], context: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``README.md`` (Hub model card) into an export directory.

    Args:
        export_dir: a directory written by ``adapt_prune_tune.export.export_hf``.
        context: what the export itself does not know, all optional:
            ``repo_id`` (title and load snippet), ``base_model`` and ``license``
            (default: the base model's recorded meta), ``target`` (text, e.g.
            "50% of prunable parameters"), ``params_before``/``params_after``
            (default: computed from the recorded architectures),
            ``training_tokens`` (int or text), ``evaluation`` (rows of dicts, or
            ``{task: score}`` / ``{task: {column: value}}``), ``command`` (the
            exact command that produced the model), ``base_model_candidates``
            (recorded ids or local checkpoint dirs, see ``card_base_model_and_license``),
            ``perplexity_by_text`` and ``heldout`` (a run record's), ``lm_eval``
            (``{task: {metric: value}}``; default: the export's ``eval_results.json``,
            written by ``adapt-prune-tune eval``) with ``lm_eval_sizes``, ``speed`` (a
            run record's).

    Returns:
        Path: the README.md written.

    Raises:
        ValueError: no Hub id for the base model or no license (the message names the flag).
    """
    export_dir = Path(export_dir)
    text = card_text(export_dir, context)
    path = export_dir / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def card_text(export_dir: Union[str, Path], context: Optional[Mapping[str, Any]] = None) -> str:
    """The model card of an export, with the lm-eval results saved next to it (see
    ``write_model_card``); nothing is written."""
    export_dir = Path(export_dir)
    context = dict(context or {})
    results = export_dir / EVAL_RESULTS
    if "lm_eval" not in context and results.is_file():
        saved = json.loads(results.read_text())
        context["lm_eval"], context["lm_eval_sizes"] = saved.get("results", {}), saved.get("sizes", {})
    return render_model_card(_export_record(export_dir), context)


def model_card_context_from_run(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """Card context from a recipe run's ``run_record.json``: the command as typed, sizes,
    training tokens, held-out perplexity, speed, and where the base model came from."""
    record = rr.load_record(run_dir)
    context: Dict[str, Any] = {
        "command": rr.reproduce_command(record, launcher_flags=False),  # public: no rendezvous host
        "params_before": record.get("params_before"),
        "params_after": record.get("params_after"),
    }
    checkpoint_dir = ((record.get("config") or {}).get("checkpointer") or {}).get("checkpoint_dir")
    context["base_model_candidates"] = [v for v in (record.get("base_model"), checkpoint_dir) if v]
    # Per-stage token counts are estimates (training steps x mean sample length).
    tokens = rr.training_tokens(record)
    if tokens is not None:
        context["training_tokens"] = f"About {tokens:,} tokens, interleaved with pruning."
    config = record.get("config") or {}
    context["datasets"], context["training_data"] = training_data(config)
    context["training_setup"] = training_setup(config)
    perplexities = rr.perplexity_by_text(record)
    if perplexities:
        context["perplexity_by_text"] = perplexities
        context["heldout"] = record.get("heldout") or {}
    if record.get("speed"):
        context["speed"] = record["speed"]
    return context


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def training_data(config: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
    """(Hub dataset ids, one description per training dataset) of a run's config, for its card.

    A Hub dataset is linked (and listed in the card's ``datasets:``); local files are named by
    file name only, since a card is public and the machine's paths are not. Datasets given in
    Python (no ``source``) are named by their builder.
    """
    nodes = config.get("dataset")
    nodes = nodes if isinstance(nodes, list) else [nodes] if isinstance(nodes, Mapping) else []
    ids: List[str] = []
    said: List[str] = []
    for node in nodes:
        source = str(node.get("source") or "")
        builder = str(node.get("_component_") or "").rsplit(".", 1)[-1]
        split = f", split {node['split']}" if node.get("split") else ""
        if source in LOCAL_BUILDERS:
            files = node.get("data_files")
            files = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, Mapping) else list(files or [])
            names = ", ".join(Path(str(f)).name for f in files) or "local files"
            said.append(f"local {source} files ({names}){split}")
        elif _HUB_ID.match(source):
            ids.append(source)
            name = f" ({node['name']})" if node.get("name") else ""
            said.append(f"[{source}](https://huggingface.co/datasets/{source}){name}{split}")
        elif source:
            said.append(f"local data ({Path(source).name}){split}")
        elif builder:
            said.append(f"`{builder}`")
    return ids, said


def training_setup(config: Mapping[str, Any]) -> Optional[str]:
    """The optimizer, its peak learning rate and schedule, and distillation, in one sentence each."""
    out = []
    optimizer = config.get("optimizer") or {}
    if optimizer.get("_component_"):
        lr = f", peak learning rate {float(optimizer['lr']):.0e}" if optimizer.get("lr") is not None else ""
        schedule = (config.get("lr_scheduler") or {}).get("_component_")
        name = "warmup-stable-decay" if str(schedule).endswith("get_wsd_schedule") else f"`{schedule}`"
        across = f", one {name} schedule across all stages" if schedule else ""
        out.append(f"Optimizer: `{optimizer['_component_']}`{lr}{across}.")
    distill = config.get("distill") or {}
    if distill.get("enabled"):
        out.append(f"Knowledge distillation from the unpruned base model (KL weight {distill.get('alpha')}, "
                   f"temperature {distill.get('temperature')}) alongside next-token cross-entropy.")
    return " ".join(out) or None


# --------------------------------------------------------------------------- upload
def _files_to_upload(export_dir: Path) -> List[Tuple[str, int]]:
    """Every file of the export except hidden ones (temporary or tool state)."""
    files = []
    for path in sorted(export_dir.rglob("*")):
        rel = path.relative_to(export_dir)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((rel.as_posix(), path.stat().st_size))
    return files


def _check_export(export_dir: Path) -> None:
    if not export_dir.is_dir():
        raise FileNotFoundError(f"Export directory {export_dir} does not exist")
    if not (export_dir / "config.json").is_file() or not any(export_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{export_dir} has no config.json and *.safetensors: run `adapt-prune-tune export` first"
        )
    _export_record(export_dir)


def _resolve_token(token: Optional[str]) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PublishError(
            "No Hugging Face token found. Log in with `hf auth login` (or `huggingface-cli login`), "
            "or set the HF_TOKEN environment variable (publish() in Python also takes token=...). "
            "The token needs write access: https://huggingface.co/settings/tokens"
        )
    return token


def publish(
    export_dir: Union[str, Path],
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: bool = False,
    dry_run: bool = False,
    commit_message: Optional[str] = None,
    model_card_context: Optional[Mapping[str, Any]] = None,
    endpoint: Optional[str] = None,
) -> PublishResult:
    """Write the model card and upload an export to a Hub model repository.

    Args:
        export_dir: a directory written by ``export_hf``.
        repo_id: ``namespace/name``; created if it does not exist.
        token: a write token; default: ``HF_TOKEN`` or the cached login.
        private: create the repository as private (an existing one keeps its visibility).
        dry_run: write the card and print what would be uploaded; no network, no token needed.
        commit_message: default "Upload pruned model".
        model_card_context: see ``write_model_card``; ``repo_id`` is filled in.
        endpoint: Hub URL; default ``$HF_ENDPOINT`` (read now, not at import) or huggingface.co.

    Returns:
        PublishResult: the files (and, unless a dry run, the commit URL).

    Raises:
        ValueError: invalid ``repo_id`` (before anything else happens), or the card lacks
            the base model's Hub id or a license (``--base-model``/``--license``).
        FileNotFoundError: ``export_dir`` is not a complete export.
        PublishError: no token, the Hub refused, or the network failed.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    validate_repo_id(repo_id)
    export_dir = Path(export_dir)
    _check_export(export_dir)
    card_context = {**dict(model_card_context or {}), "repo_id": repo_id}
    card_text(export_dir, card_context)  # a card that cannot be written (base model, license) fails first
    if not dry_run:
        token = _resolve_token(token)
    write_model_card(export_dir, card_context)
    files = tuple(_files_to_upload(export_dir))
    if dry_run:
        print(f"Dry run: would upload {len(files)} files ({sum(s for _, s in files):,} bytes) to {repo_id}:")
        for name, size in files:
            print(f"  {size:>15,}  {name}")
        return PublishResult(repo_id, files, dry_run=True)

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=export_dir,
            repo_type="model",
            commit_message=commit_message or "Upload pruned model",
            allow_patterns=[name for name, _ in files],
        )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = " Check that the token has write access to this namespace." if status in (401, 403) else ""
        raise PublishError(f"The Hub refused the upload to {repo_id} (HTTP {status}): {e}.{hint}") from e
    except Exception as e:
        # Transport errors come from whichever HTTP client this huggingface_hub
        # uses (requests, httpx, httpx2): no common base class to name here.
        raise PublishError(
            f"Uploading to {repo_id} via {api.endpoint} failed ({type(e).__name__}: {e}). Check the network "
            "connection, proxy settings, HF_ENDPOINT and HF_HUB_OFFLINE; the export is unchanged."
        ) from e
    log.info(f"Published {export_dir} to {commit.commit_url}")
    return PublishResult(repo_id, files, url=commit.commit_url)
