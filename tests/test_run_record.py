"""Figures derived from a run record, for records of every age."""

import json

import pytest

from adapt_prune_tune import configs
from adapt_prune_tune.run_record import (
    HeldoutPoint,
    heldout_series,
    launcher_prefix,
    load_record,
    perplexity_by_text,
    prune_share,
    reproduce_command,
    speed_ratios,
    training_tokens,
)

STAGES = [
    {"stage": 1, "tokens": 100, "seconds_prune": 2.0, "heldout_ppl_after_prune": 16.0, "heldout_ppl_after_train": 15.0},
    {"stage": 2, "tokens": 300, "seconds_prune": 3.0, "heldout_ppl_after_prune": 18.0, "heldout_ppl_after_train": 16.5},
]


def test_spent():
    record = {"stages": STAGES, "seconds_run": 50.0}
    assert training_tokens(record) == 400
    assert prune_share(record) == pytest.approx(0.1)
    assert training_tokens({}) is None and prune_share({"stages": STAGES}) is None


def test_heldout_series_of_an_old_record_is_rebuilt_from_its_stages():
    record = {"stages": STAGES, "perplexity": {"original": 14.0, "pruned": 18.0, "recovered": 16.5}}
    assert heldout_series(record) == {
        "heldout": [
            HeldoutPoint(0, 14.0, "original", 0),
            HeldoutPoint(0, 16.0, "pruned", 1),
            HeldoutPoint(100, 15.0, "trained", 1),
            HeldoutPoint(100, 18.0, "pruned", 2),
            HeldoutPoint(400, 16.5, "trained", 2),
        ]
    }
    assert perplexity_by_text(record) == {"heldout": {"original": 14.0, "pruned": 18.0, "recovered": 16.5}}
    # The text's name comes from the held-out settings when they list it.
    record["heldout"] = {"texts": ["python_docs"]}
    assert list(heldout_series(record)) == ["python_docs"] == list(perplexity_by_text(record))
    assert heldout_series({"stages": [{"stage": 1}]}) == {} and perplexity_by_text({}) == {}


def test_heldout_series_from_the_log_has_every_text():
    log = [
        {"step": 0, "tokens": 0, "stage": 0, "event": "original", "ppl": {"a": 10.0, "b": 20.0}},
        {"step": 0, "tokens": 0, "stage": 1, "event": "pruned", "ppl": {"a": 12.0, "b": 25.0}},
        {"step": 3, "tokens": 376, "stage": 1, "event": "checkpoint", "ppl": {"a": 11.0, "b": 22.0}},
    ]
    series = heldout_series({"heldout_log": log, "stages": STAGES})
    assert [p.tokens for p in series["b"]] == [0, 0, 376]
    assert [p.event for p in series["a"]] == ["original", "pruned", "checkpoint"]


def test_speed_ratios_new_and_old_records():
    speed = {
        "original": {"forward_tokens_per_second": 100.0, "generate_tokens_per_second": 10.0,
                     "generate_peak_memory_bytes": 1000},
        "pruned": {"forward_tokens_per_second": 150.0, "generate_tokens_per_second": 12.0,
                   "generate_peak_memory_bytes": 800},
    }
    assert speed_ratios({"speed": speed}) == pytest.approx({"forward": 1.5, "generate": 1.2, "memory": 0.8})
    old = {"throughput": {"original_tokens_per_second": 100.0, "pruned_tokens_per_second": 120.0}}
    assert speed_ratios(old) == pytest.approx({"forward": 1.2})
    assert speed_ratios({}) == {}


def test_reproduce_command_shows_what_the_user_typed():
    record = {
        "config_name": "smollm2/135M_adapt",
        "overrides": ["adapt.total_tokens=80_000", "output_dir=/tmp/my run"],
        "command": "/site/recipes/adapt_prune_recipe.py --config /site/configs/smollm2/135M_adapt.yaml",
    }
    assert reproduce_command(record) == (
        "tune run adapt_prune_recipe --config smollm2/135M_adapt adapt.total_tokens=80_000 'output_dir=/tmp/my run'"
    )
    record["launch"] = {"nnodes": 1, "nproc_per_node": 8}
    assert reproduce_command(record).startswith("tune run --nproc_per_node 8 adapt_prune_recipe --config")
    record["launch"] = {"nnodes": 2, "nproc_per_node": 8}
    assert reproduce_command(record).startswith("tune run --nnodes 2 --nproc_per_node 8 adapt_prune_recipe")


def test_launcher_prefix_keeps_the_launchers_flags():
    rdzv = ["--nnodes", "4", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint", "head:29500"]
    tune = ["/venv/bin/python", "/venv/bin/tune", "run", *rdzv, "adapt_prune_recipe", "--config", "x", "a=1"]
    assert launcher_prefix(tune) == ["tune", "run", *rdzv, "adapt_prune_recipe"]
    torchrun = ["/usr/bin/python3", "-m", "torch.distributed.run", "--signals_to_handle", "SIGTERM,SIGUSR1",
                "--nproc_per_node", "2", "recipes/adapt_prune_recipe.py", "--config", "x"]
    assert launcher_prefix(torchrun) == ["torchrun", *torchrun[3:8]]
    assert launcher_prefix(["torchrun", "--standalone", "-m", "adapt_prune_recipe", "--config", "x"]) == [
        "torchrun", "--standalone", "-m", "adapt_prune_recipe"]
    # Neither launcher, or no recipe on the line: the record keeps the world's shape only.
    assert launcher_prefix(["srun", "python", "train.py"]) is None
    assert launcher_prefix(["/venv/bin/tune", "run", "full_finetune_distributed"]) is None
    record = {"config_name": "llama3_1/8B_adapt", "overrides": ["seed=1"],
              "launch": {"nnodes": 4, "nproc_per_node": 8, "prefix": launcher_prefix(tune)}}
    assert reproduce_command(record) == (
        "tune run " + " ".join(rdzv) + " adapt_prune_recipe --config llama3_1/8B_adapt seed=1")
    assert reproduce_command(record, launcher_flags=False) == (
        "tune run --nnodes 4 --nproc_per_node 8 adapt_prune_recipe --config llama3_1/8B_adapt seed=1")


def test_reproduce_command_of_records_without_the_config_name():
    packaged = configs.resolve("smollm2/135M_adapt")
    record = {"command": f"/x/recipes/adapt_prune_recipe.py --config {packaged} heldout=null"}
    assert reproduce_command(record) == "tune run adapt_prune_recipe --config smollm2/135M_adapt heldout=null"
    record = {"command": "adapt_prune_recipe --config /tmp/kd1/config.yaml"}
    assert reproduce_command(record) == "tune run adapt_prune_recipe --config /tmp/kd1/config.yaml"
    assert reproduce_command({"command": "python something.py"}) == "python something.py"
    assert reproduce_command({}) is None


def test_load_record(tmp_path):
    (tmp_path / "run_record.json").write_text(json.dumps({"seconds_run": 1.0}))
    assert load_record(tmp_path) == load_record(tmp_path / "run_record.json") == {"seconds_run": 1.0}
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_record(tmp_path / "missing")
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has not finished .* resume_from_checkpoint=True"):
        load_record(unfinished)
