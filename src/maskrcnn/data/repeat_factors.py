"""Repeat-factor sampling for rare classes (Gupta et al., LVIS, 2019, section 4.2).

A category ``c`` present in a fraction ``f(c)`` of the training images gets ``r(c) = max(1,
sqrt(t / f(c)))`` for a threshold ``t``; an image gets the largest ``r(c)`` of the categories it
contains (1 without any). Each epoch then holds every image ``floor(r)`` times, plus once more
with probability ``r - floor(r)``, so rare classes are seen more often while every image is still
seen at least once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def repeat_factors(labels_per_image: Sequence[Sequence[int]], threshold: float) -> list[float]:
    """``r(I)`` for each image from the labels of its (non-crowd) instances."""
    if threshold <= 0:
        return [1.0] * len(labels_per_image)
    n = len(labels_per_image)
    images_with: dict[int, int] = {}
    for labels in labels_per_image:
        for c in set(labels):
            images_with[c] = images_with.get(c, 0) + 1
    per_class = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in images_with.items()}
    return [max((per_class[c] for c in set(labels)), default=1.0) for labels in labels_per_image]


def repeated_indices(factors: Sequence[float], generator: torch.Generator) -> list[int]:
    """One epoch's image indices: image ``i`` ``floor(r_i)`` times, and once more with probability
    ``r_i - floor(r_i)`` (drawn from ``generator``), in index order."""
    r = torch.tensor(list(factors), dtype=torch.float64)
    whole = r.floor()
    counts = whole + (torch.rand(len(r), generator=generator, dtype=torch.float64) < r - whole).double()
    return torch.repeat_interleave(torch.arange(len(r)), counts.long()).tolist()
