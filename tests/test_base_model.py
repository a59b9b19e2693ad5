"""The base model's Hub id and license, from what a run recorded."""

import json

import pytest

from adapt_prune_tune.base_model import (
    KNOWN_BASE_MODELS,
    BaseModelUnknown,
    License,
    license_for,
    looks_like_repo_id,
    parse_license,
    resolve_base_model,
)


def test_looks_like_repo_id(tmp_path, monkeypatch):
    assert looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    for value in ("/tmp/Llama-3.2-1B-Instruct", "./models/x", "~/x", "name", "a/b/c", "../a/b", "", None):
        assert not looks_like_repo_id(value)
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not looks_like_repo_id("org/name")  # an existing relative path is a path


def test_recorded_id_wins_and_explicit_ids_are_checked():
    assert resolve_base_model("/nowhere/x", "Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", "recorded")
    assert resolve_base_model("/nowhere/x", explicit="me/my-base") == ("me/my-base", "given")
    with pytest.raises(BaseModelUnknown, match="--base-model"):
        resolve_base_model(explicit="/tmp/my-base")
    assert resolve_base_model(None, "") == (None, "not recorded")


def test_id_from_the_checkpoints_config(tmp_path):
    ckpt = tmp_path / "anything"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert resolve_base_model(str(ckpt))[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # A training script's local _name_or_path is no id; the directory name is unknown too.
    (ckpt / "config.json").write_text(json.dumps({"_name_or_path": "/scratch/out/checkpoint-500"}))
    with pytest.raises(BaseModelUnknown, match=r"Pass --base-model org/name"):
        resolve_base_model(str(ckpt))


def test_id_from_a_tune_download_directory_name(tmp_path):
    # `tune download meta-llama/Meta-Llama-3.1-8B-Instruct --output-dir /tmp/Meta-Llama-3.1-8B-Instruct/`
    assert resolve_base_model("/tmp/Meta-Llama-3.1-8B-Instruct/") == (
        "meta-llama/Llama-3.1-8B-Instruct",
        "name of /tmp/Meta-Llama-3.1-8B-Instruct",
    )
    assert resolve_base_model("/tmp/Qwen2.5-0.5B")[0] == "Qwen/Qwen2.5-0.5B"
    # The embedded default's cache directory, prepared before config.json named the id.
    assert resolve_base_model(str(tmp_path / "models" / "SmolLM2-135M-Instruct"))[0] == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(BaseModelUnknown, match="/tmp/model"):
        resolve_base_model("/tmp/model")


def test_licenses_of_known_bases():
    assert license_for("HuggingFaceTB/SmolLM2-135M-Instruct") == License("apache-2.0")
    assert license_for("meta-llama/Llama-3.1-8B-Instruct").id == "llama3.1"
    assert license_for("meta-llama/Meta-Llama-3.1-8B-Instruct").id == "llama3.1"  # former name
    assert license_for("meta-llama/Llama-3.2-1B").id == "llama3.2"
    assert license_for("Qwen/Qwen2.5-0.5B") == license_for("Qwen/Qwen2.5-1.5B-Instruct") == License("apache-2.0")
    research = license_for("Qwen/Qwen2.5-3B-Instruct")
    assert (research.id, research.name) == ("other", "qwen-research")
    assert research.link == "https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE"
    assert license_for("Qwen/Qwen2.5-72B").front_matter()["license_name"] == "qwen"
    assert license_for("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B") == License("mit")
    assert license_for("someone/unknown") is None and license_for(None) is None
    assert all("/" in repo for repo in KNOWN_BASE_MODELS)


def test_parse_license():
    assert parse_license("mit") == License("mit")
    assert parse_license("other:acme:https://acme.example/LICENSE") == License(
        "other", "acme", "https://acme.example/LICENSE"
    )
    assert parse_license("other:acme").front_matter() == {"license": "other", "license_name": "acme"}
