"""Reading state dicts from files and loading them with errors that list what does not fit."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


def read_state_dict(checkpoint: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict from a mapping or a ``torch.save`` file (safely: tensors only, no pickled code).

    A ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper (training checkpoints) is unwrapped.
    """
    if isinstance(checkpoint, Mapping):
        state = dict(checkpoint)
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated, or not a torch file
            raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint}: expected a mapping of parameter names to tensors")
    return dict(state)


def rename_by_rules(key: str, rules: Iterable[tuple[str, str]]) -> str | None:
    """``key`` rewritten by the first ``(regex, replacement)`` rule that matches it; None if none does."""
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def load_state_dict_checked(model: nn.Module, state: Mapping[str, Tensor], source: str,
                            expected: Iterable[str] | None = None) -> None:
    """Load ``state`` into ``model``; raise one error listing missing, unexpected and mis-shaped keys.

    ``expected``: the model keys ``state`` must cover (default: all of them). ``num_batches_tracked``
    counters are neither required nor unexpected.
    """
    ours = model.state_dict()
    need = set(ours if expected is None else expected)
    missing = sorted(k for k in need - set(state) if not k.endswith("num_batches_tracked"))
    # a BatchNorm2d's step counter has no place in a frozen batch norm: dropping it loses nothing
    unexpected = sorted(k for k in set(state) - set(ours) if not k.endswith("num_batches_tracked"))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}"
                    for k in set(state) & set(ours) if state[k].shape != ours[k].shape)
    if missing or unexpected or shapes:
        parts = [f"checkpoint ({source}) does not fit the model:"]
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"  {len(items)} {name}: " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        if shapes and any("cls_score" in s or "predictor" in s for s in shapes):
            parts.append("  (a different number of classes: set model.roi_heads.num_classes to the checkpoint's)")
        raise ValueError("\n".join(parts))
    model.load_state_dict({k: v for k, v in state.items() if k in ours}, strict=False)
