"""Model builders and the per-layer architecture spec of pruned decoders."""

from adapt_prune_tune.models._arch import (
    DecoderArch,
    LayerArch,
    RopeSpec,
    arch_differences,
    arch_from_model,
)
from adapt_prune_tune.models._hf import arch_from_hf_config, decoder_from_hf_config, load_hf_model, read_hf_arch
from adapt_prune_tune.models._builders import (
    DEEPSEEK_R1_DISTILL_QWEN_1_5B,
    SMOLLM2_135M,
    deepseek_r1_distill_qwen_1_5b,
    decoder_from_arch,
    smollm2_135m,
)

__all__ = [
    "DEEPSEEK_R1_DISTILL_QWEN_1_5B",
    "DecoderArch",
    "LayerArch",
    "RopeSpec",
    "SMOLLM2_135M",
    "arch_differences",
    "arch_from_hf_config",
    "arch_from_model",
    "load_hf_model",
    "read_hf_arch",
    "decoder_from_arch",
    "decoder_from_hf_config",
    "deepseek_r1_distill_qwen_1_5b",
    "smollm2_135m",
]
