"""Argument handling shared by ``roi_align`` and ``roi_pool``: the (K, 5) RoI format of torchvision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from maskrcnn._checks import Checks, check_boxes, check_same_device, check_tensor


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """A list of per-image ``(Ni, 4)`` boxes -> ``(sum Ni, 5)`` rows ``(image index, x1, y1, x2, y2)``."""
    if len(boxes) == 0:
        raise ValueError("a list of boxes must hold one (Ni, 4) tensor per image, got an empty list")
    ids = [torch.full((b.shape[0], 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)


def check_rois(fn: str, input: Tensor, boxes: Tensor | Sequence[Tensor]) -> Tensor:
    """Validate ``input: (N, C, H, W)`` and the boxes in either format; return ``(K, 5)`` RoIs.

    The box values are read back once, whichever the format and the number of images.
    """
    check_tensor(fn, "input", input, shape=(None, None, None, None), floating=True)
    checks = Checks()
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            check_boxes(fn, f"boxes[{i}]", b, checks=checks)
            check_same_device(fn, input=input, **{f"boxes[{i}]": b})
        if len(boxes) > input.shape[0]:
            raise ValueError(f"{fn}: got boxes for {len(boxes)} images but `input` holds {input.shape[0]}")
        if len(boxes) == 0 or any(b.dtype != boxes[0].dtype for b in boxes):
            raise ValueError(f"{fn}: `boxes` must be a non-empty list of (Ni, 4) tensors of one dtype")
        checks.run()
        return boxes_to_rois(boxes)
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{fn}: `boxes` must be a (K, 5) tensor or a list of (Ni, 4) tensors, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(
            f"{fn}: `boxes` must be a (K, 5) tensor (batch index, x1, y1, x2, y2) "
            f"or a list of (Ni, 4) tensors, got a tensor of shape {tuple(boxes.shape)}"
        )
    check_boxes(fn, "boxes", boxes, columns=5, checks=checks)
    check_same_device(fn, input=input, boxes=boxes)
    idx = boxes[:, 0]
    bad = (idx != idx.round()) | (idx < 0) | (idx > input.shape[0] - 1)

    def message() -> str:
        row = int(bad.nonzero()[0, 0])
        return (f"{fn}: `boxes[:, 0]` must hold integer image indices in [0, {input.shape[0] - 1}]; "
                f"row {row} has {idx[row].item()}")

    checks.add(bad, message)
    checks.run()
    return boxes
