"""Which Hub model a run started from, and under which license its derivatives ship.

A run only knows the local directory its base checkpoint was read from (the recipe records
``checkpointer.checkpoint_dir``); a model card needs the base model's Hub id (``base_model:``
links the two repositories) and its license (a pruned model is a derivative and inherits it).
The id is found, in order, from:

1. an explicit id (``publish --base-model org/name``);
2. a recorded value that already is an id;
3. ``_name_or_path`` in the checkpoint directory's ``config.json``, when it is an id;
4. the directory's name, when exactly one known base model has that name: ``tune download
   org/name --output-dir /tmp/name`` (the configs' headers) leaves ``/tmp/name``.

A local path never becomes ``base_model`` (on the Hub it is a broken link):
:func:`resolve_base_model` says which flag to pass instead. Licenses come from
:data:`KNOWN_BASE_MODELS` (the license ids the Hub uses); for other bases the user names one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple


@dataclass(frozen=True)
class License:
    """A Hub license entry: an id from the Hub's list, or ``other`` with a name and link."""

    id: str
    name: Optional[str] = None
    link: Optional[str] = None

    def front_matter(self) -> Dict[str, str]:
        """The card metadata keys (``license``, and ``license_name``/``license_link`` for other)."""
        entry = {"license": self.id}
        if self.name:
            entry["license_name"] = self.name
        if self.link:
            entry["license_link"] = self.link
        return entry


APACHE_2 = License("apache-2.0")


def _family(org: str, prefix: str, sizes: Iterable[str], license_: License) -> Dict[str, License]:
    return {f"{org}/{prefix}-{size}{suffix}": license_ for size in sizes for suffix in ("", "-Instruct")}


def _qwen_other(size: str, name: str) -> Dict[str, License]:
    return {
        f"Qwen/Qwen2.5-{size}{suffix}": License(
            "other", name, f"https://huggingface.co/Qwen/Qwen2.5-{size}{suffix}/blob/main/LICENSE"
        )
        for suffix in ("", "-Instruct")
    }


# Base models the configs name (and their siblings), with the license their Hub cards declare.
# Qwen2.5 is Apache-2.0 except the 3B (Qwen Research License) and 72B (Qwen License); DeepSeek's
# R1 distillations of Qwen2.5 ship under MIT.
KNOWN_BASE_MODELS: Dict[str, License] = {
    **_family("HuggingFaceTB", "SmolLM2", ("135M", "360M", "1.7B"), APACHE_2),
    **_family("meta-llama", "Llama-3.1", ("8B", "70B", "405B"), License("llama3.1")),
    **_family("meta-llama", "Llama-3.2", ("1B", "3B"), License("llama3.2")),
    **_family("Qwen", "Qwen2.5", ("0.5B", "1.5B", "7B", "14B", "32B"), APACHE_2),
    **_qwen_other("3B", "qwen-research"),
    **_qwen_other("72B", "qwen"),
    **{f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{size}": License("mit") for size in ("1.5B", "7B", "14B", "32B")},
}

# Former names the Hub still redirects (the configs download Meta-Llama-3.1-8B-Instruct).
ALIASES: Dict[str, str] = {
    f"meta-llama/Meta-{repo.split('/')[1]}": repo
    for repo in KNOWN_BASE_MODELS
    if repo.startswith("meta-llama/Llama-3.1")
}

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_repo_id(value: Optional[str]) -> bool:
    """``org/name`` and not a path on this machine (absolute, relative, or existing)."""
    if not value or not _REPO_ID.fullmatch(value) or ".." in value:
        return False
    return not Path(value).expanduser().exists()


def canonical_repo_id(repo_id: str) -> str:
    """The current name of a renamed known model; anything else unchanged."""
    return ALIASES.get(repo_id, repo_id)


def _id_from_config(directory: Path) -> Optional[str]:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    return canonical_repo_id(name) if looks_like_repo_id(name) else None


def _id_from_directory_name(directory: Path) -> Optional[str]:
    """The known base model whose repository name is the directory's name, if exactly one."""
    matches = {
        canonical_repo_id(repo)
        for repo in (*KNOWN_BASE_MODELS, *ALIASES)
        if repo.split("/")[1].lower() == directory.name.lower()
    }
    return matches.pop() if len(matches) == 1 else None


class BaseModelUnknown(ValueError):
    """The base model's Hub id could not be established; the message names the flag to pass."""


def resolve_base_model(
    *candidates: Optional[str], explicit: Optional[str] = None, flag: str = "--base-model"
) -> Tuple[Optional[str], str]:
    """The base model's Hub id and how it was found.

    Args:
        candidates: recorded values in order of trust: Hub ids or local checkpoint
            directories (a run's ``base_model``, its ``checkpointer.checkpoint_dir``).
        explicit: an id the user gave; wins, and must look like ``org/name``.
        flag: the option to name in errors.

    Returns:
        Tuple[Optional[str], str]: the id (None when nothing was recorded at all) and a
        short note (``"given"``, ``"recorded"``, ``"config.json of DIR"``, ``"name of DIR"``).

    Raises:
        BaseModelUnknown: ``explicit`` is not an id, or only local paths were recorded and
            neither their ``config.json`` nor their names identify a Hub model.
    """
    if explicit:
        if not looks_like_repo_id(explicit):
            raise BaseModelUnknown(f"{flag} {explicit!r} is not a Hub model id (org/name)")
        return canonical_repo_id(explicit), "given"
    paths = []
    for value in candidates:
        if not value:
            continue
        if looks_like_repo_id(value):
            return canonical_repo_id(value), "recorded"
        paths.append(Path(value).expanduser())
    for path in paths:
        found = _id_from_config(path)
        if found:
            return found, f"config.json of {path}"
    for path in paths:
        found = _id_from_directory_name(path)
        if found:
            return found, f"name of {path}"
    if paths:
        raise BaseModelUnknown(
            f"The run records its base model only as the local directory {paths[0]}, which is not a "
            f"Hub model id, and neither its config.json (_name_or_path) nor its name identifies one; "
            f"a card must not link a local path as base_model. Pass {flag} org/name (the id you "
            f"downloaded, e.g. `tune download org/name`)."
        )
    return None, "not recorded"


def license_for(base_model: Optional[str]) -> Optional[License]:
    """The license of a known base model (None for unknown or no base)."""
    return KNOWN_BASE_MODELS.get(canonical_repo_id(base_model)) if base_model else None


def parse_license(value: str) -> License:
    """A license as given on the command line: a Hub id (``mit``), or
    ``other:NAME[:LINK]`` for a license outside the Hub's list."""
    if value.startswith("other:"):
        _, _, rest = value.partition(":")
        name, _, link = rest.partition(":")
        return License("other", name or None, link or None)
    return License(value)
