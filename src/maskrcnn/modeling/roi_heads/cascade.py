"""Cascade R-CNN heads (Cai & Vasconcelos 2018) with a mask branch: Cascade Mask R-CNN.

A sequence of box stages, each trained at a higher IoU threshold (0.5, 0.6, 0.7) on the boxes
the previous stage refined, so that later stages see better proposals and learn to be stricter.
Each stage has its own box head and class-agnostic regressor with its own delta weights
((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15): later stages' deltas are smaller).

Training: stage 0 matches and samples the proposals like the standard heads; stage k > 0 re-labels
the boxes refined (and detached) by stage k - 1 with its own threshold; with ``resample`` it also
adds the ground truth again and draws a new balanced sample (mmdetection) instead of keeping the
same RoIs (detectron2). Stage losses are named ``loss_cls_stage{k}`` / ``loss_box_reg_stage{k}``,
weighted by ``stage_loss_weights``; with ``scale_gradients`` (detectron2) the gradient into the
pooled features is divided by the number of stages, since every stage pools the same maps.

Inference: class scores are the average of the stages' softmax, boxes come from the last stage.

Masks: ``mask_mode="last"`` (detectron2) has one mask head, trained on stage 0's foreground RoIs and
run on the final detections; ``"per_stage"`` (mmdetection) has one mask head per stage, each
trained on its stage's foreground RoIs, and averages their probabilities at test time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn.config.choices import CASCADE_MASK_MODES
from maskrcnn.modeling.matching import Matcher
from maskrcnn.modeling.roi_heads.box_head import detections_from_predictions
from maskrcnn.modeling.roi_heads.mask_head import mask_probabilities
from maskrcnn.modeling.roi_heads.standard import StandardROIHeads
from maskrcnn.structures.boxes import BoxCoder, clip_boxes_to_image, nonempty
from maskrcnn.structures.precision import to_geometry


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """Identity forward; the backward gradient multiplied by ``scale``."""
    return x * scale + x.detach() * (1.0 - scale)


class CascadeROIHeads(StandardROIHeads):
    """Cascade box stages (``box_head[k]``, ``box_predictor[k]``) plus the standard mask branch.

    Args (beyond :class:`StandardROIHeads`'s, whose ``box_head``/``box_predictor`` are stage 0's):
        box_heads, box_predictors: one per stage; predictors are class-agnostic.
        stage_ious: foreground IoU threshold per stage.
        stage_box_weights: BoxCoder weights per stage.
        stage_loss_weights: multiplier of each stage's losses.
        scale_gradients: divide the gradient into the shared pooled features by the number of stages.
        resample: draw a new balanced sample (with the ground truth added) at every stage.
        mask_mode: ``"last"`` or ``"per_stage"`` (then ``mask_head`` is a ``nn.ModuleList``, one per stage).
    """

    def __init__(self, box_pooler, box_heads: Sequence[nn.Module], box_predictors: Sequence[nn.Module], *,
                 num_classes: int, mask_pooler=None, mask_head: nn.Module | None = None,
                 stage_ious: Sequence[float] = (0.5, 0.6, 0.7),
                 stage_box_weights: Sequence[tuple[float, float, float, float]] = (
                     (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)),
                 stage_loss_weights: Sequence[float] = (1.0, 1.0, 1.0), scale_gradients: bool = True,
                 resample: bool = False, mask_mode: str = "last", **kwargs) -> None:
        n = len(box_heads)
        if not (n == len(box_predictors) == len(stage_ious) == len(stage_box_weights) == len(stage_loss_weights)) or n < 1:
            raise ValueError(f"cascade: {n} box heads, {len(box_predictors)} predictors, {len(stage_ious)} IoUs, "
                             f"{len(stage_box_weights)} box weights and {len(stage_loss_weights)} loss weights: "
                             "need one of each per stage")
        if mask_mode not in CASCADE_MASK_MODES:
            raise ValueError(f"cascade mask_mode must be one of {CASCADE_MASK_MODES}, got {mask_mode!r}")
        if mask_mode == "per_stage" and mask_head is not None and len(mask_head) != n:  # type: ignore[arg-type]
            raise ValueError("cascade mask_mode 'per_stage' needs one mask head per stage")
        kwargs["box_weights"] = tuple(stage_box_weights[0])
        kwargs["fg_iou"] = kwargs["bg_iou"] = stage_ious[0]
        super().__init__(box_pooler, box_heads[0], box_predictors[0], num_classes=num_classes, mask_pooler=mask_pooler,
                         mask_head=mask_head, **kwargs)
        # one module per stage under the standard heads' names: roi_heads.box_head.{k} (detectron2's layout)
        self.box_head = nn.ModuleList(box_heads)
        self.box_predictor = nn.ModuleList(box_predictors)
        self.stage_matchers = [Matcher(t, t) for t in stage_ious]
        self.stage_coders = [BoxCoder(tuple(w), float32=self.box_coder.float32) for w in stage_box_weights]
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.grad_scale = 1.0 / n if scale_gradients else 1.0
        self.resample = resample
        self.mask_mode = mask_mode

    @property
    def num_stages(self) -> int:
        return len(self.box_head)

    def _stage(self, k: int, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        pooled = scale_gradient(self.box_pooler(features, boxes), self.grad_scale)
        return self.box_predictor[k](self.box_head[k](pooled))

    def _refine(self, k: int, deltas: Tensor, boxes: Sequence[Tensor], sizes: Sequence[tuple[int, int]],
                drop_empty: bool) -> list[Tensor]:
        """Stage k's class-agnostic boxes, detached and clipped, as the next stage's input."""
        refined = self.stage_coders[k].decode(deltas.detach()[:, -4:], torch.cat(list(boxes)))
        out = []
        for b, size in zip(refined.split([x.shape[0] for x in boxes]), sizes):
            b = clip_boxes_to_image(b, size)
            if drop_empty:  # a box squeezed to nothing by the image border has no IoU with anything
                b = b[nonempty(b)]
            out.append(b)
        return out

    def losses(self, features: Sequence[Tensor], proposals: Sequence[Tensor], targets: Sequence[dict],
               image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, Tensor]:
        sizes = image_sizes or [(int(1e9), int(1e9))] * len(proposals)
        losses: dict[str, Tensor] = {}
        rois = first = self.label_and_sample(proposals, targets, self.stage_matchers[0])
        for k in range(self.num_stages):
            if k > 0:
                rois = self.label_and_sample(boxes, targets, self.stage_matchers[k], append_gt=self.resample,
                                             sample=self.resample)
            logits, deltas = self._stage(k, features, rois.boxes)
            w = self.stage_loss_weights[k]
            for name, value in self.box_loss(logits, deltas, rois, self.stage_coders[k]).items():
                losses[f"{name}_stage{k}"] = value * w
            if self.mask_on and self.mask_mode == "per_stage":
                losses[f"loss_mask_stage{k}"] = w * self.mask_loss(features, rois, targets, mask_head=self.mask_head[k])
            if k + 1 < self.num_stages:
                boxes = self._refine(k, deltas, rois.boxes, sizes, drop_empty=True)
        if self.mask_on and self.mask_mode == "last":
            losses["loss_mask"] = self.mask_loss(features, first, targets)
        if self.keypoint_head is not None:
            losses["loss_keypoint"] = self.keypoint_loss(features, first, targets)
        return losses

    def detect(self, features: Sequence[Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
               ) -> list[dict[str, Tensor]]:
        boxes, scores = list(proposals), []
        for k in range(self.num_stages):
            logits, deltas = self._stage(k, features, boxes)
            scores.append(torch.softmax(to_geometry(logits), dim=-1))
            if k + 1 < self.num_stages:
                boxes = self._refine(k, deltas, boxes, image_sizes, drop_empty=False)
        dets = detections_from_predictions(logits, deltas, boxes, image_sizes, self.stage_coders[-1], self.score_thresh,
                                           self.nms_thresh, self.detections_per_image, self.min_size,
                                           class_scores=torch.stack(scores).mean(0), drop_empty=self.drop_empty_detections)
        self.add_instance_outputs(features, dets)
        return dets

    def mask_probs(self, features: Sequence[Tensor], boxes: Sequence[Tensor], labels: Tensor) -> Tensor:
        if self.mask_mode == "last":
            return super().mask_probs(features, boxes, labels)
        pooled = self.mask_pooler(features, boxes)
        return torch.stack([mask_probabilities(head(pooled), labels, head.softmax) for head in self.mask_head]).mean(0)
