"""Multi-level RoI pooling: each box is pooled from the FPN level that matches its size.

Level assignment is Eqn. (1) of the FPN paper (Lin et al. 2017): ``k = floor(k0 + log2(sqrt(wh) / 224))``
with ``k0 = 4``, clamped to the levels present. The two codebases whose checkpoints we load
guard the floor against round-off differently, so both guards are parameters:
torchvision adds ``eps = 1e-6`` to the level, detectron2 adds ``log_eps = 1e-8`` inside the log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn._checks import pair
from maskrcnn.ops._rois import boxes_to_rois
from maskrcnn.ops.roi_align import roi_align_unchecked
from maskrcnn.ops.roi_pool import roi_pool
from maskrcnn.ops.roi_warp import roi_warp_unchecked
from maskrcnn.structures.boxes import area
from maskrcnn.structures.precision import geometry_dtype


def assign_boxes_to_levels(boxes: Tensor, min_level: int, max_level: int, canonical_scale: float = 224.0,
                           canonical_level: int = 4, eps: float = 1e-6, log_eps: float = 0.0) -> Tensor:
    """``boxes: (K, 4)`` XYXY image pixels -> ``(K,)`` int64 level index in ``[0, max_level - min_level]``."""
    size = torch.sqrt(area(boxes))
    level = torch.floor(canonical_level + torch.log2(size / canonical_scale + log_eps) + eps)
    # clamp() maps NaN (it cannot occur for valid boxes) to a valid level rather than to garbage.
    return level.clamp(min=min_level, max=max_level).long() - min_level


class MultiLevelRoIPooler(nn.Module):
    """Pool ``(K, C, h, w)`` features for a list of per-image boxes from a list of feature maps.

    Args:
        output_size: bins, ``int`` or ``(h, w)``: 7 for the box head, 14 for the mask head.
        strides: stride of each feature map in ``forward``'s list, powers of two increasing by 2x
            (``(4, 8, 16, 32)`` for FPN P2-P5, ``(16,)`` for the C4 architecture).
        sampling_ratio, aligned: as in :func:`maskrcnn.ops.roi_align`.
        pooler_type: ``"ROIAlign"`` (Mask R-CNN), or ``"ROIPool"`` or ``"ROIWarp"`` (the paper's ablation).
        canonical_scale, canonical_level, eps, log_eps: the level assignment (see module doc).
    """

    def __init__(self, output_size: int | tuple[int, int], strides: Sequence[int], sampling_ratio: int = 0,
                 aligned: bool = True, pooler_type: str = "ROIAlign", canonical_scale: float = 224.0,
                 canonical_level: int = 4, eps: float = 1e-6, log_eps: float = 0.0) -> None:
        super().__init__()
        self.output_size = pair("MultiLevelRoIPooler", "output_size", output_size)
        levels = [math.log2(s) for s in strides]
        if not strides or any(lv != round(lv) for lv in levels) or any(b - a != 1 for a, b in zip(levels, levels[1:])):
            raise ValueError(f"MultiLevelRoIPooler: `strides` must be powers of two doubling per level, got {tuple(strides)}")
        if pooler_type not in ("ROIAlign", "ROIPool", "ROIWarp"):
            raise ValueError(f"MultiLevelRoIPooler: `pooler_type` must be 'ROIAlign', 'ROIPool' or 'ROIWarp', got "
                             f"{pooler_type!r}")
        self.strides = tuple(int(s) for s in strides)
        self.min_level, self.max_level = int(levels[0]), int(levels[-1])
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.pooler_type = pooler_type
        self.canonical_scale = float(canonical_scale)
        self.canonical_level = int(canonical_level)
        self.eps = float(eps)
        self.log_eps = float(log_eps)

    def _pool(self, feature: Tensor, rois: Tensor, stride: int) -> Tensor:
        if self.pooler_type == "ROIPool":
            return roi_pool(feature, rois, self.output_size, 1.0 / stride)
        if self.pooler_type == "ROIWarp":
            return roi_warp_unchecked(feature, rois, self.output_size, 1.0 / stride, self.sampling_ratio)
        return roi_align_unchecked(feature, rois, self.output_size, 1.0 / stride, self.sampling_ratio, self.aligned)

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """``features``: one ``(N, C, H_l, W_l)`` map per stride; ``boxes``: N tensors ``(K_i, 4)``."""
        if len(features) != len(self.strides):
            raise ValueError(f"MultiLevelRoIPooler: expected {len(self.strides)} feature maps "
                             f"(strides {self.strides}), got {len(features)}")
        if len(boxes) != features[0].shape[0]:
            raise ValueError(f"MultiLevelRoIPooler: got boxes for {len(boxes)} images, features for {features[0].shape[0]}")
        # RoIs stay in float32 when the maps are bf16/fp16 (structures/precision.py): RoIAlign samples
        # the low-precision maps at full-precision coordinates
        rois = boxes_to_rois(boxes).to(geometry_dtype(features[0].dtype))
        if len(features) == 1:
            return self._pool(features[0], rois, self.strides[0])
        levels = assign_boxes_to_levels(rois[:, 1:], self.min_level, self.max_level, self.canonical_scale,
                                        self.canonical_level, self.eps, self.log_eps)
        c = features[0].shape[1]
        out = features[0].new_zeros((rois.shape[0], c) + self.output_size)
        for lvl, (feature, stride) in enumerate(zip(features, self.strides)):
            idx = torch.nonzero(levels == lvl)[:, 0]
            if idx.numel():
                out.index_put_((idx,), self._pool(feature, rois[idx], stride))
        return out
