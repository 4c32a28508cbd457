"""ONNX translations of ``maskrcnn::nms`` and ``maskrcnn::roi_align`` (see ``ops.py``) for
``torch.onnx.export``'s ``custom_translation_table``. Needs onnxscript (the ``export`` extra)."""

from __future__ import annotations

import torch
from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op

OPSET = 18


def nms(boxes: FLOAT, scores: FLOAT, iou_threshold: float, score_threshold: float, max_per_class: int) -> INT64:
    return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[max_per_class]),
                                op.Constant(value_floats=[iou_threshold]), op.Constant(value_floats=[score_threshold]))


def roi_align(features: FLOAT, rois: FLOAT, output_height: int, output_width: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> FLOAT:
    batch_index = op.Cast(op.Gather(rois, op.Constant(value_int=0), axis=1), to=INT64.dtype)
    boxes = op.Slice(rois, op.Constant(value_ints=[1]), op.Constant(value_ints=[5]), op.Constant(value_ints=[1]))
    mode = "half_pixel" if aligned else "output_half_pixel"
    return op.RoiAlign(features, boxes, batch_index, coordinate_transformation_mode=mode, mode="avg",
                       output_height=output_height, output_width=output_width, sampling_ratio=sampling_ratio,
                       spatial_scale=spatial_scale)


def sort_stable(x: FLOAT, stable: bool = True, dim: int = -1, descending: bool = False) -> tuple[FLOAT, INT64]:
    """``torch.sort(stable=True)``: ONNX's TopK over the whole axis breaks ties by lower index, which is
    what a stable sort does (the exporter has no translation of its own for the stable overload)."""
    k = op.Gather(op.Shape(x), op.Constant(value_ints=[dim]))
    return op.TopK(x, k, axis=dim, largest=descending, sorted=True)


def translation_table() -> dict:
    return {torch.ops.maskrcnn.nms.default: nms, torch.ops.maskrcnn.roi_align.default: roi_align,
            torch.ops.aten.sort.stable: sort_stable}
