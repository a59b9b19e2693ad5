"""Quantized export (``--quantize``): torchao int8 weights in safetensors that transformers loads.

A tiny pruned model (different widths in every layer, one MLP only 7 channels
wide so int8 dynamic quantization skips its down projection) is exported with
each scheme, loaded with ``AutoModelForCausalLM`` and compared with the same
torchtune model quantized in memory by ``quantize_`` with the same config: the
logits must agree as closely as the float export's do, while differing from the
float model's by the quantization error, and greedy generation must agree.
"""

import copy
import json
from pathlib import Path
from typing import Tuple

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from adapt_prune_tune.cli import main as cli_main
from adapt_prune_tune.export import EXPORT_RECORD, export_hf
from adapt_prune_tune.hub import write_model_card
from adapt_prune_tune.models import DecoderArch, LayerArch, RopeSpec, decoder_from_arch
from adapt_prune_tune.quantize import quantize_linears_

VOCAB = 128
FLAVORS = {
    "llama3": dict(rope=RopeSpec("llama3_scaled", 500_000.0, 32.0), tie_word_embeddings=False, attn_bias=False),
    "qwen2": dict(rope=RopeSpec("qwen2", 1_000_000.0), tie_word_embeddings=True, attn_bias=True),
    "smollm2": dict(rope=RopeSpec("default", 100_000.0), tie_word_embeddings=True, attn_bias=False),
}
PRUNED = (LayerArch(4, 2, 96), LayerArch(2, 1, 40), LayerArch(4, 4, 7), LayerArch(8, 4, 128))
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(flavor: str) -> Tuple[nn.Module, DecoderArch, DecoderArch]:
    base = DecoderArch.uniform(
        vocab_size=VOCAB, embed_dim=64, num_layers=len(PRUNED), num_heads=8, num_kv_heads=4,
        intermediate_dim=128, head_dim=16, max_seq_len=256,
        meta={"base_model": f"test/{flavor}-base", "license": "apache-2.0"}, **FLAVORS[flavor],
    )
    arch = base.with_layers(list(PRUNED))
    model = decoder_from_arch(arch)
    g = torch.Generator().manual_seed(len(flavor))
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = name.endswith("scale")
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if scale else torch.randn(p.shape, generator=g) * 0.1)
    return model.eval(), arch, base


def _greedy(model: nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        with torch.no_grad():
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize(
    "flavor,scheme", [("smollm2", "int8wo"), ("smollm2", "int8da8w"), ("llama3", "int8wo"), ("qwen2", "int8da8w")]
)
def test_quantized_export_matches_quantized_torchtune(flavor: str, scheme: str, tmp_path: Path) -> None:
    model, arch, base = _tiny(flavor)
    out = export_hf(model.state_dict(), tmp_path / "export", arch=arch, original_arch=base, quantize=scheme)

    # Safetensors only, and the projections really are int8 in it.
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)], names
    assert [n for n in names if "model" in n and not n.endswith(".py")] == ["model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight_int_data"] == "I8"
    assert dtypes["model.layers.3.mlp.down_proj.weight_int_data"] == "I8"
    assert "model.layers.0.self_attn.q_proj.weight" not in dtypes
    assert dtypes["model.embed_tokens.weight"] == "F32"
    # int8 dynamic quantization skips inputs of <= 16 features (layer 2's 7-channel down projection).
    assert ("model.layers.2.mlp.down_proj.weight" in dtypes) == (scheme == "int8da8w")

    config = json.loads((out / "config.json").read_text())
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert config["adapt_quantization"]["scheme"] == record["quantization"]["scheme"] == scheme
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_adapt_torchao.")

    hf_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    quantized = quantize_linears_(copy.deepcopy(model), scheme)
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = hf_model(tokens).logits
        diff = (logits - quantized(tokens)).abs().max().item()
        quantization_error = (logits - model(tokens)).abs().max().item()
    print(f"{flavor}/{scheme}: |HF - quantized torchtune| = {diff:.2e}, "
          f"|HF - float torchtune| = {quantization_error:.2e}")
    assert diff < 1e-4
    assert quantization_error > 1e-3  # the loaded weights are the quantized ones, not float copies
    prompt = tokens[:1, :7]
    generated = hf_model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, _greedy(quantized, prompt, 5))


def test_float_and_quantized_exports_load_in_one_process(tmp_path: Path) -> None:
    """transformers maps a config class to one model class per process; directories of the same
    name share the remote-code module, so the quantized export needs its own config class."""
    model, arch, base = _tiny("smollm2")
    loaded = {}
    for scheme in (None, "int8wo"):
        out = export_hf(model.state_dict(), tmp_path / str(scheme) / "model", arch=arch, quantize=scheme)
        loaded[scheme] = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(loaded[None]).__name__ == "AdaptLlamaForCausalLM"
    assert type(loaded["int8wo"]).__name__ == "TorchaoAdaptLlamaForCausalLM"
    assert type(loaded["int8wo"].model.layers[0].mlp.up_proj).__name__ == "TorchaoLinear"


def test_quantized_export_is_smaller_and_card_says_so(tmp_path: Path) -> None:
    model, arch, base = _tiny("smollm2")
    state = model.state_dict()
    plain = export_hf(state, tmp_path / "fp32", arch=arch, original_arch=base)
    int8 = export_hf(state, tmp_path / "int8", arch=arch, original_arch=base, quantize="int8wo")
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(int8) < 0.6 * size(plain)

    card = write_model_card(int8).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert {"quantized", "torchao", "int8wo"} <= set(front["tags"])
    assert front["quantization"] == {"method": "torchao", "scheme": "int8wo"}
    assert "## Quantization" in card and "Int8WeightOnlyConfig" in card
    assert "## Quantization" not in write_model_card(plain).read_text()


def test_cli_exports_a_quantized_checkpoint(tmp_path: Path, capsys) -> None:
    model, arch, base = _tiny("smollm2")
    ckpt = tmp_path / "run" / "final"
    ckpt.mkdir(parents=True)
    arch.save(ckpt / "arch.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (tmp_path / "run" / "run_record.json").write_text(json.dumps({"arch_before": base.to_dict()}))
    cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--quantize", "int8wo"])
    assert "Exported (compact, int8wo)" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / EXPORT_RECORD).read_text())["quantization"]["scheme"] == "int8wo"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "mode,scheme,message",
    [
        ("padded", "int8wo", r"--quantize needs --mode compact.*--mode padded without --quantize"),
        ("compact", "int4wo", r"--quantize int4wo is not supported: torchao .*fbgemm-gpu-genai.*Use --quantize int8wo"),
        ("compact", "fp3", r"Unknown quantization scheme 'fp3'.*--quantize int8wo or --quantize int8da8w"),
    ],
)
def test_bad_quantize_fails_before_any_work(mode: str, scheme: str, message: str, tmp_path: Path) -> None:
    # The source does not exist: an error about it would mean the check came too late.
    with pytest.raises(ValueError, match=message):
        export_hf(tmp_path / "no-such-run", tmp_path / "out", mode=mode, quantize=scheme)
    assert not (tmp_path / "out").exists()


def test_scheme_missing_from_torchao_is_named(tmp_path: Path, monkeypatch) -> None:
    import torchao.quantization

    monkeypatch.delattr(torchao.quantization, "Int8DynamicActivationInt8WeightConfig")
    with pytest.raises(ValueError, match=r"needs torchao\.quantization\.Int8DynamicActivationInt8WeightConfig.*lacks"):
        export_hf(tmp_path / "no-such-run", tmp_path / "out", quantize="int8da8w")


def test_cli_refuses_padded_quantized_export(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", str(tmp_path / "no-such-run"), str(tmp_path / "out"), "--mode", "padded",
                  "--quantize", "int8wo"])
    assert exit_info.value.code == 2
    assert "--quantize needs --mode compact" in capsys.readouterr().err
