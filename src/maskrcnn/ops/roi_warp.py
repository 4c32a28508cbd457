"""RoIWarp (Dai et al., "Instance-aware Semantic Segmentation via Multi-task Network Cascades"), as
the Mask R-CNN paper describes it in its RoIAlign ablation: the RoI is quantized to the feature grid
like RoIPool's, and the bins are then sampled with bilinear interpolation like RoIAlign's. The
sampling is smooth, but the RoI is misaligned with the input by up to half a feature cell, which
is why the paper finds it on par with RoIPool and behind RoIAlign.

Here: the box corners are rounded to the nearest cell as :mod:`maskrcnn.ops.roi_pool` rounds them
(half away from zero), the RoI covers the cells from the first to the last corner's, inclusive
(RoIPool's ``x2 - x1 + 1`` cells), and that region is sampled as ``roi_align(..., aligned=True)``
samples a box (cell ``c`` spans ``[c, c + 1)``, its value sits at its centre). Averaged bins, the
paper's "avg" variant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskrcnn.ops.roi_align import roi_align_unchecked
from maskrcnn.ops.roi_pool import round_half_away


def quantize_rois(rois: Tensor, spatial_scale: float) -> Tensor:
    """``(K, 5)`` image-pixel RoIs -> the same RoIs in feature cells, corners snapped to whole cells."""
    corners = round_half_away(rois[:, 1:] * spatial_scale)
    return torch.cat([rois[:, :1], corners[:, :2], corners[:, 2:] + 1], dim=1)


def roi_warp_unchecked(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float = 1.0,
                       sampling_ratio: int = -1) -> Tensor:
    """RoIWarp of already validated ``(K, 5)`` RoIs ``(batch index, x1, y1, x2, y2)``."""
    return roi_align_unchecked(input, quantize_rois(rois, spatial_scale), output_size, 1.0, sampling_ratio, True)
