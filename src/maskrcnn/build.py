"""``build_model(cfg)``: the detector of a config, with its backbone initialised from a file if asked."""

from __future__ import annotations

from maskrcnn.config import Config
from maskrcnn.modeling.build import build_detector
from maskrcnn.modeling.detector import MaskRCNN


def build_model(cfg: Config) -> MaskRCNN:
    """Build ``cfg.model``; if ``cfg.model.backbone.weights`` names a torchvision ImageNet ResNet/ResNeXt
    checkpoint, the trunk starts from it (nothing is downloaded)."""
    model = build_detector(cfg)
    if cfg.model.backbone.weights:
        from maskrcnn.interop.torchvision import load_imagenet_backbone

        load_imagenet_backbone(model, cfg.model.backbone.weights)
    return model
