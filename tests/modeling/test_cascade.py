"""Cascade Mask R-CNN: reduces to the plain heads with one stage, trains, same output format."""

import math

import pytest
import torch

import maskrcnn
from maskrcnn.modeling.matching import BalancedSampler
from maskrcnn.modeling.roi_heads.cascade import CascadeROIHeads, scale_gradient
from tiny import shapes_sample, tiny_config

pytestmark = pytest.mark.numerics  # float32 results compared with fixed expectations (see pyproject.toml)


def _train(model, images, targets, steps: int) -> list[dict[str, float]]:
    """SGD steps on a fixed batch; the loss values of every step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.003, momentum=0.9)
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


def test_scale_gradient():
    x = torch.ones(3, requires_grad=True)
    y = scale_gradient(x * 2, 0.25)
    assert torch.equal(y, torch.full((3,), 2.0))
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 0.5))


def _pair():
    """A plain model with class-agnostic regression and a one-stage cascade with the same weights."""
    torch.manual_seed(0)
    plain = maskrcnn.build_model(tiny_config(extra=["model.box_head.class_agnostic=true"]))
    cascade = maskrcnn.build_model(tiny_config(extra=[
        "model.cascade.enabled=true", "model.cascade.ious=[0.5]", "model.cascade.bbox_reg_weights=[[10, 10, 5, 5]]",
        "model.cascade.stage_loss_weights=[1.0]"]))
    state = {k.replace("roi_heads.box_head.", "roi_heads.box_head.0.").replace("roi_heads.box_predictor.",
                                                                                "roi_heads.box_predictor.0."): v
             for k, v in plain.state_dict().items()}
    cascade.load_state_dict(state)
    return plain, cascade


def test_one_stage_reduces_to_the_plain_heads():
    plain, cascade = _pair()
    assert isinstance(cascade.roi_heads, CascadeROIHeads) and cascade.roi_heads.num_stages == 1
    images = [shapes_sample(i)[0] for i in range(2)]
    plain.eval(), cascade.eval()
    with torch.no_grad():
        a, b = plain(images), cascade(images)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert sum(len(x["boxes"]) for x in a) > 0
    plain.train(), cascade.train()
    data = [shapes_sample(i) for i in range(2)]
    targets = [dict(t, seed=i) for i, (_, t) in enumerate(data)]  # seeded sampling: both draw the same RoIs
    la = plain([d[0] for d in data], targets)
    torch.manual_seed(1)
    lb = cascade([d[0] for d in data], targets)
    assert set(lb) == {"loss_rpn_objectness", "loss_rpn_box", "loss_cls_stage0", "loss_box_reg_stage0", "loss_mask"}
    for name in ("loss_rpn_objectness", "loss_rpn_box", "loss_mask"):
        torch.testing.assert_close(la[name], lb[name])
    torch.testing.assert_close(la["loss_cls"], lb["loss_cls_stage0"])
    torch.testing.assert_close(la["loss_box_reg"], lb["loss_box_reg_stage0"])


def _jittered(targets, g):
    out = []
    for t in targets:
        gt = t["boxes"].repeat(8, 1)
        b = gt + torch.randn(gt.shape, generator=g) * 0.15 * (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
        xy = torch.rand(16, 2, generator=g) * 100
        b = torch.cat([b, torch.cat([xy, xy + 8 + torch.rand(16, 2, generator=g) * 40], 1)])
        out.append(torch.cat([torch.minimum(b[:, :2], b[:, 2:]), torch.maximum(b[:, :2], b[:, 2:])], 1).clamp(0, 128))
    return out


@pytest.mark.parametrize("mode", ["last", "per_stage"])
def test_cascade_training_drives_every_stage_loss_down(mode):
    # Each stage normally trains on the previous stage's refinements, which move as that stage
    # learns (and more of them pass 0.6/0.7 IoU, so a fixed-size sample's summed box loss grows):
    # here every stage gets the same fixed boxes (relabelled at its own threshold), so the
    # objective is fixed and each stage's losses can be compared with themselves.
    torch.manual_seed(0)
    extra = ["model.cascade.enabled=true", f"model.cascade.mask_mode={mode}",
             "model.cascade.resample=" + ("true" if mode == "per_stage" else "false")]
    model = maskrcnn.build_model(tiny_config(extra=extra)).train()
    data = [shapes_sample(i) for i in range(2)]
    images, targets = [d[0] for d in data], [dict(d[1], seed=i) for i, d in enumerate(data)]
    proposals = _jittered(targets, torch.Generator().manual_seed(1))
    model.rpn._proposals = lambda *a, **k: proposals
    model.roi_heads._refine = lambda k, deltas, boxes, sizes, drop_empty: list(boxes)
    # 120 steps: at 80, stage 2's box loss (deltas weighted 30/15) had only reached 0.58-0.69 of its
    # start over four initialisations under another instruction set; at 120 every loss is under 0.41
    history = _train(model, images, targets, 120)
    assert {"loss_cls_stage2", "loss_box_reg_stage2"} <= set(history[0])
    for name in history[0]:
        first, last = history[0][name], sum(h[name] for h in history[-3:]) / 3
        assert last < 0.65 * first, f"{name} did not fall: {first:.4f} -> {last:.4f}"


def test_cascade_trains_through_its_own_refinements():
    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_config(extra=["model.cascade.enabled=true"])).train()
    data = [shapes_sample(i) for i in range(2)]
    images, targets = [d[0] for d in data], [dict(d[1], seed=i) for i, d in enumerate(data)]
    history = _train(model, images, targets, 40)
    assert all(math.isfinite(v) for h in history for v in h.values())
    totals = [sum(h.values()) for h in history]
    assert sum(totals[-3:]) < 0.6 * sum(totals[:3])


def test_output_format_is_mask_rcnn_s():
    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_config(extra=["model.cascade.enabled=true",
                                                    "model.cascade.mask_mode=per_stage"])).eval()
    plain = maskrcnn.build_model(tiny_config()).eval()
    img = shapes_sample(0)[0]
    with torch.no_grad():
        a, b = model([img])[0], plain([img])[0]
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape[1:] == b[k].shape[1:], k
    with pytest.raises(ValueError, match="one of each per stage"):
        maskrcnn.build_model(tiny_config(extra=["model.cascade.enabled=true", "model.cascade.ious=[0.5, 0.6]"]))
