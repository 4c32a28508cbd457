"""Region Proposal Network (Ren et al., Faster R-CNN): objectness and box deltas for every anchor,
decoded into a few hundred/thousand class-agnostic proposals per image.

Training losses are over a balanced sample of anchors (``sampler``): binary cross-entropy on
objectness and smooth-L1 (L1 when ``smooth_l1_beta == 0``) on the deltas of positive anchors,
both summed and divided by ``loss_normalizer``: the number of sampled anchors (torchvision) or
``batch_size_per_image * num_images`` (detectron2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maskrcnn.modeling.anchors import AnchorGenerator
from maskrcnn.modeling.conv import ConvNorm
from maskrcnn.modeling.losses import box_regression_loss
from maskrcnn.modeling.matching import BalancedSampler, Matcher, Sampler, ignore_crowd
from maskrcnn.ops.nms import batched_nms_unchecked
from maskrcnn.structures.boxes import BoxCoder, clip_boxes_to_image, nonempty, pairwise_iou
from maskrcnn.structures.precision import geometry_dtype, to_geometry


class RPNHead(nn.Module):
    """``num_convs`` shared 3x3 convs + ReLU, then 1x1 convs for objectness (A) and deltas (4A)."""

    def __init__(self, channels: int, num_anchors: int, num_convs: int = 1) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[ConvNorm(channels, channels, 3, 1, 1, relu=True) for _ in range(num_convs)])
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness ``(N, H*W*A)`` and deltas ``(N, H*W*A, 4)``, anchor order (y, x, a)."""
        logits, deltas = [], []
        for f in features:
            t = self.convs(f)
            n, _, h, w = f.shape
            logits.append(self.objectness(t).permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(self.deltas(t).reshape(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return logits, deltas


class RPN(nn.Module):
    """Proposals (and, in training, losses) from feature maps.

    Args:
        head, anchor_generator: the modules above.
        fg_iou, bg_iou: anchors with IoU >= fg_iou are positive, < bg_iou negative (0.7 / 0.3).
        batch_size_per_image, positive_fraction: the anchor sample for the loss (256, 0.5).
        pre_nms_topk, post_nms_topk: ``(train, test)``: proposals kept per level before NMS and per
            image after it.
        nms_thresh: IoU of the NMS between proposals of the same level (0.7).
        min_size: proposals no wider/taller than this (input pixels) are dropped.
        score_thresh: proposals with objectness probability below this are dropped.
        nms_on_probability: rank proposals for NMS by sigmoid probability (torchvision) rather than by
            logit (detectron2). The order is the same except where float precision saturates the
            sigmoid (logits above ~17 in float32 all become 1.0) and ties are broken by position.
        smooth_l1_beta, loss_normalizer ("sampled" or "batch"): see the module docstring.
        crowd_ioa_thresh: negative anchors this much inside a crowd region are ignored.
        box_decode_float32: decode proposals in float32 whatever the model's dtype (detectron2).
    """

    def __init__(self, head: RPNHead, anchor_generator: AnchorGenerator, *, fg_iou: float = 0.7, bg_iou: float = 0.3,
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_topk: tuple[int, int] = (2000, 1000), post_nms_topk: tuple[int, int] = (2000, 1000),
                 nms_thresh: float = 0.7, min_size: float = 1e-3, score_thresh: float = 0.0,
                 box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 smooth_l1_beta: float = 1 / 9, loss_normalizer: str = "sampled",
                 objectness_loss_weight: float = 1.0, box_loss_weight: float = 1.0,
                 nms_on_probability: bool = True, crowd_ioa_thresh: float = 0.7, box_decode_float32: bool = False
                 ) -> None:
        super().__init__()
        if loss_normalizer not in ("sampled", "batch"):
            raise ValueError(f"RPN loss_normalizer must be 'sampled' or 'batch', got {loss_normalizer!r}")
        self.head = head
        self.anchor_generator = anchor_generator
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality_matches=True)
        self.sampler: Sampler = BalancedSampler(batch_size_per_image, positive_fraction, salt=1)
        self.batch_size_per_image = batch_size_per_image
        self.box_coder = BoxCoder(box_weights, float32=box_decode_float32)
        self.pre_nms_topk = tuple(pre_nms_topk)
        self.post_nms_topk = tuple(post_nms_topk)
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.score_thresh = score_thresh
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_normalizer = loss_normalizer
        self.loss_weights = (objectness_loss_weight, box_loss_weight)
        self.nms_on_probability = nms_on_probability
        self.crowd_ioa_thresh = crowd_ioa_thresh

    def forward(self, features: Sequence[Tensor], padded_size: Sequence[int], image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[dict] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """``features``: levels ``(N, C, H_l, W_l)``; ``padded_size``: batch (H, W); ``image_sizes``: each
        image's size inside the padding; ``targets`` (training): per image ``boxes (G_i, 4)`` and
        optionally ``crowd_boxes (C_i, 4)`` and a sampling ``seed``.
        Returns per-image proposals ``(K_i, 4)`` and a dict of losses (empty at inference)."""
        logits, deltas = self.head(features)
        # scores, deltas and anchors leave the network's precision here (structures/precision.py)
        logits, deltas = [to_geometry(t) for t in logits], [to_geometry(t) for t in deltas]
        anchors = self.anchor_generator(padded_size, [f.shape[-2:] for f in features],
                                        geometry_dtype(features[0].dtype), features[0].device)
        with torch.no_grad():
            proposals = self._proposals(anchors, [lg.detach() for lg in logits], [d.detach() for d in deltas],
                                        image_sizes)
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN: training needs ground-truth boxes")
            losses = self._losses(torch.cat(anchors), torch.cat(logits, 1), torch.cat(deltas, 1), targets)
        return proposals, losses

    def _proposals(self, anchors: list[Tensor], logits: list[Tensor], deltas: list[Tensor],
                   image_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        topk = self.pre_nms_topk[0 if self.training else 1]
        n = logits[0].shape[0]
        boxes, scores, levels = [], [], []
        for lvl, (a, lg, d) in enumerate(zip(anchors, logits, deltas)):
            k = min(topk, lg.shape[1])
            lg, idx = lg.topk(k, dim=1)
            d = d.gather(1, idx[..., None].expand(-1, -1, 4))
            boxes.append(self.box_coder.decode(d.reshape(-1, 4), a[idx.reshape(-1)]).reshape(n, k, 4))
            scores.append(lg)
            levels.append(torch.full((k,), lvl, dtype=torch.long, device=lg.device))
        boxes_all, scores_all, level_all = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(levels)
        post = self.post_nms_topk[0 if self.training else 1]
        out = []
        for b, s, size in zip(boxes_all, scores_all, image_sizes):
            finite = torch.isfinite(b).all(1) & torch.isfinite(s)
            b, s, lv = b[finite], s[finite], level_all[finite]
            b = clip_boxes_to_image(b, size)
            keep = nonempty(b, self.min_size)
            if self.nms_on_probability or self.score_thresh > 0:
                prob = torch.sigmoid(s)
                keep &= prob >= self.score_thresh
                if self.nms_on_probability:
                    s = prob
            b, s, lv = b[keep], s[keep], lv[keep]
            keep = batched_nms_unchecked(b, s, lv, self.nms_thresh, max_kept=post)
            out.append(b[keep])
        return out

    def _losses(self, anchors: Tensor, logits: Tensor, deltas: Tensor, gt: Sequence[dict]) -> dict[str, Tensor]:
        labels, targets = [], []
        for t in gt:
            boxes = t["boxes"].to(anchors.dtype)
            iou = pairwise_iou(boxes, anchors).nan_to_num_(0.0)
            matched, lab = self.matcher(iou)
            labels.append(ignore_crowd(lab, anchors, t.get("crowd_boxes"), self.crowd_ioa_thresh))
            targets.append(boxes[matched] if boxes.shape[0] else torch.zeros_like(anchors))
        sampled = self.sampler(labels, [t.get("seed") for t in gt])
        num_images = len(gt)
        pos_img, pos_idx, all_img, all_idx, all_lab = [], [], [], [], []
        for i, (pos, neg) in enumerate(sampled):
            pos_img.append(torch.full_like(pos, i))
            pos_idx.append(pos)
            idx = torch.cat([pos, neg])
            all_img.append(torch.full_like(idx, i))
            all_idx.append(idx)
            all_lab.append(labels[i][idx])
        pos_img_t, pos_idx_t = torch.cat(pos_img), torch.cat(pos_idx)
        all_img_t, all_idx_t = torch.cat(all_img), torch.cat(all_idx)
        if self.loss_normalizer == "sampled":
            normalizer = max(all_idx_t.numel(), 1)
        else:
            normalizer = self.batch_size_per_image * num_images
        target_deltas = self.box_coder.encode(anchors[pos_idx_t], torch.stack(targets)[pos_img_t, pos_idx_t]) \
            if pos_idx_t.numel() else deltas.new_zeros((0, 4))
        box_loss = box_regression_loss(deltas[pos_img_t, pos_idx_t], target_deltas, self.smooth_l1_beta) / normalizer
        obj_loss = F.binary_cross_entropy_with_logits(
            logits[all_img_t, all_idx_t], torch.cat(all_lab).to(logits.dtype), reduction="sum") / normalizer
        return {"loss_rpn_objectness": obj_loss * self.loss_weights[0], "loss_rpn_box": box_loss * self.loss_weights[1]}
