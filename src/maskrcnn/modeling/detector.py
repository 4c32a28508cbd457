"""The detector: preprocess -> backbone -> RPN -> RoI heads -> postprocess, with torchvision's API.

``model(images)`` returns one dict per image with ``boxes (D, 4)`` (XYXY, original image pixels),
``labels (D,)`` (1..K), ``scores (D,)``, with the mask head ``masks (D, 1, H, W)`` (bool, or
probabilities when the mask threshold is negative), and with the keypoint head ``keypoints (D, K, 3)``
(x, y, 1) and ``keypoints_scores (D, K)``, as torchvision's Keypoint R-CNN. ``model(images, targets)`` in training mode
returns a dict of named losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn._checks import Checks
from maskrcnn.modeling.preprocess import ImagePreprocessor
from maskrcnn.modeling.roi_heads.standard import StandardROIHeads
from maskrcnn.modeling.rpn import RPN
from maskrcnn.structures.precision import network_precision


class MaskRCNN(nn.Module):
    """Generalised R-CNN (Faster R-CNN when the RoI heads have no mask head).

    Args:
        preprocess: input checks, normalisation, resize and batching.
        backbone: image batch -> list of feature maps, finest first.
        rpn: proposals from ``backbone`` maps ``rpn_levels``.
        roi_heads: detections from maps ``roi_levels`` and the proposals.
        num_classes: foreground classes (labels 1..K).
        paste_style, mask_threshold: how ``masks`` are produced (see ``paste_masks_in_image``).
        channels_last: run the network on NHWC feature maps (the conv weights should be too:
            ``model.to(memory_format=torch.channels_last)``, as ``build_model`` does).
        precision: at inference, "float32" (exact), or "bf16"/"fp16": the network's layers under
            ``torch.autocast``, geometry in float32 (``maskrcnn.structures.precision``). Training's
            precision is the trainer's (``solver.amp``).
    """

    def __init__(self, preprocess: ImagePreprocessor, backbone: nn.Module, rpn: RPN, roi_heads: StandardROIHeads,
                 num_classes: int, rpn_levels: Sequence[int], roi_levels: Sequence[int],
                 paste_style: str = "detectron2", mask_threshold: float = 0.5, channels_last: bool = False,
                 precision: str = "float32") -> None:
        super().__init__()
        self.preprocess = preprocess
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = num_classes
        self.rpn_levels = tuple(rpn_levels)
        self.roi_levels = tuple(roi_levels)
        self.paste_style = paste_style
        self.mask_threshold = mask_threshold
        self.channels_last = channels_last
        self.precision = precision
        # the losses of a training step: "all", "rpn" (the RPN's alone) or "detector" (the RoI heads'
        # alone, on proposals of a frozen RPN: Faster R-CNN's alternating training, engine/alternating.py)
        self.train_parts = "all"
        # optimize="detector": another network whose backbone and RPN propose (a list, so that it is not
        # a submodule: its weights are not this model's and stay out of its state dict)
        self._proposal_source: list[nn.Module] = []

    def set_proposal_source(self, source: "MaskRCNN | None") -> None:
        """With ``train_parts == "detector"``: the frozen network whose proposals the RoI heads train
        on (``None``: this model's own RPN, frozen)."""
        self._proposal_source = [] if source is None else [source.eval()]

    @torch.no_grad()
    def _frozen_proposals(self, batch: Tensor, rpn_feats: list[Tensor], sizes) -> list[Tensor]:
        """Proposals of the frozen RPN (the source network's, or this model's own) as at test time."""
        if self._proposal_source:
            source = self._proposal_source[0]
            feats = source.backbone(batch)
            proposals, _ = source.rpn([feats[i] for i in source.rpn_levels], batch.shape[-2:], sizes)
        else:
            was_training = self.rpn.training
            self.rpn.eval()
            proposals, _ = self.rpn([f.detach() for f in rpn_feats], batch.shape[-2:], sizes)
            self.rpn.train(was_training)
        return [p.detach() for p in proposals]

    @property
    def dtype(self) -> torch.dtype:
        """float32, or float64 for a model converted with ``.double()`` (the parity tests): the type
        of the images and of the geometry. Layer weights kept in bf16/fp16 for the fast mode
        (``modeling.inference``) run under autocast and do not change it."""
        dtypes = {p.dtype for p in self.parameters()}
        return torch.float64 if torch.float64 in dtypes else torch.float32

    @property
    def coco_types(self) -> list[str]:
        """The COCO result types of the predictions: ``bbox``, then ``segm`` and ``keypoints`` if predicted."""
        return ["bbox"] + (["segm"] if self.roi_heads.mask_on else []) + \
            (["keypoints"] if self.roi_heads.num_keypoints else [])

    def forward(self, images: Sequence[Tensor] | Tensor, targets: Sequence[dict] | None = None
                ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        checks = Checks()  # the value checks of the whole batch, read back once
        images = self.preprocess.check_images(images, checks)
        if self.training:
            if targets is None:
                raise ValueError("the model is in training mode: pass targets, or call model.eval() to predict")
            targets = self.preprocess.check_targets(targets, images, self.num_classes, self.roi_heads.mask_on,
                                                    self.roi_heads.num_keypoints, checks)
        checks.run()
        dtype = self.dtype
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, sizes, targets = self.preprocess(images, dtype, targets if self.training else None)
        batch = batch.to(next(self.parameters()).device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        # at inference, model.precision; in training the trainer sets it (solver.amp)
        with network_precision(batch.device, "float32" if self.training else self.precision, "model.precision"):
            features = self.backbone(batch)
            rpn_feats = [features[i] for i in self.rpn_levels]
            roi_feats = [features[i] for i in self.roi_levels]
            if self.training:
                assert targets is not None
                targets = [{k: (v.to(batch.device) if hasattr(v, "to") else v) for k, v in t.items()} for t in targets]
                if self.train_parts == "detector":
                    proposals, losses = self._frozen_proposals(batch, rpn_feats, sizes), {}
                else:
                    proposals, losses = self.rpn(rpn_feats, batch.shape[-2:], sizes, targets)
                    if self.train_parts == "rpn":
                        return losses
                _, roi_losses = self.roi_heads(roi_feats, proposals, sizes, targets)
                losses.update(roi_losses)
                return losses
            proposals, _ = self.rpn(rpn_feats, batch.shape[-2:], sizes)
            dets, _ = self.roi_heads(roi_feats, proposals, sizes)
        threshold = self.mask_threshold if self.mask_threshold >= 0 else None
        return self.preprocess.postprocess(dets, sizes, original_sizes, self.paste_style, threshold)
