"""``--device`` / ``train.device`` to a ``torch.device``, with a user error for one this machine lacks.

torch raises an ``AssertionError`` ("Torch not compiled with CUDA enabled") or a ``RuntimeError``
deep inside the first tensor moved there; both would read as a bug of ours.
"""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:1", ... checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N, ...): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {name!r}: {why} (torch.cuda.is_available() is False); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
