"""Configs of compact Adapt-Pruner exports: a stock Llama/Qwen2 config plus per-layer widths.

This file is copied into every compact export and loaded by transformers with
``trust_remote_code=True``, so it imports nothing but transformers.

Structured pruning leaves every layer with its own number of query heads,
key/value heads and MLP channels (hidden size and head size never change). The
stock configs hold one value of each for the whole model, so the per-layer
values travel as three extra lists::

    num_attention_heads_per_layer    query heads of layer i
    num_key_value_heads_per_layer    key/value heads of layer i
    intermediate_size_per_layer      MLP channels of layer i

The scalar ``num_attention_heads`` / ``num_key_value_heads`` /
``intermediate_size`` hold the largest per-layer value, so code that only reads
them (memory estimates, tensor-parallel planners) gets an upper bound, and
``head_dim`` is always written explicitly because it can no longer be derived
from ``hidden_size // num_attention_heads``.

The lists are plain extra attributes rather than declared fields so that the
same file works with transformers 4.x (``__init__(**kwargs)`` configs) and 5.x
(dataclass configs), which both keep unknown keyword arguments as attributes.
"""

from typing import Any, List, Tuple

from transformers import LlamaConfig, Qwen2Config

PER_LAYER_KEYS = (
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
    "intermediate_size_per_layer",
)


def layer_widths(config: Any) -> List[Tuple[int, int, int]]:
    """``(query heads, key/value heads, MLP channels)`` of every layer, validated.

    Checked here rather than at config load time because this is the single place
    every model construction goes through, whatever transformers version built the config.
    """
    lists = [getattr(config, key, None) for key in PER_LAYER_KEYS]
    missing = [key for key, value in zip(PER_LAYER_KEYS, lists) if value is None]
    if missing:
        raise ValueError(f"config.json of a pruned model must define {', '.join(missing)}")
    widths = list(zip(*lists))
    if any(len(values) != config.num_hidden_layers for values in lists):
        raise ValueError(
            f"Per-layer width lists must have num_hidden_layers={config.num_hidden_layers} "
            f"entries, got {[len(values) for values in lists]}"
        )
    for i, (heads, kv_heads, hidden) in enumerate(widths):
        if min(heads, kv_heads, hidden) < 1 or heads % kv_heads:
            raise ValueError(
                f"Layer {i}: invalid widths heads={heads}, kv_heads={kv_heads}, mlp={hidden} "
                "(all must be positive and heads a multiple of kv_heads)"
            )
    return [(int(h), int(k), int(m)) for h, k, m in widths]


class AdaptLlamaConfig(LlamaConfig):
    """``LlamaConfig`` with per-layer attention heads and MLP widths."""

    model_type = "adapt_llama"


class AdaptQwen2Config(Qwen2Config):
    """``Qwen2Config`` with per-layer attention heads and MLP widths."""

    model_type = "adapt_qwen2"
