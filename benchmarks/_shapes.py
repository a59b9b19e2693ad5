"""The model shapes the performance benchmarks run on, and their calibration tokens.

``micro`` (in-process smoke tests), ``tiny`` and ``small`` are random Llamas with
SmolLM2's vocabulary (recipe runs use its tokenizer); ``smollm2`` is the real
SmolLM2-135M-Instruct when ``adapt-prune-tune prepare`` has run (random weights of its
shape otherwise); ``llama3_2_1b`` and ``llama3_1_8b`` are torchtune's builders with
random weights (GPU sizes). Timing depends on shapes, not on weight values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

CACHE = Path(os.environ.get("ADAPT_PRUNE_TUNE_CACHE", Path.home() / ".cache" / "adapt-prune-tune"))
SMOLLM2_DIR = CACHE / "models" / "SmolLM2-135M-Instruct"
DATA_DIR = CACHE / "data" / "python-docs"


def _llama_kwargs(num_layers: int = 4, dim: int = 64, heads: int = 4, kv: int = 2, mlp: int = 128,
                  vocab: int = 49152) -> Dict[str, Any]:
    return dict(
        vocab_size=vocab, embed_dim=dim, num_layers=num_layers, num_heads=heads, num_kv_heads=kv,
        intermediate_dim=mlp, max_seq_len=512,
    )


RANDOM_HF_SHAPES = {
    "micro": _llama_kwargs(num_layers=2, dim=32, heads=4, kv=2, mlp=64, vocab=512),
    "tiny": _llama_kwargs(),
    "small": _llama_kwargs(num_layers=12, dim=128, heads=4, kv=2, mlp=256),
}
GPU_SHAPES = {"llama3_2_1b", "llama3_1_8b"}
ALL_SHAPES = sorted({*RANDOM_HF_SHAPES, "smollm2", *GPU_SHAPES})


def random_arch(name: str = "tiny"):
    from adapt_prune_tune.models import DecoderArch, RopeSpec

    kw = RANDOM_HF_SHAPES[name]
    return DecoderArch.uniform(
        **kw, norm_eps=1e-5, rope=RopeSpec("default", 100_000.0), tie_word_embeddings=True,
        meta={"base_model": f"random-{name}"},
    )


def build_shape(name: str, device: str = "cpu", dtype: str = "fp32", seed: int = 0):
    """(model, arch) for a named shape; weights random except SmolLM2 (real when prepared)."""
    import torch
    from torchtune import training

    from adapt_prune_tune.models import arch_from_model, decoder_from_arch, load_hf_model

    torch.manual_seed(seed)
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    dev = torch.device(device)
    if name == "smollm2" and (SMOLLM2_DIR / "model.safetensors").is_file():
        model, arch = load_hf_model(SMOLLM2_DIR)
        return model.to(device=dev, dtype=tdtype), arch
    with training.set_default_dtype(tdtype), dev:
        if name in RANDOM_HF_SHAPES:
            model = decoder_from_arch(random_arch(name))
        elif name == "smollm2":
            from adapt_prune_tune.models import smollm2_135m

            model = smollm2_135m(max_seq_len=2048)
        elif name == "llama3_2_1b":
            from torchtune.models.llama3_2 import llama3_2_1b

            model = llama3_2_1b()
        elif name == "llama3_1_8b":
            from torchtune.models.llama3_1 import llama3_1_8b

            model = llama3_1_8b()
        else:
            raise ValueError(f"unknown shape {name!r}; one of {ALL_SHAPES}")
    return model, arch_from_model(model)


def write_random_hf_checkpoint(out: Path, name: str = "tiny", seed: int = 0) -> Path:
    """A random Llama in HF format with SmolLM2's tokenizer (for ``tune run`` benchmarks)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "model.safetensors").is_file():
        return out
    kw = RANDOM_HF_SHAPES[name]
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=kw["vocab_size"], hidden_size=kw["embed_dim"], intermediate_size=kw["intermediate_dim"],
        num_hidden_layers=kw["num_layers"], num_attention_heads=kw["num_heads"],
        num_key_value_heads=kw["num_kv_heads"], max_position_embeddings=kw["max_seq_len"],
        rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((SMOLLM2_DIR / f).read_bytes())
    return out


def model_dir_for(shape: str, work: Path) -> Path:
    """An HF checkpoint directory of ``shape`` (the prepared SmolLM2, or a random one in ``work``)."""
    if shape == "smollm2":
        return SMOLLM2_DIR
    return write_random_hf_checkpoint(work / f"model_{shape}", shape)


_TOKEN_STREAM: Optional[List[int]] = None


def calibration_batches(
    vocab_size: int, num_samples: int, seq_len: int, batch_size: int, device: str = "cpu", seed: int = 0
) -> List[Dict[str, Any]]:
    """Real calibration text (SmolLM2 tokenizer) when the vocab matches and data exist, else random ids.

    Windows of ``seq_len + 1`` tokens (the loss predicts ``seq_len`` of them).
    """
    global _TOKEN_STREAM
    import torch

    need = num_samples * (seq_len + 1)
    calib = DATA_DIR / "calibration.jsonl"
    if vocab_size == 49152 and calib.is_file() and (SMOLLM2_DIR / "tokenizer.json").is_file():
        if _TOKEN_STREAM is None or len(_TOKEN_STREAM) < need:
            from adapt_prune_tune.tokenizer import smollm2_tokenizer

            tok = smollm2_tokenizer(str(SMOLLM2_DIR))
            stream: List[int] = []
            for line in calib.read_text().splitlines():
                stream += tok.encode(json.loads(line)["text"])
                if len(stream) >= max(need, 70_000):
                    break
            _TOKEN_STREAM = stream
        if len(_TOKEN_STREAM) >= need:
            t = torch.tensor(_TOKEN_STREAM[:need], dtype=torch.long).view(num_samples, seq_len + 1)
            return [{"tokens": b.to(device)} for b in t.split(batch_size)]
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab_size, (num_samples, seq_len + 1), generator=g)
    return [{"tokens": b.to(device)} for b in t.split(batch_size)]
