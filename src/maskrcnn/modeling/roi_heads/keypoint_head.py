"""The keypoint branch (Mask R-CNN section 5): eight 3x3 conv-512 layers on 14x14 RoI features, a
4x4 stride-2 deconv to K heatmaps and a 2x bilinear upsampling to 56x56; the loss is a softmax
cross-entropy over the 56*56 bins of each labelled keypoint (one-hot "mask" per keypoint)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maskrcnn.modeling.conv import ConvNorm
from maskrcnn.structures.keypoints import keypoints_to_heatmap
from maskrcnn.structures.precision import to_geometry


class KeypointRCNNConvDeconvUpsampleHead(nn.Module):
    """``convs`` (3x3, ReLU) -> ``score_lowres`` (deconv 4x4, stride 2) -> x``up_scale`` bilinear.

    Output ``(R, K, 4S, 4S)`` heatmap logits for ``(R, C, S, S)`` RoI features.
    """

    def __init__(self, in_channels: int, num_keypoints: int, conv_dims: Sequence[int] = (512,) * 8,
                 up_scale: int = 2) -> None:
        super().__init__()
        dims = [in_channels, *conv_dims]
        self.convs = nn.Sequential(*[ConvNorm(dims[i], dims[i + 1], 3, 1, 1, relu=True) for i in range(len(conv_dims))])
        self.score_lowres = nn.ConvTranspose2d(dims[-1], num_keypoints, 4, stride=2, padding=1)
        self.up_scale = up_scale
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @property
    def num_keypoints(self) -> int:
        return self.score_lowres.out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.score_lowres(self.convs(x))
        if self.up_scale == 1:
            return x
        return F.interpolate(x, scale_factor=float(self.up_scale), mode="bilinear", align_corners=False)


def keypoint_loss(logits: Tensor, boxes: Sequence[Tensor], keypoints: Sequence[Tensor], normalizer: float | None = None
                  ) -> Tensor:
    """Cross-entropy of ``logits (R, K, M, M)`` against the bins of ``keypoints[i] (R_i, K, 3)``
    (the instance matched to each RoI of ``boxes[i]``), summed over labelled keypoints inside their
    RoI and divided by their number (``normalizer`` None: torchvision and detectron2's default) or
    by ``normalizer``. 0, with a graph, when no keypoint is labelled."""
    logits = to_geometry(logits)
    size = logits.shape[-1]
    bins, valid = [], []
    for b, kp in zip(boxes, keypoints):
        t, v = keypoints_to_heatmap(kp.to(b.dtype), b, size)
        bins.append(t)
        valid.append(v)
    if not bins or logits.shape[0] == 0:
        return logits.sum() * 0
    bins_all, valid_all = torch.cat(bins).flatten(), torch.cat(valid).flatten()
    flat = logits.flatten(2).flatten(0, 1)  # (R*K, M*M)
    losses = F.cross_entropy(flat, bins_all, reduction="none")
    total = (losses * valid_all).sum()
    if normalizer is None:
        # (mean over the labelled keypoints, without a host sync on how many there are)
        return total / valid_all.sum().clamp(min=1)
    return total / normalizer
