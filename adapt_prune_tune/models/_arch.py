"""The architecture of a (possibly pruned) decoder as a small serializable spec.

Stock torchtune builders take one ``num_heads`` / ``intermediate_dim`` for every
layer. After adaptive pruning each layer has its own widths, so the shape of a
model is a list of per-layer widths plus the few integers every layer shares.
The spec is what checkpoints, exports and the recipe carry around: a builder
turns it back into an empty model (see ``decoder_from_arch``), and
``arch_from_model`` reads it off any torchtune Llama/Qwen2-style decoder,
including the stock builders' models, so a run can start from an unpruned
torchtune model and continue from a pruned one through the same code.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from torch import nn

ROPE_KINDS = ("default", "llama3_scaled", "qwen2")


@dataclass(frozen=True)
class LayerArch:
    """Widths of one decoder layer: the only things pruning changes."""

    num_heads: int
    num_kv_heads: int
    intermediate_dim: int

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1 or self.num_heads < 1 or self.intermediate_dim < 1:
            raise ValueError(f"Layer widths must be positive, got {self}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )


@dataclass(frozen=True)
class RopeSpec:
    """Which rotary embedding a family uses; its buffers are not in the state dict."""

    kind: str = "default"
    base: float = 10_000.0
    # Llama 3.1/3.2 frequency scaling (``Llama3ScaledRoPE``, HF ``rope_type: llama3``); ignored
    # otherwise. The last three are the same in every Meta checkpoint, not in every derivative.
    scale_factor: Optional[float] = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    old_context_len: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"rope.kind must be one of {ROPE_KINDS}, got {self.kind!r}")


# RopeSpec's Llama 3 frequency band and original context in every Meta checkpoint: its defaults.
_LLAMA3_BAND = {name: getattr(RopeSpec, name) for name in ("low_freq_factor", "high_freq_factor", "old_context_len")}


@dataclass(frozen=True)
class DecoderArch:
    """Everything needed to build an empty decoder of a given (pruned) shape."""

    vocab_size: int
    embed_dim: int
    head_dim: int
    max_seq_len: int
    norm_eps: float
    layers: tuple  # Tuple[LayerArch, ...]
    rope: RopeSpec = field(default_factory=RopeSpec)
    tie_word_embeddings: bool = False
    # Qwen2 has biases on q/k/v projections; they are pruned with their rows.
    attn_bias: bool = False
    # Free-form provenance: base model name, family, license (carried into exports).
    meta: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def with_layers(self, layers: List[LayerArch]) -> "DecoderArch":
        """The same model with new per-layer widths (what a prune step produces)."""
        if len(layers) != self.num_layers:
            raise ValueError("Pruning never removes whole layers in this spec")
        return replace(self, layers=tuple(layers))

    # ----- parameter accounting (exact, no model needed) -----
    def layer_attention_params(self, i: int) -> int:
        layer = self.layers[i]
        q = layer.num_heads * self.head_dim
        kv = layer.num_kv_heads * self.head_dim
        params = self.embed_dim * (q + 2 * kv) + q * self.embed_dim
        if self.attn_bias:
            params += q + 2 * kv
        return params

    def layer_mlp_params(self, i: int) -> int:
        return 3 * self.embed_dim * self.layers[i].intermediate_dim

    def prunable_params(self) -> int:
        """Parameters in attention and MLP projections: what pruning can remove."""
        return sum(
            self.layer_attention_params(i) + self.layer_mlp_params(i)
            for i in range(self.num_layers)
        )

    def num_params(self) -> int:
        """Total parameter count, counting tied embeddings once."""
        embeddings = self.vocab_size * self.embed_dim
        output = 0 if self.tie_word_embeddings else embeddings
        norms = (2 * self.num_layers + 1) * self.embed_dim
        return embeddings + output + norms + self.prunable_params()

    # ----- serialization -----
    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(layer) for layer in self.layers]
        # Llama 3 scaling's band and original context appear only where they differ from Meta's:
        # specs written before they were read stay byte-identical (arch.json, run fingerprints).
        for key, default in _LLAMA3_BAND.items():
            if d["rope"][key] == default:
                del d["rope"][key]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DecoderArch":
        d = dict(d)
        d["layers"] = tuple(LayerArch(**layer) for layer in d["layers"])
        d["rope"] = RopeSpec(**d.get("rope", {}))
        d["meta"] = dict(d.get("meta", {}))
        return cls(**d)

    def save(self, path: Union[str, Path]) -> None:
        """Write as JSON atomically (a kill mid-write never leaves half a spec)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "DecoderArch":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Architecture spec {path} not found: a pruned checkpoint directory "
                "must contain the arch.json written next to its weights"
            )
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def uniform(
        cls,
        *,
        vocab_size: int,
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        intermediate_dim: int,
        max_seq_len: int,
        norm_eps: float = 1e-5,
        head_dim: Optional[int] = None,
        rope: Optional[RopeSpec] = None,
        tie_word_embeddings: bool = False,
        attn_bias: bool = False,
        meta: Optional[Dict[str, Any]] = None,
    ) -> "DecoderArch":
        """An unpruned model: every layer has the same widths."""
        layer = LayerArch(num_heads, num_kv_heads, intermediate_dim)
        return cls(
            vocab_size=vocab_size,
            embed_dim=embed_dim,
            head_dim=head_dim or embed_dim // num_heads,
            max_seq_len=max_seq_len,
            norm_eps=norm_eps,
            layers=(layer,) * num_layers,
            rope=rope or RopeSpec(),
            tie_word_embeddings=tie_word_embeddings,
            attn_bias=attn_bias,
            meta=dict(meta or {}),
        )


def arch_fields(arch: DecoderArch) -> Dict[str, Any]:
    """What two descriptions of one unpruned model must agree on: a builder and its checkpoint's
    config.json, a run and the checkpoint it resumes, an export and the base it takes its
    tokenizer from."""
    layer = arch.layers[0]
    return {
        "vocab_size": arch.vocab_size,
        "embed_dim": arch.embed_dim,
        "num_layers": arch.num_layers,
        "head_dim": arch.head_dim,
        "num_heads": layer.num_heads,
        "num_kv_heads": layer.num_kv_heads,
        "intermediate_dim": layer.intermediate_dim,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "attention biases": arch.attn_bias,
        "rope": arch.rope.kind,
        "rope base": arch.rope.base,
        "rope scaling (factor, low/high frequency factors, original context)": (
            (arch.rope.scale_factor, arch.rope.low_freq_factor, arch.rope.high_freq_factor, arch.rope.old_context_len)
            if arch.rope.kind == "llama3_scaled" else None
        ),
        "norm_eps": arch.norm_eps,
    }


def arch_differences(a: DecoderArch, b: DecoderArch) -> Dict[str, Tuple[Any, Any]]:
    """The ``arch_fields`` in which ``a`` and ``b`` differ: name -> (a's value, b's value).
    Floats agree to a relative 1e-6 (a config's 1e-05 and a builder's 1e-5 are one model)."""
    mine, theirs = arch_fields(a), arch_fields(b)
    return {name: (mine[name], theirs[name]) for name in mine if not _same(mine[name], theirs[name])}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def arch_from_model(model: nn.Module) -> DecoderArch:
    """Read the spec off a torchtune ``TransformerDecoder`` (meta, real or sharded).

    Raises a clear error for decoders we cannot prune (non-RMSNorm blocks,
    fused projections, cross-attention, ...), before any work starts.
    """
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
    from torchtune.models.qwen2._positional_embeddings import (
        Qwen2RotaryPositionalEmbeddings,
    )
    from torchtune.modules import (
        FeedForward,
        MultiHeadAttention,
        RotaryPositionalEmbeddings,
        TiedLinear,
        TransformerDecoder,
        TransformerSelfAttentionLayer,
    )

    if not isinstance(model, TransformerDecoder):
        raise TypeError(
            f"Expected a torchtune TransformerDecoder, got {type(model).__name__}. "
            "Supported: torchtune's llama3/3.1/3.2, qwen2/2.5 builders and "
            "adapt_prune_tune.models builders."
        )
    layers: List[LayerArch] = []
    rope: Optional[RopeSpec] = None
    attn_bias = False
    for i, layer in enumerate(model.layers):
        layer = getattr(layer, "_checkpoint_wrapped_module", layer)
        if not isinstance(layer, TransformerSelfAttentionLayer):
            raise TypeError(
                f"layers[{i}] is a {type(layer).__name__}; only "
                "TransformerSelfAttentionLayer blocks can be pruned"
            )
        attn, mlp = layer.attn, layer.mlp
        if not isinstance(attn, MultiHeadAttention) or not isinstance(mlp, FeedForward):
            raise TypeError(
                f"layers[{i}] has {type(attn).__name__}/{type(mlp).__name__}; "
                "expected MultiHeadAttention and a gated FeedForward (w1/w2/w3)"
            )
        if mlp.w3 is None:
            raise TypeError(f"layers[{i}].mlp has no w3: only gated (SwiGLU) MLPs are supported")
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            if not isinstance(getattr(attn, name), nn.Linear):
                raise TypeError(
                    f"layers[{i}].attn.{name} is a {type(getattr(attn, name)).__name__}; "
                    "merge LoRA/quantized weights into plain nn.Linear before pruning"
                )
        if attn.q_norm is not None or attn.k_norm is not None:
            raise TypeError(f"layers[{i}] uses q/k norms, which this pruner does not support")
        attn_bias = attn.q_proj.bias is not None
        layers.append(
            LayerArch(attn.num_heads, attn.num_kv_heads, mlp.w1.out_features)
        )
        pe = attn.pos_embeddings
        if isinstance(pe, Llama3ScaledRoPE):
            rope = RopeSpec("llama3_scaled", float(pe.base), float(pe.scale_factor), float(pe.low_freq_factor),
                            float(pe.high_freq_factor), int(pe.old_context_len))
        elif isinstance(pe, Qwen2RotaryPositionalEmbeddings):
            rope = RopeSpec("qwen2", float(pe.base))
        elif isinstance(pe, RotaryPositionalEmbeddings):
            rope = RopeSpec("default", float(pe.base))
        else:
            raise TypeError(f"layers[{i}] has unsupported position embeddings {type(pe).__name__}")
    first = model.layers[0]
    first = getattr(first, "_checkpoint_wrapped_module", first)
    arch = DecoderArch(
        vocab_size=model.tok_embeddings.num_embeddings,
        embed_dim=model.tok_embeddings.embedding_dim,
        head_dim=first.attn.head_dim,
        max_seq_len=model.max_seq_len,
        norm_eps=float(model.norm.eps),
        layers=tuple(layers),
        rope=rope,
        tie_word_embeddings=isinstance(model.output, TiedLinear),
        attn_bias=attn_bias,
    )
    from adapt_prune_tune.models._builders import rebuild_differences  # builds from this module's spec

    differences = rebuild_differences(model, arch)
    if differences:
        raise TypeError(
            "this decoder is not one the pruner can rebuild: every resize builds the pruned model "
            "from stock Llama/Qwen2 blocks (plain embeddings, RMSNorm, SiLU-gated MLP), and this one "
            "would silently change at the first prune: " + "; ".join(differences) + ". Supported: "
            "torchtune's llama3/3.1/3.2, qwen2/2.5 and mistral builders, and adapt_prune_tune.models builders."
        )
    return arch
