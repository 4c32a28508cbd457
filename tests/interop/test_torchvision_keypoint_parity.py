"""Parity with torchvision's Keypoint R-CNN (``keypointrcnn_resnet50_fpn``) in float64, seeded random
weights: torchvision builds and runs the model in the reference environment, we load its converted
state dict and must give the same detections, keypoints and keypoint scores, and (with torchvision's
samples injected) the same keypoint loss."""

import pytest
import torch

import maskrcnn
from maskrcnn.interop.torchvision import load_torchvision_detection
from tiny import random_scene

BUILD = """
import torch, torchvision
from torchvision.models import resnet50
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.models.detection import KeypointRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

def build(**kw):
    # what keypointrcnn_resnet50_fpn builds when given weights (frozen BN in the trunk)
    torch.manual_seed(inputs["seed"])
    model = KeypointRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=2,
                         num_keypoints=17, **kw)
    g = randomize_norms(model, inputs["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # non-zero biases
    return model.double()
"""

INFER = BUILD + """
model = build(box_score_thresh=0.0).eval()
with torch.no_grad():
    out = model([im.double() for im in inputs["images"]])
outputs["state"] = dict(model.state_dict())
outputs["dets"] = out
"""

TRAIN = BUILD + """
model = build(min_size=320, max_size=512).train()
record = record_samplers(model)
torch.manual_seed(0)
targets = [dict(t, keypoints=t["keypoints"].float()) for t in inputs["targets"]]  # torchvision wants float32
losses = model([im.double() for im in inputs["images"]], targets)
outputs["state"] = dict(model.state_dict())
outputs["losses"] = {k: v.detach() for k, v in losses.items()}
outputs["samples"] = record
"""


def _ours(state, *overrides):
    model = maskrcnn.build_model(maskrcnn.get_config("torchvision_keypointrcnn_resnet50_fpn", list(overrides)))
    return load_torchvision_detection(model, state).double()


@pytest.mark.reference
def test_keypoint_inference_matches_torchvision(reference):
    images = [random_scene(480, 640, 5), random_scene(420, 360, 6)]
    ref = reference(INFER, {"seed": 3, "images": images}, timeout=1500)
    model = _ours(ref["state"], "model.roi_heads.score_thresh=0.0").eval()
    with torch.no_grad():
        ours = model(images)
    for i, (o, r) in enumerate(zip(ours, ref["dets"])):
        assert r["boxes"].shape[0] > 50, "torchvision should keep many detections with score_thresh 0"
        assert torch.equal(o["labels"], r["labels"])
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(o["scores"], r["scores"], rtol=1e-6, atol=1e-12)
        # torchvision decodes keypoints and their scores in float32, hence the tolerances
        torch.testing.assert_close(o["keypoints"], r["keypoints"].double(), rtol=0, atol=1e-3)
        torch.testing.assert_close(o["keypoints_scores"], r["keypoints_scores"].double(), rtol=1e-5, atol=1e-5)
        # not vacuous: keypoints spread over their boxes, scores vary
        kp = o["keypoints"]
        assert kp.shape == (r["boxes"].shape[0], 17, 3)
        assert kp[..., 0].std() > 10 and o["keypoints_scores"].std() > 1e-3


def _targets():
    g = torch.Generator().manual_seed(9)
    out = []
    for boxes in ([[40.0, 60, 200, 300], [300, 100, 620, 400]], [[50.0, 50, 300, 400]]):
        boxes = torch.tensor(boxes, dtype=torch.float64)
        wh = boxes[:, 2:] - boxes[:, :2]
        xy = boxes[:, None, :2] + torch.rand(len(boxes), 17, 2, generator=g, dtype=torch.float64) * wh[:, None]
        vis = torch.randint(0, 3, (len(boxes), 17, 1), generator=g).double()
        out.append({"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64),
                    "keypoints": torch.cat([xy.round(), vis], dim=2)})
    return out


@pytest.mark.reference
def test_keypoint_training_losses_match_torchvision(reference):
    images, targets = [random_scene(480, 640, 7), random_scene(500, 380, 8)], _targets()
    ref = reference(TRAIN, {"seed": 4, "images": images, "targets": targets}, timeout=1500)
    model = _ours(ref["state"], "model.input.min_size_train=[320]", "model.input.max_size_train=512").train()
    model.rpn.sampler = lambda labels, seeds: ref["samples"]["rpn"]
    model.roi_heads.sampler = lambda labels, seeds: ref["samples"]["roi"]
    losses = model(images, targets)
    assert ref["losses"]["loss_keypoint"] > 0 and len(ref["samples"]["roi"][0][0]) > 0
    torch.testing.assert_close(losses["loss_keypoint"].detach(), ref["losses"]["loss_keypoint"].double(), rtol=1e-6,
                               atol=1e-8)
    for tv_name, our_name in {"loss_classifier": "loss_cls", "loss_box_reg": "loss_box_reg"}.items():
        torch.testing.assert_close(losses[our_name].detach(), ref["losses"][tv_name], rtol=1e-6, atol=1e-10)
