"""Crowd regions (COCO ``iscrowd``) in training: boxes inside one are neither objects nor background."""

import pytest
import torch

import maskrcnn
from maskrcnn.modeling.matching import ignore_crowd
from tiny import shapes_sample, tiny_config


def test_negatives_inside_a_crowd_region_are_ignored():
    crowd = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    boxes = torch.tensor([
        [10.0, 10.0, 30.0, 30.0],    # all inside: intersection over its own area 1.0
        [80.0, 80.0, 120.0, 120.0],  # a quarter inside: 0.25
        [60.0, 0.0, 130.0, 10.0],    # 40 of 70 columns inside: 0.571, under the 0.7 threshold
        [50.0, 50.0, 60.0, 60.0],    # inside, but matched to an object: stays positive
        [200.0, 200.0, 220.0, 220.0],  # outside
    ])
    labels = torch.tensor([0, 0, 0, 1, 0])
    assert ignore_crowd(labels, boxes, crowd, 0.7).tolist() == [-1, 0, 0, 1, 0]
    assert ignore_crowd(labels, boxes, crowd, 0.5).tolist() == [-1, 0, -1, 1, 0]
    assert ignore_crowd(labels, boxes, None, 0.7).tolist() == labels.tolist()
    assert ignore_crowd(labels, boxes, torch.zeros(0, 4), 0.7).tolist() == labels.tolist()


@pytest.mark.parametrize("preset", ["mask_rcnn_R_50_FPN", "cascade_mask_rcnn_R_50_FPN"])
def test_an_image_that_is_all_crowd_trains_nothing_as_background(preset):
    # no objects and one crowd region over the whole image: every anchor and proposal lies inside it,
    # so the RPN and the box head have nothing to learn from this image (losses exactly 0), where the
    # same image without the crowd region teaches "background" everywhere
    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_config(preset)).train()
    image, _ = shapes_sample(3)
    h, w = image.shape[1:]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, h, w, dtype=torch.uint8)}
    crowded = dict(empty, crowd_boxes=torch.tensor([[-1000.0, -1000.0, w + 1000.0, h + 1000.0]]))  # the largest anchors too
    plain = model([image], [empty])
    crowd = model([image], [crowded])
    assert plain["loss_rpn_objectness"] > 0 and all(v > 0 for k, v in plain.items() if k.startswith("loss_cls"))
    # (a batch of such images has no RoI at all: this crashed in the box loss's reshape before)
    assert set(crowd) == set(plain)
    assert all(v == 0 for k, v in crowd.items()), crowd
    sum(crowd.values()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    # a crowd region over one corner leaves the rest of the image as background
    corner = dict(empty, crowd_boxes=torch.tensor([[0.0, 0.0, w / 3, h / 3]]))
    assert model([image], [corner])["loss_rpn_objectness"] > 0
