"""The dtype geometry is computed in, whatever precision the network runs at.

Under mixed precision (``torch.autocast``) convolutions and linear layers return bf16/fp16 maps.
Coordinates must not follow them: bf16 keeps 8 significant bits, so x = 700 px is stored in
steps of 4 px, and fp16 overflows at 65504, below the area of a 256 x 256 box (IoU then becomes
NaN). Anchors, IoUs, box deltas, proposals, NMS, the pooler's RoIs, mask and keypoint targets and
the decoding of the heads' outputs therefore run in float32, or in float64 when the model itself
is float64; only the network's layers run in low precision.

``network_precision`` is that low precision switched on for a forward pass: training's
``solver.amp`` and inference's ``model.precision`` both use it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

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


LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether oneDNN finds bf16 instructions (avx512_bf16 or AMX) on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def fast_precision(device: torch.device) -> tuple[str, str | None]:
    """The precision of fast mode on ``device`` and, when that is float32, why.

    bf16 where the hardware runs it: a CPU with bf16 units, or a GPU that has bf16 (fp16 on older
    GPUs). A CPU without them emulates bf16, and emulation is no fast mode: a 256-channel 3x3
    convolution took 40-62 s in bf16 against 0.19-0.22 s in float32 on an AMD EPYC (Zen 3, AVX2), 2026-12-08;
    there fast mode stays float32 and the reason is returned for the caller to say.
    """
    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"), None
    if device.type == "cpu" and not cpu_has_bf16_units():
        return "float32", ("fast mode: this CPU has no bf16 instructions (avx512_bf16 or AMX), where bf16 is emulated "
                           "and up to hundreds of times slower; the layers stay float32 (exact mode)")
    return "bf16", None


def network_precision(device: torch.device, mode: str, setting: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``mode`` ("bf16" or "fp16"; "" or "float32": none) on ``device``.

    ``setting`` names the config key in the messages. fp16 is refused on the CPU (training it needs
    gradient scaling, which the trainer does on CUDA only; bf16 is the CPU's low precision); bf16
    on a CPU without bf16 units works but is emulated, up to hundreds of times slower than float32 in
    convolutions (see ``fast_precision``), and said so.
    """
    if mode in ("", "float32"):
        return contextlib.nullcontext()
    if mode not in LOW_PRECISION_DTYPES:
        raise ValueError(f"{setting}={mode}: expected bf16 or fp16")
    if device.type == "cpu":
        if mode == "fp16":
            raise ValueError(f"{setting}=fp16 needs a CUDA device; use bf16 on the CPU")
        if not cpu_has_bf16_units():
            _warn_emulated_bf16(setting)
    return torch.autocast(device.type, dtype=LOW_PRECISION_DTYPES[mode])


@functools.cache  # once per process, not at every forward pass
def _warn_emulated_bf16(setting: str) -> None:
    warnings.warn(f"{setting}=bf16: this CPU has no bf16 instructions (avx512_bf16 or AMX), so bf16 is emulated, "
                  "up to hundreds of times slower than float32 in large convolutions; use float32 here", stacklevel=4)
