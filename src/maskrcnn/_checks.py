"""Argument checks shared by the public tensor functions.

Bad input must fail at the API boundary with a message that names the function, the argument
and what was expected, instead of failing deep inside an indexing op (or worse, returning a
silently wrong answer). Checks of tensor values need the values on the host, and every such read
waits for the device to finish its queue, so a function gathers all its value checks in one
``Checks`` and reads them back once; the detailed message is only worked out when one fails.
Internal hot paths (the model's own proposals) call the unchecked kernels and pay nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(
    fn: str,
    name: str,
    t: object,
    *,
    shape: Sequence[int | None] | None = None,
    floating: bool = False,
) -> Tensor:
    """Check that ``t`` is a tensor with ``len(shape)`` dims (None = any size), float if asked."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(e is None or e == s for e, s in zip(shape, t.shape))
        if not ok:
            want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
            raise ValueError(f"{fn}: `{name}` must have shape {want}, got {_shape(t)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{fn}: `{name}` must be a floating point tensor, got {t.dtype}")
    return t


def check_same_device(fn: str, **tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"`{n}` on {d}" for n, d in devices.items())
        raise ValueError(f"{fn}: all tensors must be on the same device, got {listing}")


class Checks:
    """Failure conditions gathered on the device and read back with one host synchronisation.

    ``add(failed, message)``: ``failed`` is a bool tensor (any True element is a failure) and
    ``message`` the error text, or a function that builds it (it may read the device: it only runs
    once a failure is known). ``run()`` raises ``ValueError`` with the message of the first failing
    condition, in the order they were added.
    """

    def __init__(self) -> None:
        self._items: list[tuple[Tensor, str | Callable[[], str]]] = []

    def add(self, failed: Tensor, message: str | Callable[[], str]) -> None:
        self._items.append((failed.any(), message))

    def run(self) -> None:
        if not self._items:
            return
        # on one device for the stack: an accelerator's if any (copying a CPU flag there does not wait)
        device = next((f.device for f, _ in self._items if f.device.type != "cpu"), torch.device("cpu"))
        flags = torch.stack([f.to(device) for f, _ in self._items]).tolist()  # the one host read
        self._items, items = [], self._items
        for flag, (_, message) in zip(flags, items):
            if flag:
                raise ValueError(message if isinstance(message, str) else message())


def check_finite(fn: str, name: str, t: Tensor, checks: Checks | None = None) -> None:
    """No NaN or inf in ``t: (N, ...)``; read back now, or with ``checks`` when one is given."""
    def message() -> str:
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()[:5, 0].tolist()
        return f"{fn}: `{name}` contains NaN or inf values (rows {bad}{'...' if len(bad) == 5 else ''})"

    own = Checks() if checks is None else checks
    own.add(~torch.isfinite(t), message)
    if checks is None:
        own.run()


def check_boxes(fn: str, name: str, boxes: object, *, columns: int = 4, checks: Checks | None = None) -> Tensor:
    """A float (N, columns) tensor of finite XYXY boxes (in the last 4 columns) with x2>=x1, y2>=y1.

    The values are read back now (one synchronisation), or with ``checks`` when one is given.
    """
    check_tensor(fn, name, boxes, shape=(None, columns), floating=True)
    assert isinstance(boxes, Tensor)
    own = Checks() if checks is None else checks
    check_finite(fn, name, boxes, own)
    xyxy = boxes[:, columns - 4 :]
    bad = (xyxy[:, 2] < xyxy[:, 0]) | (xyxy[:, 3] < xyxy[:, 1])

    def message() -> str:
        rows = bad.nonzero()[:5, 0].tolist()
        example = [round(v, 4) for v in xyxy[rows[0]].tolist()]
        return (f"{fn}: `{name}` must be (x1, y1, x2, y2) boxes with x2 >= x1 and y2 >= y1; "
                f"rows {rows} are not (e.g. row {rows[0]} = {example})")

    own.add(bad, message)
    if checks is None:
        own.run()
    return boxes


def pair(fn: str, name: str, value: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an int or an (h, w) pair of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        out = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{fn}: `{name}` must be an int or a pair of ints (h, w), got {value!r}")
    if out[0] <= 0 or out[1] <= 0:
        raise ValueError(f"{fn}: `{name}` must be positive, got {value!r}")
    return out
