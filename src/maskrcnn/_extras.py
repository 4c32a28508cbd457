"""Optional dependencies (the pip extras): import one, or fail with the pip line that installs it."""

from __future__ import annotations

import importlib


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip line."""


def require(module: str, purpose: str, pip_line: str):
    """``module`` imported, or a :class:`MissingExtra` saying that ``purpose`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{purpose} needs the '{module}' package, which is not installed: {pip_line}") from e
