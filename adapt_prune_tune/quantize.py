"""Quantized exports: torchao int8 weights in the compact Hugging Face export.

``adapt-prune-tune export RUN OUT --quantize int8wo`` quantizes every decoder
layer's projections (attention q/k/v/o, MLP gate/up/down) with torchao's
``quantize_`` and writes them, still in safetensors, into the compact export.
Embeddings, the output projection and the norms keep the export's float dtype,
as transformers' torchao integration does by default. Pruning shrinks the
widths, quantization the bytes per weight; the two compose because a pruned
layer is just a narrower stock layer.

Schemes (``SCHEMES``):

``int8wo``
    ``Int8WeightOnlyConfig``: int8 weights, one symmetric scale per output
    channel; activations stay float.
``int8da8w``
    ``Int8DynamicActivationInt8WeightConfig``: the same int8 weights, and each
    token's activations quantized to int8 at run time for an int8 matmul.
``int4wo``
    Refused: torchao 0.14.1 has no int4 layout that is both CPU-runnable and a
    portable file. Its default int4 packing needs the CUDA kernels of
    fbgemm-gpu-genai, the legacy tinygemm packing has no CPU kernel, and the CPU
    one (``Int4OpaqueTensor``) is pre-shuffled for the exporting machine's
    instruction set, so a file written on one CPU need not load right on another.

What the installed versions allow, and therefore the file format: transformers'
torchao integration (``quantization_config`` in ``config.json``) cannot read
these weights from safetensors with the torchao versions torchtune 0.6.1 runs on
(< 0.16): transformers 5.x enables it only for torchao >= 0.15, and torchao's
safetensors format has no int8 weight-only or int8 dynamic tensors in 0.14.1 or
0.15 (details in ``adapt_prune_tune.modeling.modeling_adapt_torchao``). Pickled
tensor subclasses (``torch.save``), the other way transformers stores them, are
never written. So each quantized weight is stored as the plain tensors it is made
of (int8 values, scales) and the compact export's shipped modeling code rebuilds
the torchao tensors on load, bit for bit what ``quantize_`` made here. That is
also why ``--quantize`` needs ``--mode compact``: a padded export is for loaders
that run no shipped code, and none of those can read the result.

The scheme travels in the export's ``adapt_prune.json`` (``quantization``), in
``config.json`` (``adapt_quantization``) and in the model card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from adapt_prune_tune.modeling import modeling_adapt_torchao as shipped

#: The modeling file a quantized compact export ships next to ``modeling_adapt.py``.
SHIPPED_FILE = Path(shipped.__file__)
#: What this project's dependency pins allow for torchao (see pyproject.toml).
TORCHAO_REQUIREMENT = "torchao>=0.14.1,<0.16"


@dataclass(frozen=True)
class QuantScheme:
    """A ``--quantize`` choice: its torchao config and what it does to the model."""

    name: str
    torchao_config: str  # class name in torchao.quantization
    description: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    refused: Optional[str] = None  # why this scheme cannot be exported, when it cannot

    def config(self) -> Any:
        """The torchao ``AOBaseConfig`` (``check_quantization`` has checked it exists)."""
        import torchao.quantization

        return getattr(torchao.quantization, self.torchao_config)(**self.kwargs)


# set_inductor_config=False: quantize_ would otherwise change global torch._inductor
# settings in every process that exports or loads, whether it compiles or not.
SCHEMES: Dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme(
            "int8wo",
            "Int8WeightOnlyConfig",
            "int8 weight-only: int8 weights with one scale per output channel, float activations",
            {"set_inductor_config": False},
        ),
        QuantScheme(
            "int8da8w",
            "Int8DynamicActivationInt8WeightConfig",
            "int8 dynamic activation, int8 weight: per-channel int8 weights, per-token int8 activations "
            "quantized at run time",
            {"set_inductor_config": False},
        ),
        QuantScheme(
            "int4wo",
            "Int4WeightOnlyConfig",
            "int4 weight-only",
            refused=(
                "torchao {torchao} has no int4 weight layout that runs on CPU and is portable: the default "
                "packing needs the CUDA kernels of fbgemm-gpu-genai, the legacy tinygemm packing has no CPU "
                "kernel, and the CPU packing (Int4OpaqueTensor) is laid out for the exporting machine's "
                "instruction set"
            ),
        ),
    )
}


def _torchao_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:
        return "not installed"


def check_quantization(scheme: Optional[str], mode: str) -> Optional[QuantScheme]:
    """The scheme named by ``quantize`` (``--quantize``), or None; raises before any work if it cannot be exported.

    Raises:
        ValueError: an unknown or refused scheme, a padded export, or a torchao
            that lacks the scheme's config; the message names the fix.
    """
    if scheme is None:
        return None
    usable = " or ".join(f"--quantize {s}" for s, q in SCHEMES.items() if not q.refused)
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown quantization scheme {scheme!r} (quantize=, --quantize): use {usable}")
    chosen = SCHEMES[scheme]
    if chosen.refused:
        raise ValueError(
            f"--quantize {scheme} is not supported: {chosen.refused.format(torchao=_torchao_version())}. "
            f"Use {usable}."
        )
    if mode != "compact":
        raise ValueError(
            f"--quantize needs --mode compact, got --mode {mode}. A {mode} export is for loaders that run no "
            "shipped code, and none can read torchao int8 weights from safetensors with torchao < 0.16 "
            "(transformers' torchao integration needs torchao >= 0.15 and torchao's safetensors format has "
            f"no int8 tensors; see adapt_prune_tune.quantize). Export --mode compact --quantize {scheme} "
            f"(loads with trust_remote_code=True), or --mode {mode} without --quantize."
        )
    try:
        import torchao.quantization
    except ImportError as e:
        raise ValueError(f"--quantize {scheme} needs torchao: pip install '{TORCHAO_REQUIREMENT}' ({e})") from None
    if not hasattr(torchao.quantization, chosen.torchao_config):
        raise ValueError(
            f"--quantize {scheme} needs torchao.quantization.{chosen.torchao_config}, which the installed "
            f"torchao {_torchao_version()} lacks: pip install '{TORCHAO_REQUIREMENT}', or use another scheme "
            f"({usable})"
        )
    return chosen


def _is_decoder_projection(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and ".layers." in f".{fqn}"


def quantize_linears_(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize, in place, every ``nn.Linear`` inside the decoder layers of ``model``.

    Works on torchtune models (``layers.N.attn.q_proj``) and Hugging Face ones
    (``model.layers.N.self_attn.q_proj``) alike and touches exactly the weights an
    export with ``--quantize scheme`` quantizes, so it gives the in-memory model a
    quantized export must match.
    """
    from torchao.quantization import quantize_

    quantize_(model, SCHEMES[scheme].config(), filter_fn=_is_decoder_projection)
    return model


def quantize_weight(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """``weight`` (``[out, in]``) as ``quantize_`` turns it into a torchao tensor (or leaves it, if it skips it)."""
    from torchao.quantization import quantize_

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    quantize_(linear, SCHEMES[scheme].config())
    return linear.weight.detach()


def quantize_hf_state_dict(hf_state: Mapping[str, torch.Tensor], scheme: str) -> Dict[str, torch.Tensor]:
    """A compact HF state dict with every decoder projection's ``weight`` replaced by its torchao components.

    ``model.layers.0.self_attn.q_proj.weight`` becomes ``...q_proj.weight_int_data``,
    ``...q_proj.weight_scale``, ... (names by ``flatten_quantized``, which the shipped
    loader shares). A weight torchao skips (int8 dynamic quantization skips inputs
    of 16 features or fewer) stays a float ``weight``, as the loader expects.
    """
    projections = {f".{name}.weight" for name in shipped.QUANTIZED_PROJECTIONS}
    out: Dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        prefix, _, suffix = key.rpartition(".")
        is_projection = key.startswith("model.layers.") and any(key.endswith(p) for p in projections)
        quantized = quantize_weight(value, scheme) if is_projection else value
        if shipped.is_plain(quantized):
            out[key] = value
            continue
        for name, component in shipped.flatten_quantized(quantized).items():
            out[f"{prefix}.{suffix}_{name}"] = component.detach().contiguous()
    return out


def quantization_record(scheme: str) -> Dict[str, Any]:
    """What an export records about its quantization (``adapt_prune.json`` and ``config.json``)."""
    from torchao.core.config import config_to_dict

    chosen = SCHEMES[scheme]
    return {
        "scheme": scheme,
        "description": chosen.description,
        "method": "torchao",
        "torchao_version": _torchao_version(),
        "torchao_config": config_to_dict(chosen.config()),
        "quantized_modules": list(shipped.QUANTIZED_PROJECTIONS),
    }


def quantized_config(config: Any, scheme: str) -> Any:
    """A compact export's config as the quantized one: its own config class, model classes and the scheme."""
    family = "Qwen2" if "Qwen2" in config.architectures[0] else "Llama"
    cls = getattr(shipped, f"TorchaoAdapt{family}Config")
    quantized = cls.from_dict({k: v for k, v in config.to_dict().items() if k != "model_type"})
    quantized.adapt_quantization = quantization_record(scheme)
    quantized.architectures = [f"TorchaoAdapt{family}ForCausalLM"]
    quantized.auto_map = {
        "AutoConfig": f"modeling_adapt_torchao.TorchaoAdapt{family}Config",
        "AutoModelForCausalLM": f"modeling_adapt_torchao.TorchaoAdapt{family}ForCausalLM",
    }
    return quantized
