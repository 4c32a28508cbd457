"""Typed configuration: nested dataclasses, presets as plain functions, YAML in and out.

Every field has a type and a default; loading a dict/YAML or applying ``key=value`` overrides
checks each key and value against them, so a typo or a wrong type fails at load time with the
dotted name of the key (and a suggestion), never later inside the model.

``get_config(name)`` returns a preset (see :data:`PRESETS`) or loads a YAML file. A YAML file may
start from a preset or another file with ``_base_: <preset or path>`` and list only what differs.

The package: ``choices`` (allowed values), ``schema`` (the dataclasses), ``loading`` (YAML,
overrides, checks), ``presets``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from maskrcnn.config.choices import NORMS
from maskrcnn.config.loading import apply_overrides, check_config, load_yaml, merge
from maskrcnn.config.presets import PRESETS, torch_float32
from maskrcnn.config.schema import Config, ConfigError

__all__ = ["NORMS", "PRESETS", "Config", "ConfigError", "apply_overrides", "check_config", "get_config",
           "load_yaml", "merge", "torch_float32"]


def get_config(name: str, overrides: list[str] | None = None) -> Config:
    """A preset by name (``list(PRESETS)``) or a YAML file path, with optional ``key=value`` overrides."""
    if name in PRESETS:
        cfg = PRESETS[name]()
    elif name.endswith((".yaml", ".yml")) or Path(name).is_file():
        cfg = load_yaml(name)
    else:
        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        raise ConfigError(f"unknown config {name!r}: not a preset or a YAML file"
                          + (f"; did you mean {close}?" if close else f"; presets: {sorted(PRESETS)}"))
    return check_config(apply_overrides(cfg, overrides or []))
