"""RoI heads of Faster/Mask R-CNN with FPN: label and sample proposals, run the box branch on them
and the mask branch on the positives (training) or on the final detections (inference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn.modeling.matching import BalancedSampler, Matcher, Sampler, ignore_crowd
from maskrcnn.modeling.poolers import MultiLevelRoIPooler
from maskrcnn.modeling.roi_heads.box_head import FastRCNNPredictor, box_losses, detections_from_predictions
from maskrcnn.modeling.roi_heads.keypoint_head import keypoint_loss
from maskrcnn.modeling.roi_heads.mask_head import mask_loss, mask_probabilities, mask_targets
from maskrcnn.structures.boxes import BoxCoder, pairwise_iou
from maskrcnn.structures.keypoints import heatmaps_to_keypoints


class SampledRoIs:
    """The RoIs of one training step, concatenated over images.

    ``boxes`` per image; ``labels (R,)`` 0 = background; ``matched (R,)`` ground-truth index;
    ``target_boxes (R, 4)`` the matched ground-truth box (meaningless for background).
    """

    def __init__(self, boxes: list[Tensor], labels: Tensor, matched: list[Tensor], target_boxes: Tensor) -> None:
        self.boxes, self.labels, self.matched, self.target_boxes = boxes, labels, matched, target_boxes

    def foreground(self) -> tuple[list[Tensor], list[Tensor], Tensor, list[Tensor]]:
        """Per image: foreground boxes and matched indices; plus their labels and the per-image fg masks."""
        per_image = [b.shape[0] for b in self.boxes]
        fg_masks = [lab > 0 for lab in self.labels.split(per_image)]
        boxes = [b[m] for b, m in zip(self.boxes, fg_masks)]
        matched = [mt[m] for mt, m in zip(self.matched, fg_masks)]
        return boxes, matched, self.labels[self.labels > 0], fg_masks


class StandardROIHeads(nn.Module):
    """Box branch (``box_pooler`` -> ``box_head`` -> ``box_predictor``), optional mask and keypoint branches.

    Args:
        num_classes: foreground classes K; labels are 1..K, 0 is background.
        fg_iou, bg_iou: proposals with IoU >= fg_iou with a ground truth are foreground, < bg_iou
            background (0.5 / 0.5: no ignored band).
        batch_size_per_image, positive_fraction: the RoI sample for the loss (512, 0.25).
        append_gt: add the ground-truth boxes to the proposals in training (so every object has at
            least one perfect positive early in training).
        box_weights: the BoxCoder weights of the deltas (10, 10, 5, 5).
        smooth_l1_beta: box loss transition (torchvision 1/9, detectron2 0 = L1).
        score_thresh, nms_thresh, detections_per_image, min_size: inference (0.05, 0.5, 100, 1e-2).
        drop_empty_detections: drop zero-width/height detections after NMS and top-k (detectron2).
        box_decode_float32: decode boxes in float32 whatever the model's dtype (detectron2).
        mask_target_aligned, mask_target_sampling, mask_target_binarize: how bitmap ground truth is
            cropped into mask targets (see :func:`mask_targets`).
        crowd_ioa_thresh: background proposals this much inside a crowd region are not sampled.
        keypoint_pooler, keypoint_head: the keypoint branch (run on the foreground RoIs in training,
            on the detections at test time, like the mask branch).
        keypoint_score: ``"logit"`` (torchvision) or ``"softmax"`` (detectron2) keypoint scores.
        keypoint_loss_weight: multiplies the keypoint loss.
        keypoint_loss_normalizer: ``"visible"``: mean over the labelled keypoints of the batch;
            ``"fixed"``: divided by what a full sample would hold (detectron2's alternative,
            ``images * batch_size_per_image * positive_fraction * K``), so that images with few
            labelled keypoints weigh less.
    """

    def __init__(self, box_pooler: MultiLevelRoIPooler, box_head: nn.Module, box_predictor: FastRCNNPredictor, *,
                 num_classes: int, mask_pooler: MultiLevelRoIPooler | None = None, mask_head: nn.Module | None = None,
                 fg_iou: float = 0.5, bg_iou: float = 0.5, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, append_gt: bool = True,
                 box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0), smooth_l1_beta: float = 1 / 9,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_image: int = 100,
                 min_size: float = 1e-2, mask_target_aligned: bool = False, mask_target_sampling: int = -1,
                 mask_target_binarize: bool = False, crowd_ioa_thresh: float = 0.7,
                 keypoint_pooler: MultiLevelRoIPooler | None = None, keypoint_head: nn.Module | None = None,
                 keypoint_score: str = "logit", keypoint_loss_weight: float = 1.0,
                 keypoint_loss_normalizer: str = "visible", drop_empty_detections: bool = False,
                 box_decode_float32: bool = False) -> None:
        super().__init__()
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.num_classes = num_classes
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality_matches=False)
        self.sampler: Sampler = BalancedSampler(batch_size_per_image, positive_fraction, salt=2)
        self.positives_per_image = batch_size_per_image * positive_fraction  # at most
        self.append_gt = append_gt
        self.box_coder = BoxCoder(box_weights, float32=box_decode_float32)
        self.smooth_l1_beta = smooth_l1_beta
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.min_size = min_size
        self.drop_empty_detections = drop_empty_detections
        self.mask_target = dict(aligned=mask_target_aligned, sampling_ratio=mask_target_sampling,
                                binarize=mask_target_binarize)
        self.crowd_ioa_thresh = crowd_ioa_thresh
        self.keypoint_pooler = keypoint_pooler
        self.keypoint_head = keypoint_head
        if keypoint_loss_normalizer not in ("visible", "fixed"):
            raise ValueError(f"keypoint_loss_normalizer must be 'visible' or 'fixed', got {keypoint_loss_normalizer!r}")
        self.keypoint_score = keypoint_score
        self.keypoint_loss_weight = keypoint_loss_weight
        self.keypoint_loss_normalizer = keypoint_loss_normalizer

    @property
    def mask_on(self) -> bool:
        return self.mask_head is not None

    @property
    def num_keypoints(self) -> int:
        """K of the keypoint branch, 0 without one."""
        return self.keypoint_head.num_keypoints if self.keypoint_head is not None else 0

    # -- training ---------------------------------------------------------------------------------
    def label_and_sample(self, proposals: Sequence[Tensor], targets: Sequence[dict], matcher: Matcher | None = None,
                         append_gt: bool | None = None, sample: bool = True) -> SampledRoIs:
        """Match ``proposals`` to the ground truth (``matcher``, default the heads' own), optionally add the
        ground-truth boxes first and draw the balanced sample; ignored RoIs are dropped either way."""
        matcher = matcher or self.matcher
        append_gt = self.append_gt if append_gt is None else append_gt
        boxes, labels, matched, target_boxes, binary = [], [], [], [], []
        for props, tgt in zip(proposals, targets):
            gt = tgt["boxes"].to(props.dtype)
            if append_gt:
                props = torch.cat([props, gt])
            m, lab = matcher(pairwise_iou(gt, props).nan_to_num_(0.0))
            cls = tgt["labels"][m] if gt.shape[0] else torch.zeros_like(m)
            cls = torch.where(lab == 1, cls, torch.where(lab == 0, 0, -1))
            lab = ignore_crowd(lab, props, tgt.get("crowd_boxes"), self.crowd_ioa_thresh)
            cls = torch.where(lab == -1, -1, cls)
            boxes.append(props)
            labels.append(cls)
            matched.append(m)
            binary.append(lab)
            target_boxes.append(gt[m] if gt.shape[0] else torch.zeros_like(props))
        if sample:
            chosen = [torch.cat([pos, neg]).sort().values  # proposal order, as torchvision
                      for pos, neg in self.sampler(binary, [t.get("seed") for t in targets])]
        else:
            chosen = [torch.nonzero(lab >= 0)[:, 0] for lab in binary]
        return SampledRoIs([b[i] for b, i in zip(boxes, chosen)], torch.cat([lab[i] for lab, i in zip(labels, chosen)]),
                           [m[i] for m, i in zip(matched, chosen)], torch.cat([t[i] for t, i in zip(target_boxes, chosen)]))

    def box_features(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        return self.box_head(self.box_pooler(features, boxes))

    def mask_logits(self, features: Sequence[Tensor], boxes: Sequence[Tensor], box_feats: Tensor | None = None,
                    fg_masks: Sequence[Tensor] | None = None) -> Tensor:
        assert self.mask_pooler is not None and self.mask_head is not None
        return self.mask_head(self.mask_pooler(features, boxes))

    def box_loss(self, logits: Tensor, deltas: Tensor, rois: SampledRoIs, box_coder: BoxCoder) -> dict[str, Tensor]:
        fg = rois.labels > 0
        target_deltas = torch.zeros_like(rois.target_boxes)
        if fg.any():
            target_deltas[fg] = box_coder.encode(torch.cat(rois.boxes)[fg], rois.target_boxes[fg])
        return box_losses(logits, deltas, rois.labels, target_deltas, self.smooth_l1_beta)

    def mask_loss(self, features: Sequence[Tensor], rois: SampledRoIs, targets: Sequence[dict],
                  box_feats: Tensor | None = None, mask_head: nn.Module | None = None) -> Tensor:
        """The mask loss of the foreground RoIs (``mask_head``: a cascade stage's own head)."""
        fg_boxes, fg_matched, fg_labels, fg_masks = rois.foreground()
        if mask_head is None:
            mlogits = self.mask_logits(features, fg_boxes, box_feats, fg_masks)
        else:
            mlogits = mask_head(self.mask_pooler(features, fg_boxes))
        size = mlogits.shape[-1]
        tgts = [mask_targets(t["masks"], b, m, size, **self.mask_target) for t, b, m in zip(targets, fg_boxes, fg_matched)]
        head = mask_head if mask_head is not None else self.mask_head
        return mask_loss(mlogits, fg_labels, torch.cat(tgts) if tgts else mlogits.new_zeros(0),
                         getattr(head, "softmax", False))

    def keypoint_loss(self, features: Sequence[Tensor], rois: SampledRoIs, targets: Sequence[dict]) -> Tensor:
        """The keypoint loss of the foreground RoIs against their matched instances' keypoints."""
        assert self.keypoint_pooler is not None and self.keypoint_head is not None
        fg_boxes, fg_matched, _, _ = rois.foreground()
        logits = self.keypoint_head(self.keypoint_pooler(features, fg_boxes))
        normalizer = None
        if self.keypoint_loss_normalizer == "fixed":
            normalizer = len(targets) * self.positives_per_image * self.num_keypoints
        loss = keypoint_loss(logits, fg_boxes, [t["keypoints"][m] for t, m in zip(targets, fg_matched)], normalizer)
        return loss * self.keypoint_loss_weight

    def losses(self, features: Sequence[Tensor], proposals: Sequence[Tensor], targets: Sequence[dict],
               image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, Tensor]:
        """``image_sizes`` clip the boxes a cascade refines between stages; one stage does not need them."""
        rois = self.label_and_sample(proposals, targets)
        feats = self.box_features(features, rois.boxes)
        losses = self.box_loss(*self.box_predictor(feats), rois, self.box_coder)
        if self.mask_on:
            losses["loss_mask"] = self.mask_loss(features, rois, targets, feats)
        if self.keypoint_head is not None:
            losses["loss_keypoint"] = self.keypoint_loss(features, rois, targets)
        return losses

    # -- inference --------------------------------------------------------------------------------
    def detect(self, features: Sequence[Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
               ) -> list[dict[str, Tensor]]:
        logits, deltas = self.box_predictor(self.box_features(features, proposals))
        dets = detections_from_predictions(logits, deltas, proposals, image_sizes, self.box_coder, self.score_thresh,
                                           self.nms_thresh, self.detections_per_image, self.min_size,
                                           drop_empty=self.drop_empty_detections)
        self.add_instance_outputs(features, dets)
        return dets

    def add_instance_outputs(self, features: Sequence[Tensor], dets: list[dict[str, Tensor]]) -> None:
        """Run the mask and keypoint branches (those present) on the final detections."""
        if self.mask_on:
            self.add_masks(features, dets)
        if self.keypoint_head is not None:
            self.add_keypoints(features, dets)

    def add_keypoints(self, features: Sequence[Tensor], dets: list[dict[str, Tensor]]) -> None:
        """Adds ``keypoints (D, K, 3)`` (x, y, 1) and ``keypoints_scores (D, K)`` to each image's detections."""
        assert self.keypoint_pooler is not None and self.keypoint_head is not None
        boxes = [d["boxes"] for d in dets]
        logits = self.keypoint_head(self.keypoint_pooler(features, boxes))
        kps, scores = heatmaps_to_keypoints(logits, torch.cat(boxes), self.keypoint_score)
        sizes = [b.shape[0] for b in boxes]
        for d, kp, sc in zip(dets, kps.split(sizes), scores.split(sizes)):
            d["keypoints"], d["keypoints_scores"] = kp, sc

    def add_masks(self, features: Sequence[Tensor], dets: list[dict[str, Tensor]]) -> None:
        """Adds ``mask_probs (D, M, M)`` of the predicted class to each image's detections."""
        boxes = [d["boxes"] for d in dets]
        probs = self.mask_probs(features, boxes, torch.cat([d["labels"] for d in dets]))
        for d, p in zip(dets, probs.split([b.shape[0] for b in boxes])):
            d["mask_probs"] = p

    def mask_probs(self, features: Sequence[Tensor], boxes: Sequence[Tensor], labels: Tensor) -> Tensor:
        return mask_probabilities(self.mask_logits(features, boxes), labels, getattr(self.mask_head, "softmax", False))

    def forward(self, features: Sequence[Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[dict] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("ROI heads: training needs targets")
            return [], self.losses(features, proposals, targets, image_sizes)
        return self.detect(features, proposals, image_sizes), {}
