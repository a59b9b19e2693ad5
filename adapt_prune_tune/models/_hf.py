"""Unpruned Hugging Face checkpoints (config.json + safetensors) as torchtune models.

Used wherever a base model is needed outside the recipe (benchmarks, tests,
evaluation): reads the HF config into a ``DecoderArch`` and converts weights
with torchtune's own key/permutation mapping, so the result is exactly what
torchtune's ``FullModelHFCheckpointer`` would load.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from safetensors.torch import load_file
from torch import nn

from adapt_prune_tune.models._arch import DecoderArch, RopeSpec
from adapt_prune_tune.models._builders import decoder_from_arch

# Mistral's blocks are Llama's (no biases, SiLU gate, plain RoPE) once its sliding window is off.
SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


class UnsupportedHFConfig(ValueError):
    """A Llama/Qwen2 config.json with a feature torchtune's blocks cannot reproduce."""


def arch_from_hf_config(config: Dict) -> DecoderArch:
    """Spec of an unpruned Llama/Qwen2 HF config (clear error for anything else)."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    if archs[0] not in SUPPORTED_HF_ARCHITECTURES:
        raise ValueError(
            f"Unsupported model architecture {archs[0]!r}; supported: "
            f"{', '.join(SUPPORTED_HF_ARCHITECTURES)} (Llama 3/3.1/3.2, SmolLM2, Qwen2/2.5, Mistral without "
            "a sliding window)"
        )
    qwen = archs[0] == "Qwen2ForCausalLM"
    scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {})
    theta = config.get("rope_theta", scaling.get("rope_theta", 10_000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    # What torchtune's blocks cannot build; each would load into a network other than the checkpoint's.
    unsupported = []
    if kind not in ("default", None) and (qwen or kind != "llama3"):
        unsupported.append(f"rope_scaling of type {kind!r} (supported: none, and Llama 3's 'llama3')")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        unsupported.append(f"hidden_act {config['hidden_act']!r} (supported: 'silu')")
    if not qwen and (config.get("attention_bias") or config.get("mlp_bias")):
        unsupported.append("attention_bias / mlp_bias (Llama blocks here have no projection biases)")
    if qwen and config.get("use_sliding_window"):
        unsupported.append("use_sliding_window (torchtune attends over the whole sequence)")
    window = config.get("sliding_window")
    if archs[0] == "MistralForCausalLM" and window is not None and window < config.get("max_position_embeddings", 0):
        unsupported.append(f"sliding_window {window} (torchtune attends over the whole sequence)")
    if unsupported:
        raise UnsupportedHFConfig(f"{archs[0]} config with " + "; ".join(unsupported) + " is not supported: "
                                  "this checkpoint would be built as another network than it was trained as")
    if qwen:
        rope = RopeSpec("qwen2", float(theta))
    elif kind == "llama3":
        rope = RopeSpec(
            "llama3_scaled", float(theta), float(scaling["factor"]),
            float(scaling.get("low_freq_factor", RopeSpec.low_freq_factor)),
            float(scaling.get("high_freq_factor", RopeSpec.high_freq_factor)),
            int(scaling.get("original_max_position_embeddings", RopeSpec.old_context_len)),
        )
    else:
        rope = RopeSpec("default", float(theta))
    heads = config["num_attention_heads"]
    return DecoderArch.uniform(
        vocab_size=config["vocab_size"],
        embed_dim=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        intermediate_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 4096),
        norm_eps=config.get("rms_norm_eps", 1e-5),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope=rope,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attn_bias=qwen,
        meta={"base_model": config.get("_name_or_path", ""), "hf_architecture": archs[0]},
    )


def load_hf_state_dict(checkpoint_dir: Path) -> Dict[str, torch.Tensor]:
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"No *.safetensors files in {checkpoint_dir}; download the model first "
            "(`tune download ...`) or run `adapt-prune-tune prepare` for the default model"
        )
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def hf_to_torchtune(state: Dict[str, torch.Tensor], arch: DecoderArch) -> Dict[str, torch.Tensor]:
    """HF keys/layout -> torchtune keys/layout for an unpruned model."""
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    layer = arch.layers[0]
    kwargs = dict(num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads, dim=arch.embed_dim, head_dim=arch.head_dim)
    if arch.rope.kind == "qwen2":
        out = qwen2_hf_to_tune(state, tie_word_embeddings=arch.tie_word_embeddings, **kwargs)
    else:
        out = hf_to_tune(state, **kwargs)
    if arch.tie_word_embeddings:
        out.pop("output.weight", None)
    return out


def read_hf_arch(path: Union[str, Path], max_seq_len: Optional[int] = None) -> DecoderArch:
    """Spec of an HF checkpoint given its directory or its ``config.json``."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: expected a Hugging Face checkpoint directory "
            "(config.json + *.safetensors) or the path of its config.json"
        )
    arch = arch_from_hf_config(json.loads(config_path.read_text()))
    return arch if max_seq_len is None else replace(arch, max_seq_len=max_seq_len)


def load_hf_model(
    checkpoint_dir: Union[str, Path], dtype: torch.dtype = torch.float32, max_seq_len: Optional[int] = None
) -> Tuple[nn.Module, DecoderArch]:
    """Build the torchtune decoder of an HF checkpoint directory and load its weights."""
    checkpoint_dir = Path(checkpoint_dir)
    arch = read_hf_arch(checkpoint_dir, max_seq_len)
    state = hf_to_torchtune(load_hf_state_dict(checkpoint_dir), arch)
    with torch.device("meta"):
        model = decoder_from_arch(arch)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    for m in model.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    return model, arch


def decoder_from_hf_config(path: Union[str, Path], max_seq_len: Optional[int] = None) -> nn.Module:
    """An empty torchtune decoder shaped like an (unpruned) HF ``config.json``.

    Lets a config use any local Llama/Qwen2 checkpoint without a dedicated
    builder: ``model: {_component_: adapt_prune_tune.models.decoder_from_hf_config, path: .../config.json}``.
    """
    return decoder_from_arch(read_hf_arch(path, max_seq_len))
