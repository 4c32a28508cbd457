"""The mask branch (Mask R-CNN section 3): a small FCN on 14x14 RoI features that predicts one 28x28
mask per class; the loss is a per-pixel sigmoid cross-entropy on the ground-truth class's channel
only, so classes do not compete (the paper's "decoupled" masks, seed 004 slide 17).

The paper's ablations are options: an MLP head instead of the FCN (Table 2e), and a per-pixel
softmax over the classes with a multinomial loss instead of the sigmoids (Table 2b; channel 0, the
background otherwise unused, is the "not this object" class, as in an FCN for semantic
segmentation: each pixel of the RoI is the ground-truth class where the object's mask is, and
background elsewhere). Heads carry ``softmax`` so the loss and the probabilities know which."""

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
                 norm_eps: float = 1e-5, class_agnostic: bool = False, softmax: bool = False) -> None:
        super().__init__()
        self.softmax = _check_softmax(softmax, class_agnostic)
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


class MaskRCNNMLPHead(nn.Module):
    """The paper's MLP mask head (Table 2e): the ``(C, S, S)`` RoI features flattened, fully
    connected layers of ``fc_dims`` (+ReLU), and a last one to ``(K + 1) x 2S x 2S`` logits (or one
    class-agnostic mask), so the output has the FCN head's shape. Unlike the FCN it has to learn the
    spatial layout of every mask pixel from scratch, which the paper finds worse (31.5 vs 33.6 AP)."""

    def __init__(self, in_channels: int, resolution: int, num_classes: int, fc_dims: tuple[int, ...] = (1024, 1024),
                 class_agnostic: bool = False, softmax: bool = False) -> None:
        super().__init__()
        self.softmax = _check_softmax(softmax, class_agnostic)
        self.out_channels, self.out_size = 1 if class_agnostic else num_classes + 1, 2 * resolution
        dims = [in_channels * resolution * resolution, *fc_dims]
        self.fcs = nn.Sequential(*[layer for a, b in zip(dims, dims[1:]) for layer in (nn.Linear(a, b), nn.ReLU())])
        self.predictor = nn.Linear(dims[-1], self.out_channels * self.out_size ** 2)
        for m in self.fcs:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.predictor(self.fcs(x.flatten(1)))
        return out.reshape(x.shape[0], self.out_channels, self.out_size, self.out_size)


def _check_softmax(softmax: bool, class_agnostic: bool) -> bool:
    if softmax and class_agnostic:
        raise ValueError("model.mask_head.loss=softmax needs class-specific masks (a softmax over one class "
                         "channel is always 1): set model.mask_head.class_agnostic=false")
    return bool(softmax)


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


def mask_loss(logits: Tensor, labels: Tensor, targets: Tensor, softmax: bool = False) -> Tensor:
    """Mean sigmoid cross-entropy of each RoI's ground-truth-class channel, or with ``softmax`` the
    mean multinomial cross-entropy over all channels (the target pixel is the class where the
    target is >= 0.5, background elsewhere); 0 (with a graph) if no RoI."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    if softmax:
        classes = torch.where(targets >= 0.5, labels[:, None, None], torch.zeros_like(labels)[:, None, None])
        return F.cross_entropy(to_geometry(logits), classes.long())
    channel = torch.zeros_like(labels) if logits.shape[1] == 1 else labels
    picked = to_geometry(logits[torch.arange(logits.shape[0], device=logits.device), channel])
    return F.binary_cross_entropy_with_logits(picked, targets.to(picked.dtype))


def mask_probabilities(logits: Tensor, labels: Tensor, softmax: bool = False) -> Tensor:
    """``(R, M, M)`` probability of each detection's predicted class at each mask pixel: the sigmoid
    of its channel. With ``softmax``, a pixel is the object's where its class wins the softmax over
    the channels (the argmax, as an FCN labels pixels: its probability may be well under 0.5 when
    the head hesitates between classes); returned as ``sigmoid(z_k - max_{j != k} z_j)``, which is
    above 0.5 exactly where class k wins, so masks are thresholded and pasted as the sigmoid's."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    if softmax:
        z = to_geometry(logits)
        own = z[rows, labels]
        others = z.clone()
        others[rows, labels] = float("-inf")
        return torch.sigmoid(own - others.amax(dim=1))
    channel = torch.zeros_like(labels) if logits.shape[1] == 1 else labels
    return to_geometry(logits[rows, channel]).sigmoid()
