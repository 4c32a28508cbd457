"""Backbones: ResNet/ResNeXt trunks (``resnet``) and the Feature Pyramid Network (``fpn``)."""

from __future__ import annotations

from torch import Tensor, nn

from maskrcnn.modeling.backbone.fpn import FPN


class Backbone(nn.Module):
    """A trunk (``body``: image -> its stages, finest first), optionally followed by an :class:`FPN`.

    Keeping the trunk under ``.body`` in both architectures gives every checkpoint one key layout.
    """

    def __init__(self, body: nn.Module, fpn: FPN | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.body(x)
        return feats if self.fpn is None else self.fpn(feats)
