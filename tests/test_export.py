"""Hugging Face export: pruned torchtune models load in transformers and compute the same thing.

Every flavor we support (Llama 3 scaled RoPE untied, Qwen2 with q/k/v biases
and tied embeddings, SmolLM2-style default RoPE tied) is built tiny with
different widths in every layer, including a layer whose query-heads-per-KV
ratio is below the base model's, exported in both modes, loaded with
``AutoModelForCausalLM`` and compared with the torchtune model on logits and on
greedy generation.
"""

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from torchtune import config as tt_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapt_prune_tune.export import EXPORT_RECORD, export_hf, hf_config, load_pruned_checkpoint
from adapt_prune_tune.models import DecoderArch, LayerArch, RopeSpec, decoder_from_arch, load_hf_model

VOCAB = 128
ATOL = 1e-4
FLAVORS = {
    "llama3": dict(rope=RopeSpec("llama3_scaled", 500_000.0, 32.0), tie_word_embeddings=False, attn_bias=False),
    "qwen2": dict(rope=RopeSpec("qwen2", 1_000_000.0), tie_word_embeddings=True, attn_bias=True),
    "smollm2": dict(rope=RopeSpec("default", 100_000.0), tie_word_embeddings=True, attn_bias=False),
    # Llama 3 scaling with another original context and frequency band than Meta's (1, 4, 8192).
    "llama3_ctx": dict(rope=RopeSpec("llama3_scaled", 500_000.0, 8.0, 2.0, 8.0, 64), tie_word_embeddings=False,
                       attn_bias=False),
}
# Base: 8 query / 4 KV heads (2 per group), MLP 128. Layer 2 keeps all 4 KV heads with
# one query head each; layer 3 is unpruned.
PRUNED = (LayerArch(4, 2, 96), LayerArch(2, 1, 40), LayerArch(4, 4, 7), LayerArch(8, 4, 128))


pytestmark = pytest.mark.usefixtures("one_thread")


def _base_arch(flavor: str) -> DecoderArch:
    return DecoderArch.uniform(
        vocab_size=VOCAB,
        embed_dim=64,
        num_layers=len(PRUNED),
        num_heads=8,
        num_kv_heads=4,
        intermediate_dim=128,
        head_dim=16,
        # Above Llama 3's original context (8192), as in real Llama 3.1/3.2 configs.
        max_seq_len=16_384 if flavor == "llama3" else 256,
        meta={"base_model": f"test/{flavor}-base", "license": "apache-2.0"},
        **FLAVORS[flavor],
    )


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, incl. norm scales and biases, so nothing matches by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("bias") else 0.1))
    return model.eval()


def _tiny(flavor: str) -> Tuple[nn.Module, DecoderArch, DecoderArch]:
    base = _base_arch(flavor)
    arch = base.with_layers(list(PRUNED))
    return _randomize(decoder_from_arch(arch), seed=len(flavor)), arch, base


@pytest.fixture(scope="module")
def tiny() -> Dict[str, Tuple[nn.Module, DecoderArch, DecoderArch]]:
    return {flavor: _tiny(flavor) for flavor in FLAVORS}


def _greedy(model: nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        with torch.no_grad():
            next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def _load(out: Path, mode: str) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=(mode == "compact"), dtype=torch.float32)
    return model.eval()


def _assert_same_model(
    tt_model: nn.Module,
    hf_model: nn.Module,
    label: str,
    vocab: int = VOCAB,
    atol: float = ATOL,
    shape: Tuple[int, int] = (2, 19),
) -> float:
    """Logits on random tokens within ``atol``, and identical greedy continuations; returns the max diff."""
    tokens = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf_model(tokens).logits - tt_model(tokens)).abs().max().item()
    print(f"{label}: max |logits diff| = {diff:.2e}")
    assert diff < atol, f"{label}: logits differ by {diff}"
    prompt = tokens[:1, :7]
    expected = _greedy(tt_model, prompt, 5)
    generated = hf_model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected), f"{label}: greedy generation differs"
    return diff


@pytest.mark.parametrize("mode", ["compact", "padded"])
@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_export_matches_torchtune(tiny, flavor: str, mode: str, tmp_path: Path) -> None:
    model, arch, base = tiny[flavor]
    out = export_hf(model.state_dict(), tmp_path / "export", arch=arch, mode=mode, original_arch=base)
    config = json.loads((out / "config.json").read_text())
    hf_model = _load(out, mode)
    _assert_same_model(model, hf_model, f"{flavor}/{mode}")

    family = "Qwen2" if flavor == "qwen2" else "Llama"
    assert config["rope_theta"] == arch.rope.base  # also readable by transformers 4.x
    assert ("rope_scaling" in config) == flavor.startswith("llama3")
    if mode == "compact":
        assert type(hf_model).__name__ == f"Adapt{family}ForCausalLM"
        assert config["num_attention_heads_per_layer"] == [layer.num_heads for layer in PRUNED]
        assert config["num_key_value_heads_per_layer"] == [layer.num_kv_heads for layer in PRUNED]
        assert config["intermediate_size_per_layer"] == [layer.intermediate_dim for layer in PRUNED]
        assert sum(p.numel() for p in hf_model.parameters()) == arch.num_params()
    else:
        assert type(hf_model).__name__ == f"{family}ForCausalLM"  # stock class, no remote code
        assert "auto_map" not in config and not (out / "modeling_adapt.py").exists()
        assert sum(p.numel() for p in hf_model.parameters()) == base.num_params()
    assert hf_model.config.tie_word_embeddings == arch.tie_word_embeddings
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["mode"] == mode and DecoderArch.from_dict(record["arch"]) == arch


def _write_pruned_checkpoint(directory: Path, state: Dict[str, torch.Tensor], arch: DecoderArch, shard: bool) -> Path:
    directory.mkdir(parents=True)
    arch.save(directory / "arch.json")
    if shard:
        save_torch_state_dict(state, directory, max_shard_size="40KB")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def test_export_from_run_dir_with_shards(tiny, tmp_path: Path) -> None:
    """The recipe's layout: <run>/final/{arch.json, shards} and <run>/run_record.json with the base."""
    model, arch, base = tiny["smollm2"]
    run = tmp_path / "run"
    final = _write_pruned_checkpoint(run / "final", model.state_dict(), arch, shard=True)
    assert (final / "model.safetensors.index.json").is_file()
    (run / "run_record.json").write_text(json.dumps({"arch_before": base.to_dict()}))
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tokenizer_dir / "unrelated.txt").write_text("not copied")

    out = export_hf(run, tmp_path / "padded", mode="padded", tokenizer_dir=tokenizer_dir, max_shard_size="100KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "generation_config.json").is_file() and not (out / "unrelated.txt").exists()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2
    _assert_same_model(model, _load(out, "padded"), "smollm2/padded from sharded run dir")


def test_base_of_another_model_is_refused(tiny, tmp_path: Path) -> None:
    """--base supplies the tokenizer and special token ids: another model's would ship with these weights."""
    model, arch, base = tiny["smollm2"]
    run = tmp_path / "run"
    _write_pruned_checkpoint(run / "final", model.state_dict(), arch, shard=False)
    (run / "run_record.json").write_text(json.dumps({"arch_before": base.to_dict()}))
    other = hf_config(_base_arch("qwen2"), "padded", original=_base_arch("qwen2")).to_dict()
    with pytest.raises(ValueError, match=r"describes another model than the one this run pruned .*attention biases False vs True"):
        export_hf(run, tmp_path / "out", base_config=other)
    # A sibling with the same vocabulary, width and depth but another MLP width or eps is another model too.
    sibling = hf_config(base, "padded", original=base).to_dict()
    sibling.update(intermediate_size=sibling["intermediate_size"] + 64, rms_norm_eps=1e-6)
    with pytest.raises(ValueError, match=r"intermediate_dim \d+ vs \d+, norm_eps 1e-05 vs 1e-06"):
        export_hf(run, tmp_path / "out", base_config=sibling)
    assert not (tmp_path / "out").exists()
    export_hf(run, tmp_path / "out", base_config=hf_config(base, "padded", original=base).to_dict())  # its own


def test_checkpoint_dir_round_trip(tiny, tmp_path: Path) -> None:
    model, arch, _ = tiny["qwen2"]
    ckpt = _write_pruned_checkpoint(tmp_path / "ckpt", model.state_dict(), arch, shard=False)
    state, loaded = load_pruned_checkpoint(ckpt)
    assert loaded == arch and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_bfloat16_export(tiny, tmp_path: Path) -> None:
    model, arch, _ = tiny["llama3"]
    out = export_hf(model, tmp_path / "bf16", dtype="bf16")  # arch read off the model
    weights = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- bad input
def test_shipped_config_rejects_bad_widths() -> None:
    from adapt_prune_tune.modeling import AdaptLlamaConfig, layer_widths

    def config(heads, kv_heads, mlp):
        return AdaptLlamaConfig(
            num_hidden_layers=2, hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
            num_attention_heads_per_layer=heads, num_key_value_heads_per_layer=kv_heads,
            intermediate_size_per_layer=mlp,
        )

    assert layer_widths(config([4, 2], [2, 1], [8, 3])) == [(4, 2, 8), (2, 1, 3)]
    with pytest.raises(ValueError, match="Layer 1"):
        layer_widths(config([4, 3], [2, 2], [8, 8]))
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        layer_widths(config([4], [2], [8]))


def test_missing_key_is_named(tiny, tmp_path: Path) -> None:
    model, arch, _ = tiny["smollm2"]
    state = dict(model.state_dict())
    del state["layers.1.mlp.w2.weight"]
    with pytest.raises(ValueError, match=r"missing key layers\.1\.mlp\.w2\.weight \(expected shape \(64, 40\)\)"):
        export_hf(state, tmp_path / "out", arch=arch)
    assert not (tmp_path / "out").exists()


def test_checkpoint_not_matching_its_arch(tiny, tmp_path: Path) -> None:
    model, arch, _ = tiny["smollm2"]
    wrong = arch.with_layers([PRUNED[0], LayerArch(2, 1, 41), *PRUNED[2:]])
    ckpt = _write_pruned_checkpoint(tmp_path / "ckpt", model.state_dict(), wrong, shard=False)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.w1\.weight: expected shape \(41, 64\), found \(40, 64\)"):
        export_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_dir_without_arch_or_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="arch.json"):
        export_hf(tmp_path, tmp_path / "out")
    _base_arch("smollm2").save(tmp_path / "arch.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        export_hf(tmp_path, tmp_path / "out")


def test_padded_export_rejects_other_head_dim(tiny, tmp_path: Path) -> None:
    model, arch, base = tiny["smollm2"]
    from dataclasses import replace

    with pytest.raises(ValueError, match="head_dim"):
        export_hf(
            model.state_dict(), tmp_path / "out", arch=arch, mode="padded", original_arch=replace(base, head_dim=8)
        )
    assert not (tmp_path / "out").exists()


def test_padded_export_needs_base_widths_that_fit(tiny, tmp_path: Path) -> None:
    model, arch, base = tiny["smollm2"]
    with pytest.raises(ValueError, match="base model's widths"):
        export_hf(model.state_dict(), tmp_path / "out", arch=arch, mode="padded")
    narrow = base.with_layers([LayerArch(4, 4, 128)] * len(PRUNED))  # one query head per group
    with pytest.raises(ValueError, match="does not fit the base layout"):
        export_hf(model.state_dict(), tmp_path / "out", arch=arch, mode="padded", original_arch=narrow)
    with pytest.raises(ValueError, match="mode must be one of"):
        export_hf(model.state_dict(), tmp_path / "out", arch=arch, mode="fp8")


def test_existing_output_is_never_clobbered(tiny, tmp_path: Path, monkeypatch) -> None:
    model, arch, _ = tiny["smollm2"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(model.state_dict(), out, arch=arch)
    # --overwrite replaces an earlier export only: `out` mistyped as a run or model directory
    # (here: any directory without the export record) would be deleted whole.
    with pytest.raises(FileExistsError, match="is not an export of this tool"):
        export_hf(model.state_dict(), out, arch=arch, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

    export_hf(model.state_dict(), tmp_path / "export", arch=arch)
    (tmp_path / "export" / "mine.txt").write_text("an earlier export's extra file")

    # A failure half-way through an overwrite leaves the old export and no temp files.
    import adapt_prune_tune.export as export_module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_write_config", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model.state_dict(), tmp_path / "export", arch=arch, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out"]
    assert (tmp_path / "export" / "mine.txt").is_file()
    monkeypatch.undo()

    export_hf(model.state_dict(), tmp_path / "export", arch=arch, overwrite=True)
    assert not (tmp_path / "export" / "mine.txt").exists() and (tmp_path / "export" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out"]


def test_a_disk_without_room_is_named_before_writing_and_when_it_fills(
    tiny, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Too little space: refused before anything is written, with what the export needs and what is
    free; a disk that fills during the write (another process) is said the same way, and nothing
    is left behind either way; the CLI says it without a traceback."""
    import errno
    from collections import namedtuple

    import adapt_prune_tune.export as export_module
    from adapt_prune_tune import cli

    model, arch, _ = tiny["smollm2"]
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(export_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(OSError, match=r"no room for the export in .*/out: it needs [\d.,]+ MiB and .* has 1\.0 "
                                      r"MiB free \(checked before writing\); nothing was written") as err:
        export_hf(model.state_dict(), tmp_path / "out", arch=arch)
    assert err.value.errno == errno.ENOSPC
    assert float(re.search(r"needs ([\d.,]+) MiB", str(err.value)).group(1).replace(",", "")) >= weights / 2**20
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()

    def fill(*args, **kwargs):  # safetensors' own wording of a full disk
        raise OSError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export_module, "_write_config", fill)
    with pytest.raises(OSError, match="the disk filled while writing it"):
        export_hf(model.state_dict(), tmp_path / "out", arch=arch)
    assert list(tmp_path.iterdir()) == []

    checkpoint = _write_pruned_checkpoint(tmp_path / "ckpt", model.state_dict(), arch, shard=False)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["export", str(checkpoint), str(tmp_path / "out")])
    said = capsys.readouterr().err
    assert said.startswith("adapt-prune-tune export: error: no room for the export") and "[Errno" not in said
    assert "the disk filled while writing it" in said and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- checkpointer
def _prune_state(state: Dict[str, torch.Tensor], layer: int, keep_mlp: List[int]) -> Dict[str, torch.Tensor]:
    """Drop MLP channels of one layer, as a prune step after loading would."""
    state = dict(state)
    p, idx = f"layers.{layer}.mlp.", torch.tensor(keep_mlp)
    state[p + "w1.weight"] = state[p + "w1.weight"][idx]
    state[p + "w3.weight"] = state[p + "w3.weight"][idx]
    state[p + "w2.weight"] = state[p + "w2.weight"][:, idx]
    return state


def test_checkpointer_component(tiny, tmp_path: Path) -> None:
    model, arch, base = tiny["llama3"]
    ckpt = _write_pruned_checkpoint(tmp_path / "ckpt", model.state_dict(), arch, shard=False)
    cfg = OmegaConf.create(
        {
            "_component_": "adapt_prune_tune.export.PrunedModelCheckpointer",
            "checkpoint_dir": str(ckpt),
            "checkpoint_files": ["model.safetensors"],
            "model_type": "LLAMA3",
            "output_dir": str(tmp_path / "out"),
            "hf_export": "padded",
            "original_arch": str(tmp_path / "base.json"),
        }
    )
    base.save(tmp_path / "base.json")
    checkpointer = tt_config.instantiate(cfg, should_load_recipe_state=False)
    loaded = checkpointer.load_checkpoint()
    fresh = decoder_from_arch(arch)
    fresh.load_state_dict(loaded["model"])

    pruned_state = _prune_state(fresh.state_dict(), layer=0, keep_mlp=list(range(0, 96, 2)))
    checkpointer.save_checkpoint(
        {"model": pruned_state, "optimizer": {"lr": 0.1}}, epoch=0, intermediate_checkpoint=True
    )
    saved_arch = DecoderArch.load(tmp_path / "out" / "epoch_0" / "arch.json")
    assert saved_arch.layers[0] == LayerArch(4, 2, 48) and saved_arch.layers[1:] == arch.layers[1:]
    pruned = decoder_from_arch(saved_arch)
    pruned.load_state_dict(pruned_state)
    exported = _load(tmp_path / "out" / "epoch_0" / "hf", "padded")
    _assert_same_model(pruned.eval(), exported, "checkpointer padded export")

    resumed = tt_config.instantiate(cfg, should_load_recipe_state=True).load_checkpoint()
    assert resumed["optimizer"] == {"lr": 0.1}
    assert resumed["model"]["layers.0.mlp.w1.weight"].shape == (48, 64)

    # Without any source of base widths a padded export is refused up front, not after training.
    del cfg["original_arch"]
    with pytest.raises(ValueError, match="hf_export=padded needs the base model's widths"):
        tt_config.instantiate(cfg)


# ----------------------------------------------------------------------------- SmolLM2
def _prune_smollm2(state: Dict[str, torch.Tensor], arch: DecoderArch) -> Tuple[Dict[str, torch.Tensor], DecoderArch]:
    """Cut heads and channels by hand: per layer a different number of KV groups, query heads per
    group and MLP channels, keeping scattered (not leading) indices."""
    g = torch.Generator().manual_seed(0)
    hd, full = arch.head_dim, arch.layers[0]
    group = full.num_heads // full.num_kv_heads
    state, layers = dict(state), []
    for i in range(arch.num_layers):
        kv_keep = sorted(torch.randperm(full.num_kv_heads, generator=g)[: 1 + i % full.num_kv_heads].tolist())
        per_group = 1 + (i // 2) % group
        in_group = sorted(torch.randperm(group, generator=g)[:per_group].tolist())
        q_keep = [kv * group + j for kv in kv_keep for j in in_group]
        mlp_keep = sorted(torch.randperm(full.intermediate_dim, generator=g)[: full.intermediate_dim - 41 * i].tolist())
        rows = lambda heads: torch.tensor([h * hd + d for h in heads for d in range(hd)])  # noqa: E731
        p = f"layers.{i}."
        state[p + "attn.q_proj.weight"] = state[p + "attn.q_proj.weight"][rows(q_keep)]
        state[p + "attn.k_proj.weight"] = state[p + "attn.k_proj.weight"][rows(kv_keep)]
        state[p + "attn.v_proj.weight"] = state[p + "attn.v_proj.weight"][rows(kv_keep)]
        state[p + "attn.output_proj.weight"] = state[p + "attn.output_proj.weight"][:, rows(q_keep)]
        state = _prune_state(state, i, mlp_keep)
        layers.append(LayerArch(len(q_keep), len(kv_keep), len(mlp_keep)))
    return state, arch.with_layers(layers)


@pytest.mark.integration
def test_smollm2_pruned_export(smollm2_dir: Path, tmp_path: Path) -> None:
    """The real model, pruned by hand, in both modes.

    Over 30 layers fp32 rounding alone can move logits (up to ~34) by a few
    1e-4, depending on which heads are cut: for one cut the compact and padded
    HF models, same weights, differed by 4e-4 in fp32 from summation order
    only. The torchtune comparison therefore allows 2e-3 (an index error moves
    logits by whole units). That the mapping is exact is checked in float64,
    where the compact and padded exports must agree exactly.
    """
    model, base = load_hf_model(smollm2_dir, max_seq_len=256)
    state, arch = _prune_smollm2(model.state_dict(), base)
    with torch.device("meta"):
        pruned = decoder_from_arch(arch)
    pruned.load_state_dict(state, assign=True)
    for module in pruned.modules():  # RoPE caches are buffers, not in the state dict
        if hasattr(module, "rope_init"):
            module.rope_init()
    pruned.eval()
    assert arch.num_params() < base.num_params()
    for mode in ("compact", "padded"):
        out = export_hf(
            state, tmp_path / mode, arch=arch, mode=mode, original_arch=smollm2_dir,
            tokenizer_dir=smollm2_dir, base_config=smollm2_dir,
        )
        label = f"SmolLM2-135M pruned/{mode}"
        _assert_same_model(pruned, _load(out, mode), label, vocab=base.vocab_size, atol=2e-3, shape=(1, 12))
        # transformers reads config.json for the tokenizer too, hence the flag for compact exports.
        tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=(mode == "compact"))
        assert tokenizer.decode(tokenizer("def f(x):")["input_ids"]) == "def f(x):"

    tokens = torch.randint(0, base.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    logits = {}
    for mode in ("compact", "padded"):
        hf_model = AutoModelForCausalLM.from_pretrained(
            tmp_path / mode, trust_remote_code=(mode == "compact"), dtype=torch.float64
        ).eval()
        with torch.no_grad():
            logits[mode] = hf_model(tokens).logits
    diff = (logits["compact"] - logits["padded"]).abs().max().item()
    print(f"SmolLM2-135M pruned: compact vs padded in float64: max |logits diff| = {diff:.2e}")
    assert diff < 1e-9


def test_mistral_checkpoint_loads_prunes_and_exports_as_llama_blocks(tmp_path: Path) -> None:
    """Mistral without a sliding window is Llama's network: read from its config.json, equal to
    transformers' Mistral, and exported (after a cut) with the same logits; a sliding window is refused."""
    from transformers import MistralConfig, MistralForCausalLM

    from adapt_prune_tune.models import arch_from_hf_config
    from adapt_prune_tune.models._hf import UnsupportedHFConfig
    from adapt_prune_tune.surgery import LayerKeep, prune_decoder_

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                           rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
    mistral = _randomize(MistralForCausalLM(config), seed=3)
    mistral.save_pretrained(tmp_path / "base", safe_serialization=True)
    model, arch = load_hf_model(tmp_path / "base")
    _assert_same_model(model.eval(), mistral, "mistral/load")
    assert arch.rope.kind == "default" and not arch.attn_bias
    base = arch
    # Layer 0 keeps KV groups 0 and 2 with both of their query heads, and every other MLP channel.
    keep = LayerKeep(q=torch.tensor([0, 1, 4, 5]), kv=torch.tensor([0, 2]), mlp=torch.arange(0, 128, 2))
    arch = prune_decoder_(model, arch, [keep, None])
    out = export_hf(model, tmp_path / "export", arch=arch, original_arch=base, base_config=tmp_path / "base")
    _assert_same_model(model, _load(out, "compact"), "mistral/export")
    with pytest.raises(UnsupportedHFConfig, match="sliding_window 64"):
        arch_from_hf_config({**config.to_dict(), "sliding_window": 64})
