"""The dtype geometry is computed in, whatever precision the network runs at.

Under mixed precision (``torch.autocast``) convolutions and linear layers return bf16/fp16 maps.
Coordinates must not follow them: bf16 keeps 8 significant bits, so x = 700 px is stored in
steps of 4 px, and fp16 overflows at 65504, below the area of a 256 x 256 box (IoU then becomes
NaN). Anchors, IoUs, box deltas, proposals, NMS, the pooler's RoIs, mask and keypoint targets and
the decoding of the heads' outputs therefore run in float32, or in float64 when the model itself
is float64; only the network's layers run in low precision.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for a float64 model, float32 for everything else (float32, bf16, fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_geometry(t: Tensor) -> Tensor:
    """``t`` in :func:`geometry_dtype` (no copy when it already is)."""
    return t.to(geometry_dtype(t.dtype))


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch autocast off on ``device`` for a block of geometry that uses matrix products (which
    autocast would otherwise run in bf16/fp16 even on float32 inputs)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
