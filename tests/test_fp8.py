"""FP8 training: refused up front where it cannot run; which projections convert."""

import torch

from adapt_prune_tune.fp8 import fp8_problems, is_fp8_eligible, wrap_component
from adapt_prune_tune.models import DecoderArch, LayerArch, RopeSpec, decoder_from_arch


def test_refused_on_cpu_and_with_widths_fp8_cannot_use():
    problems = fp8_problems("cpu", round_to=1)
    assert any("needs a CUDA GPU with FP8 tensor cores" in p and "enable_fp8_training=False" in p for p in problems)
    assert any("pruning.method.round_to to a multiple of 16" in p for p in problems)
    assert not any("round_to" in p for p in fp8_problems("cpu", round_to=64))


def test_only_decoder_projections_with_multiples_of_16_convert():
    arch = DecoderArch(
        vocab_size=64, embed_dim=32, head_dim=8, max_seq_len=32, norm_eps=1e-5,
        layers=(LayerArch(4, 2, 48), LayerArch(4, 2, 40)), rope=RopeSpec("default", 1e4),
    )
    model = decoder_from_arch(arch)
    chosen = {name for name, m in model.named_modules() if is_fp8_eligible(m, name)}
    assert "layers.0.mlp.w1" in chosen and "layers.0.attn.q_proj" in chosen
    assert "layers.1.mlp.w1" not in chosen  # 40 channels: not a multiple of 16, stays in bf16/fp32
    assert "output" not in chosen and not any(n.startswith("tok_embeddings") for n in chosen)
    from torchao.float8 import convert_to_float8_training  # noqa: F401  (import works on CPU)

    from adapt_prune_tune.fp8 import convert_to_fp8_

    convert_to_fp8_(model)
    assert type(model.layers[0].mlp.w1).__name__ == "Float8Linear"
    assert isinstance(model.layers[1].mlp.w1, torch.nn.Linear) and type(model.layers[1].mlp.w1).__name__ == "Linear"
    assert wrap_component({"_component_": "x"}) == {"_component_": "adapt_prune_tune.fp8.float8_decoder",
                                                    "model": {"_component_": "x"}}
