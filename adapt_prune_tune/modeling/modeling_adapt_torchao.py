"""Compact Adapt-Pruner exports whose projections hold torchao-quantized weights.

This file is copied, next to ``modeling_adapt.py``, into every compact export
written with ``--quantize`` and loaded by transformers with
``trust_remote_code=True``; it imports torch and transformers, and torchao once
a quantized model is built.

Why not transformers' own torchao integration (``quantization_config`` in
``config.json``): with the versions this project pins it cannot load such a
file. transformers 5.x enables that integration only for torchao >= 0.15,
torchtune 0.6.1 breaks from torchao 0.16 on, and torchao's safetensors format
(``torchao.prototype.safetensors``) covers Float8/Int4/IntxUnpackedToInt8
tensors but not the ``AffineQuantizedTensor`` that int8 weight-only and int8
dynamic quantization produce; torchao 0.14.1's reader also rejects every file
(``is_metadata_torchao`` tests ``or`` where 0.15 tests ``and``). The usual way
out, ``torch.save`` of the tensor subclasses, is a pickle. So the key is
``adapt_quantization``, which transformers does not act on, and this file does
the loading.

Format: a quantized torchao tensor is a tree of plain tensors plus non-tensor
attributes (``__tensor_flatten__``). The plain tensors are stored under the
projection's name, ``q_proj.weight_int_data``, ``q_proj.weight_scale`` and so
on, in the export's safetensors. The non-tensor half (block size, quantization
range, the activation quantizer) is not stored: it is read off a template, a
zero weight of the same shape quantized with the same torchao config (kept in
``config.json`` as torchao's own ``config_to_dict``). On load every quantized
projection becomes a ``TorchaoLinear`` holding the stored tensors as buffers;
its forward wraps them back into the torchao tensor (no copy) and calls
``F.linear``, so torchao's kernels run exactly as after ``quantize_`` on the
float model. Embeddings, the output projection and the norms stay in the
export's float dtype, as in transformers' torchao integration.
"""

import json
from functools import lru_cache
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_adapt import AdaptLlamaConfig, AdaptQwen2Config
from .modeling_adapt import AdaptLlamaForCausalLM, AdaptQwen2ForCausalLM, apply_layer_widths

#: The decoder-layer projections a quantized export stores as torchao tensors.
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Path_ = Tuple[str, ...]


def is_plain(tensor: torch.Tensor) -> bool:
    """True for an ordinary tensor or parameter, False for a tensor subclass such as torchao's."""
    return type(tensor) in (torch.Tensor, nn.Parameter)


def _leaves(tensor: torch.Tensor, path: Path_ = ()) -> Dict[Path_, torch.Tensor]:
    """The plain tensors a torchao tensor subclass is made of, by attribute path."""
    names, _ = tensor.__tensor_flatten__()
    out: Dict[Path_, torch.Tensor] = {}
    for name in names:
        inner = getattr(tensor, name)
        if is_plain(inner):
            out[path + (name,)] = inner
        else:
            out.update(_leaves(inner, path + (name,)))
    return out


def _component_names(paths: Any) -> Dict[Path_, str]:
    """Each leaf's stored name: its attribute name, or the whole path if names repeat."""
    paths = list(paths)
    short = [p[-1] for p in paths]
    unique = len(set(short)) == len(short)
    return {p: (p[-1] if unique else "_".join(p)) for p in paths}


def flatten_quantized(tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``{component name: plain tensor}`` of a torchao-quantized weight (no copies)."""
    if is_plain(tensor):
        raise TypeError("Expected a torchao quantized tensor, got a plain tensor (quantize_ skipped this weight)")
    leaves = _leaves(tensor)
    names = _component_names(leaves)
    return {names[p]: t for p, t in leaves.items()}


def unflatten_quantized(template: torch.Tensor, components: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``template``'s torchao tensor rebuilt around ``components`` (as ``flatten_quantized`` names them)."""
    names = _component_names(_leaves(template))

    def build(t: torch.Tensor, path: Path_) -> torch.Tensor:
        inner_names, ctx = t.__tensor_flatten__()
        inner = {}
        for name in inner_names:
            child = getattr(t, name)
            inner[name] = components[names[path + (name,)]] if is_plain(child) else build(child, path + (name,))
        return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())

    return build(template, ())


@lru_cache(maxsize=None)
def _template(out_features: int, in_features: int, config_json: str, dtype: torch.dtype) -> torch.Tensor:
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    # device="cpu" overrides the meta-device context transformers builds models in.
    linear = nn.Linear(in_features, out_features, bias=False, device="cpu", dtype=dtype)
    with torch.no_grad():
        linear.weight.zero_()
    quantize_(linear, config_from_dict(json.loads(config_json)))
    return linear.weight.detach()


def quantized_template(
    out_features: int, in_features: int, torchao_config: Mapping[str, Any], dtype: torch.dtype
) -> torch.Tensor:
    """A zero ``[out, in]`` weight quantized with ``torchao_config`` (torchao's ``config_to_dict``), on CPU."""
    return _template(out_features, in_features, json.dumps(torchao_config, sort_keys=True), dtype)


class TorchaoLinear(nn.Module):
    """A linear layer whose weight is a torchao quantized tensor kept as its plain tensors.

    The tensors are buffers named ``weight_<component>``, so state dicts, ``.to()``
    and safetensors see only plain tensors; ``quantized_weight`` wraps them.
    """

    def __init__(self, linear: nn.Linear, torchao_config: Mapping[str, Any]) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.torchao_config = dict(torchao_config)
        template = quantized_template(self.out_features, self.in_features, self.torchao_config, linear.weight.dtype)
        self.component_names = tuple(flatten_quantized(template))
        for name, t in flatten_quantized(template).items():
            self.register_buffer(f"weight_{name}", torch.empty(t.shape, dtype=t.dtype, device=linear.weight.device))
        self.bias = linear.bias
        self._cached: Optional[Tuple[Tuple[torch.Tensor, ...], torch.Tensor]] = None

    def quantized_weight(self) -> torch.Tensor:
        """The torchao tensor over the current buffers (rebuilt when ``.to()`` replaced them)."""
        buffers = tuple(getattr(self, f"weight_{name}") for name in self.component_names)
        if self._cached is None or any(a is not b for a, b in zip(self._cached[0], buffers)):
            dtype = next(b.dtype for b in buffers if b.is_floating_point())
            template = quantized_template(self.out_features, self.in_features, self.torchao_config, dtype)
            self._cached = (buffers, unflatten_quantized(template, dict(zip(self.component_names, buffers))))
        return self._cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        kind = self.torchao_config["_type"]
        return f"in_features={self.in_features}, out_features={self.out_features}, torchao={kind}"


def quantize_projections(decoder_layers: nn.ModuleList, config: Any) -> None:
    """Replace every layer's projections by ``TorchaoLinear`` as ``config.adapt_quantization`` says.

    A projection torchao leaves alone (int8 dynamic quantization skips inputs of
    16 features or fewer) stays an ``nn.Linear``: the template of its shape comes
    back plain, exactly as its weight did at export.
    """
    quantization = getattr(config, "adapt_quantization", None)
    if not quantization or "torchao_config" not in quantization:
        raise ValueError("config.json of a quantized export must define adapt_quantization.torchao_config")
    ao_config = quantization["torchao_config"]
    for layer in decoder_layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in QUANTIZED_PROJECTIONS:
                child = getattr(parent, name, None)
                if not isinstance(child, nn.Linear):
                    continue
                template = quantized_template(child.out_features, child.in_features, ao_config, child.weight.dtype)
                if not is_plain(template):
                    setattr(parent, name, TorchaoLinear(child, ao_config))


# Own config classes (and model types): transformers' auto classes map a config
# class to one model class per process, and once an unquantized compact export
# with the same config class was loaded they would build that model for a
# quantized export too, leaving its projections randomly initialized.
class TorchaoAdaptLlamaConfig(AdaptLlamaConfig):
    """``AdaptLlamaConfig`` of a quantized export (``adapt_quantization`` says how)."""

    model_type = "adapt_llama_torchao"


class TorchaoAdaptQwen2Config(AdaptQwen2Config):
    """``AdaptQwen2Config`` of a quantized export (``adapt_quantization`` says how)."""

    model_type = "adapt_qwen2_torchao"


class TorchaoAdaptLlamaForCausalLM(AdaptLlamaForCausalLM):
    """``AdaptLlamaForCausalLM`` with torchao-quantized projections."""

    config_class = TorchaoAdaptLlamaConfig

    def post_init(self) -> None:
        apply_layer_widths(self.model.layers, self.config)
        quantize_projections(self.model.layers, self.config)
        super().post_init()  # its resize is a no-op now; then the stock post_init


class TorchaoAdaptQwen2ForCausalLM(AdaptQwen2ForCausalLM):
    """``AdaptQwen2ForCausalLM`` with torchao-quantized projections."""

    config_class = TorchaoAdaptQwen2Config

    def post_init(self) -> None:
        apply_layer_widths(self.model.layers, self.config)
        quantize_projections(self.model.layers, self.config)
        super().post_init()
