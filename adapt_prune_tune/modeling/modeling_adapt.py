"""Models of compact Adapt-Pruner exports: stock Llama/Qwen2 with per-layer widths.

This file is copied into every compact export and loaded by transformers with
``trust_remote_code=True``; it imports nothing but torch and transformers.

Why a shipped file and not a native architecture: transformers has no decoder
that takes arbitrary per-layer head counts and MLP widths for Llama-style
blocks. DeciLM/Nemotron-NAS (per-block ``n_heads_in_group`` and ``ffn_mult``)
is remote code on the Hub, not part of transformers, and derives the MLP width
from a float multiplier through a rounding formula; OpenELM is remote code too,
with layer-wise scaling rules rather than free widths. Gemma3n accepts a list
of MLP widths but its blocks (AltUp, per-layer embeddings) are not Llama's.
transformers 5.x configs accept a ``per_layer_config`` (HeterogeneousConfigMixin),
but the stock Llama/Qwen2 modeling code does not read it: building a model from
such a config raises ``AmbiguousGlobalPerLayerAttributeError``.

So the classes below are the stock ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``
with one change: before weights are initialized or loaded, each layer's
q/k/v/o and gate/up/down projections are replaced by ones of that layer's
width, and the attention module's ``num_key_value_groups`` is set to that
layer's query-heads-per-KV-head ratio. Everything else (RMSNorm, RoPE incl.
Llama 3 scaling, Qwen2 q/k/v biases, tied embeddings, attention backends, KV
caches, ``generate``) is the stock code path: the stock attention reshapes with
``-1`` heads and the caches size themselves from the tensors they receive.
"""

from typing import Any

from torch import nn
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from .configuration_adapt import AdaptLlamaConfig, AdaptQwen2Config, layer_widths


def _linear_like(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """``linear`` itself if it already has this shape, else a new one on its device/dtype."""
    if (linear.in_features, linear.out_features) == (in_features, out_features):
        return linear
    return nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def apply_layer_widths(decoder_layers: nn.ModuleList, config: Any) -> None:
    """Resize each stock decoder layer's projections to the widths in ``config``."""
    hidden = config.hidden_size
    for layer, (heads, kv_heads, mlp_width) in zip(decoder_layers, layer_widths(config)):
        attn, mlp = layer.self_attn, layer.mlp
        q_dim, kv_dim = heads * attn.head_dim, kv_heads * attn.head_dim
        attn.q_proj = _linear_like(attn.q_proj, hidden, q_dim)
        attn.k_proj = _linear_like(attn.k_proj, hidden, kv_dim)
        attn.v_proj = _linear_like(attn.v_proj, hidden, kv_dim)
        attn.o_proj = _linear_like(attn.o_proj, q_dim, hidden)
        attn.num_key_value_groups = heads // kv_heads
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, mlp_width)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, mlp_width)
        mlp.down_proj = _linear_like(mlp.down_proj, mlp_width, hidden)
        mlp.intermediate_size = mlp_width


class AdaptLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose layers have the widths listed in the config."""

    config_class = AdaptLlamaConfig

    def post_init(self) -> None:
        # The stock __init__ ends here; resizing first lets weight init, weight
        # tying and the loading plan see the real per-layer shapes.
        apply_layer_widths(self.model.layers, self.config)
        super().post_init()


class AdaptQwen2ForCausalLM(Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` whose layers have the widths listed in the config."""

    config_class = AdaptQwen2Config

    def post_init(self) -> None:
        apply_layer_widths(self.model.layers, self.config)
        super().post_init()
