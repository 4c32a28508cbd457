"""RoI heads of the paper's ResNet-C4 model: RoIs pooled 14x14 from res4, the whole res5 stage as the
box head (average-pooled by the predictor), and the mask head on res5's 7x7 output (Mask R-CNN,
figure 4 left). In training the mask branch reuses the res5 features of the positive RoIs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from maskrcnn.modeling.roi_heads.standard import StandardROIHeads


class Res5ROIHeads(StandardROIHeads):
    """``box_head`` is the res5 stage (a ``nn.Sequential`` of blocks); see the module docstring."""

    def mask_logits(self, features: Sequence[Tensor], boxes: Sequence[Tensor], box_feats: Tensor | None = None,
                    fg_masks: Sequence[Tensor] | None = None) -> Tensor:
        assert self.mask_head is not None
        if box_feats is not None and fg_masks is not None:
            return self.mask_head(box_feats[torch.cat(list(fg_masks))])
        return self.mask_head(self.box_features(features, boxes))
