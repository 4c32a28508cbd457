"""Training checkpoints: written atomically, read safely, carrying everything needed to resume.

A checkpoint holds the model weights, the config it was built from, the class map (dataset
category ids and names), and for resuming the optimizer, the AMP grad scaler, the iteration and
the RNG states. It is written to a temporary file in the same folder, flushed to disk and renamed
over the target (an atomic replace), so a crash or a full disk mid-write never leaves a truncated
checkpoint and never destroys the previous one. ``last_checkpoint`` names the newest.
Reading uses ``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from maskrcnn.interop.checkpoint import CheckpointError, describe, read_torch_file

FORMAT = "maskrcnn-checkpoint"


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: str | Path, model_state: dict, config: dict, classes: dict, iteration: int,
                    optimizer: dict | None = None, scaler: dict | None = None, extra: dict | None = None,
                    resumable: bool = True) -> Path:
    """Write a checkpoint atomically; RNG states are captured here. ``extra`` entries are stored
    beside the standard ones (e.g. ``best``); ``resumable=False`` (``model_best.pth``) leaves the
    ``last_checkpoint`` marker alone, so that ``--resume`` continues from the newest checkpoint."""
    state: dict[str, Any] = {
        "format": FORMAT, "version": 1, "model": model_state, "config": config, "classes": classes,
        "iteration": int(iteration),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    if optimizer is not None:
        state["optimizer"] = optimizer
    if scaler is not None:
        state["scaler"] = scaler
    state.update(extra or {})
    atomic_write(path, lambda f: torch.save(state, f))
    path = Path(path)
    if resumable:
        atomic_write(path.parent / "last_checkpoint", lambda f: f.write(path.name.encode()))
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint of ours; anything else is a ``CheckpointError`` (a ``ValueError``) naming the
    file and what it holds (or ``FileNotFoundError``)."""
    path = Path(path)
    state = read_torch_file(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            found = f"a bare state dict of {len(state)} tensors (e.g. {next(iter(state))!r})"
        else:
            found = describe(state)
        raise CheckpointError(f"{path} is not a maskrcnn checkpoint: it holds {found}; torchvision or detectron2 "
                              f"weights are read with --config <their preset>, or converted by `maskrcnn convert`")
    for key, kind in (("model", dict), ("config", dict), ("classes", dict)):
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{path}: damaged maskrcnn checkpoint: '{key}' is missing or not a mapping")
    return state


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint of a training folder, or None."""
    marker = Path(output_dir) / "last_checkpoint"
    if not marker.is_file():
        return None
    path = Path(output_dir) / marker.read_text().strip()
    return path if path.is_file() else None


def restore_rng(state: dict) -> None:
    rng = state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
