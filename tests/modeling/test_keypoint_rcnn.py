"""Keypoint R-CNN: the head's loss on hand-made cases, training drives it down, with or without the mask
head, output format, and bad keypoint targets rejected up front."""

import math

import pytest
import torch

import maskrcnn
from maskrcnn.modeling.roi_heads.keypoint_head import KeypointRCNNConvDeconvUpsampleHead, keypoint_loss
from tiny import shapes_sample, tiny_config

KP = ["model.keypoint_on=true", "model.keypoint_head.num_keypoints=3", "model.keypoint_head.conv_dims=[32, 32]"]


def test_head_gives_56x56_heatmaps_from_14x14_features():
    head = KeypointRCNNConvDeconvUpsampleHead(16, 5, (32,) * 3)
    assert head(torch.randn(2, 16, 14, 14)).shape == (2, 5, 56, 56) and head.num_keypoints == 5


def test_keypoint_loss_hand_computed():
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 4.0]])]
    kps = [torch.tensor([[[1.0, 2.0, 2], [3.0, 3.0, 0]]])]  # one labelled keypoint
    loss = keypoint_loss(logits, boxes, kps)
    assert math.isclose(loss.item(), math.log(16), rel_tol=1e-6)  # uniform over 16 bins
    loss.backward()
    assert logits.grad[0, 1].abs().sum() == 0  # the unlabelled keypoint gets no gradient
    with torch.no_grad():
        peaked = torch.zeros(1, 2, 4, 4)
        peaked[0, 0, 2, 1] = 20.0  # the right bin (row 2, column 1)
    assert keypoint_loss(peaked, boxes, kps).item() < 1e-6
    none = keypoint_loss(logits, boxes, [torch.zeros(1, 2, 3)])
    assert none.item() == 0 and none.requires_grad
    fixed = keypoint_loss(torch.zeros(1, 2, 4, 4), boxes, kps, normalizer=4.0)
    assert math.isclose(fixed.item(), math.log(16) / 4, rel_tol=1e-6)


def _with_keypoints(target):
    """Three keypoints per instance: the top-left corner, the centre, and an unlabelled one."""
    b = target["boxes"]
    kp = torch.stack([torch.stack([b[:, 0], b[:, 1], torch.full_like(b[:, 0], 2)], 1),
                      torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, torch.full_like(b[:, 0], 1)], 1),
                      torch.zeros(len(b), 3)], 1)
    return dict(target, keypoints=kp)


@pytest.mark.numerics
@pytest.mark.parametrize("mask_on", [False, True])
def test_keypoint_loss_falls_in_training(mask_on):
    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_config(extra=KP + [f"model.mask_on={str(mask_on).lower()}"])).train()
    data = [shapes_sample(i) for i in range(2)]
    images = [d[0] for d in data]
    targets = [dict(_with_keypoints(d[1]), seed=i) for i, d in enumerate(data)]
    # lr 0.003 for 12 steps overshot on some initialisations (last/first 0.03-0.77 over 12 seeds, so
    # the result hung on the CPU's rounding); lr 0.001 for 20 steps: 0.05-0.39
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
    history = []
    for _ in range(20):
        losses = model(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append(losses["loss_keypoint"].item())
    assert ("loss_mask" in losses) == mask_on
    assert history[0] > 0.5 * math.log(56 * 56)  # starts near chance
    assert all(math.isfinite(v) for v in history) and sum(history[-3:]) / 3 < 0.6 * history[0], history


def test_keypoint_outputs_and_cascade():
    for extra in ([], ["model.cascade.enabled=true"]):
        model = maskrcnn.build_model(tiny_config(extra=KP + extra)).eval()
        with torch.no_grad():
            out = model([torch.rand(3, 100, 130), torch.rand(3, 90, 70)])
        for o, (h, w) in zip(out, [(100, 130), (90, 70)]):
            n = o["boxes"].shape[0]
            assert o["keypoints"].shape == (n, 3, 3) and o["keypoints_scores"].shape == (n, 3)
            assert o["masks"].shape == (n, 1, h, w)
            # keypoints fall inside their boxes (original image coordinates)
            x, y = o["keypoints"][..., 0], o["keypoints"][..., 1]
            assert bool(((x >= o["boxes"][:, None, 0] - 1) & (x <= o["boxes"][:, None, 2] + 1)).all())
            assert bool(((y >= o["boxes"][:, None, 1] - 1) & (y <= o["boxes"][:, None, 3] + 1)).all())
    model.train()
    image, target = shapes_sample(0)
    losses = model([image], [_with_keypoints(target)])
    assert "loss_keypoint" in losses and "loss_cls_stage2" in losses


def test_bad_keypoint_targets_are_rejected():
    model = maskrcnn.build_model(tiny_config(extra=KP)).train()
    image, target = shapes_sample(0)
    with pytest.raises(ValueError, match="needs 'keypoints'"):
        model([image], [target])
    bad = _with_keypoints(target)
    bad["keypoints"] = bad["keypoints"][:, :2]
    with pytest.raises(ValueError, match="needs 'keypoints'"):
        model([image], [bad])
    bad = _with_keypoints(target)
    bad["keypoints"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model([image], [bad])
