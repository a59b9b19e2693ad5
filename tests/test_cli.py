"""The helper commands that manage packaged configs: ``ls`` and ``cp``."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from adapt_prune_tune import configs
from adapt_prune_tune.cli import main


def test_ls_lists_the_packaged_configs(capsys):
    main(["ls"])
    listed = capsys.readouterr().out
    assert "smollm2/135M_adapt" in listed and "llama3_1/8B_adapt" in listed


def test_cp_to_a_file_or_into_a_directory_and_never_over_a_file_unasked(tmp_path):
    main(["cp", "smollm2/135M_adapt", str(tmp_path / "mine.yaml")])
    assert OmegaConf.load(tmp_path / "mine.yaml") == OmegaConf.load(configs.resolve("smollm2/135M_adapt"))
    main(["cp", "smollm2/135M_adapt", str(tmp_path)])  # as cp and `tune cp`: under its own name
    assert (tmp_path / "135M_adapt.yaml").is_file()
    (tmp_path / "mine.yaml").write_text("edited: true\n")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["cp", "smollm2/135M_adapt", str(tmp_path / "mine.yaml")])
    assert (tmp_path / "mine.yaml").read_text() == "edited: true\n"
    main(["cp", "smollm2/135M_adapt", str(tmp_path / "mine.yaml"), "--overwrite"])
    assert "pruning" in OmegaConf.load(tmp_path / "mine.yaml")
    with pytest.raises(SystemExit, match="does not exist; create it"):
        main(["cp", "smollm2/135M_adapt", str(tmp_path / "no" / "such.yaml")])


@pytest.mark.parametrize("command", [["report", "RUN"], ["compare", "RUN", "RUN"]])
def test_an_out_that_is_a_file_is_named_before_any_work(tmp_path, command):
    (tmp_path / "notes.md").write_text("mine")
    args = [str(tmp_path / "run") if a == "RUN" else a for a in command]
    with pytest.raises(SystemExit, match="is a file, not a directory"):
        main([*args, "--out", str(tmp_path / "notes.md")])
    assert (tmp_path / "notes.md").read_text() == "mine"
