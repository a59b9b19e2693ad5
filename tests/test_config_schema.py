"""The config table and the up-front checks: every problem named, all in one message, before any work.

No process is started and no weights are read: configs are the packaged ones with ``key=value``
overrides (as ``tune run`` applies them), pointed at a fake cache whose files exist but are empty.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import List

import pytest
import torchtune
from omegaconf import OmegaConf
from safetensors.torch import save_file

from adapt_prune_tune import config_checks, config_schema, configs, data_checks
from adapt_prune_tune.config_checks import ConfigError, check_inputs, clear_previous_run
from adapt_prune_tune.config_schema import (
    DISTILL,
    MARKERS,
    PRUNING_METHOD,
    SECTIONS,
    STOCK_KEYS,
    readme_reference,
    render_markdown,
)
from adapt_prune_tune.distillation import DistillConfig
from adapt_prune_tune.planning import load_config
from adapt_prune_tune.pruner import PruningConfig

README = Path(__file__).resolve().parent.parent / "README.md"


def demo_config(tmp_path: Path, *overrides: str):
    """The packaged SmolLM2 demo config over a fake cache in which every file it names exists."""
    cache = tmp_path / "cache"
    for name in (
        "models/SmolLM2-135M-Instruct/model.safetensors",
        "data/python-docs/train.jsonl",
        "data/python-docs/calibration.jsonl",
    ):
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).touch()
    save_file({}, str(cache / "models/SmolLM2-135M-Instruct/model.safetensors"))  # a whole header, no weights
    (cache / "data/austen-novels").mkdir(parents=True, exist_ok=True)
    cfg, _ = load_config("smollm2/135M_adapt", [f"cache_dir={cache}", *overrides])
    return cfg


def problems_of(cfg, world_size: int = 1) -> List[str]:
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg, world_size=world_size)
    assert str(err.value).startswith("adapt_prune_recipe cannot run this config")
    return err.value.problems


def run_dir(cfg) -> Path:
    return Path(str(cfg.output_dir))


# --------------------------------------------------------------------------- configs that pass


def test_demo_config_passes_and_returns_what_it_built(tmp_path):
    checked = check_inputs(demo_config(tmp_path), world_size=1)
    assert checked.pruning == PruningConfig(target_sparsity=0.2, amplitude=0.02)
    assert checked.distill == DistillConfig()
    assert checked.arch.num_params() == 134_515_008


@pytest.mark.parametrize("name", configs.available())
def test_packaged_configs_have_no_config_problems(tmp_path, name):
    """What this machine lacks (downloads, disk for an 8B checkpoint) is a file problem, which ``warn`` takes.

    Config problems raise instead, so every warning here must be one of the two machine facts.
    """
    warnings: List[str] = []
    cfg, _ = load_config(name, [f"output_dir={tmp_path}/run"])
    check_inputs(cfg, world_size=1, warn=warnings.append)
    machine_facts = ("not found", "free disk space or choose another output_dir")
    assert all(any(fact in w for fact in machine_facts) for w in warnings), warnings


# --------------------------------------------------------------------------- one key at a time


@pytest.mark.parametrize(
    "override, message",
    [
        # wrong types, named with the key
        ("pruning.method.amplitude=abc", "pruning.method.amplitude must be a finite number >= 0, got 'abc' (a string)"),
        ("pruning.method.steps=2.5", "pruning.method.steps must be an integer >= 1, got 2.5"),
        ("pruning.method.prune_mlp=3", "pruning.method.prune_mlp must be True or False, got 3"),
        ("pruning.method.similarity=dot", "pruning.method.similarity must be one of ('cosine', 'euclidean', 'manhattan')"),
        ("pruning.calibration.num_samples=many", "pruning.calibration.num_samples must be an integer >= 1, got 'many'"),
        ("pruning.calibration.dataset=null", "pruning.calibration.dataset must be a component"),
        ("heldout.at_checkpoints=sometimes", "heldout.at_checkpoints must be True or False, got 'sometimes'"),
        ("distill.enabled=maybe", "distill.enabled must be True or False"),
        ("overwrite_output_dir=1", "overwrite_output_dir must be True or False, got 1"),
        ("heldout=5", "heldout must be a section (a mapping of keys), got 5"),
        # ranges and choices
        ("pruning.method.target_sparsity=1.5", "pruning.method.target_sparsity must be in [0, 1) or null, got 1.5"),
        ("pruning.method.max_layer_sparsity=1", "pruning.method.max_layer_sparsity must be in (0, 1), got 1"),
        ("pruning.method.round_to=0", "pruning.method.round_to must be an integer >= 1"),
        ("pruning.calibration.seq_len=1", "pruning.calibration.seq_len must be an integer >= 2"),
        ("adapt.stages=0", "adapt.stages must be an integer >= 1, got 0"),
        ("adapt.keep_last_checkpoints=-1", "adapt.keep_last_checkpoints must be an integer >= 0"),
        ("adapt.optimizer_state=keep", "adapt.optimizer_state must be one of ('slice', 'reset'), got 'keep'"),
        ("heldout.window=1", "heldout.window must be an integer >= 2"),
        ("distill.alpha=1.5", "distill.alpha must be in [0, 1] (0: labels only, 1: teacher only), got 1.5"),
        ("distill.temperature=0", "distill.temperature must be a finite number > 0 (1 = no softening), got 0"),
        ("distill.calibration_loss=mse", "distill.calibration_loss must be one of ('ce', 'kl'), got 'mse'"),
        ("speed.new_tokens=1", "speed.new_tokens must be an integer >= 2, got 1"),
        # missing keys and sections
        ("~pruning.calibration.num_samples", "pruning.calibration.num_samples is missing"),
        ("~adapt", "missing section `adapt:`"),
        # misspelled keys and sections: the closest valid name
        ("pruning.method.amplitde=0.1", "pruning.method.amplitde: unknown key (did you mean pruning.method.amplitude?)"),
        ("adapt.total_token=5", "did you mean adapt.total_tokens?"),
        ("heldout.windw=64", "did you mean heldout.window?"),
        ("distill.alpah=0.3", "did you mean distill.alpha?"),
        ("pruning.calibraton.num_samples=4", "pruning.calibraton: unknown key (did you mean pruning.calibration?)"),
        ("prunning.method.amplitude=0.1", "prunning: unknown top-level key, nothing reads it (did you mean pruning?)"),
        ("overwrite_ouput_dir=True", "(did you mean overwrite_output_dir?)"),
        ("bach_size=4", "(did you mean batch_size?)"),
        ("modle_dir=/x", "(did you mean model_dir?)"),  # a helper the config interpolates
        # relations between keys
        ("pruning.method.target_params=100_000_000", "pruning.method: set exactly one of target_sparsity or target_params"),
        ("adapt.total_steps=10", "adapt: set exactly one of total_tokens or total_steps"),
        ("adapt.total_tokens=null adapt.total_steps=3", "3 optimizer steps for 4 stages; every stage needs at least one"),
        (
            "pruning.method.prune_attention=False pruning.method.prune_mlp=False",
            "enable prune_attention and/or prune_mlp",
        ),
        ("heldout.num_tokens=1000", "heldout.num_tokens (1000) must be a positive multiple of heldout.window (512)"),
        ("heldout.text._component_=adapt_prune_tune.corpus.heldout_text", "give either `text:` (one text) or `texts:`"),
        ("distill.enabled=True adapt.total_tokens=0", "there is no training to distil into"),
        ("resume_from_checkpoint=True overwrite_output_dir=True", "contradict each other"),
        # relations with the model (SmolLM2: 9 heads in 3 KV groups, MLP 1536 wide)
        ("pruning.method.min_kv_heads=4", "pruning.method.min_kv_heads=4 exceeds the model's 3 KV heads per layer"),
        ("pruning.method.min_q_per_kv=4", "pruning.method.min_q_per_kv=4 exceeds the model's 3 query heads per KV head"),
        ("pruning.method.min_mlp_channels=1537", "(1537) exceeds the model's MLP width (1536)"),
        ("pruning.method.min_mlp_channels=1100 pruning.method.round_to=1024", "(2048) exceeds the model's MLP width"),
        ("pruning.method.target_sparsity=0.95", "exceeds what the minimum widths and max_layer_sparsity allow"),
        ("speed.seq_len=10000", "speed.seq_len=10000 exceeds the model's max_seq_len (8192)"),
        ("pruning.calibration.seq_len=8194", "feeds 8193 positions to the model, whose max_seq_len is 8192; set "
         "pruning.calibration.seq_len to at most 8193"),
        ("heldout.window=9000 heldout.num_tokens=18000", "set heldout.window to at most 8193"),
        ("tokenizer.max_seq_len=9000", "tokenizer.max_seq_len=9,000 exceeds the model's max_seq_len (8,192)"),
        ("tokenizer.max_seq_len=null", "tokenizer.max_seq_len is null: training samples would not be cut"),
        (
            "pruning.method.target_sparsity=null pruning.method.target_params=10_000_000",
            "parameters this configuration cannot prune",
        ),
        # torchtune's own config checks and what a resize cannot carry join the same message
        ("dtype=fp16", "full fp16 training is not supported"),
        ("optimizer_in_bwd=True", "optimizer_in_bwd=True (per-parameter optimizers cannot be resized)"),
        # torchtune's numbers it reads unchecked: refused here, not as a ZeroDivisionError later
        ("batch_size=0", "batch_size must be an integer >= 1 (samples per rank per forward), got 0"),
        ("gradient_accumulation_steps=abc", "gradient_accumulation_steps must be an integer >= 1"),
        ("max_steps_per_epoch=0", "max_steps_per_epoch must be an integer >= 1 or null (optimizer steps per epoch), got 0"),
        ("clip_grad_norm=-1", "clip_grad_norm must be a finite number > 0 or null"),
        # torchtune's run length, which the stages replace: refused, not silently ignored
        ("max_steps_per_epoch=3", "max_steps_per_epoch=3: this recipe does not count epochs"),
        ("epochs=2", "set adapt.total_steps=N (N optimizer steps in all)"),
        # a referenced key's problem names the key it comes from
        ("seed=null", "got None (this config sets it to ${seed}: change that key"),
        # FSDP2 settings that fail at the process group or at the first sharded forward
        ("fsdp_cpu_offload=True", "fsdp_cpu_offload=True with device=cpu"),
        ("custom_sharded_layers=[tok_embeddings,output]", "this model ties its output projection to tok_embeddings"),
        ("custom_sharded_layers=[embeddings]", "['embeddings'] name no module of this model"),
        ("custom_sharded_layers=tok_embeddings", "must be a list of module names"),
        # a section given as a value is named, not a crash of a check that reads one of its keys
        ("adapt=abc", "adapt must be a section (a mapping of keys), got 'abc'"),
        ("pruning.method=abc", "pruning.method must be a section (a mapping of keys), got 'abc'"),
        # Hydra's '+' for a new key: torchtune keeps it in the key's name
        ("+dataset.sample_by=paragraph", "+dataset: tune run adds a key with a plain `key=value`, without "
                                         "Hydra's '+': write dataset.sample_by=..."),
    ],
)
def test_bad_key_is_refused_by_name(tmp_path, override, message):
    found = problems_of(demo_config(tmp_path, *override.split()))
    assert any(message in p for p in found), found


def test_optimizer_and_schedule_that_cannot_be_built_are_named_with_the_error_type(tmp_path):
    found = problems_of(demo_config(tmp_path, "optimizer.lr=-1"))
    assert found == ["optimizer: torch.optim.AdamW cannot be built: ValueError: Invalid learning rate: -1"]
    found = problems_of(demo_config(tmp_path, "lr_scheduler.warmup_ratio=2"))
    assert found == ["lr_scheduler: adapt_prune_tune.schedule.get_wsd_schedule cannot be built: ValueError: "
                     "lr_scheduler.warmup_ratio must be in [0, 1], got 2"]


def test_optimizer_state_a_resize_cannot_slice_is_refused_unless_reset(tmp_path):
    """Adafactor's factored statistics are not shaped like their parameter: sliced runs would
    fail at the first step after a resize; ``reset`` starts fresh state there instead."""
    adafactor = ("optimizer._component_=torch.optim.Adafactor", "~optimizer.fused")
    found = problems_of(demo_config(tmp_path, *adafactor))
    assert found == [
        "optimizer: torch.optim.Adafactor keeps state shaped otherwise than its parameter (`row_var` (64, 1), "
        "`col_var` (1, 64) for a (64, 64) parameter), which a resize cannot slice: set adapt.optimizer_state=reset "
        "(fresh state at every resize), or use an optimizer with per-element state (torch.optim.AdamW, SGD, "
        "Adagrad; torchao.optim.AdamW8bit / AdamW4bit / AdamWFp8)"
    ]
    check_inputs(demo_config(tmp_path, *adafactor, "adapt.optimizer_state=reset"))
    for per_element in ("optimizer._component_=torch.optim.SGD optimizer.momentum=0.9",
                        "optimizer._component_=torch.optim.Adagrad", "optimizer.amsgrad=True"):
        check_inputs(demo_config(tmp_path, *per_element.split(), "~optimizer.fused"))


def test_override_that_cannot_merge_is_named_with_the_fix():
    """OmegaConf's bare "Cannot merge incompatible container types" becomes the override and the fix."""
    with pytest.raises(ConfigError) as err:
        load_config("smollm2/135M_adapt", ["adapt.stages=2", "heldout.texts=[austen]", "pruning={}"])
    assert len(err.value.problems) == 1, err.value.problems  # the good overrides are not blamed
    (problem,) = err.value.problems
    assert problem.startswith("override `heldout.texts=[austen]` cannot be applied to 135M_adapt.yaml")
    assert "heldout.texts.NAME=..." in problem
    with pytest.raises(ConfigError) as err:
        load_config("smollm2/135M_adapt", ["~loss.num_output_chunks", "~adapt.stages"])
    assert err.value.problems == ["override `~loss.num_output_chunks`: 135M_adapt.yaml has no key "
                                  "`loss.num_output_chunks` to remove"]


def test_a_leading_tilde_is_the_home_directory(tmp_path, monkeypatch):
    """YAML and torchtune keep `~` literally: `output_dir: ~/runs/x` wrote a directory named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg, _ = load_config("smollm2/135M_adapt", ["output_dir=~/runs/x", "cache_dir=~/cache"])
    assert cfg.output_dir == f"{tmp_path}/runs/x"
    assert cfg.checkpointer.output_dir == f"{tmp_path}/runs/x"  # through ${output_dir}
    assert cfg.dataset.data_files == f"{tmp_path}/cache/data/python-docs/train.jsonl"
    expanded = config_checks.expand_home(OmegaConf.create({"files": ["~/a.jsonl", "b~/c", "~x/d"], "n": 3}))
    assert OmegaConf.to_container(expanded) == {"files": [f"{tmp_path}/a.jsonl", "b~/c", "~x/d"], "n": 3}


def test_model_and_rank_relations_wait_for_them(tmp_path):
    # The table alone (no model, no ranks): the model's and the ranks' relations wait for them.
    cfg = demo_config(tmp_path, "pruning.method.min_kv_heads=4", "pruning.calibration.num_samples=15")
    assert config_schema.check_sections(cfg).problems == []
    arch, _, _ = config_checks.meta_model(cfg)
    later = config_schema.check_sections(cfg, world_size=2, arch=arch)
    assert len(later.problems) == 2


def test_calibration_split_is_checked_for_the_ranks(tmp_path):
    cfg = demo_config(tmp_path)  # 16 samples, batches of at most 8
    for world in (1, 2, 4, 8, 16):  # a share smaller than the batch runs as one batch
        check_inputs(cfg, world_size=world)
    assert problems_of(cfg, world_size=3) == [  # only another window count fixes it
        "pruning.calibration.num_samples (16) must be a multiple of the data-parallel ranks (3) so every rank "
        "scores the same number of windows: set pruning.calibration.num_samples=15 or pruning.calibration.num_samples=18"
    ]
    assert problems_of(cfg, world_size=32) == [
        "pruning.calibration.num_samples (16) must be a multiple of the data-parallel ranks (32) so every rank "
        "scores the same number of windows: set pruning.calibration.num_samples=32"
    ]


def test_every_problem_in_one_message(tmp_path):
    cfg = demo_config(
        tmp_path,
        "pruning.method.amplitde=0.1",  # typo'd key
        "prunning.method.amplitude=0.1",  # typo'd section
        "adapt.stages=zero",  # wrong type
        "distill.alpha=2",  # out of range
        "heldout.num_tokens=1000",  # relation
        "pruning.method.min_kv_heads=7",  # relation with the model
        "checkpointer.checkpoint_dir=/nonexistent/model",  # a file
    )
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg, world_size=1)
    text = str(err.value)
    assert len(err.value.problems) == 7 and "(7 problems)" in text
    for key in ("pruning.method.amplitde", "prunning", "adapt.stages", "distill.alpha", "heldout.num_tokens",
                "pruning.method.min_kv_heads", "/nonexistent/model"):
        assert key in text, key
    # One wrong key does not hide the relations of the others in its section.
    assert "exceeds the model's 3 KV heads" in text


def test_helper_keys_are_fine_once_the_config_uses_them(tmp_path):
    cfg = demo_config(tmp_path, f"runs_root={tmp_path}/runs", "output_dir=${runs_root}/mine")
    check_inputs(cfg, world_size=1)
    assert run_dir(cfg) == tmp_path / "runs" / "mine"
    # The packaged configs' helpers stay known when a copy stops using them (absolute paths).
    cache = tmp_path / "cache"
    check_inputs(demo_config(tmp_path, f"model_dir={cache}/models/SmolLM2-135M-Instruct",
                             f"data_dir={cache}/data/python-docs", f"novels_dir={cache}/data/austen-novels",
                             f"output_dir={tmp_path}/run"), world_size=1)
    assert config_schema.packaged_helper_keys() == ("cache_dir", "model_dir", "data_dir", "novels_dir")
    found = problems_of(demo_config(tmp_path, "runs_root=/x"))  # defined, never used: a typo or a leftover
    assert found == [
        "runs_root: unknown top-level key, nothing reads it; a helper key of your own is fine once the config "
        "uses it through ${...}"
    ]


def test_broken_interpolation_is_a_problem_of_its_key(tmp_path):
    found = problems_of(demo_config(tmp_path, "adapt.stages=${no_such_key}"))
    assert len(found) == 1 and found[0].startswith("adapt.stages: cannot resolve its value")


# --------------------------------------------------------------------------- files


def test_missing_files_are_named_with_the_fix(tmp_path):
    cfg = demo_config(tmp_path)
    cache = tmp_path / "cache"
    (cache / "models/SmolLM2-135M-Instruct/model.safetensors").unlink()
    (cache / "data/python-docs/calibration.jsonl").unlink()
    (cache / "data/austen-novels").rmdir()
    cfg.tokenizer.path = str(tmp_path / "no-tokenizer")
    found = problems_of(cfg)
    assert len(found) == 4, found
    assert found[0].startswith("checkpointer: checkpoint files not found:") and "adapt-prune-tune prepare" in found[0]
    assert found[1].startswith(f"tokenizer.path not found: {tmp_path / 'no-tokenizer'}")
    assert found[2].startswith("pruning.calibration.dataset: data file(s) not found:") and "data_files" in found[2]
    assert found[3].startswith("heldout.texts.austen_novels.data_dir not found:")
    # The planner is told instead (a plan is made before the model is downloaded).
    warnings: List[str] = []
    check_inputs(cfg, world_size=1, warn=warnings.append)
    assert warnings == found


def test_teacher_of_another_family_and_its_missing_files_in_one_message(tmp_path):
    cfg = demo_config(
        tmp_path, "distill.enabled=True",
        "distill.teacher_checkpointer._component_=torchtune.training.FullModelHFCheckpointer",
        f"distill.teacher_checkpointer.checkpoint_dir={tmp_path}/qwen", "distill.teacher_checkpointer.model_type=QWEN2",
        "distill.teacher_checkpointer.checkpoint_files=[model.safetensors]",
    )
    found = problems_of(cfg)
    assert len(found) == 2
    assert "distill.teacher_checkpointer.model_type=QWEN2 is another architecture family" in found[0]
    assert found[1].startswith(f"distill.teacher_checkpointer: checkpoint files not found: checkpoint_dir {tmp_path}/qwen")


def test_builder_must_match_the_checkpoints_config(tmp_path):
    """A sibling's builder loads the same tensor shapes but is another network: refused, both named."""
    from adapt_prune_tune.checkpoint_checks import checkpoint_arch_problems
    from adapt_prune_tune.models import DEEPSEEK_R1_DISTILL_QWEN_1_5B

    deepseek = {
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 1536, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "max_position_embeddings": 131072,
    }
    (tmp_path / "config.json").write_text(json.dumps(deepseek))
    node = OmegaConf.create({"checkpoint_dir": str(tmp_path)})
    assert checkpoint_arch_problems(node, DEEPSEEK_R1_DISTILL_QWEN_1_5B) == []
    (tmp_path / "config.json").write_text(json.dumps({**deepseek, "tie_word_embeddings": True, "rope_theta": 1e6}))
    (problem,) = checkpoint_arch_problems(node, DEEPSEEK_R1_DISTILL_QWEN_1_5B)
    assert problem.startswith("model: the builder does not match") and "decoder_from_hf_config" in problem
    assert "tie_word_embeddings False (checkpoint: True)" in problem and "rope base 10000.0 (checkpoint: 1000000.0)" in problem
    assert "num_heads" not in problem
    # A RoPE scaling torchtune cannot build (Qwen2.5's long-context YaRN) is refused whatever the builder.
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps({**deepseek, "rope_scaling": yarn}))
    (problem,) = checkpoint_arch_problems(node, DEEPSEEK_R1_DISTILL_QWEN_1_5B)
    assert "Qwen2ForCausalLM config with rope_scaling of type 'yarn'" in problem and "not supported" in problem
    # No config.json, or one we cannot read: nothing to compare, nothing refused.
    (tmp_path / "config.json").write_text("{not json")
    assert checkpoint_arch_problems(node, DEEPSEEK_R1_DISTILL_QWEN_1_5B) == []


def test_llama3_rope_scaling_is_read_whole(tmp_path):
    """Meta's checkpoints share low/high frequency factors 1/4 and an 8,192-token original context;
    a derivative with others is another network, which the builder comparison names."""
    from adapt_prune_tune.checkpoint_checks import checkpoint_arch_problems
    from adapt_prune_tune.models import DecoderArch, RopeSpec, arch_from_hf_config, read_hf_arch
    from adapt_prune_tune.models._hf import UnsupportedHFConfig

    llama = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    }
    assert arch_from_hf_config(llama).rope == RopeSpec("llama3_scaled", 500000.0, 8.0)
    longer = {**llama, "rope_scaling": {**llama["rope_scaling"], "original_max_position_embeddings": 32768}}
    (tmp_path / "config.json").write_text(json.dumps(longer))
    assert read_hf_arch(tmp_path).rope.old_context_len == 32768
    # Meta's band is left out of arch.json (specs and fingerprints from before stay the same); others round-trip.
    assert set(arch_from_hf_config(llama).to_dict()["rope"]) == {"kind", "base", "scale_factor"}
    assert DecoderArch.from_dict(read_hf_arch(tmp_path).to_dict()) == read_hf_arch(tmp_path)
    (problem,) = checkpoint_arch_problems(OmegaConf.create({"checkpoint_dir": str(tmp_path)}), arch_from_hf_config(llama))
    assert "(8.0, 1.0, 4.0, 8192) (checkpoint: (8.0, 1.0, 4.0, 32768))" in problem
    with pytest.raises(UnsupportedHFConfig, match="'linear'"):
        arch_from_hf_config({**llama, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(UnsupportedHFConfig, match="hidden_act 'gelu'.*attention_bias"):
        arch_from_hf_config({**llama, "hidden_act": "gelu", "attention_bias": True})


def test_formatted_checkpoint_files_are_expanded(tmp_path):
    cfg = demo_config(tmp_path)
    cfg.checkpointer.checkpoint_files = {"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00002"}
    found = problems_of(cfg)
    assert "model-00001-of-00002.safetensors" in found[0] and "model-00002-of-00002.safetensors" in found[0]


def test_every_shard_the_index_names_must_be_listed(tmp_path):
    """One shard of two listed: torchtune would load half the weights, then fail on the missing keys."""
    cfg = demo_config(tmp_path)
    ckpt_dir = Path(cfg.checkpointer.checkpoint_dir)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for shard in shards:
        save_file({}, str(ckpt_dir / shard))
    (ckpt_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {f"w{i}": shard for i, shard in enumerate(shards * 2)}}))
    cfg.checkpointer.checkpoint_files = shards[:1]
    found = [p for p in problems_of(cfg) if "checkpoint_files lists" in p]
    assert found == [
        f"checkpointer: checkpoint_files lists 1 of the 3 files {ckpt_dir}/model.safetensors.index.json names; the "
        "weights in model-00002-of-00003.safetensors, model-00003-of-00003.safetensors would be missing. List "
        "every shard (in the config file: `checkpoint_files: {filename_format: 'model-{}-of-{}.safetensors', "
        "max_filename: '00003'}`)"]
    cfg.checkpointer.checkpoint_files = {"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00003"}
    check_inputs(cfg, world_size=1)


def test_a_metric_logger_without_its_package_is_named(tmp_path, monkeypatch):
    """torchtune imports wandb (tensorboard, comet_ml, mlflow) when the stock setup builds the
    logger, after the data was read."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = demo_config(tmp_path, "metric_logger._component_=torchtune.training.metric_logging.WandBLogger")
    assert [p for p in problems_of(cfg) if p.startswith("metric_logger")] == [
        "metric_logger: torchtune.training.metric_logging.WandBLogger logs through `wandb`, which is not installed: "
        "`pip install wandb`, or log to files with metric_logger._component_=torchtune.training.metric_logging.DiskLogger"]
    cfg = demo_config(tmp_path, "metric_logger._component_=torchtune.training.metric_logging.WandLogger")
    (problem,) = [p for p in problems_of(cfg) if p.startswith("metric_logger")]
    assert problem.startswith("metric_logger: torchtune.training.metric_logging.WandLogger cannot be found: ")


def test_an_output_dir_inside_the_checkpoint_dir_is_named_before_loading(tmp_path):
    """torchtune's checkpointer refused it from its constructor, with a ValueError traceback."""
    cfg = demo_config(tmp_path)
    inside = Path(cfg.checkpointer.checkpoint_dir) / "runs" / "pruned"
    cfg = demo_config(tmp_path, f"output_dir={inside}")
    assert problems_of(cfg) == [
        f"checkpointer.output_dir {inside} is inside its checkpoint_dir {inside.parent.parent}, which torchtune's "
        f"checkpointers refuse: choose an output_dir outside {inside.parent.parent} (configs set "
        "checkpointer.output_dir: ${output_dir})"]


@pytest.mark.parametrize("has_output, model_type, expected", [
    (True, "LLAMA3", "holds output.weight and model_type LLAMA3 keeps it, but the model ties its output to the "
                     "embeddings: set checkpointer.model_type=LLAMA3_2"),
    (False, "LLAMA3_2", "model_type LLAMA3_2 makes the Meta checkpointer drop output.weight, which"),
    (True, "LLAMA3_2", None),
    (False, "LLAMA3", None),
])
def test_a_meta_checkpoints_output_weight_is_checked_against_tied_embeddings(tmp_path, has_output, model_type, expected):
    """torchtune's Meta checkpointer failed inside the load (KeyError: 'output.weight', or a NoneType
    error for a key the tied model lacks); the demo model ties its embeddings."""
    import torch

    meta = tmp_path / "meta"
    meta.mkdir()
    weights = {"tok_embeddings.weight": torch.zeros(4, 2), **({"output.weight": torch.zeros(4, 2)} if has_output else {})}
    torch.save(weights, meta / "consolidated.00.pth")
    cfg = demo_config(tmp_path, "checkpointer._component_=torchtune.training.FullModelMetaCheckpointer",
                      f"checkpointer.checkpoint_dir={meta}", "checkpointer.checkpoint_files=[consolidated.00.pth]",
                      f"checkpointer.model_type={model_type}")
    if expected is None:
        check_inputs(cfg)
    else:
        (problem,) = problems_of(cfg)
        assert problem.startswith("checkpointer: ") and expected in problem, problem


def test_cut_off_and_pointer_weight_files_are_named_before_loading(tmp_path):
    """An interrupted download, or a clone without git-lfs: torchtune found out while loading the
    weights ("Unable to load checkpoint"), after the files before it."""
    import torch

    cfg = demo_config(tmp_path)
    weights = Path(cfg.checkpointer.checkpoint_dir) / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(64, 8)}, str(weights))
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-100])
    assert [p for p in problems_of(cfg) if str(weights) in p] == [
        f"checkpointer: {weights} is cut off: {len(whole) - 100:,} of the {len(whole):,} bytes its header describes "
        "(an interrupted download or copy): download it again"]
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 269060552\n")
    (problem,) = [p for p in problems_of(cfg) if str(weights) in p]
    assert problem.startswith(f"checkpointer: {weights} is a Git LFS pointer (") and "`git lfs pull`" in problem
    weights.write_bytes(whole[:20])
    assert f"{weights} is cut off inside its header (20 bytes)" in " ".join(problems_of(cfg))


def test_a_tokenizer_file_left_as_a_git_lfs_pointer_is_named(tmp_path):
    pointer = tmp_path / "original" / "tokenizer.model"
    pointer.parent.mkdir()
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 2183982\n")
    node = OmegaConf.create({"_component_": "torchtune.models.llama3.llama3_tokenizer", "path": str(pointer)})
    _, (problem,) = data_checks.run_tokenizer(OmegaConf.create({"tokenizer": node}))
    assert problem.startswith("tokenizer: torchtune.models.llama3.llama3_tokenizer cannot be built: ")
    assert problem.endswith(f"; {pointer} is a Git LFS pointer, not the file: run `git lfs pull` in the model's "
                            "directory, or download with `tune download`")
    # A directory named as the path (HF tokenizers): the pointers in it are found too.
    assert data_checks.tokenizer_lfs_pointers(OmegaConf.create({"path": str(pointer.parent)})) == [pointer]


def test_checkpointer_model_type_and_key_layout_are_checked(tmp_path):
    """A model_type typo was a bare KeyError in the checkpointer's constructor; HF weights given to
    the Meta or torchtune checkpointer failed inside the weight load."""
    import torch
    from safetensors.torch import save_file

    from adapt_prune_tune.checkpoint_checks import weight_layout

    cfg = demo_config(tmp_path, "checkpointer.model_type=llama3_2")
    found = [p for p in problems_of(cfg) if "model_type" in p]
    assert found == ["checkpointer.model_type: 'llama3_2' is not a torchtune model type (did you mean LLAMA3_2? the "
                     "decoders this recipe prunes: LLAMA3, LLAMA3_2, QWEN2, MISTRAL)"]
    cfg = demo_config(tmp_path, "checkpointer._component_=torchtune.training.FullModelMetaCheckpointer")
    weights = Path(cfg.checkpointer.checkpoint_dir) / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2), "model.norm.weight": torch.zeros(2)}, str(weights))
    found = [p for p in problems_of(cfg) if "holds" in p]
    assert found == [f"checkpointer: {weights} holds Hugging Face weights (e.g. `model.embed_tokens.weight`), which "
                     "torchtune.training.FullModelMetaCheckpointer does not read: set "
                     "checkpointer._component_=torchtune.training.FullModelHFCheckpointer"]
    assert weight_layout(["tok_embeddings.weight", "layers.0.attention.wq.weight"]) == "meta"
    assert weight_layout(["tok_embeddings.weight", "layers.0.attn.q_proj.weight"]) == "torchtune"
    assert weight_layout(["norm.weight"]) is None


def test_a_file_extension_as_source_names_the_builder(tmp_path):
    """`source: jsonl` made datasets search the Hub for a dataset named jsonl (tens of seconds
    offline), then fail without naming the `json` builder."""
    found = problems_of(demo_config(tmp_path, "dataset.source=jsonl", "pruning.calibration.dataset.source=tsv"))
    assert "dataset.source: 'jsonl' is a file extension, not a datasets builder: jsonl files load with source: json" in found
    assert ('pruning.calibration.dataset.source: \'tsv\' is a file extension, not a datasets builder: tsv files load '
            'with source: csv and delimiter: "\\t"') in found


def test_output_dir_must_be_writable(tmp_path):
    (tmp_path / "a-file").write_text("")
    found = problems_of(demo_config(tmp_path, f"output_dir={tmp_path}/a-file/run"))
    assert found == [f"output_dir {tmp_path}/a-file/run cannot be created: {tmp_path}/a-file is not a directory; "
                     "choose another output_dir"]


def test_one_checkpoint_must_fit_on_the_disk(tmp_path, monkeypatch):
    class Usage:
        free = 1 << 30  # 1 GiB; SmolLM2 in fp32 with two AdamW moments needs 1.5 GiB

    monkeypatch.setattr(config_checks.shutil, "disk_usage", lambda path: Usage)
    found = problems_of(demo_config(tmp_path))
    assert len(found) == 1 and "1.00 GiB free, but one run checkpoint needs ~1.50 GiB" in found[0]
    assert "134,515,008 parameters × (4 + 2 × 4) bytes: weights + 2 AdamW moments); the run keeps up to 3" in found[0]
    # Prune only: no optimizer state, the weights alone fit.
    check_inputs(demo_config(tmp_path, "adapt.total_tokens=null", "adapt.total_steps=0"), world_size=1)


PACKED_TEXT = ("dataset._component_=adapt_prune_tune.packing.packed_text_dataset", "dataset.packed=True",
               "dataset.max_tokens=100000000", "dataset.cache_dir=${output_dir}/packs")


def test_the_packed_text_must_fit_on_the_disk_too(tmp_path, monkeypatch):
    class Usage:
        free = 1.8 * (1 << 30)  # the checkpoint's 1.5 GiB fit; with 100 M tokens of packs (0.56 GiB) they do not

    monkeypatch.setattr(config_checks.shutil, "disk_usage", lambda path: Usage)
    found = problems_of(demo_config(tmp_path, *PACKED_TEXT))
    assert len(found) == 1 and "one run checkpoint needs ~1.50 GiB" in found[0]
    assert "and the packed training text another ~0.56 GiB (6 bytes a token)" in found[0]
    (tmp_path / "a-file").write_text("")
    found = problems_of(demo_config(tmp_path, *PACKED_TEXT, f"dataset.cache_dir={tmp_path}/a-file/packs"))
    assert found == [f"dataset.cache_dir {tmp_path}/a-file/packs cannot be written ({tmp_path}/a-file is not a "
                     "writable directory): choose another cache_dir, or null for no file (every rank then packs its own)"]


# --------------------------------------------------------------------------- earlier runs in output_dir


def finished_run(out: Path) -> None:
    """What a run leaves: a complete checkpoint, final/, the record, the report and its figures, logs."""
    (out / "checkpoints/step_0000004_prune_0002").mkdir(parents=True)
    (out / "checkpoints/step_0000004_prune_0002/COMPLETE").write_text("ok\n")
    (out / "checkpoints/latest").write_text("step_0000004_prune_0002\n")
    (out / "final").mkdir()
    (out / "final/arch.json").write_text("{}")
    (out / "run_record.json").write_text("{}")
    (out / "report.md").write_text("# Run\n\n![widths](layer_widths.png)\n![loss](training.png)\n")
    (out / "layer_widths.png").write_bytes(b"png")
    (out / "training.png").write_bytes(b"png")
    (out / "logs").mkdir()
    (out / "logs/log_1.txt").write_text("step 1\n")
    (out / "notes.txt").write_text("mine")


@pytest.mark.parametrize("leftover", ["checkpoints", "final", "run_record.json"])
def test_fresh_run_in_a_run_dir_is_refused(tmp_path, leftover):
    cfg = demo_config(tmp_path)
    out = run_dir(cfg)
    finished_run(out)
    for other in {"checkpoints", "final", "run_record.json"} - {leftover}:
        path = out / other
        config_checks.shutil.rmtree(path) if path.is_dir() else path.unlink()
    found = problems_of(cfg)
    assert found == [
        f"output_dir {out} already holds a run ({leftover}): set resume_from_checkpoint=True to continue it, "
        "overwrite_output_dir=True to replace it (its checkpoints/, final/, run_record.json and report are deleted "
        "before the new run starts), or choose another output_dir"
    ]


def test_incomplete_checkpoints_alone_are_not_a_run(tmp_path):
    cfg = demo_config(tmp_path)
    (run_dir(cfg) / "checkpoints/step_0000004_prune_0002.tmp").mkdir(parents=True)  # killed during its first save
    check_inputs(cfg, world_size=1)


def test_overwrite_deletes_the_old_run_after_the_checks(tmp_path, monkeypatch, caplog):
    cfg = demo_config(tmp_path, "overwrite_output_dir=True")
    out = run_dir(cfg)
    finished_run(out)
    check_inputs(cfg, world_size=1)
    assert (out / "run_record.json").exists()  # checking deletes nothing
    monkeypatch.setenv("RANK", "1")
    assert clear_previous_run(cfg) == []  # rank 0 alone deletes
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level("WARNING"):
        removed = clear_previous_run(cfg)
    assert sorted(p.name for p in removed) == [
        "checkpoints", "final", "layer_widths.png", "report.md", "run_record.json", "training.png"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["logs", "notes.txt"]  # the metric logs and the user's files stay
    assert "overwrite_output_dir=True: deleted the previous run's checkpoints, final, run_record.json" in caplog.text
    # Without the flag nothing is touched.
    finished_run(tmp_path / "other")
    assert clear_previous_run(demo_config(tmp_path, f"output_dir={tmp_path}/other")) == []
    assert (tmp_path / "other/run_record.json").exists()


def test_resume_needs_a_complete_checkpoint(tmp_path):
    cfg = demo_config(tmp_path, "resume_from_checkpoint=True")
    assert problems_of(cfg) == [
        f"resume_from_checkpoint=True but {run_dir(cfg) / 'checkpoints'} holds no complete checkpoint; "
        "start without resume_from_checkpoint"
    ]
    finished_run(run_dir(cfg))
    check_inputs(cfg, world_size=1)  # resuming a run in its own output_dir is the point


# --------------------------------------------------------------------------- the table itself


def test_dataclasses_validate_through_the_table():
    assert PRUNING_METHOD.names == [f.name for f in fields(PruningConfig)]
    defaults = {f.name: f.default for f in fields(PruningConfig)}
    assert PRUNING_METHOD.defaults() == defaults
    assert {k: DISTILL.defaults()[k] for k in (f.name for f in fields(DistillConfig))} == asdict(DistillConfig())
    with pytest.raises(ValueError) as err:
        PruningConfig(target_sparsity=0.2, scorer="hessian", amplitude=-1)
    assert str(err.value) == "; ".join(PRUNING_METHOD.problems({**defaults, "target_sparsity": 0.2,
                                                                 "scorer": "hessian", "amplitude": -1}))
    with pytest.raises(ValueError, match=r"did you mean distill\.alpha\?"):
        DistillConfig.from_section({"enabled": True, "alpah": 0.5})


def test_every_setting_is_documented_and_typed():
    paths = [s.path for s in SECTIONS]
    assert paths == ["", "pruning.method", "pruning.calibration", "adapt", "heldout", "distill", "speed"]
    for section in SECTIONS:
        for s in section.settings:
            assert s.doc and s.kind in config_schema.KINDS, (section.path, s.name)
            if not s.required and s.default is not None:
                assert s.problem(section.key(s.name), s.default) is None, (section.path, s.name)


def test_stock_keys_are_what_torchtunes_recipe_reads():
    site = Path(torchtune.__file__).resolve().parent.parent
    read = set()
    for path in ("recipes/full_finetune_distributed.py", "torchtune/training/checkpointing/_checkpoint_client.py"):
        text = (site / path).read_text()
        read |= set(re.findall(r"(?:\bcfg|self\._cfg)\.get\(\s*\"(\w+)\"", text))  # profiler_cfg.get: not top level
        read |= set(re.findall(r"(?:\bcfg|self\._cfg)\.(\w+)\b(?!\()", text))
    assert "batch_size" in read and "enable_activation_offloading" in read  # the multi-line calls too
    assert read <= set(STOCK_KEYS), sorted(read - set(STOCK_KEYS))


def test_every_top_level_key_our_recipe_reads_is_known():
    """A new section the recipe reads must join the table, or every config using it would be refused."""
    text = (Path(__file__).resolve().parent.parent / "recipes" / "adapt_prune_recipe.py").read_text()
    read = set(re.findall(r"(?:\bcfg|self\._cfg)\.get\(\s*\"(\w+)\"", text))
    read |= set(re.findall(r"(?:\bcfg|self\._cfg)\.(\w+)\b(?!\()", text))
    assert {"pruning", "adapt", "heldout", "distill"} <= read
    assert read <= set(config_schema.known_top_level_keys()), sorted(read - set(config_schema.known_top_level_keys()))


def test_readme_reference_is_the_rendered_table():
    assert readme_reference(README.read_text(encoding="utf-8")) == render_markdown(), (
        "README.md's config reference is stale: run python -m adapt_prune_tune.config_schema --update-readme README.md"
    )


def test_reference_names_every_key(tmp_path, capsys):
    text = render_markdown()
    for section in SECTIONS:
        for s in section.settings:
            assert f"| `{s.name}` |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{MARKERS[0]}\nold\n{MARKERS[1]}\n\n## After\n")
    config_schema.main(["--update-readme", str(readme)])
    assert readme_reference(readme.read_text()) == text and readme.read_text().endswith(f"{MARKERS[1]}\n\n## After\n")
    config_schema.main(["--markdown"])
    assert text in capsys.readouterr().out


# --------------------------------------------------------------------------- the data, read


def data_config(tmp_path: Path, smollm2_dir: Path, python_docs_dir: Path, *overrides: str):
    """The demo config on the real tokenizer and corpus (the fake cache's files are empty)."""
    return demo_config(tmp_path, f"model_dir={smollm2_dir}", f"data_dir={python_docs_dir}", *overrides)


def instruct_file(tmp_path: Path, python_docs_dir: Path, prompt_chars: int) -> Path:
    """Instruction pairs from the corpus: a prompt of ``prompt_chars`` characters, then a response."""
    rows = [json.loads(line) for line in (python_docs_dir / "train.jsonl").read_text().splitlines()[:50]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"input": (r["text"] * 20)[:prompt_chars], "output": r["text"][:200]}) + "\n"
                            for r in rows))
    return path


def test_data_that_cannot_be_read_is_refused_before_the_model_loads(tmp_path, smollm2_dir, python_docs_dir):
    ok = data_config(tmp_path, smollm2_dir, python_docs_dir)
    assert data_checks.dataset_problems(ok) == []
    found = data_checks.dataset_problems(data_config(tmp_path, smollm2_dir, python_docs_dir, "dataset.column=content"))
    assert found == ["dataset: its first sample cannot be read: KeyError: 'content' (the data's columns: "
                     "['text', 'path', 'chunk']; check dataset.column / column_map)"]
    found = data_checks.dataset_problems(data_config(
        tmp_path, smollm2_dir, python_docs_dir, "dataset._component_=torchtune.datasets.chat_dataset"))
    assert len(found) == 1 and found[0].startswith("dataset: torchtune.datasets.chat_dataset cannot be built: TypeError")
    found = data_checks.dataset_problems(data_config(
        tmp_path, smollm2_dir, python_docs_dir, "pruning.calibration.num_samples=4000"))
    assert found == ["Calibration data has 27,705 tokens but pruning.calibration asks for 4000 × 128 = 512,000; lower "
                     "num_samples/seq_len or add data (each sample is cut at tokenizer.max_seq_len = 256 tokens "
                     "before the windows are drawn)"]


def test_rows_without_text_are_refused_unless_filtered(tmp_path, smollm2_dir, python_docs_dir):
    """A missing field in row 7 of the data reads fine at row 0 and would stop the run at row 7."""
    from torchtune.datasets import text_completion_dataset

    from adapt_prune_tune.tokenizer import smollm2_tokenizer

    docs = [json.loads(line)["text"] for line in (python_docs_dir / "train.jsonl").read_text().splitlines()[:40]]
    holes = tmp_path / "holes.jsonl"
    holes.write_text("".join(json.dumps({"text": None if i in (7, 21) else ("" if i == 3 else doc)}) + "\n"
                             for i, doc in enumerate(docs)))
    for key in ("dataset", "pruning.calibration.dataset"):
        found = data_checks.dataset_problems(data_config(tmp_path, smollm2_dir, python_docs_dir,
                                                           f"{key}.data_files={holes}"))
        assert found == [
            f"{key}: column 'text' is empty (null) in 2 of 40 rows (row 7, 21): the run would stop at the first "
            "of them; drop those rows from the data (e.g. `datasets.load_dataset(...).filter(lambda row: "
            "row['text'] is not None)`, saved locally)"]
    tokenizer = smollm2_tokenizer(str(smollm2_dir))
    kept = text_completion_dataset(tokenizer, source="json", data_files=str(holes), split="train",
                                   filter_fn=lambda row: row["text"] is not None)
    assert len(kept) == 38 and data_checks.null_rows_problem("dataset", kept) is None
    pairs = tmp_path / "pairs.jsonl"  # an instruct dataset reads its column_map's columns
    pairs.write_text("".join(json.dumps({"q": doc[:100], "a": None if i == 5 else doc[:50], "unused": None}) + "\n"
                             for i, doc in enumerate(docs)))
    found = data_checks.dataset_problems(data_config(
        tmp_path, smollm2_dir, python_docs_dir, "dataset._component_=torchtune.datasets.instruct_dataset",
        "~dataset.column", f"dataset.data_files={pairs}", "dataset.column_map={input: q, output: a}"))
    assert len(found) == 1 and found[0].startswith("dataset: column 'a' is empty (null) in 1 of 40 rows (row 5)")


def test_text_files_read_line_by_line_are_warned_about_with_the_fix(tmp_path, smollm2_dir, python_docs_dir):
    """Documents in .txt files: datasets' text builder makes every line a document of its own, which
    trains on one line of context; a warning (the run goes on) names sample_by. One document per line
    (few blank rows) and the calibration text (windows cross rows) are left alone."""
    docs = [json.loads(line)["text"] for line in (python_docs_dir / "train.jsonl").read_text().splitlines()[:60]]
    prose = tmp_path / "docs.txt"
    prose.write_text("\n\n".join(docs))
    per_line = tmp_path / "lines.txt"
    per_line.write_text("\n".join(" ".join(doc.split()) for doc in docs))
    text = ("dataset.source=text", "dataset.column=text")

    def warnings(*overrides: str) -> List[str]:
        found: List[str] = []
        cfg = data_config(tmp_path, smollm2_dir, python_docs_dir, *text, *overrides)
        assert data_checks.dataset_problems(cfg, warn=found.append) == []
        return found

    (found,) = warnings(f"dataset.data_files={prose}")
    assert found.startswith("dataset: datasets' `text` builder reads one row per line")
    assert "are blank lines" in found and "dataset.sample_by=paragraph" in found and "sample_by=document" in found
    assert warnings(f"dataset.data_files={prose}", "dataset.sample_by=paragraph") == []
    assert warnings(f"dataset.data_files={per_line}") == []
    calibration = ("pruning.calibration.dataset.source=text", f"pruning.calibration.dataset.data_files={prose}")
    assert warnings(f"dataset.data_files={per_line}", *calibration) == []


def test_packed_documents_cut_at_max_seq_len_are_warned_about_with_the_fix(tmp_path, smollm2_dir, python_docs_dir):
    """Packed at max_seq_len 32, most of the corpus's documents lose most of their tokens: said,
    with packed_text_dataset's split_long_documents, which, set, keeps them and says nothing.
    Unpacked samples are cut by design (the demo config's) and not warned about."""
    def warnings(*overrides: str) -> List[str]:
        found: List[str] = []
        cfg = data_config(tmp_path, smollm2_dir, python_docs_dir, "tokenizer.max_seq_len=32", *overrides)
        assert data_checks.dataset_problems(cfg, warn=found.append) == []
        return found

    assert warnings() == []
    (found,) = warnings("dataset.packed=True")
    assert re.match(r"dataset: \d+ of \d+ sampled documents are longer than tokenizer.max_seq_len = 32 tokens and are "
                    r"cut there, dropping \d+% of the sampled text's tokens", found)
    assert found.endswith("pack with dataset._component_=adapt_prune_tune.packing.packed_text_dataset and "
                          "dataset.split_long_documents=True")
    ours = ("dataset._component_=adapt_prune_tune.packing.packed_text_dataset", "dataset.packed=True")
    (found,) = warnings(*ours)
    assert found.endswith("set dataset.split_long_documents=True to pack them whole, in pieces of 32 tokens")
    assert warnings(*ours, "dataset.split_long_documents=True") == []


def test_training_data_without_a_label_token_is_refused(tmp_path, smollm2_dir, python_docs_dir):
    """Instruction pairs whose prompts fill max_seq_len leave no response token to train on."""
    instruct = ("dataset._component_=torchtune.datasets.instruct_dataset", "~dataset.column")
    long = instruct_file(tmp_path, python_docs_dir, prompt_chars=4000)
    found = data_checks.dataset_problems(data_config(tmp_path, smollm2_dir, python_docs_dir, *instruct,
                                                       f"dataset.data_files={long}"))
    assert len(found) == 1 and found[0].startswith(
        "dataset: none of the sampled examples has a label token to train on (responses cut off at "
        "tokenizer.max_seq_len = 256 tokens?)")
    short = instruct_file(tmp_path, python_docs_dir, prompt_chars=200)
    assert data_checks.dataset_problems(data_config(tmp_path, smollm2_dir, python_docs_dir, *instruct,
                                                      f"dataset.data_files={short}")) == []


def test_another_models_tokenizer_is_refused_by_its_token_ids(tmp_path, smollm2_dir, python_docs_dir):
    """SmolLM2's tokenizer against a 1,000-token embedding: ids past it would index out of range
    in the first calibration pass, after the weights loaded."""
    cfg = data_config(tmp_path, smollm2_dir, python_docs_dir)
    assert data_checks.dataset_problems(cfg, vocab_size=49152) == []
    found = data_checks.dataset_problems(cfg, vocab_size=1000)
    assert [p.split(":")[0] for p in found] == ["dataset", "pruning.calibration.dataset"]
    assert all("outside the model's 1,000 embeddings" in p and "is not this model's tokenizer" in p for p in found)


def test_a_device_this_machine_lacks_is_refused(tmp_path):
    import torch

    assert config_checks.device_problems(demo_config(tmp_path)) == []
    (problem,) = config_checks.device_problems(demo_config(tmp_path, "device=cuda:0" if not torch.cuda.is_available()
                                                           else "device=nonsense"))
    assert "set device=cpu" in problem or "is not a torch device" in problem
