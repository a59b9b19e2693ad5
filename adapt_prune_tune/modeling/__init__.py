"""Hugging Face modeling code shipped inside compact exports (see ``modeling_adapt``).

The two modules are copied verbatim into each compact export directory and
named in its ``config.json`` ``auto_map``, so the export loads anywhere with
``trust_remote_code=True`` and without this package installed.
"""

from pathlib import Path

from adapt_prune_tune.modeling.configuration_adapt import (
    AdaptLlamaConfig,
    AdaptQwen2Config,
    layer_widths,
)

#: The files an export needs next to its config.json.
SHIPPED_FILES = tuple(
    Path(__file__).with_name(name) for name in ("configuration_adapt.py", "modeling_adapt.py")
)

__all__ = ["AdaptLlamaConfig", "AdaptQwen2Config", "SHIPPED_FILES", "layer_widths"]
