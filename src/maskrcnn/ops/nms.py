"""Greedy non-maximum suppression, exact, without a compiled kernel.

Greedy NMS keeps a box iff no higher-scoring *kept* box overlaps it with IoU > threshold. That
recurrence is sequential, but it can be resolved in blocks with tensor ops:

1. take the next ``block`` undecided boxes in score order; every box before them is decided,
   and the ones still undecided have already been checked against every kept box;
2. inside the block, iterate ``keep_i = not any(keep_j and overlap_ji for j < i)`` from
   ``keep = all``: entry i is final after at most i + 1 rounds (it only depends on earlier
   entries), and in practice it settles in a few rounds because suppression chains are short;
3. drop every remaining box that a box kept in this block suppresses, then repeat.

The IoUs computed are those between kept boxes and the boxes still alive, as in torchvision's
C++ loop, but in large vectorised chunks and with suppressed boxes removed early.

Ties in score: boxes are visited in descending score and, among equal scores, in ascending index
(a stable sort). This is the order torchvision's CPU kernel uses as well.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from maskrcnn._checks import check_boxes, check_same_device, check_tensor
from maskrcnn.structures.boxes import pairwise_iou

_BLOCK = 128


def _threshold_for(dtype: torch.dtype, iou_threshold: float) -> float:
    """The value ``t`` in ``dtype`` such that ``iou > t`` (computed in dtype) equals ``iou > iou_threshold``
    computed in double precision, as torchvision's kernel compares."""
    if dtype == torch.float64:
        return float(iou_threshold)
    t32 = np.float32(iou_threshold)
    if float(t32) > iou_threshold:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return float(t32)


def _suppressed_by(kept: Tensor, cand: Tensor, threshold: float) -> Tensor:
    """``(M,)`` bool: is candidate j overlapped (IoU > threshold) by any of ``kept: (K, 4)``."""
    # 0/0 IoU (two empty boxes) is NaN and compares False: empty boxes never suppress.
    return (pairwise_iou(kept, cand) > threshold).any(0)


def _nms_sorted(boxes: Tensor, groups: Tensor | None, threshold: float) -> Tensor:
    """Greedy NMS on boxes already sorted by descending score (and by group, if groups are given).

    Returns the positions (into the sorted order) of the kept boxes, ascending.
    """
    n = boxes.shape[0]
    alive = torch.arange(n, device=boxes.device)
    kept_parts = []
    while alive.numel():
        blk_idx = alive[:_BLOCK]
        blk = boxes[blk_idx]
        overlap = pairwise_iou(blk, blk) > threshold
        if groups is not None:
            g = groups[blk_idx]
            overlap &= g[:, None] == g[None, :]
        overlap.triu_(1)  # overlap[j, i] for j < i: j comes first, so j may suppress i
        keep = torch.ones(blk_idx.shape[0], dtype=torch.bool, device=boxes.device)
        while True:
            new = ~(overlap & keep[:, None]).any(0)
            if torch.equal(new, keep):
                break
            keep = new
        kept_idx = blk_idx[keep]
        kept_parts.append(kept_idx)
        rest = alive[blk_idx.shape[0]:]
        if rest.numel() and kept_idx.numel():
            kept_boxes = boxes[kept_idx]
            if groups is None:
                sup = _suppressed_by(kept_boxes, boxes[rest], threshold)
            else:
                # Sorted by group: only the rest's prefix in the block's groups can be suppressed.
                last_group = groups[blk_idx[-1]]
                m = int(torch.searchsorted(groups[rest], last_group, right=True))
                head = rest[:m]
                sup = torch.zeros(rest.shape[0], dtype=torch.bool, device=boxes.device)
                if m:
                    same = groups[kept_idx][:, None] == groups[head][None, :]
                    sup[:m] = ((pairwise_iou(kept_boxes, boxes[head]) > threshold) & same).any(0)
            rest = rest[~sup]
        alive = rest
    if not kept_parts:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    return torch.cat(kept_parts)


def _check_nms_args(fn: str, boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    check_boxes(fn, "boxes", boxes)
    check_tensor(fn, "scores", scores, shape=(boxes.shape[0],))
    check_same_device(fn, boxes=boxes, scores=scores)
    if scores.numel() and torch.isnan(scores).any():
        raise ValueError(f"{fn}: `scores` contains NaN")
    if not isinstance(iou_threshold, (int, float)) or not (0.0 <= float(iou_threshold) <= 1.0):
        raise ValueError(f"{fn}: `iou_threshold` must be a number in [0, 1], got {iou_threshold!r}")


def _work_dtype(boxes: Tensor) -> Tensor:
    # Half precision cannot represent the coordinates of a 1000-pixel image finely enough for IoU.
    return boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS (same signature and result as ``torchvision.ops.nms``).

    ``boxes: (N, 4)`` XYXY float, ``scores: (N,)``; discards boxes with IoU > ``iou_threshold`` with a
    higher-scoring kept box. Returns int64 indices of the kept boxes by descending score.
    """
    _check_nms_args("nms", boxes, scores, iou_threshold)
    boxes = _work_dtype(boxes)
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = _nms_sorted(boxes[order], None, _threshold_for(boxes.dtype, iou_threshold))
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS applied independently per value of ``idxs: (N,)`` (a class or an FPN level).

    Same signature and result as ``torchvision.ops.batched_nms``: int64 indices of the kept boxes by
    descending score (ties by ascending index). Boxes of different groups never suppress each
    other; unlike the coordinate-offset trick, this costs no floating-point precision.
    """
    _check_nms_args("batched_nms", boxes, scores, iou_threshold)
    check_tensor("batched_nms", "idxs", idxs, shape=(boxes.shape[0],))
    check_same_device("batched_nms", boxes=boxes, idxs=idxs)
    if idxs.is_floating_point() or idxs.is_complex():
        raise TypeError(f"batched_nms: `idxs` must be an integer tensor, got {idxs.dtype}")
    return batched_nms_unchecked(_work_dtype(boxes), scores, idxs, iou_threshold)


def batched_nms_unchecked(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``batched_nms`` without argument validation, for boxes the model produced itself."""
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(idxs[order], stable=True).indices]  # group-major, score-descending within
    kept = order[_nms_sorted(boxes[order], idxs[order], _threshold_for(boxes.dtype, iou_threshold))]
    kept = kept.sort().values  # ascending index, so the stable score sort breaks ties by index
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]
