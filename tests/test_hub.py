"""Model cards and publishing, offline: dry runs, bad names, no login, no network.

Nothing here reaches the Hub: a dry run never touches the network, and the
network-failure test points the client at a closed local port.
"""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict

import pytest
import yaml

from adapt_prune_tune.export import export_hf
from adapt_prune_tune.hub import (
    PublishError,
    model_card_context_from_run,
    publish,
    training_data,
    training_setup,
    validate_repo_id,
    write_model_card,
)
from adapt_prune_tune.models import DecoderArch, LayerArch, RopeSpec, decoder_from_arch

LAYERS = (LayerArch(4, 2, 96), LayerArch(2, 1, 40), LayerArch(4, 4, 7))
CONTEXT = {
    "target": "50% of prunable parameters",
    "training_tokens": 1_234_567,
    "evaluation": [
        {"task": "python-docs perplexity", "base": 9.81, "pruned": 12.5},
        {"task": "hellaswag acc_norm", "base": 0.4312, "pruned": 0.3977},
    ],
    "command": "tune run adapt_prune_recipe --config smollm2/135M_adapt",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _base() -> DecoderArch:
    return DecoderArch.uniform(
        vocab_size=128, embed_dim=64, num_layers=len(LAYERS), num_heads=8, num_kv_heads=4,
        intermediate_dim=128, head_dim=16, max_seq_len=64, rope=RopeSpec("default", 1e5),
        tie_word_embeddings=True,
        meta={"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Dict[str, Path]:
    base = _base()
    arch = base.with_layers(list(LAYERS))
    state = decoder_from_arch(arch).state_dict()
    root = tmp_path_factory.mktemp("exports")
    modes = ("compact", "padded")
    return {mode: export_hf(state, root / mode, arch=arch, mode=mode, original_arch=base) for mode in modes}


@pytest.fixture
def export_dir(exports, tmp_path: Path) -> Path:
    """A private copy of the compact export, so each test may write into it."""
    return Path(shutil.copytree(exports["compact"], tmp_path / "export"))


def _digests(directory: Path) -> Dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir() if p.is_file()}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture
def no_login(monkeypatch, tmp_path: Path) -> None:
    """No token anywhere: environment, HF_HOME, or the token file huggingface_hub resolved at import."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))


def test_model_card_compact(export_dir: Path) -> None:
    card = write_model_card(export_dir, {**CONTEXT, "repo_id": "someone/smollm2-pruned"}).read_text()
    front = _front_matter(card)
    assert front["license"] == "apache-2.0"
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert set(front["tags"]) >= {"pruned", "adapt-pruner", "torchtune"}
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    for section in ("## Method", "## Base model", "## Size", "## Per-layer widths", "## Training",
                    "## Evaluation", "## How to load", "## Reproduce"):
        assert section in card
    base, arch = _base(), _base().with_layers(list(LAYERS))
    assert f"{base.num_params():,}" in card and f"{arch.num_params():,}" in card
    assert "- Target: 50% of prunable parameters" in card
    assert "| 1 | 2 | 1 | 40 |" in card and "| base (every layer) | 8 | 4 | 128 |" in card
    assert "| hellaswag acc_norm | 0.4312 | 0.3977 |" in card
    assert 'from_pretrained("someone/smollm2-pruned", trust_remote_code=True)' in card
    assert CONTEXT["command"] in card and "1,234,567" in card


def test_model_card_padded_needs_no_remote_code(exports, tmp_path: Path) -> None:
    export_dir = Path(shutil.copytree(exports["padded"], tmp_path / "padded"))
    card = write_model_card(export_dir).read_text()
    assert "trust_remote_code" not in card and "**padded**" in card
    assert "## Evaluation" not in card and "## Reproduce" not in card  # nothing given, nothing made up


def test_context_from_run_record(tmp_path: Path, export_dir: Path) -> None:
    record = {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "command": "tune run adapt_prune_recipe --config smollm2/135M_adapt",
        "params_before": 134_515_008,
        "params_after": 67_000_000,
        "stages": [{"stage": 1, "tokens": 1000}, {"stage": 2, "tokens": 2500}],
        "config": {"dataset": {"source": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"},
                   "optimizer": {"_component_": "torch.optim.AdamW", "lr": 2e-5}},
    }
    (tmp_path / "run_record.json").write_text(json.dumps(record))
    context = model_card_context_from_run(tmp_path)
    assert context["command"] == record["command"] and context["params_after"] == 67_000_000
    assert "3,500" in context["training_tokens"]
    card = write_model_card(export_dir, context).read_text()
    assert _front_matter(card)["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert ("Data: [HuggingFaceFW/fineweb-edu](https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu) "
            "(sample-10BT), split train. Optimizer: `torch.optim.AdamW`, peak learning rate 2e-05.") in card


def test_card_names_the_training_data_and_setup_without_local_paths() -> None:
    """Hub datasets are linked and listed in the front matter; local files by name only."""
    from omegaconf import OmegaConf

    from adapt_prune_tune.configs import resolve

    qwen = OmegaConf.to_container(OmegaConf.load(resolve("qwen2_5/0.5B_adapt")), resolve=False)
    qwen["distill"] = {"enabled": True, "alpha": 0.5, "temperature": 2.0}
    ids, said = training_data(qwen)
    assert ids == ["DKYoon/SlimPajama-6B"]
    assert said == ["[DKYoon/SlimPajama-6B](https://huggingface.co/datasets/DKYoon/SlimPajama-6B), split train"]
    setup = training_setup(qwen)
    assert setup.startswith("Optimizer: `torch.optim.AdamW`, peak learning rate ") and "warmup-stable-decay" in setup
    assert "(KL weight 0.5, temperature 2.0)" in setup
    local = {"dataset": [{"_component_": "torchtune.datasets.text_completion_dataset", "source": "text",
                          "data_files": ["/home/me/secret/a.txt", "/home/me/secret/b.txt"]},
                         {"_component_": "my_pkg.data.build"}]}
    assert training_data(local) == ([], ["local text files (a.txt, b.txt)", "`build`"])
    assert training_setup(local) is None


def test_dry_run_uploads_nothing(export_dir: Path, no_login, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any network use would fail
    before = _digests(export_dir)
    result = publish(export_dir, "someone/smollm2-pruned", dry_run=True, model_card_context=CONTEXT)
    out = capsys.readouterr().out
    names = [name for name, _ in result.files]
    assert result.dry_run and result.url is None
    assert {"README.md", "config.json", "model.safetensors", "modeling_adapt.py"} <= set(names)
    for name, size in result.files:
        assert name in out and f"{size:,}" in out
    after = _digests(export_dir)
    assert {k: v for k, v in after.items() if k != "README.md"} == before


@pytest.mark.parametrize(
    "repo_id",
    ["no-namespace", "a/b/c", "/name", "ns/", "ns/bad name", "ns/-leading", "ns/a--b", "ns/a..b",
     "ns/name.git", "ns/" + "x" * 97, "ns/naïve"],
)
def test_invalid_repo_id_fails_before_anything(export_dir: Path, repo_id: str) -> None:
    before = _digests(export_dir)
    with pytest.raises(ValueError, match="namespace/name|Invalid repository id"):
        publish(export_dir, repo_id, dry_run=True)
    assert _digests(export_dir) == before and not (export_dir / "README.md").exists()


def test_valid_repo_ids() -> None:
    for repo_id in ("someone/model", "Org-1/SmolLM2-135M_pruned.v2"):
        assert validate_repo_id(repo_id) == repo_id


def test_missing_token_says_how_to_log_in(export_dir: Path, no_login) -> None:
    before = _digests(export_dir)
    with pytest.raises(PublishError, match="hf auth login") as e:
        publish(export_dir, "someone/smollm2-pruned")
    assert "--token" not in str(e.value)  # the CLI prints this too, and has no such option
    assert _digests(export_dir) == before


def test_network_failure_is_clear_and_leaves_export(export_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    before = _digests(export_dir)
    with pytest.raises(PublishError, match=r"127\.0\.0\.1:9.*network"):
        publish(export_dir, "someone/smollm2-pruned", token="hf_not_a_real_token")
    after = _digests(export_dir)
    assert {k: v for k, v in after.items() if k != "README.md"} == before


def test_publish_needs_an_export(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        publish(tmp_path / "missing", "someone/model", dry_run=True)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="export"):
        publish(tmp_path, "someone/model", dry_run=True)


# ----- the card as the Hub shows it: base model link, license, evaluation metadata -----


def _export_with_base(root: Path, base_model: str, license_: str = "") -> Path:
    """An export whose recorded base model is ``base_model`` (as the recipe records a local dir)."""
    meta = {"base_model": base_model, **({"license": license_} if license_ else {})}
    base = DecoderArch.uniform(
        vocab_size=128, embed_dim=64, num_layers=len(LAYERS), num_heads=8, num_kv_heads=4,
        intermediate_dim=128, head_dim=16, max_seq_len=64, rope=RopeSpec("default", 1e5),
        tie_word_embeddings=True, meta=meta,
    )
    arch = base.with_layers(list(LAYERS))
    return export_hf(decoder_from_arch(arch).state_dict(), root, arch=arch, original_arch=base)


RUN_RECORD = {
    "command": "/site/recipes/adapt_prune_recipe.py --config /site/configs/smollm2/135M_adapt.yaml",
    "config_name": "smollm2/135M_adapt",
    "overrides": ["adapt.total_tokens=80_000"],
    "params_before": 134_515_008,
    "params_after": 113_300_000,
    "stages": [{"stage": 1, "tokens": 1000}, {"stage": 2, "tokens": 2500}],
    "perplexity_by_text": {
        "python_docs": {"original": 14.36, "pruned": 17.71, "recovered": 16.66},
        "austen": {"original": 30.0, "pruned": 38.0},
    },
    "heldout": {"num_tokens": 8192, "window": 512, "texts": ["python_docs", "austen"]},
    "speed": {
        "original": {"forward_tokens_per_second": 1000.0, "generate_tokens_per_second": 20.0,
                     "generate_peak_memory_bytes": 600 * 2**20, "device": "cpu (x)", "dtype": "float32",
                     "memory_measure": "cpu VmHWM growth (lower bound)"},
        "pruned": {"forward_tokens_per_second": 1190.0, "generate_tokens_per_second": 23.0,
                   "generate_peak_memory_bytes": 500 * 2**20, "device": "cpu (x)", "dtype": "float32",
                   "memory_measure": "cpu VmHWM growth (lower bound)", "seq_len": 512, "batch_size": 4,
                   "new_tokens": 128, "prompt_len": 32},
        "device": "cpu (x)",
    },
}


def _run_dir(tmp_path: Path, checkpoint_dir: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    record = {**RUN_RECORD, "base_model": str(checkpoint_dir),
              "config": {"checkpointer": {"checkpoint_dir": str(checkpoint_dir)}}}
    (run / "run_record.json").write_text(json.dumps(record))
    return run


def test_card_links_the_hub_id_not_the_local_checkpoint_dir(tmp_path: Path) -> None:
    ckpt = tmp_path / "models" / "SmolLM2-135M-Instruct"  # the prepared default's directory
    export = _export_with_base(tmp_path / "export", str(ckpt))
    card = write_model_card(export, model_card_context_from_run(_run_dir(tmp_path, ckpt))).read_text()
    front = _front_matter(card)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["license"] == "apache-2.0"  # inherited from the base model
    assert str(tmp_path) not in card.split("## Reproduce")[0]  # no local path anywhere above
    # What the user typed, not the resolved YAML path.
    assert "tune run adapt_prune_recipe --config smollm2/135M_adapt adapt.total_tokens=80_000" in card
    assert "/site/configs" not in card


def test_card_reads_the_id_from_the_checkpoints_config(tmp_path: Path) -> None:
    ckpt = tmp_path / "my-download"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.2-1B-Instruct"}))
    card = write_model_card(_export_with_base(tmp_path / "export", str(ckpt))).read_text()
    front = _front_matter(card)
    assert front["base_model"] == "meta-llama/Llama-3.2-1B-Instruct" and front["license"] == "llama3.2"


def test_a_local_path_is_refused_with_the_flag_to_pass(tmp_path: Path, no_login) -> None:
    export = _export_with_base(tmp_path / "export", "/data/checkpoints/my-model", license_="apache-2.0")
    before = _digests(export)
    with pytest.raises(ValueError, match="--base-model"):
        write_model_card(export)
    with pytest.raises(ValueError, match="--base-model"):  # before the token is even looked for
        publish(export, "someone/pruned")
    with pytest.raises(ValueError, match="--base-model"):
        publish(export, "someone/pruned", dry_run=True)
    assert _digests(export) == before
    card = write_model_card(export, {"base_model": "someone/my-model"}).read_text()
    assert _front_matter(card)["base_model"] == "someone/my-model"


def test_unknown_base_needs_a_license(tmp_path: Path) -> None:
    export = _export_with_base(tmp_path / "export", "someone/their-model")
    with pytest.raises(ValueError, match="--license"):
        write_model_card(export)
    front = _front_matter(write_model_card(export, {"license": "other:acme:https://acme.example/L"}).read_text())
    assert (front["license"], front["license_name"], front["license_link"]) == (
        "other", "acme", "https://acme.example/L"
    )


def test_card_evaluation_model_index_and_speed(tmp_path: Path) -> None:
    ckpt = tmp_path / "models" / "SmolLM2-135M-Instruct"
    export = _export_with_base(tmp_path / "export", str(ckpt))
    (export / "eval_results.json").write_text(json.dumps({
        "results": {"heldout_next_sentence": {"acc": 0.61, "acc_stderr": 0.034},
                    "arc_easy": {"acc_norm": 0.52, "acc_norm_stderr": 0.01}},
        "sizes": {"heldout_next_sentence": "quick: up to 200 next-sentence questions"},
    }))
    context = {**model_card_context_from_run(_run_dir(tmp_path, ckpt)), "repo_id": "someone/smol-pruned"}
    card = write_model_card(export, context).read_text()
    index = _front_matter(card)["model-index"]
    assert index[0]["name"] == "smol-pruned"
    results = {r["dataset"]["type"]: r for r in index[0]["results"]}
    assert results["python_docs"]["metrics"] == [{"type": "perplexity", "value": 16.66, "name": "perplexity"}]
    assert results["austen"]["metrics"][0]["value"] == 38.0  # no recovery measured: the pruned figure
    assert "8192 tokens in 512-token windows" in results["python_docs"]["dataset"]["name"]
    assert results["allenai/ai2_arc"]["dataset"]["config"] == "ARC-Easy"
    assert results["heldout_next_sentence"]["metrics"] == [{"type": "acc", "value": 0.61, "name": "acc"}]
    for result in index[0]["results"]:
        assert result["task"]["type"] == "text-generation"
    # The same figures in the text a person reads.
    assert "| python_docs | 14.36 | 17.71 | 16.66 |" in card and "| austen | 30.00 | 38.00 | 38.00 |" in card
    assert "| heldout_next_sentence | acc | 0.6100 ± 0.0340 |" in card
    assert "quick: up to 200 next-sentence questions" in card
    assert "## Speed" in card and "| tokens/s (forward) | 1000 | 1190 | 1.190× |" in card
    assert "| peak memory (generation) | 600.0 MiB | 500.0 MiB | 0.833× |" in card


def test_cli_publish_dry_run_with_flags(tmp_path: Path, no_login, capsys) -> None:
    from adapt_prune_tune.cli import main

    export = _export_with_base(tmp_path / "export", "/data/checkpoints/my-model")
    with pytest.raises(SystemExit):
        main(["publish", str(export), "someone/pruned", "--dry-run"])
    assert "--base-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["publish", str(export), "someone/pruned", "--dry-run", "--base-model", "/data/x"])
    main(["publish", str(export), "someone/pruned", "--dry-run", "--base-model", "meta-llama/Llama-3.2-1B"])
    front = _front_matter((export / "README.md").read_text())
    assert (front["base_model"], front["license"]) == ("meta-llama/Llama-3.2-1B", "llama3.2")
    main(["publish", str(export), "someone/pruned", "--dry-run", "--base-model", "me/base", "--license", "mit"])
    assert _front_matter((export / "README.md").read_text())["license"] == "mit"
