"""Axis-aligned boxes: area, IoU, clipping, filtering and the delta encoding of R-CNN.

Convention (README, "Conventions"): boxes are ``(N, 4)`` float tensors in XYXY order, in absolute
pixel coordinates of the image they refer to, with widths ``x2 - x1`` (no "+1", as in torchvision
and detectron2 since 2018). All functions are vectorised, work on any device and dtype, and are
differentiable where a model trains through them (``BoxCoder``).

The public functions validate their input; the ``pairwise_iou``/``area`` kernels do not, so that
the model's hot paths (which produce their boxes themselves) pay no device synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from maskrcnn._checks import check_boxes, check_same_device, check_tensor
from maskrcnn.structures.precision import geometry_dtype

# The largest log-scale change a decoded box may get: exp(log(1000/16)) = 62.5x. Without it a
# single bad regression output early in training overflows exp() and poisons the loss with inf.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def area(boxes: Tensor) -> Tensor:
    """``boxes: (N, 4)`` -> ``(N,)`` areas. Unchecked."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def pairwise_intersection(a: Tensor, b: Tensor) -> Tensor:
    """``a: (N, 4)``, ``b: (M, 4)`` -> ``(N, M)`` intersection areas. Unchecked."""
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp_(min=0)
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp_(min=0)
    return w.mul_(h)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """``a: (N, 4)``, ``b: (M, 4)`` -> ``(N, M)`` IoU. Unchecked; 0/0 (two empty boxes) gives NaN."""
    inter = pairwise_intersection(a, b)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return inter.div_(union)


def box_area(boxes: Tensor) -> Tensor:
    """Areas of ``boxes: (N, 4)`` XYXY -> ``(N,)``."""
    check_boxes("box_area", "boxes", boxes)
    return area(boxes)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection-over-union of ``boxes1: (N, 4)`` and ``boxes2: (M, 4)`` -> ``(N, M)``.

    Two boxes of zero area have IoU 0 (not NaN), as in torchvision's kernels where the comparison
    against a threshold is what matters.
    """
    check_boxes("box_iou", "boxes1", boxes1)
    check_boxes("box_iou", "boxes2", boxes2)
    check_same_device("box_iou", boxes1=boxes1, boxes2=boxes2)
    return torch.nan_to_num_(pairwise_iou(boxes1, boxes2), nan=0.0)


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp ``boxes: (..., 4)`` XYXY into an image of ``size = (height, width)``."""
    check_tensor("clip_boxes_to_image", "boxes", boxes, floating=True)
    if boxes.shape[-1] != 4:
        raise ValueError(f"clip_boxes_to_image: `boxes` must have 4 values in the last dim, got {tuple(boxes.shape)}")
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def nonempty(boxes: Tensor, threshold: float = 0.0) -> Tensor:
    """``(N,)`` bool: boxes wider and taller than ``threshold`` (by default, those with any area)."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both ``>= min_size`` (torchvision's rule)."""
    check_tensor("remove_small_boxes", "boxes", boxes, shape=(None, 4), floating=True)
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


class BoxCoder:
    """The R-CNN box parametrisation (Girshick et al.): centre offsets relative to the reference
    box size and log-scale size ratios, each multiplied by a weight.

    ``weights = (wx, wy, ww, wh)``: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head;
    Cascade R-CNN stages use (20, 20, 10, 10) and (30, 30, 15, 15).

    Both directions compute in the geometry dtype of their inputs (float32, or float64 if either
    is float64: see :mod:`maskrcnn.structures.precision`), so bf16/fp16 deltas from a network under
    autocast give float32 boxes. ``float32``: decode in float32 even for float64 inputs
    (detectron2 does); the result is then cast to the geometry dtype.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP, float32: bool = False) -> None:
        if len(weights) != 4 or any(not (w > 0) for w in weights):
            raise ValueError(f"BoxCoder: `weights` must be 4 positive numbers, got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)
        self.float32 = float32

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, scale_clamp={self.scale_clamp:.4f})"

    def encode(self, boxes: Tensor, targets: Tensor) -> Tensor:
        """Deltas ``(N, 4)`` that turn ``boxes: (N, 4)`` into ``targets: (N, 4)``.

        Both must have positive widths and heights (the log of a zero size is -inf); the model
        guarantees this by dropping empty proposals and degenerate ground truth upstream.
        """
        dtype = geometry_dtype(torch.promote_types(boxes.dtype, targets.dtype))
        boxes, targets = boxes.to(dtype), targets.to(dtype)
        wx, wy, ww, wh = self.weights
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        t_widths = targets[:, 2] - targets[:, 0]
        t_heights = targets[:, 3] - targets[:, 1]
        t_ctr_x = targets[:, 0] + 0.5 * t_widths
        t_ctr_y = targets[:, 1] + 0.5 * t_heights
        dx = wx * (t_ctr_x - ctr_x) / widths
        dy = wy * (t_ctr_y - ctr_y) / heights
        dw = ww * torch.log(t_widths / widths)
        dh = wh * torch.log(t_heights / heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply ``deltas: (N, 4k)`` (k = 1, or one set per class) to ``boxes: (N, 4)`` -> ``(N, 4k)``."""
        if deltas.dim() != 2 or deltas.shape[1] % 4 != 0 or deltas.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"BoxCoder.decode: `deltas` must be (N, 4k) for N = {boxes.shape[0]} boxes, got {tuple(deltas.shape)}"
            )
        out_dtype = geometry_dtype(torch.promote_types(deltas.dtype, boxes.dtype))
        dtype = torch.float32 if self.float32 else out_dtype
        deltas, boxes = deltas.to(dtype), boxes.to(dtype)
        wx, wy, ww, wh = self.weights
        widths = (boxes[:, 2] - boxes[:, 0])[:, None]
        heights = (boxes[:, 3] - boxes[:, 1])[:, None]
        ctr_x = boxes[:, 0, None] + 0.5 * widths
        ctr_y = boxes[:, 1, None] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * torch.exp(dw) * widths
        half_h = 0.5 * torch.exp(dh) * heights
        out = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2)
        return out.reshape(deltas.shape).to(out_dtype)
