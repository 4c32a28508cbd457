"""Assigning ground truth to anchors/proposals by IoU, and sampling a balanced minibatch of them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from maskrcnn._seeding import derive_seed
from maskrcnn.structures.boxes import area, pairwise_intersection

# Sampler protocol: ``sampler(labels, seeds)``: per image, labels (1 positive, 0 negative, -1 ignore)
# and an optional integer seed -> (positive idx, negative idx). The model's samplers are plain
# attributes; replace them with any callable of this shape to inject a fixed choice (the parity
# tests do this to compare losses with torchvision's).
Sampler = Callable[[list[Tensor], list[int | None]], list[tuple[Tensor, Tensor]]]


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
    negatives, uniformly at random.

    Randomness, in order of precedence: a per-image seed passed with the labels (the data
    pipeline gives every sample one, so a sample is drawn the same way whether it is trained in a
    batch of 16 on one process or of 2 on each of 8, and again after resuming; ``salt`` keeps the
    RPN's and the RoI heads' draws apart), then ``generator``, then torch's global generator.
    """

    def __init__(self, batch_size: int, positive_fraction: float, generator: torch.Generator | None = None,
                 salt: int = 0) -> None:
        if batch_size <= 0 or not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"BalancedSampler needs batch_size > 0 and positive_fraction in [0, 1], "
                             f"got {batch_size}, {positive_fraction}")
        self.batch_size = batch_size
        self.positive_fraction = positive_fraction
        self.generator = generator
        self.salt = salt

    @staticmethod
    def _pick(idx: Tensor, k: int, gen: torch.Generator | None) -> Tensor:
        return idx[torch.randperm(idx.numel(), device=idx.device, generator=gen)[:k]]

    def __call__(self, labels: list[Tensor], seeds: list[int | None] | None = None) -> list[tuple[Tensor, Tensor]]:
        out = []
        for i, lab in enumerate(labels):
            seed = seeds[i] if seeds is not None else None
            if seed is not None:
                gen: torch.Generator | None = torch.Generator(device=lab.device).manual_seed(derive_seed(seed, self.salt))
            elif self.generator is not None and self.generator.device == lab.device:
                gen = self.generator
            else:
                gen = None
            pos = torch.nonzero(lab == 1)[:, 0]
            neg = torch.nonzero(lab == 0)[:, 0]
            num_pos = min(pos.numel(), int(self.batch_size * self.positive_fraction))
            num_neg = min(neg.numel(), self.batch_size - num_pos)
            out.append((self._pick(pos, num_pos, gen), self._pick(neg, num_neg, gen)))
        return out


def ignore_crowd(labels: Tensor, boxes: Tensor, crowd_boxes: Tensor | None, ioa_thresh: float) -> Tensor:
    """Negatives covered by a crowd region (intersection over their own area > ``ioa_thresh``) become
    ignored (-1): a crowd box marks many objects without outlining them, so a box inside it is
    neither an object of its own nor background."""
    if crowd_boxes is None or crowd_boxes.shape[0] == 0 or boxes.shape[0] == 0:
        return labels
    inter = pairwise_intersection(boxes, crowd_boxes.to(boxes.dtype))
    ioa = inter / area(boxes).clamp(min=1e-6)[:, None]
    covered = (ioa > ioa_thresh).any(dim=1) & (labels == 0)
    return torch.where(covered, torch.full_like(labels, -1), labels)
