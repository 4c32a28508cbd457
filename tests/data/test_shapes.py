"""The built-in synthetic shapes: deterministic, valid COCO, occlusion reflected in the masks."""

import hashlib
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from maskrcnn.data.shapes import CLASSES, draw_image, write_shapes_dataset


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_and_valid_coco(tmp_path):
    a = write_shapes_dataset(tmp_path / "a", num_train=12, num_val=4, size=(96, 128), seed=3)
    write_shapes_dataset(tmp_path / "b", num_train=12, num_val=4, size=(96, 128), seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    write_shapes_dataset(tmp_path / "c", num_train=12, num_val=4, size=(96, 128), seed=4)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    data = json.loads(a["train"][0].read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASSES) and "star" in CLASSES
    assert len(data["images"]) == 12 and all(im["height"] == 96 and im["width"] == 128 for im in data["images"])
    coco = COCO(str(a["train"][0]))
    for ann in data["annotations"]:
        m = coco.annToMask(ann)
        assert m.sum() == ann["area"] > 0
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def test_occlusion_is_in_the_masks():
    rng = np.random.default_rng(0)
    seen_rle = seen_polygon = False
    for _ in range(200):
        img, insts = draw_image(rng, (96, 96), 6, 10, 36, 0.3)
        masks = np.stack([i["mask"] for i in insts]) if insts else np.zeros((0, 96, 96), bool)
        assert (masks.sum(0) <= 1).all(), "visible masks must not overlap"
        for inst in insts:
            seen_rle |= inst["polygon"] is None
            seen_polygon |= inst["polygon"] is not None
            # the visible region is painted with the shape's colour: nearly uniform
            assert img[inst["mask"]].std(0).max() < 20
    assert seen_rle and seen_polygon
