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


def test_context_from_run_record(tmp_path: Path) -> None:
    record = {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "command": "tune run adapt_prune_recipe --config smollm2/135M_adapt",
        "params_before": 134_515_008,
        "params_after": 67_000_000,
        "stages": [{"stage": 1, "tokens": 1000}, {"stage": 2, "tokens": 2500}],
    }
    (tmp_path / "run_record.json").write_text(json.dumps(record))
    context = model_card_context_from_run(tmp_path)
    assert context["command"] == record["command"] and context["params_after"] == 67_000_000
    assert "3,500" in context["training_tokens"]


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
    with pytest.raises(PublishError, match="hf auth login"):
        publish(export_dir, "someone/smollm2-pruned")
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
