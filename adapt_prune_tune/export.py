"""Export pruned models to Hugging Face format, and a torchtune checkpointer for them.

A pruned model is a torchtune state dict plus its per-layer ``DecoderArch``. Two
export modes turn it into a directory ``transformers.AutoModelForCausalLM`` loads:

``compact``
    The real, smaller model. Stock transformers has no Llama/Qwen2 variant with
    per-layer widths (see ``adapt_prune_tune.modeling.modeling_adapt`` for what
    was checked), so ``config.json`` names the two small modeling files shipped
    in the directory (``auto_map``) and loading needs ``trust_remote_code=True``.
``padded``
    Every layer zero-padded back to the base model's uniform widths, in a stock
    ``LlamaConfig``/``Qwen2Config``: no custom code, same outputs, but no
    memory or speed gain. Zero padding is exact, not approximate: a padded MLP
    channel has zero gate/up rows (silu(0) * 0 = 0) and a zero down column; a
    padded query head, and every head of a padded key/value group, has a zero
    column block in ``o_proj``, so whatever it attends to is multiplied by zero.
    Kept query heads sit in the first positions of their key/value group, so
    stock grouped-query attention pairs them with the same key/value head.

Weights are converted with torchtune's key names (``_FROM_HF``) and, for
Llama-style RoPE, the same rotary row permutation as torchtune's ``tune_to_hf``
but applied per layer, since each layer has its own head count. Qwen2 models use
the Hugging Face rotary layout in torchtune already and are not permuted.

Every export is written into a temporary sibling directory and renamed into
place only when complete, so a failure never leaves a half-written export or
touches an existing one.

``quantize`` (``--quantize int8wo``/``int8da8w``) stores the compact export's
decoder projections as torchao int8 tensors, still in safetensors; see
``adapt_prune_tune.quantize`` for why it needs the compact mode.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import load_file
from torch import nn

from adapt_prune_tune import checkpointing as ckpt
from adapt_prune_tune.errors import free_space_that_matters, is_out_of_space
from adapt_prune_tune.models import DecoderArch, LayerArch, arch_differences, arch_from_hf_config, arch_from_model

log = logging.getLogger(__name__)

EXPORT_MODES = ("compact", "padded")
#: Provenance written into every export: mode, pruned and base architecture.
EXPORT_RECORD = "adapt_prune.json"
#: Tokenizer and generation files copied from ``tokenizer_dir`` when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# torchtune's Llama3ScaledRoPE defaults, which ``decoder_from_arch`` builds with.
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, Path]
ArchLike = Union[DecoderArch, Mapping[str, Any], PathLike]


# --------------------------------------------------------------------------- checks
def expected_shapes(arch: DecoderArch) -> Dict[str, Tuple[int, ...]]:
    """Every torchtune state-dict key of a model with this spec, and its shape."""
    dim, hd = arch.embed_dim, arch.head_dim
    shapes: Dict[str, Tuple[int, ...]] = {"tok_embeddings.weight": (arch.vocab_size, dim), "norm.scale": (dim,)}
    if not arch.tie_word_embeddings:
        shapes["output.weight"] = (arch.vocab_size, dim)
    for i, layer in enumerate(arch.layers):
        p = f"layers.{i}."
        q, kv = layer.num_heads * hd, layer.num_kv_heads * hd
        shapes.update(
            {
                p + "sa_norm.scale": (dim,),
                p + "mlp_norm.scale": (dim,),
                p + "attn.q_proj.weight": (q, dim),
                p + "attn.k_proj.weight": (kv, dim),
                p + "attn.v_proj.weight": (kv, dim),
                p + "attn.output_proj.weight": (dim, q),
                p + "mlp.w1.weight": (layer.intermediate_dim, dim),
                p + "mlp.w3.weight": (layer.intermediate_dim, dim),
                p + "mlp.w2.weight": (dim, layer.intermediate_dim),
            }
        )
        if arch.attn_bias:
            shapes.update({p + "attn.q_proj.bias": (q,), p + "attn.k_proj.bias": (kv,), p + "attn.v_proj.bias": (kv,)})
    return shapes


def check_state_dict(state_dict: Mapping[str, torch.Tensor], arch: DecoderArch) -> None:
    """Raise one error listing every key that is missing, unexpected or mis-shaped.

    Checkpoints and ``arch.json`` travel separately, so a mismatch (a spec from
    another prune step, a truncated copy) must be caught before any conversion.
    """
    expected = expected_shapes(arch)
    problems = [f"missing key {k} (expected shape {tuple(s)})" for k, s in expected.items() if k not in state_dict]
    problems += [f"unexpected key {k} (shape {tuple(state_dict[k].shape)})" for k in state_dict if k not in expected]
    problems += [
        f"{k}: expected shape {tuple(s)}, found {tuple(state_dict[k].shape)}"
        for k, s in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(s)
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"Weights do not match the architecture spec ({len(problems)} problems):\n  {shown}")


def arch_for_state_dict(state_dict: Mapping[str, torch.Tensor], template: DecoderArch) -> DecoderArch:
    """``template`` with the per-layer widths read off the weights' shapes.

    Lets a checkpointer save a model that was pruned after it was loaded: only
    the widths change, everything else in the spec stays the template's.
    """
    hd, names = template.head_dim, ("attn.q_proj.weight", "attn.k_proj.weight", "mlp.w1.weight")
    layers = []
    for i in range(template.num_layers):
        p = f"layers.{i}."
        try:
            q, k, w1 = (state_dict[p + n].shape[0] for n in names)
        except KeyError as e:
            raise ValueError(f"State dict has no {e.args[0]}: not a {template.num_layers}-layer decoder") from e
        if q % hd or k % hd:
            raise ValueError(f"layers.{i}: q/k projection rows ({q}, {k}) are not multiples of head_dim={hd}")
        layers.append(LayerArch(q // hd, k // hd, w1))
    return template.with_layers(layers)


# ------------------------------------------------------------------ checkpoint files
def _weight_files(directory: Path) -> List[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {directory}: {', '.join(missing)}")
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    # A run checkpoint's model-rank* files hold each rank's rows, not whole tensors: not HF shards.
    shards = sorted(f for f in directory.glob("model-*-of-*.safetensors") if not f.name.startswith("model-rank"))
    if shards:
        total = int(shards[0].stem.rsplit("-of-", 1)[1])
        if len(shards) != total:
            raise FileNotFoundError(f"{directory} has {len(shards)} of {total} model-*-of-*.safetensors shards")
        return shards
    raise FileNotFoundError(
        f"No model.safetensors, model.safetensors.index.json or model-*-of-*.safetensors in {directory}"
    )


def pruned_checkpoint_dir(path: PathLike) -> Path:
    """The directory holding ``arch.json`` + weights.

    ``path`` itself; a run's ``final/``; for a run that has none yet (still training, or
    stopped) or for its ``checkpoints/`` directory or ``checkpoints/latest`` pointer, the
    newest complete run checkpoint, so an interrupted run's progress can be exported too.
    """
    path = Path(path)
    if path.name == "latest" and path.is_file():
        path = path.parent
    if (path / "arch.json").is_file():
        return path
    if (path / "final" / "arch.json").is_file():
        return path / "final"
    for root in (path, path / "checkpoints"):
        newest = ckpt.latest_checkpoint(root) if root.is_dir() else None
        if newest is not None:
            return newest
    return path


def run_output_dir(path: PathLike) -> Optional[Path]:
    """The recipe run a checkpoint belongs to: ``path`` or the first of its two parents that
    holds the run's record or its logged config (a run's ``final/`` or ``checkpoints/step_*``)."""
    path = Path(path)
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "run_record.json").is_file() or (candidate / "torchtune_config.yaml").is_file():
            return candidate
    return None


def load_pruned_checkpoint(path: PathLike) -> Tuple[StateDict, DecoderArch]:
    """Weights (torchtune keys) and spec of a pruned checkpoint, checked against each other.

    Args:
        path: a directory with ``arch.json`` and ``model.safetensors`` (or shards
            with ``model.safetensors.index.json``), as the recipe writes, a run
            checkpoint (``checkpoints/step_*``: every rank's rows of each tensor,
            assembled here), or a run output directory (see ``pruned_checkpoint_dir``).
    """
    directory = pruned_checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Pruned checkpoint directory {directory} does not exist (expected a run's output_dir, its final/, "
            "a checkpoints/step_* directory, or a directory with arch.json and model safetensors)"
        )
    arch = DecoderArch.load(directory / "arch.json")
    if any(directory.glob("model-rank*.safetensors")):
        state: StateDict = dict(ckpt.load_run_checkpoint(directory)["model"].items())
    else:
        state = {}
        for f in _weight_files(directory):
            state.update(load_file(str(f)))
    check_state_dict(state, arch)
    return state, arch


def _load_json(path_or_dict: Union[PathLike, Mapping[str, Any]], default_name: str) -> Dict[str, Any]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def resolve_original_arch(
    original_arch: Optional[ArchLike] = None,
    base_config: Optional[Union[PathLike, Mapping[str, Any]]] = None,
    arch: Optional[DecoderArch] = None,
    search_dir: Optional[PathLike] = None,
) -> Optional[DecoderArch]:
    """The unpruned model's spec, from the first source that has it.

    In order: ``original_arch`` (a spec, its dict, an ``arch.json``, a
    ``run_record.json`` or an HF ``config.json``/checkpoint directory);
    ``base_config`` (the base model's HF config); ``arch.meta["base_arch"]``;
    a ``run_record.json`` (the recipe's) in ``search_dir`` or its parent.
    Returns None if none of them is available.
    """
    if original_arch is not None:
        if isinstance(original_arch, DecoderArch):
            return original_arch
        d = _load_json(original_arch, "config.json")
        return _arch_from_any_dict(d)
    if base_config is not None:
        return arch_from_hf_config(_load_json(base_config, "config.json"))
    if arch is not None and arch.meta.get("base_arch"):
        return DecoderArch.from_dict(arch.meta["base_arch"])
    if search_dir is not None:
        for candidate in (Path(search_dir) / "run_record.json", Path(search_dir).parent / "run_record.json"):
            if candidate.is_file():
                return DecoderArch.from_dict(json.loads(candidate.read_text())["arch_before"])
    return None


def _recorded_base_arch(arch: DecoderArch, directory: Path) -> Optional[DecoderArch]:
    """The unpruned spec a recipe run recorded: in the spec's meta, the run's record, or the
    state of a run checkpoint (a run not finished yet); None for other checkpoints."""
    found = resolve_original_arch(arch=arch, search_dir=run_output_dir(directory))
    state = directory / ckpt.STATE_FILE
    if found is None and state.is_file():
        base = ckpt.from_json(json.loads(state.read_text())).get("recipe", {}).get("base_arch")
        found = DecoderArch.from_dict(base) if base else None
    return found


def _check_base_is_the_runs(recorded: DecoderArch, base_config: Union[PathLike, Mapping[str, Any]]) -> None:
    """The base an export takes its tokenizer, special token ids and config fields from is the
    model the run pruned: another one would ship its tokenizer with these weights."""
    given = arch_from_hf_config(_load_json(base_config, "config.json"))
    differ = [f"{name} {mine} vs {theirs}" for name, (mine, theirs) in arch_differences(recorded, given).items()]
    if differ:
        where = base_config if not isinstance(base_config, Mapping) else "base_config"
        raise ValueError(
            f"{where} describes another model than the one this run pruned (run vs given: {', '.join(differ)}); "
            "its tokenizer and special token ids would ship with these weights. Pass the base checkpoint "
            "the run started from (or leave --base out: the run's is found from its record)"
        )


def _arch_from_any_dict(d: Mapping[str, Any]) -> DecoderArch:
    if "arch_before" in d:  # the recipe's run_record.json
        return DecoderArch.from_dict(d["arch_before"])
    if "layers" in d:  # an arch.json
        return DecoderArch.from_dict(d)
    if "architectures" in d or "model_type" in d:  # an HF config.json
        return arch_from_hf_config(d)
    raise ValueError("original_arch must be an arch.json, a run_record.json or an HF config.json")


# ------------------------------------------------------------------ conversion
def _is_qwen2(arch: DecoderArch) -> bool:
    return arch.rope.kind == "qwen2"


def _check_family(arch: DecoderArch) -> None:
    if _is_qwen2(arch) and not arch.attn_bias:
        raise ValueError("Qwen2 models (rope kind 'qwen2') have q/k/v biases; this spec has attn_bias=False")
    if not _is_qwen2(arch) and arch.attn_bias:
        raise ValueError("Llama-family exports have no attention biases; this spec has attn_bias=True")


def _rotary_to_hf(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """torchtune's interleaved RoPE rows of each head -> HF's half-split order.

    The same permutation as torchtune's ``tune_to_hf``, with the head count read
    off the tensor so it works for every pruned layer (weights and biases).
    """
    return t.reshape(-1, head_dim // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], arch: DecoderArch) -> StateDict:
    """torchtune keys/layout -> Hugging Face Llama/Qwen2 keys/layout, layer by layer."""
    from torchtune.models.convert_weights import _FROM_HF, get_mapped_key

    to_hf = {v: k for k, v in _FROM_HF.items() if v is not None}
    to_hf.update({f"layers.{{}}.attn.{n}_proj.bias": f"model.layers.{{}}.self_attn.{n}_proj.bias" for n in "qkv"})
    permute = not _is_qwen2(arch)
    out: StateDict = {}
    for key, value in state_dict.items():
        if permute and (".attn.q_proj." in key or ".attn.k_proj." in key):
            value = _rotary_to_hf(value, arch.head_dim)
        out[get_mapped_key(key, to_hf)] = value
    return out


def _check_paddable(arch: DecoderArch, base: DecoderArch) -> LayerArch:
    """The base's single layer width, after checking every pruned layer fits in it."""
    if arch.head_dim != base.head_dim:
        raise ValueError(
            f"Padded export needs the base model's head_dim: the pruned model has head_dim={arch.head_dim}, "
            f"the base {base.head_dim}. Use mode='compact'."
        )
    shared = ("vocab_size", "embed_dim", "num_layers", "tie_word_embeddings", "attn_bias")
    diffs = [
        f"{f}: {getattr(arch, f)} vs base {getattr(base, f)}" for f in shared if getattr(arch, f) != getattr(base, f)
    ]
    if arch.rope.kind != base.rope.kind:
        diffs.append(f"rope: {arch.rope.kind} vs base {base.rope.kind}")
    if diffs:
        raise ValueError("Pruned model and base model differ beyond layer widths: " + "; ".join(diffs))
    if len(set(base.layers)) != 1:
        raise ValueError("Padded export needs a base model with the same widths in every layer")
    full = base.layers[0]
    group = full.num_heads // full.num_kv_heads
    for i, layer in enumerate(arch.layers):
        ratio = layer.num_heads // layer.num_kv_heads
        if layer.num_kv_heads > full.num_kv_heads or ratio > group or layer.intermediate_dim > full.intermediate_dim:
            raise ValueError(
                f"Layer {i} ({layer.num_heads} heads / {layer.num_kv_heads} KV heads / MLP {layer.intermediate_dim}) "
                f"does not fit the base layout ({full.num_heads} / {full.num_kv_heads} / {full.intermediate_dim})"
            )
    return full


def _scatter(t: torch.Tensor, index: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.index_copy_(dim, index, t)
    return out


def pad_hf_state_dict(hf_state: Mapping[str, torch.Tensor], arch: DecoderArch, base: DecoderArch) -> StateDict:
    """Zero-pad a compact HF state dict to the base model's uniform widths.

    Key/value head j goes to slot j; its i-th query head to position i of group j
    (stock GQA maps query slot s to key/value slot s // group), and MLP channel c
    to channel c. Everything else is zero (see the module docstring for why
    that is exact).
    """
    full = _check_paddable(arch, base)
    hd, group = arch.head_dim, full.num_heads // full.num_kv_heads
    out = dict(hf_state)
    for i, layer in enumerate(arch.layers):
        ratio = layer.num_heads // layer.num_kv_heads
        q_slots = [(h // ratio) * group + h % ratio for h in range(layer.num_heads)]
        q_rows = torch.tensor([s * hd + d for s in q_slots for d in range(hd)])
        kv_rows = torch.arange(layer.num_kv_heads * hd)
        channels = torch.arange(layer.intermediate_dim)
        p = f"model.layers.{i}."
        plan = {
            "self_attn.q_proj": (q_rows, full.num_heads * hd, 0),
            "self_attn.k_proj": (kv_rows, full.num_kv_heads * hd, 0),
            "self_attn.v_proj": (kv_rows, full.num_kv_heads * hd, 0),
            "self_attn.o_proj": (q_rows, full.num_heads * hd, 1),
            "mlp.gate_proj": (channels, full.intermediate_dim, 0),
            "mlp.up_proj": (channels, full.intermediate_dim, 0),
            "mlp.down_proj": (channels, full.intermediate_dim, 1),
        }
        for name, (index, size, dim) in plan.items():
            out[f"{p}{name}.weight"] = _scatter(out[f"{p}{name}.weight"], index, size, dim)
            if dim == 0 and f"{p}{name}.bias" in out:  # Qwen2's q/k/v biases
                out[f"{p}{name}.bias"] = _scatter(out[f"{p}{name}.bias"], index, size, 0)
    return out


def _parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def _rope_scaling(arch: DecoderArch) -> Optional[Dict[str, Any]]:
    """HF ``rope_scaling`` of the spec's RoPE (None when unscaled)."""
    if arch.rope.kind != "llama3_scaled":
        return None
    rope = arch.rope
    return {"rope_type": "llama3", "factor": rope.scale_factor, "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor, "original_max_position_embeddings": rope.old_context_len}


def _token_ids(base_config: Mapping[str, Any], tokenizer_dir: Optional[Path]) -> Dict[str, Any]:
    """bos/eos/pad ids: the base config's, else the tokenizer's generation config's, else None.

    The stock config defaults (Llama: bos 1, eos 2) are wrong for most models,
    so an export never silently inherits them.
    """
    sources: List[Mapping[str, Any]] = [base_config]
    if tokenizer_dir is not None and (tokenizer_dir / "generation_config.json").is_file():
        sources.append(json.loads((tokenizer_dir / "generation_config.json").read_text()))
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {n: next((s[n] for s in sources if s.get(n) is not None), None) for n in names}


def hf_config(
    arch: DecoderArch,
    mode: str,
    original: Optional[DecoderArch] = None,
    base_config: Optional[Mapping[str, Any]] = None,
    tokenizer_dir: Optional[Path] = None,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """The transformers config object of an export (stock class for padded, ours for compact)."""
    from transformers import LlamaConfig, Qwen2Config

    from adapt_prune_tune.modeling import AdaptLlamaConfig, AdaptQwen2Config

    base_config = dict(base_config or {})
    qwen2 = _is_qwen2(arch)
    common: Dict[str, Any] = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.embed_dim,
        num_hidden_layers=arch.num_layers,
        head_dim=arch.head_dim,
        hidden_act="silu",
        rms_norm_eps=arch.norm_eps,
        max_position_embeddings=base_config.get("max_position_embeddings", arch.max_seq_len),
        tie_word_embeddings=arch.tie_word_embeddings,
        rope_theta=arch.rope.base,
        rope_scaling=_rope_scaling(arch),
        torch_dtype=str(dtype).removeprefix("torch."),
        **_token_ids(base_config, tokenizer_dir),
    )
    if "initializer_range" in base_config:
        common["initializer_range"] = base_config["initializer_range"]
    if not qwen2:
        common.update(attention_bias=False, mlp_bias=False)
    if mode == "padded":
        full = original.layers[0]
        cls = Qwen2Config if qwen2 else LlamaConfig
        config = cls(
            num_attention_heads=full.num_heads,
            num_key_value_heads=full.num_kv_heads,
            intermediate_size=full.intermediate_dim,
            **common,
        )
        config.architectures = ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"]
        return config
    layers = arch.layers
    cls = AdaptQwen2Config if qwen2 else AdaptLlamaConfig
    config = cls(
        num_attention_heads=max(layer.num_heads for layer in layers),
        num_key_value_heads=max(layer.num_kv_heads for layer in layers),
        intermediate_size=max(layer.intermediate_dim for layer in layers),
        num_attention_heads_per_layer=[layer.num_heads for layer in layers],
        num_key_value_heads_per_layer=[layer.num_kv_heads for layer in layers],
        intermediate_size_per_layer=[layer.intermediate_dim for layer in layers],
        **common,
    )
    family = "Qwen2" if qwen2 else "Llama"
    config.architectures = [f"Adapt{family}ForCausalLM"]
    config.auto_map = {
        "AutoConfig": f"configuration_adapt.Adapt{family}Config",
        "AutoModelForCausalLM": f"modeling_adapt.Adapt{family}ForCausalLM",
    }
    return config


# ------------------------------------------------------------------ writing
def _write_config(config: Any, arch: DecoderArch, directory: Path) -> None:
    """``config.json`` as transformers writes it, plus the pre-5.0 RoPE keys.

    transformers 5 stores RoPE settings only in ``rope_parameters``; 4.x reads
    ``rope_theta``/``rope_scaling`` and would silently fall back to its default
    base without them. 5.x accepts (and ignores) the duplicates.
    """
    d = json.loads(config.to_json_string(use_diff=True))
    d["rope_theta"] = arch.rope.base
    if _rope_scaling(arch) is not None:
        d["rope_scaling"] = _rope_scaling(arch)
    (directory / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """``out_dir`` is new, empty, or (with ``overwrite``) an earlier export.

    Overwriting replaces the whole directory, so it is limited to what this tool wrote: a
    mistyped ``out`` (the run directory, the base model's, the current directory) would
    otherwise be deleted with everything in it once the new export is complete.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if not (out_dir / EXPORT_RECORD).is_file():
        raise FileExistsError(
            f"{out_dir} is not an export of this tool (it has no {EXPORT_RECORD}), and overwriting would delete "
            "everything in it: --overwrite replaces only an earlier export. Choose a new or empty directory."
        )


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Swap the finished export in; an old export is removed only after the swap."""
    old = None
    if out_dir.is_dir():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def export_bytes(hf_state: Mapping[str, torch.Tensor], tokenizer_dir: Optional[Path]) -> int:
    """Bytes an export writes: its tensors, the tokenizer files it copies, and 1 MiB for the
    config, the shipped modeling code and the safetensors headers."""
    tensors = sum(t.numel() * t.element_size() for t in hf_state.values())
    tokenizer = sum((tokenizer_dir / name).stat().st_size for name in TOKENIZER_FILES
                    if tokenizer_dir is not None and (tokenizer_dir / name).is_file())
    return tensors + tokenizer + 2**20


def _no_room(out_dir: Path, need: int, free: Optional[int], why: str) -> str:
    has = "free space unknown" if free is None else f"{free / 2**20:,.1f} MiB free"
    return (f"no room for the export in {out_dir}: it needs {need / 2**20:,.1f} MiB and {out_dir.parent} has "
            f"{has} ({why}); nothing was written there. Free space or choose another directory")


def _check_room(out_dir: Path, need: int) -> None:
    """Refuse before writing when the export cannot fit: an earlier export being replaced is
    removed only after the new one is complete, so the whole export must fit beside it."""
    try:
        free = shutil.disk_usage(out_dir.parent).free
    except OSError:
        return  # the write itself will say what is wrong
    if free < need:
        raise OSError(errno.ENOSPC, _no_room(out_dir, need, free, "checked before writing"))


def export_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    arch: DecoderArch,
    out_dir: PathLike,
    *,
    mode: str = "compact",
    original_arch: Optional[ArchLike] = None,
    tokenizer_dir: Optional[PathLike] = None,
    base_config: Optional[Union[PathLike, Mapping[str, Any]]] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    dtype: Union[None, str, torch.dtype] = None,
    quantize: Optional[str] = None,
) -> Path:
    """Write a torchtune state dict of shape ``arch`` as a Hugging Face model directory.

    Args:
        state_dict: torchtune keys (``layers.N.attn.q_proj.weight``, ...).
        arch: the per-layer spec the weights have.
        out_dir: the export directory (created; must be empty unless ``overwrite``).
        mode: ``"compact"`` (real pruned model, shipped modeling code) or
            ``"padded"`` (stock architecture at the base widths, zero-padded).
        original_arch: the unpruned spec (see ``resolve_original_arch``); needed
            for ``padded``, recorded for model cards in both modes.
        tokenizer_dir: tokenizer/generation files to copy (e.g. the base checkpoint).
        base_config: the base model's HF ``config.json`` (or its directory or
            dict): token ids and ``max_position_embeddings`` are taken from it,
            and the base widths when ``original_arch`` is not given.
        max_shard_size: safetensors shard limit, as in ``save_pretrained``.
        overwrite: replace a non-empty ``out_dir`` (only once the new export is complete).
        dtype: cast floating-point weights (``"bfloat16"``, ``torch.float16``, ...).
        quantize: a ``adapt_prune_tune.quantize.SCHEMES`` name (``"int8wo"``,
            ``"int8da8w"``): torchao-quantize the decoder projections (compact only).

    Returns:
        Path: ``out_dir``.
    """
    from huggingface_hub import save_torch_state_dict

    from adapt_prune_tune.modeling import SHIPPED_FILES

    if mode not in EXPORT_MODES:
        raise ValueError(f"mode must be one of {EXPORT_MODES}, got {mode!r}")
    scheme = _check_quantize(quantize, mode)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} does not exist")
    base_config_dict = _load_json(base_config, "config.json") if base_config is not None else {}
    cast = _parse_dtype(dtype)
    _check_family(arch)
    check_state_dict(state_dict, arch)
    original = resolve_original_arch(original_arch, base_config_dict or None, arch)
    if mode == "padded" and original is None:
        raise ValueError(
            "Padded export needs the base model's widths: pass original_arch (arch.json, run_record.json "
            "or the base config.json) or base_config"
        )

    hf_state = to_hf_state_dict(state_dict, arch)
    if mode == "padded":
        hf_state = pad_hf_state_dict(hf_state, arch, original)
    hf_state = {
        k: (v.to(cast) if cast is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in hf_state.items()
    }
    weights_dtype = hf_state["model.embed_tokens.weight"].dtype
    config = hf_config(arch, mode, original, base_config_dict, tokenizer_dir, weights_dtype)
    shipped_files = list(SHIPPED_FILES) if mode == "compact" else []
    if scheme is not None:
        from adapt_prune_tune.quantize import SHIPPED_FILE, quantize_hf_state_dict, quantized_config

        hf_state = quantize_hf_state_dict(hf_state, scheme)
        config = quantized_config(config, scheme)
        shipped_files.append(SHIPPED_FILE)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    need = export_bytes(hf_state, tokenizer_dir)
    _check_room(out_dir, need)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_torch_state_dict(hf_state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        _write_config(config, arch, tmp)
        for f in shipped_files:
            shutil.copyfile(f, tmp / f.name)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, tmp / name)
        record = {
            "format_version": 1,
            "mode": mode,
            "arch": arch.to_dict(),
            "original_arch": original.to_dict() if original is not None else None,
            "quantization": getattr(config, "adapt_quantization", None),
        }
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and is_out_of_space(e):
            free = free_space_that_matters(out_dir.parent, e, need)
            raise OSError(e.errno or errno.ENOSPC, _no_room(out_dir, need, free, "the disk filled while writing it")) from e
        raise
    log.info(f"Exported {mode} Hugging Face model{f' ({scheme})' if scheme else ''} to {out_dir}")
    return out_dir


def _check_quantize(quantize: Optional[str], mode: str) -> Optional[str]:
    """``quantize`` if it can be exported in ``mode`` (else the error), imported only when asked for."""
    if quantize is None:
        return None
    from adapt_prune_tune.quantize import check_quantization

    return check_quantization(quantize, mode).name


def export_hf(
    source: Union[PathLike, Mapping[str, torch.Tensor], nn.Module],
    out_dir: PathLike,
    *,
    arch: Optional[DecoderArch] = None,
    mode: str = "compact",
    original_arch: Optional[ArchLike] = None,
    tokenizer_dir: Optional[PathLike] = None,
    base_config: Optional[Union[PathLike, Mapping[str, Any]]] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    dtype: Union[None, str, torch.dtype] = None,
    quantize: Optional[str] = None,
) -> Path:
    """Export a pruned model, given as a checkpoint directory, a state dict or a model.

    Args:
        source: a pruned checkpoint directory (``arch.json`` + safetensors in
            torchtune keys, or a run output directory with ``final/``); a
            torchtune state dict (then ``arch`` is required); or a torchtune
            ``TransformerDecoder`` (``arch`` defaults to the one read off it).
        arch: the spec of ``source`` when it is a state dict or model.
        Other arguments: see ``export_state_dict``. For a checkpoint directory
        without ``original_arch``/``base_config``, a ``run_record.json`` next to
        it supplies the base widths.

    Returns:
        Path: ``out_dir``.
    """
    kwargs = dict(
        mode=mode,
        tokenizer_dir=tokenizer_dir,
        base_config=base_config,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        dtype=dtype,
        quantize=quantize,
    )
    _check_quantize(quantize, mode)  # before reading gigabytes of weights
    if isinstance(source, (str, Path)):
        _check_out_dir(Path(out_dir), overwrite)  # before reading gigabytes of weights
        state, loaded = load_pruned_checkpoint(source)
        recorded = _recorded_base_arch(loaded, pruned_checkpoint_dir(source))
        if base_config is not None and recorded is not None:
            _check_base_is_the_runs(recorded, base_config)
        if original_arch is None and base_config is None:
            original_arch = recorded
        return export_state_dict(state, loaded, out_dir, original_arch=original_arch, **kwargs)
    if isinstance(source, nn.Module):
        arch = arch if arch is not None else arch_from_model(source)
        source = source.state_dict()
    if arch is None:
        raise ValueError("Exporting a state dict needs its arch (the DecoderArch the weights were pruned to)")
    return export_state_dict(source, arch, out_dir, original_arch=original_arch, **kwargs)


# ------------------------------------------------------------------ checkpointer
class PrunedModelCheckpointer:
    """torchtune checkpointer for pruned models, which also writes Hugging Face exports.

    Reads and writes the recipe's pruned format (``arch.json`` + safetensors in
    torchtune keys), so a pruned model can be trained further with torchtune's
    stock recipes::

        model:
          _component_: adapt_prune_tune.models.decoder_from_arch
          arch: /path/to/run/final/arch.json
        checkpointer:
          _component_: adapt_prune_tune.export.PrunedModelCheckpointer
          checkpoint_dir: /path/to/run/final
          output_dir: ${output_dir}
          hf_export: compact          # or padded, or null for none
          tokenizer_dir: /path/to/base_model

    Each save writes ``output_dir/epoch_{N}/`` (``arch.json`` with the widths
    read off the saved weights, so a model pruned after loading is described
    correctly, plus ``model.safetensors``) and, if ``hf_export`` is set, the
    export in ``output_dir/epoch_{N}/hf/``. Intermediate saves also write
    ``output_dir/recipe_state/recipe_state.pt`` as torchtune's checkpointers do,
    and ``should_load_recipe_state`` resumes from the newest epoch.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        output_dir: str,
        checkpoint_files: Optional[List[str]] = None,
        model_type: Optional[str] = None,
        hf_export: Optional[str] = "compact",
        tokenizer_dir: Optional[str] = None,
        base_config: Optional[str] = None,
        original_arch: Optional[str] = None,
        max_shard_size: Union[int, str] = "5GB",
        should_load_recipe_state: bool = False,
    ) -> None:
        # checkpoint_files and model_type are accepted so stock configs keep working:
        # the directory's arch.json and index say which files hold the weights.
        if hf_export is not None and hf_export not in EXPORT_MODES:
            raise ValueError(f"hf_export must be one of {EXPORT_MODES} or null, got {hf_export!r}")
        self._checkpoint_dir = pruned_checkpoint_dir(checkpoint_dir)
        self._output_dir = Path(output_dir)
        self._hf_export = hf_export
        self._tokenizer_dir = tokenizer_dir
        self._base_config = base_config
        self._max_shard_size = max_shard_size
        self._should_load_recipe_state = should_load_recipe_state
        self._arch = DecoderArch.load(self._checkpoint_dir / "arch.json")
        # Resolved now so that a padded export without base widths fails before training, not after.
        self._original_arch = resolve_original_arch(original_arch, base_config, self._arch, self._checkpoint_dir)
        if hf_export == "padded" and self._original_arch is None:
            raise ValueError(
                "hf_export=padded needs the base model's widths: set original_arch or base_config, "
                f"or put the run's run_record.json next to {self._checkpoint_dir}"
            )

    def _latest_epoch_dir(self) -> Path:
        epochs = sorted(
            (int(p.name[len("epoch_") :]), p)
            for p in self._output_dir.glob("epoch_*")
            if p.name[len("epoch_") :].isdigit() and (p / "arch.json").is_file()
        )
        if not epochs:
            raise FileNotFoundError(f"should_load_recipe_state=True but {self._output_dir} has no epoch_*/arch.json")
        return epochs[-1][1]

    def load_checkpoint(self) -> Dict[str, Any]:
        """``{"model": state_dict}``, plus the recipe state when resuming."""
        source = self._latest_epoch_dir() if self._should_load_recipe_state else self._checkpoint_dir
        state, self._arch = load_pruned_checkpoint(source)
        out: Dict[str, Any] = {"model": state}
        if self._should_load_recipe_state:
            out.update(torch.load(self._output_dir / "recipe_state" / "recipe_state.pt", weights_only=False))
        return out

    def save_checkpoint(
        self,
        state_dict: Dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
    ) -> None:
        """Write the model (pruned format + optional HF export) and, mid-training, the recipe state."""
        from huggingface_hub import save_torch_state_dict

        if adapter_only:
            raise ValueError("PrunedModelCheckpointer saves full models only; merge adapters first")
        model_state = state_dict["model"]
        arch = arch_for_state_dict(model_state, self._arch)
        check_state_dict(model_state, arch)
        epoch_dir = self._output_dir / f"epoch_{epoch}"
        epoch_dir.mkdir(parents=True, exist_ok=True)
        cpu_state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
        save_torch_state_dict(cpu_state, epoch_dir, max_shard_size=self._max_shard_size, metadata={"format": "pt"})
        arch.save(epoch_dir / "arch.json")
        if self._hf_export is not None:
            export_state_dict(
                cpu_state,
                arch,
                epoch_dir / "hf",
                mode=self._hf_export,
                original_arch=self._original_arch,
                tokenizer_dir=self._tokenizer_dir,
                base_config=self._base_config,
                max_shard_size=self._max_shard_size,
                overwrite=True,
            )
        if intermediate_checkpoint:
            recipe_state = {k: v for k, v in state_dict.items() if k != "model"}
            path = self._output_dir / "recipe_state" / "recipe_state.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(recipe_state, path)
        log.info(f"Saved pruned checkpoint to {epoch_dir}")
