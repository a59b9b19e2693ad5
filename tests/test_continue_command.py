"""The command a stopped or failed run prints to continue it."""

import socket

import pytest


@pytest.fixture
def launched(monkeypatch):
    import adapt_prune_recipe as apr

    def launch(nnodes: int, prefix=None, overrides=("output_dir=/runs/a", "overwrite_output_dir=True")):
        shape = {"nnodes": nnodes, "nproc_per_node": 8, **({"prefix": prefix} if prefix else {})}
        monkeypatch.setattr(apr, "_LAUNCH", {"config_name": "llama3_1/8B_adapt", "overrides": list(overrides),
                                             "launch": shape})
        return apr

    return launch


def test_one_node_gets_the_launch_line_resuming(launched):
    apr = launched(1)
    assert apr._continue_command() == ("tune run --nproc_per_node 8 adapt_prune_recipe --config llama3_1/8B_adapt "
                                       "output_dir=/runs/a resume_from_checkpoint=True")  # overwrite would delete it
    assert apr._continue_command({"batch_size": 2}, resume=False).endswith("output_dir=/runs/a batch_size=2")


def test_several_nodes_are_told_each_runs_its_own_launch_line(launched):
    prefix = ["tune", "run", "--nnodes", "2", "--nproc_per_node", "8", "--node_rank", "0",
              "--master_addr", "n0", "adapt_prune_recipe"]
    apr = launched(2, prefix)
    command = apr._continue_command({"pruning.calibration.batch_size": 16})
    assert command.startswith("tune run --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr n0 adapt_prune_recipe")
    assert command.endswith(
        f"(that is {socket.gethostname()}'s launch line: on each of the 2 nodes run its own with "
        "pruning.calibration.batch_size=16 resume_from_checkpoint=True)"
    )
