"""Packaged recipe configs, addressable by name like torchtune's own.

``tune run adapt_prune_recipe --config llama3_1/8B_adapt`` hands the string
``llama3_1/8B_adapt`` to our recipe unchanged (torchtune only resolves names
of its own registered recipes), so the recipe resolves it here: an existing
file path wins, otherwise ``<name>.yaml`` is looked up among these configs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List


def available() -> List[str]:
    """Names of the packaged configs, e.g. ``smollm2/135M_adapt``."""
    root = resources.files(__name__)
    names = []
    for family in root.iterdir():
        if family.is_dir() and not family.name.startswith("_"):
            names += [f"{family.name}/{f.name[:-5]}" for f in family.iterdir() if f.name.endswith(".yaml")]
    return sorted(names)


def resolve(name: str) -> Path:
    """Path of a config given as a file path or a packaged config name."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    stem = name[:-5] if name.endswith(".yaml") else name
    candidate = resources.files(__name__).joinpath(f"{stem}.yaml")
    if candidate.is_file():
        return Path(str(candidate))
    raise FileNotFoundError(
        f"Config {name!r} is neither a file nor a packaged config. "
        f"Packaged configs: {', '.join(available())}. "
        "Copy one with `adapt-prune-tune cp NAME my.yaml` to customize it."
    )
