"""Typed geometric structures: boxes (XYXY, absolute pixels) and their encodings."""

from maskrcnn.structures.boxes import (
    BoxCoder,
    box_area,
    box_iou,
    clip_boxes_to_image,
    remove_small_boxes,
)

__all__ = ["BoxCoder", "box_area", "box_iou", "clip_boxes_to_image", "remove_small_boxes"]
