"""RoIs grouped by the size of their pooling grid, for ``roi_align`` (adaptive sampling) and ``roi_pool``.

A batched call needs one grid size for all its RoIs, and that size must be known on the host.
RoIs whose sizes round up to the same powers of two share a call padded to the largest of them,
so a call makes a handful of batched calls rather than one per distinct size, and padding wastes
less than 2x per axis. Everything the host needs (which groups exist, their sizes, their padded
grids) comes back in a single read, since on a GPU each read waits for the device's whole queue.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Sizes above 2**14 share the last bucket: still padded to their own maximum (correct, only
# less tight), and it keeps the table read back small.
_BUCKETS = 16


def _bucket(size: Tensor) -> Tensor:
    """``ceil(log2(size))`` (0 for sizes up to 1), capped, in integers: exact for any size, and no
    float64, which MPS does not have."""
    powers = 2 ** torch.arange(_BUCKETS - 1, device=size.device)
    return (size[:, None] > powers).sum(1)


def size_groups(size_h: Tensor, size_w: Tensor) -> list[tuple[Tensor, int, int]]:
    """``size_h, size_w: (K,)`` non-negative int64 grid sizes -> ``[(rows, max size_h, max size_w)]``.

    ``rows`` are the int64 indices of a group's RoIs; every RoI is in exactly one group.
    """
    key = _bucket(size_h) * _BUCKETS + _bucket(size_w)
    order = torch.sort(key, stable=True).indices
    stats = torch.zeros(3, _BUCKETS * _BUCKETS, dtype=torch.long, device=key.device)
    stats[0].index_add_(0, key, torch.ones_like(key))
    stats[1].scatter_reduce_(0, key, size_h, "amax")
    stats[2].scatter_reduce_(0, key, size_w, "amax")
    counts, max_h, max_w = stats.tolist()  # the one host read
    groups, start = [], 0
    for k, count in enumerate(counts):
        if count:
            groups.append((order[start:start + count], max_h[k], max_w[k]))
            start += count
    return groups
