"""Multi-level RoI pooler: FPN level assignment and parity with torchvision's MultiScaleRoIAlign."""

import pytest
import torch

from maskrcnn.modeling.poolers import MultiLevelRoIPooler, assign_boxes_to_levels
from maskrcnn.ops import roi_align

TV_SCRIPT = """
from torchvision.ops import MultiScaleRoIAlign
feats = {str(i): f for i, f in enumerate(inputs["features"])}
pooler = MultiScaleRoIAlign(list(feats), inputs["output_size"], inputs["sampling_ratio"])
outputs["out"] = pooler(feats, inputs["boxes"], inputs["image_sizes"])
"""


def _square(cx, cy, side):
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def test_level_assignment_by_hand():
    # sqrt(area) 224 -> level 4 (index 2 when levels are 2..5); halving the side drops one level
    sides = [224, 223.9, 112, 111, 448, 1000, 10, 56]
    boxes = torch.tensor([_square(500, 500, s) for s in sides])
    lv = assign_boxes_to_levels(boxes, 2, 5) + 2
    assert lv.tolist() == [4, 3, 3, 2, 5, 5, 2, 2]
    # a 2:1 box has the level of the square of equal area
    assert assign_boxes_to_levels(torch.tensor([[0.0, 0.0, 448.0, 112.0]]), 2, 5).item() + 2 == 4
    # detectron2's guard sits inside the log
    assert (assign_boxes_to_levels(boxes, 2, 5, eps=0.0, log_eps=1e-8) + 2).tolist() == [4, 3, 3, 2, 5, 5, 2, 2]


def test_pools_each_box_from_its_level():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 3, 64 // s, 96 // s, generator=g, dtype=torch.float64) for s in (1, 2, 4, 8)]
    pooler = MultiLevelRoIPooler(5, strides=(4, 8, 16, 32), sampling_ratio=2, aligned=True)
    boxes = torch.tensor([_square(150, 120, 40), _square(200, 100, 500), _square(100, 100, 150)], dtype=torch.float64)
    out = pooler(feats, [boxes])
    levels = assign_boxes_to_levels(boxes, 2, 5)
    assert levels.tolist() == [0, 3, 1]
    for i, lv in enumerate(levels.tolist()):
        expected = roi_align(feats[lv], [boxes[i:i + 1]], 5, 1 / (4 * 2 ** lv), 2, True)
        torch.testing.assert_close(out[i:i + 1], expected)


def test_single_level_and_bad_arguments():
    x = torch.randn(2, 4, 10, 10)
    pooler = MultiLevelRoIPooler(3, strides=(16,), sampling_ratio=0)
    b = [torch.tensor([[0.0, 0.0, 100.0, 80.0]]), torch.zeros(0, 4)]
    assert pooler([x], b).shape == (1, 4, 3, 3)
    with pytest.raises(ValueError, match="strides"):
        MultiLevelRoIPooler(7, strides=(4, 16))
    with pytest.raises(ValueError, match="expected 1 feature maps"):
        pooler([x, x], b)
    with pytest.raises(ValueError, match="got boxes for 1 images"):
        pooler([x], b[:1])


@pytest.mark.reference
def test_matches_torchvision_multiscale_roialign(reference):
    g = torch.Generator().manual_seed(0)
    image_sizes = [(800, 1088), (608, 1000)]
    feats = [torch.randn(2, 6, 800 // s, 1088 // s, generator=g, dtype=torch.float64) for s in (4, 8, 16, 32)]
    boxes = []
    for h, w in image_sizes:
        xy = torch.rand(200, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h]) * 0.9
        side = torch.exp(torch.empty(200, 1, dtype=torch.float64).uniform_(1.4, 6.6, generator=g))  # 4 .. 735 px
        aspect = torch.exp(torch.empty(200, 1, dtype=torch.float64).uniform_(-0.7, 0.7, generator=g))
        wh = torch.cat([side * aspect, side / aspect], 1)
        boxes.append(torch.cat([xy, xy + wh], 1))
    ref = reference(TV_SCRIPT, dict(features=feats, boxes=boxes, image_sizes=image_sizes, output_size=7,
                                    sampling_ratio=2))["out"]
    ours = MultiLevelRoIPooler(7, strides=(4, 8, 16, 32), sampling_ratio=2, aligned=False)(feats, boxes)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    levels = assign_boxes_to_levels(torch.cat(boxes), 2, 5)
    assert levels.unique().numel() == 4  # every level is exercised
