"""Assigning ground truth to anchors/proposals by IoU, and sampling a balanced minibatch of them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Sampler protocol: per image, labels (1 positive, 0 negative, -1 ignore) -> (positive idx, negative idx).
# The model's samplers are plain attributes; replace them with any callable of this shape to inject
# a fixed choice (the parity tests do this to compare losses with torchvision's).
Sampler = Callable[[list[Tensor]], list[tuple[Tensor, Tensor]]]


class Matcher:
    """Match each prediction (column) to its best ground truth (row) of an IoU matrix.

    Labels: 1 if the best IoU >= ``high``, 0 if < ``low``, -1 (ignored) in between. With
    ``allow_low_quality_matches`` (the RPN, Faster R-CNN section 3.1.2), every prediction that is
    the best match of some ground truth (ties included) is positive too, so small or oddly shaped
    objects still get an anchor.
    """

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool = False) -> None:
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"Matcher thresholds must satisfy 0 <= low <= high <= 1, got low={low}, high={high}")
        self.high, self.low = high, low
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> tuple[Tensor, Tensor]:
        """``iou: (G, P)`` -> ``matched: (P,)`` int64 ground-truth index, ``labels: (P,)`` int8 in {1, 0, -1}.

        With no ground truth (G = 0) every prediction is a negative matched to index 0.
        """
        n = iou.shape[1]
        if iou.shape[0] == 0:
            return (torch.zeros(n, dtype=torch.long, device=iou.device),
                    torch.zeros(n, dtype=torch.int8, device=iou.device))
        best, matched = iou.max(dim=0)
        labels = torch.ones(n, dtype=torch.int8, device=iou.device)
        labels[best < self.high] = -1
        labels[best < self.low] = 0
        if self.allow_low_quality_matches and n:
            best_per_gt = iou.max(dim=1, keepdim=True).values
            labels[(iou == best_per_gt).any(dim=0)] = 1
        return matched, labels


class BalancedSampler:
    """Sample up to ``batch_size`` per image with at most ``positive_fraction`` positives, the rest
    negatives, uniformly at random (``generator`` makes it reproducible)."""

    def __init__(self, batch_size: int, positive_fraction: float, generator: torch.Generator | None = None) -> None:
        if batch_size <= 0 or not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"BalancedSampler needs batch_size > 0 and positive_fraction in [0, 1], "
                             f"got {batch_size}, {positive_fraction}")
        self.batch_size = batch_size
        self.positive_fraction = positive_fraction
        self.generator = generator

    def _pick(self, idx: Tensor, k: int) -> Tensor:
        gen = self.generator if self.generator is not None and self.generator.device == idx.device else None
        return idx[torch.randperm(idx.numel(), device=idx.device, generator=gen)[:k]]

    def __call__(self, labels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        out = []
        for lab in labels:
            pos = torch.nonzero(lab == 1)[:, 0]
            neg = torch.nonzero(lab == 0)[:, 0]
            num_pos = min(pos.numel(), int(self.batch_size * self.positive_fraction))
            num_neg = min(neg.numel(), self.batch_size - num_pos)
            out.append((self._pick(pos, num_pos), self._pick(neg, num_neg)))
        return out
