"""Counting host reads on the CPU: the calls that would wait for a GPU/MPS device's queue.

On a GPU every host read (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, ...) waits for all
queued kernels; on the CPU they cost nothing, so tests count them with a ``TorchFunctionMode``.
"""

import torch
from torch.overrides import TorchFunctionMode

T = torch.Tensor
_READS = {
    T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.nonzero, torch.nonzero,
    T.unique, torch.unique, T.unique_consecutive, torch.unique_consecutive, torch.argwhere, T.argwhere,
    T.cpu, T.numpy, torch.equal, T.equal, torch.masked_select, T.masked_select,
}


def _bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class HostReads(TorchFunctionMode):
    """Records every call that reads a (device) tensor's values back to the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", repr(func))
        if func in _READS:
            self.calls.append(name)
        elif func is torch.where and len(args) + len(kwargs) == 1:
            self.calls.append("where(cond)")
        elif func in (T.__getitem__, T.__setitem__) and _bool_index(args[1]):
            self.calls.append(f"{name}[bool mask]")
        return func(*args, **kwargs)
