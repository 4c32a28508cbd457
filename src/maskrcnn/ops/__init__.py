"""Detection tensor ops with the signatures of ``torchvision.ops``: pure PyTorch, any device."""

from maskrcnn.ops.nms import batched_nms, nms
from maskrcnn.ops.roi_align import RoIAlign, roi_align
from maskrcnn.ops.roi_pool import RoIPool, roi_pool
from maskrcnn.structures.boxes import box_area, box_iou, clip_boxes_to_image, remove_small_boxes

__all__ = [
    "RoIAlign",
    "RoIPool",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes_to_image",
    "nms",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
]
