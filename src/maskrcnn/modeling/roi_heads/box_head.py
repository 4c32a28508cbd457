"""The box branch: pooled RoI features -> class scores and per-class box deltas, its loss, and the
inference that turns them into detections.

Class layout (every checkpoint converter maps to it): index 0 is background and foreground class
``c`` (1..K) is index ``c``, as in torchvision; ``bbox_pred`` has ``4 * (K + 1)`` outputs (the
background's four are never used) or 4 when regression is class-agnostic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maskrcnn.modeling.conv import ConvNorm
from maskrcnn.modeling.norm import make_norm
from maskrcnn.modeling.losses import box_regression_loss
from maskrcnn.ops.nms import batched_nms_unchecked
from maskrcnn.structures.boxes import BoxCoder, clip_boxes_to_image, nonempty
from maskrcnn.structures.precision import to_geometry


def fc1_as_conv_pays(device: torch.device) -> bool:
    """Whether the first FC runs as a convolution: only on a CPU with AVX-512, where oneDNN's 7x7
    kernel beat MKL's matrix product (AMD EPYC, R50-FPN, 1000 RoIs: 63 vs 152 ms); with AVX2 alone it
    took 10x the matrix product's time (AMD EPYC Zen 3: 1.92 vs 0.18 s) and made a training step 1.5x
    torchvision's. Elsewhere (other CPUs, GPUs) the FC stays a matrix product, as in torchvision."""
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512"


class FastRCNNConvFCHead(nn.Module):
    """``num_conv`` 3x3 convs (+norm) and ``num_fc`` fully connected layers, all followed by ReLU.

    2 FCs of 1024 is the paper's FPN head ("2fc"); 4 convs + 1 FC with GroupNorm/BatchNorm is the
    "4conv1fc" head of the later models (torchvision's v2, detectron2's GN configs).
    """

    def __init__(self, in_channels: int, resolution: int, num_conv: int = 0, conv_dim: int = 256, num_fc: int = 2,
                 fc_dim: int = 1024, norm: str = "", norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[
            ConvNorm(in_channels if i == 0 else conv_dim, conv_dim, 3, 1, 1, norm=make_norm(norm, conv_dim, norm_eps),
                     relu=True) for i in range(num_conv)])
        self.in_shape = (conv_dim if num_conv else in_channels, resolution, resolution)  # of the first FC's input
        dim = self.in_shape[0] * resolution * resolution
        self.register_buffer("fc1_as_conv", None, persistent=False)  # see cache_fc1_as_conv
        self.fcs = nn.ModuleList()
        for _ in range(num_fc):
            self.fcs.append(nn.Linear(dim, fc_dim))
            dim = fc_dim
        self.out_dim = dim
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for fc in self.fcs:
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.convs(x)
        fcs = list(self.fcs)
        if fcs and x.dim() == 4 and fc1_as_conv_pays(x.device):
            # the first FC over the (C, R, R) pooled map is an RxR convolution without padding: oneDNN
            # reads the channels-last map in place (flatten would copy it into (C, R, R) order first)
            # at its convolution speed; MKL's float32 matrix product ran at ~40% of that on an AMD
            # EPYC (R50-FPN, 1000 RoIs: 152 ms as a matrix product, 63 ms as this convolution)
            fc = fcs.pop(0)
            layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
            weight = self.fc1_as_conv
            if weight is None or not weight.is_contiguous(memory_format=layout):
                # the kernel in the map's layout, as cached: given another layout oneDNN takes another
                # path, which can round differently (oneDNN's AVX2 kernels: 2e-7 in the scores), and a prepared
                # model would no longer give exactly the outputs of the model it was made from
                weight = fc.weight.view(fc.out_features, *x.shape[1:]).contiguous(memory_format=layout)
            x = F.relu(F.conv2d(x, weight, fc.bias).flatten(1))
        else:
            x = x.flatten(1)
        for fc in fcs:
            x = F.relu(fc(x))
        return x

    def cache_fc1_as_conv(self, memory_format: torch.memory_format) -> None:
        """For inference: keep the first FC's weight as a convolution kernel in ``memory_format``, so
        that it is not reordered at every call (the FC's own weight stays, for ``state_dict``); only
        where the convolution is used (``fc1_as_conv_pays``)."""
        if len(self.fcs) and fc1_as_conv_pays(self.fcs[0].weight.device):
            fc, c = self.fcs[0], self.in_shape[0]
            kernel = fc.weight.detach().view(fc.out_features, c, *self.in_shape[1:]).contiguous(memory_format=memory_format)
            self.fc1_as_conv = kernel


class FastRCNNPredictor(nn.Module):
    """Linear class scores ``(R, K + 1)`` and box deltas ``(R, 4 (K + 1))`` (or ``(R, 4)`` class-agnostic)."""

    def __init__(self, in_dim: int, num_classes: int, class_agnostic: bool = False) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, 4 if class_agnostic else 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # (R, C, h, w) maps (the C4 head's res5 output) are average-pooled, as in the paper's C4 model
        x = x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


def box_losses(class_logits: Tensor, deltas: Tensor, labels: Tensor, target_deltas: Tensor,
               smooth_l1_beta: float) -> dict[str, Tensor]:
    """Cross-entropy over all sampled RoIs, and box regression of the foreground ones on their class,
    summed and divided by the number of sampled RoIs (torchvision and detectron2 agree here).

    ``labels: (R,)`` 0 = background; ``target_deltas: (R, 4)`` (rows of background RoIs are unused).
    """
    class_logits, deltas = to_geometry(class_logits), to_geometry(deltas)
    # no RoI at all when every proposal of the batch was ignored (inside crowd regions): zero losses
    # that keep the graph, not the mean over nothing (NaN) that would poison the weights
    loss_cls = F.cross_entropy(class_logits, labels) if labels.numel() else class_logits.sum() * 0.0
    fg = torch.nonzero(labels > 0)[:, 0]
    if deltas.shape[1] == 4:
        fg_deltas = deltas[fg]
    else:
        fg_deltas = deltas.reshape(deltas.shape[0], deltas.shape[1] // 4, 4)[fg, labels[fg]]
    loss_box = box_regression_loss(fg_deltas, target_deltas[fg], smooth_l1_beta) / max(labels.numel(), 1)
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box}


def detections_from_predictions(class_logits: Tensor, deltas: Tensor, proposals: Sequence[Tensor],
                                image_sizes: Sequence[tuple[int, int]], box_coder: BoxCoder, score_thresh: float,
                                nms_thresh: float, max_detections: int, min_size: float,
                                class_scores: Tensor | None = None, drop_empty: bool = False
                                ) -> list[dict[str, Tensor]]:
    """Per image: boxes of every (proposal, class) pair with score > ``score_thresh``, clipped, those
    at least ``min_size`` wide and tall, per-class NMS, the best ``max_detections``; ``drop_empty``:
    then without those of zero width or height (detectron2's order: fewer than the maximum may remain).

    Returns dicts with ``boxes (D, 4)``, ``scores (D,)``, ``labels (D,)`` (1..K).
    ``class_scores`` replaces ``softmax(class_logits)`` when given (Cascade R-CNN averages stages).
    """
    # decoded and ranked in full precision: bf16 scores tie and bf16 boxes snap to 4-px steps
    class_logits, deltas = to_geometry(class_logits), to_geometry(deltas)
    scores_all = F.softmax(class_logits, -1) if class_scores is None else to_geometry(class_scores)
    num_classes = scores_all.shape[1] - 1
    per_image = [p.shape[0] for p in proposals]
    boxes_all = box_coder.decode(deltas, torch.cat(list(proposals)))
    out = []
    for boxes, scores, size in zip(boxes_all.split(per_image), scores_all.split(per_image), image_sizes):
        # the box count per RoI from the deltas' width, not -1: an image may have no proposals
        boxes = clip_boxes_to_image(boxes.reshape(boxes.shape[0], deltas.shape[1] // 4, 4), size)
        if boxes.shape[1] == 1:  # class-agnostic: the same box for every class
            boxes = boxes.expand(-1, num_classes + 1, -1)
        labels = torch.arange(num_classes + 1, device=scores.device).expand_as(scores)
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        keep = scores > score_thresh
        if min_size >= 0:
            keep &= ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms_unchecked(boxes, scores, labels, nms_thresh, max_kept=max_detections)
        if drop_empty:
            keep = keep[nonempty(boxes[keep])]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out
