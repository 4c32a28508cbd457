"""The two operators of an exported detector that have a native ONNX counterpart, as PyTorch custom ops.

``torch.export`` records ``maskrcnn::nms`` and ``maskrcnn::roi_align`` as single nodes (they run our
pure-PyTorch implementations in a ``torch`` runtime), and the ONNX export turns them into ONNX's
``NonMaxSuppression`` and ``RoiAlign`` (``onnx_ops.py``), which onnxruntime and OpenVINO run as
compiled kernels. Their semantics are those ONNX operators':

- ``nms(boxes (B, N, 4), scores (B, C, N), iou_threshold, score_threshold, max_per_class)``: for
  every batch entry b and class c, greedy NMS over the boxes with ``score > score_threshold``
  (suppressed when IoU > ``iou_threshold``), at most ``max_per_class`` kept; returns ``(S, 3)`` int64
  rows ``(b, c, box index)`` ordered by b, then c, then descending score. The exported graph gives
  every box a distinct score (its rank), so no runtime's tie-breaking can change the result.
- ``roi_align(features, rois (R, 5), ...)``: :func:`maskrcnn.ops.roi_align` (rows ``(image, x1, y1,
  x2, y2)``); ONNX's RoiAlign with ``half_pixel`` (aligned) or ``output_half_pixel`` coordinates is
  the same operator (checked against onnxruntime and OpenVINO in the tests).

An ExportedProgram that contains them loads after ``import maskrcnn.export`` (which registers them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskrcnn.ops.nms import batched_nms_unchecked
from maskrcnn.ops.roi_align import roi_align_unchecked


@torch.library.custom_op("maskrcnn::nms", mutates_args=())
def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_per_class: int) -> Tensor:
    _, c, _ = scores.shape
    cand = torch.nonzero(scores > score_threshold)  # rows (b, c, n), in that order
    b, k, n = cand.unbind(1)
    group = b * c + k
    keep = batched_nms_unchecked(boxes[b, n], scores[b, k, n], group, iou_threshold)  # by descending score
    keep = keep[torch.sort(group[keep], stable=True).indices]  # group-major, score order kept within
    g = group[keep]
    rank = torch.arange(g.shape[0], device=g.device) - torch.searchsorted(g, g)
    return cand[keep[rank < max_per_class]]


@nms.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_per_class: int) -> Tensor:
    count = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty((count, 3), dtype=torch.long)


@torch.library.custom_op("maskrcnn::roi_align", mutates_args=())
def roi_align(features: Tensor, rois: Tensor, output_height: int, output_width: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> Tensor:
    return roi_align_unchecked(features, rois, (output_height, output_width), spatial_scale, sampling_ratio, aligned)


@roi_align.register_fake
def _(features: Tensor, rois: Tensor, output_height: int, output_width: int, spatial_scale: float,
      sampling_ratio: int, aligned: bool) -> Tensor:
    return features.new_empty((rois.shape[0], features.shape[1], output_height, output_width))
