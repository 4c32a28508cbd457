"""Box utilities: hand-computed values, torchvision parity for IoU and the box coder, input checks."""

import math

import pytest
import torch

from maskrcnn.structures import BoxCoder, box_area, box_iou, clip_boxes_to_image, remove_small_boxes

TV_SCRIPT = """
import torchvision
from torchvision.models.detection._utils import BoxCoder
out = {"iou": torchvision.ops.box_iou(inputs["a"], inputs["b"]), "area": torchvision.ops.box_area(inputs["a"])}
coder = BoxCoder(inputs["weights"])
out["enc"] = coder.encode_single(inputs["gt"], inputs["a"])
out["dec"] = coder.decode_single(inputs["deltas"], inputs["a"])
out["clip"] = torchvision.ops.clip_boxes_to_image(inputs["a"], (300, 200))
out["small"] = torchvision.ops.remove_small_boxes(inputs["a"], 20.0)
outputs.update(out)
"""


def _rand_boxes(g, n, dtype=torch.float64):
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 400 - 50
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g, dtype=dtype) * 150 + 0.5], 1)


@pytest.mark.reference
def test_matches_torchvision(reference):
    g = torch.Generator().manual_seed(0)
    a, gt = _rand_boxes(g, 300), _rand_boxes(g, 300)
    weights = (10.0, 10.0, 5.0, 5.0)
    deltas = torch.randn(300, 4, generator=g, dtype=torch.float64) * 2
    deltas[::10, 2:] = 20.0  # beyond the log(1000/16) clamp
    ref = reference(TV_SCRIPT, dict(a=a, b=gt, gt=gt, weights=weights, deltas=deltas))
    coder = BoxCoder(weights)
    torch.testing.assert_close(box_iou(a, gt), ref["iou"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(box_area(a), ref["area"], rtol=1e-12, atol=0)
    torch.testing.assert_close(coder.encode(a, gt), ref["enc"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(coder.decode(deltas, a), ref["dec"].reshape(300, 4), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(clip_boxes_to_image(a, (300, 200)), ref["clip"])
    assert torch.equal(remove_small_boxes(a, 20.0), ref["small"])
    assert (ref["iou"] > 0).sum() > 100


def test_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 20.0, 30.0]])
    assert box_area(a).tolist() == [100.0, 100.0, 0.0]
    iou = box_iou(a, a)
    assert iou[0, 1].item() == pytest.approx(25 / 175)
    assert iou[0, 0] == 1 and iou[0, 2] == 0
    assert iou[2, 2] == 0  # empty box: 0, not NaN
    assert clip_boxes_to_image(torch.tensor([[-5.0, 3.0, 50.0, 70.0]]), (60, 40)).tolist() == [[0.0, 3.0, 40.0, 60.0]]
    assert remove_small_boxes(a, 1.0).tolist() == [0, 1]


def test_box_coder_roundtrip_weights_and_clamp():
    g = torch.Generator().manual_seed(1)
    boxes, targets = _rand_boxes(g, 50), _rand_boxes(g, 50)
    for w in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (30.0, 30.0, 15.0, 15.0)]:
        coder = BoxCoder(w)
        torch.testing.assert_close(coder.decode(coder.encode(boxes, targets), boxes), targets)
    # a target twice as wide, centred: dx = 0, dw = ww * log 2
    d = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[-5.0, 0.0, 15.0, 10.0]]))
    torch.testing.assert_close(d, torch.tensor([[0.0, 0.0, 5 * math.log(2), 0.0]]))
    # huge predicted scale changes are clamped at log(1000/16): a 10 px box grows at most to 625 px
    out = BoxCoder().decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    torch.testing.assert_close(out[0, 2] - out[0, 0], torch.tensor(625.0))
    # class-specific deltas: (N, 4k) -> (N, 4k)
    assert BoxCoder().decode(torch.zeros(3, 12), boxes[:3].float()).shape == (3, 12)
    # differentiable
    d = torch.zeros(2, 4, requires_grad=True)
    BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(d, boxes[:2].float()).sum().backward()
    assert d.grad is not None and torch.isfinite(d.grad).all()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"box_iou: `boxes1` must have shape \(\*, 4\)"):
        box_iou(torch.zeros(3, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="box_iou: `boxes2` contains NaN"):
        box_iou(torch.zeros(3, 4), torch.tensor([[0.0, 0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="x2 >= x1"):
        box_area(torch.tensor([[5.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(TypeError, match="must be a floating point"):
        box_iou(torch.zeros(3, 4, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="`weights` must be 4 positive"):
        BoxCoder((1.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"`deltas` must be \(N, 4k\)"):
        BoxCoder().decode(torch.zeros(3, 5), torch.zeros(3, 4))
