"""Parity with torchvision's Mask R-CNN (v1 and v2) in float64 with seeded random weights.

torchvision builds its models in the reference environment, we convert and load its state dict,
and both run on the same images: detections (boxes, scores, labels, pasted masks) and, with
torchvision's anchor/RoI samples injected into ours, the training losses must agree.
"""

import numpy as np
import pytest
import torch

import maskrcnn
from maskrcnn.interop.torchvision import load_torchvision_detection
from tiny import random_scene as _image

BUILD = """
import torch, torchvision
from torch import nn
from torchvision.models import resnet50
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.models.detection import MaskRCNN, FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, _default_anchorgen
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead

def build(variant, **kw):
    # exactly what maskrcnn_resnet50_fpn(_v2) build when given weights (frozen BN in the trunk)
    torch.manual_seed(inputs["seed"])  # the default initialisers draw from the global generator
    trunk = resnet50(norm_layer=FrozenBatchNorm2d)
    if variant == "v1":
        model = MaskRCNN(_resnet_fpn_extractor(trunk, 3), num_classes=91, **kw)
    else:
        backbone = _resnet_fpn_extractor(trunk, 3, norm_layer=nn.BatchNorm2d)
        model = MaskRCNN(backbone, num_classes=91, rpn_anchor_generator=_default_anchorgen(),
                         rpn_head=RPNHead(256, 3, conv_depth=2),
                         box_head=FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d),
                         mask_head=MaskRCNNHeads(256, [256] * 4, 1, norm_layer=nn.BatchNorm2d), **kw)
    g = randomize_norms(model, inputs["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "bn" not in name and ".1." not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # biases: non-zero, small
            elif p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.75)
        # shift the mask logits so that the pasted masks are neither empty nor full boxes, and spread
        # the class logits so that detections do not all share one class
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.add_(inputs.get("mask_bias", 0.0))
        model.roi_heads.box_predictor.cls_score.weight.mul_(inputs.get("cls_gain", 1.0))
    return model.double()
"""

INFER = BUILD + """
model = build(inputs["variant"], box_score_thresh=0.0).eval()
with torch.no_grad():
    out = model([im.double() for im in inputs["images"]])
outputs["state"] = {k: v for k, v in model.state_dict().items()}
outputs["dets"] = [{"boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"], "masks": o["masks"][:, 0] >= 0.5}
                   for o in out]
"""

TRAIN = BUILD + """
model = build(inputs["variant"], min_size=320, max_size=512).train()
record = record_samplers(model)
torch.manual_seed(0)
losses = model([im.double() for im in inputs["images"]], inputs["targets"])
outputs["state"] = {k: v for k, v in model.state_dict().items()}
outputs["losses"] = {k: v.detach() for k, v in losses.items()}
outputs["samples"] = record
"""


def _ours(variant, state, **overrides):
    name = "torchvision_maskrcnn_resnet50_fpn" + ("_v2" if variant == "v2" else "")
    cfg = maskrcnn.get_config(name, [f"{k}={v}" for k, v in overrides.items()])
    model = maskrcnn.build_model(cfg)
    load_torchvision_detection(model, state)
    return model.double()


@pytest.mark.reference
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_inference_matches_torchvision(reference, variant):
    # a 4:3 image resized to 800x1066 and a portrait one of another size, in one batch
    images = [_image(480, 640, 1), _image(500, 380, 2)]
    ref = reference(INFER, {"variant": variant, "seed": 7, "images": images, "mask_bias": 1.0,
                                     "cls_gain": 3.0 if variant == "v1" else 1.0},
                    timeout=1500)
    model = _ours(variant, ref["state"], **{"model.roi_heads.score_thresh": 0.0}).eval()
    with torch.no_grad():
        ours = model(images)
    for i, (o, r) in enumerate(zip(ours, ref["dets"])):
        assert r["boxes"].shape[0] == 100, "torchvision should keep 100 detections with score_thresh 0"
        assert torch.equal(o["labels"], r["labels"]), f"image {i}: labels differ"
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(o["scores"], r["scores"], rtol=1e-6, atol=1e-12)
        same = (o["masks"][:, 0] == r["masks"]).double().mean().item()
        assert same >= 0.999, f"image {i}: only {same:.5f} of mask pixels agree"
        # not vacuous: many detections have a mask, and the masks are not whole boxes either
        nonempty = r["masks"].flatten(1).any(1).double().mean().item()
        assert nonempty > 0.2 and r["masks"].sum() > 2000, f"degenerate masks: {nonempty:.2f} non-empty"
        assert (o["masks"][:, 0] != r["masks"]).sum() < 0.01 * r["masks"].sum()
        # no tied scores (their order would be arbitrary), boxes of all sizes, several classes where
        # the random classifier allows it (v2's 4conv-1fc features favour one class for all boxes)
        assert r["scores"].unique().numel() == 100 and (o["boxes"][:, 2] - o["boxes"][:, 0]).std() > 5
        assert o["labels"].unique().numel() >= (5 if variant == "v1" else 1)


def _targets():
    targets = []
    for (h, w), boxes, labels in [((480, 640), [[40.0, 60, 200, 220], [300, 100, 620, 400], [10, 300, 90, 470]], [1, 18, 3]),
                                  ((500, 380), [[50.0, 50, 300, 450]], [5])]:
        boxes = torch.tensor(boxes, dtype=torch.float64)
        masks = torch.zeros(len(labels), h, w, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            yy, xx = np.mgrid[y0:y1, x0:x1]
            masks[k, y0:y1, x0:x1] = torch.from_numpy(((yy - (y0 + y1) / 2) ** 2 / ((y1 - y0) / 2) ** 2
                                                        + (xx - (x0 + x1) / 2) ** 2 / ((x1 - x0) / 2) ** 2 <= 1)
                                                       .astype(np.uint8))
        targets.append({"boxes": boxes, "labels": torch.tensor(labels), "masks": masks})
    return targets


@pytest.mark.reference
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_training_losses_match_torchvision(reference, variant):
    images, targets = [_image(480, 640, 3), _image(500, 380, 4)], _targets()
    ref = reference(TRAIN, {"variant": variant, "seed": 11, "images": images, "targets": targets}, timeout=1500)
    model = _ours(variant, ref["state"], **{"model.input.min_size_train": "[320]", "model.input.max_size_train": 512})
    model.train()
    model.rpn.sampler = lambda labels, seeds: ref["samples"]["rpn"]
    model.roi_heads.sampler = lambda labels, seeds: ref["samples"]["roi"]
    losses = model(images, targets)
    names = {"loss_objectness": "loss_rpn_objectness", "loss_rpn_box_reg": "loss_rpn_box", "loss_classifier": "loss_cls",
             "loss_box_reg": "loss_box_reg", "loss_mask": "loss_mask"}
    assert set(losses) == set(names.values())
    for tv_name, our_name in names.items():
        # (torchvision computes the objectness loss against float32 labels, hence check_dtype=False)
        torch.testing.assert_close(losses[our_name].detach(), ref["losses"][tv_name], rtol=1e-6, atol=1e-10, check_dtype=False,
                                   msg=lambda m: f"{our_name}: {m}")
    assert all(v > 0 for v in ref["losses"].values())
    assert len(ref["samples"]["roi"][0][0]) > 0  # some positive RoIs, so the mask loss is exercised
