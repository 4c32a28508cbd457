"""The mask branch (Mask R-CNN section 3): a small FCN on 14x14 RoI features that predicts one 28x28
mask per class; the loss is a per-pixel sigmoid cross-entropy on the ground-truth class's channel
only, so classes do not compete (the paper's "decoupled" masks, seed 004 slide 17)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maskrcnn.modeling.conv import ConvNorm
from maskrcnn.modeling.norm import make_norm
from maskrcnn.ops.roi_align import roi_align_unchecked
from maskrcnn.structures.masks import PolygonMasks
from maskrcnn.structures.precision import to_geometry


class MaskRCNNConvUpsampleHead(nn.Module):
    """``num_conv`` 3x3 convs (+norm, ReLU), a 2x2 stride-2 deconv + ReLU, a 1x1 conv to the class masks.

    Output ``(R, K + 1, 2S, 2S)`` logits (channel 0, background, is never used) or ``(R, 1, 2S, 2S)``
    when class-agnostic.
    """

    def __init__(self, in_channels: int, num_classes: int, num_conv: int = 4, conv_dim: int = 256, norm: str = "",
                 norm_eps: float = 1e-5, class_agnostic: bool = False) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[
            ConvNorm(in_channels if i == 0 else conv_dim, conv_dim, 3, 1, 1, norm=make_norm(norm, conv_dim, norm_eps),
                     relu=True) for i in range(num_conv)])
        dim = conv_dim if num_conv else in_channels
        self.deconv = nn.ConvTranspose2d(dim, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1 if class_agnostic else num_classes + 1, 1)
        for m in list(self.convs.modules()) + [self.deconv]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(F.relu(self.deconv(self.convs(x))))


def mask_targets(gt_masks: Tensor | PolygonMasks, boxes: Tensor, matched: Tensor, size: int, aligned: bool = False,
                 sampling_ratio: int = -1, binarize: bool = False) -> Tensor:
    """``(K, size, size)`` targets: instance ``matched[k]`` cropped to ``boxes[k]`` (input pixels).

    Bitmaps ``(G, H, W)`` are pooled with RoIAlign in one call (torchvision: ``aligned=False``,
    adaptive sampling, soft targets; detectron2: ``aligned=True``, ``binarize``); polygons are
    rasterised at the bin centres.
    """
    if isinstance(gt_masks, PolygonMasks):
        return gt_masks.to(boxes.device)[matched].rasterize(boxes, size).to(boxes.dtype)
    rois = torch.cat([matched[:, None].to(boxes.dtype), boxes], dim=1)
    out = roi_align_unchecked(gt_masks[:, None].to(boxes.dtype), rois, (size, size), 1.0, sampling_ratio, aligned)[:, 0]
    return (out >= 0.5).to(out.dtype) if binarize else out


def mask_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid cross-entropy of each RoI's ground-truth-class channel; 0 (with a graph) if no RoI."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    channel = torch.zeros_like(labels) if logits.shape[1] == 1 else labels
    picked = to_geometry(logits[torch.arange(logits.shape[0], device=logits.device), channel])
    return F.binary_cross_entropy_with_logits(picked, targets.to(picked.dtype))


def mask_probabilities(logits: Tensor, labels: Tensor) -> Tensor:
    """``(R, M, M)`` sigmoid of each detection's predicted-class channel."""
    channel = torch.zeros_like(labels) if logits.shape[1] == 1 else labels
    return to_geometry(logits[torch.arange(logits.shape[0], device=logits.device), channel]).sigmoid()
