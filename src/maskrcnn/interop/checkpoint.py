"""Reading state dicts from files and loading them with errors that list what does not fit."""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

TORCH_ZIP = b"PK\x03\x04"  # how torch.save's files begin (its format since torch 1.6)


class CheckpointError(ValueError):
    """A weights file that cannot be used: unreadable, truncated, refused, or not the kind expected."""


def describe(obj: Any) -> str:
    """What a loaded file holds, in a few words, for error messages."""
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:4]]
        return f"a dict of {len(obj)} entries ({', '.join(keys)}{', ...' if len(obj) > 4 else ''})"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def _why_unreadable(error: BaseException, head: bytes) -> str:
    """The reason torch.load failed, in our words: torch's message on a refused pickle recommends
    ``weights_only=False``, which runs whatever code the file carries, so it is never passed on."""
    text = str(error)
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if refused:
        return (f"refused: it holds the pickled Python object {refused.group(1)}, not only tensors, and unpickling "
                f"it could run code; a checkpoint must hold tensors and plain containers (save a state_dict())")
    if head.startswith(TORCH_ZIP):
        return "truncated or corrupt (an incomplete torch zip archive: an interrupted copy or download?)"
    if isinstance(error, EOFError) or "truncated" in text or "Ran out of input" in text:
        return "truncated (the data ends early: an interrupted copy or download?)"
    if head.startswith(b"\x80") and isinstance(error, pickle.UnpicklingError):
        return ("a plain Python pickle, not a file written by torch.save (detectron2's model-zoo .pkl files are: "
                "read those with `maskrcnn convert --from detectron2` or a detectron2_* --config)")
    # neither a zip archive nor a pickle: unpickling garbage fails in arbitrary ways (IndexError,
    # struct errors, ...), all meaning the same thing
    if not head.startswith(b"\x80") or not text \
            or isinstance(error, (pickle.UnpicklingError, KeyError, ValueError, UnicodeDecodeError)):
        return f"not a file written by torch.save (it starts with {head[:16]!r})"
    first = text.splitlines()[0]
    return f"{type(error).__name__}: {first}" if "weights_only" not in first else type(error).__name__


def file_head(path: str | Path) -> bytes:
    """The first 16 bytes of a weights file, once the checks every reader needs are passed: it exists
    (else ``FileNotFoundError``), is a readable file and not empty (else :class:`CheckpointError`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes: an interrupted copy or download?)")
    return head


def read_torch_file(path: str | Path) -> Any:
    """What a ``torch.save`` file holds, read safely: tensors and plain containers, no pickled code.

    A missing file is a ``FileNotFoundError``; anything else wrong (a folder, an empty, truncated or
    corrupt file, a refused pickle, another format) a :class:`CheckpointError` naming the file.
    """
    head = file_head(path)
    try:
        with warnings.catch_warnings():
            # torch's note on a plain pickle's protocol: the error that follows says what the file is
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure of the file's bytes; ours is the only message shown
        reason = _why_unreadable(e, head)
    raise CheckpointError(f"cannot read checkpoint {path}: {reason}")


def read_state_dict(checkpoint: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict from a mapping or a ``torch.save`` file (safely: tensors only, no pickled code).

    A ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper (training checkpoints) is unwrapped.
    """
    state = dict(checkpoint) if isinstance(checkpoint, Mapping) else read_torch_file(checkpoint)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    name = "state dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{name}: expected a mapping of parameter names to tensors, found {describe(state)}")
    wrong = next((k for k, v in state.items() if not isinstance(v, Tensor)), None)
    if wrong is not None:
        raise CheckpointError(f"{name}: expected a mapping of parameter names to tensors, but {wrong!r} is "
                              f"{describe(state[wrong])}")
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
