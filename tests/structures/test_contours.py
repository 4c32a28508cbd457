"""Mask -> polygon outlines: pycocotools rasterizes the polygons back to the mask, holes filled."""

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.structures.contours import mask_to_polygons
from tiny import holes_filled


def _rasterize(polygons, h, w):
    if not polygons:
        return np.zeros((h, w), bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).astype(bool)


def test_hand_made_cases():
    m = np.zeros((6, 7), bool)
    m[1:3, 1:4] = True
    assert mask_to_polygons(m) == [[1.0, 1.0, 4.0, 1.0, 4.0, 3.0, 1.0, 3.0]]  # the pixel corners, clockwise
    assert mask_to_polygons(m, offset=(10, 20)) == [[11.0, 21.0, 14.0, 21.0, 14.0, 23.0, 11.0, 23.0]]
    diagonal = np.eye(2, dtype=bool)  # touching at a corner: two squares
    assert mask_to_polygons(diagonal) == [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0]]
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    assert mask_to_polygons(ring) == [[0.0, 0.0, 3.0, 0.0, 3.0, 3.0, 0.0, 3.0]]  # COCO polygons have no holes
    assert mask_to_polygons(np.zeros((4, 4), bool)) == []
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros((1, 4, 4), bool))


def test_pycocotools_rasterizes_the_polygons_back_to_the_mask():
    rng = np.random.default_rng(0)
    for t in range(150):
        h, w = (int(v) for v in rng.integers(5, 60, 2))
        if t % 3 == 0:  # noise: many single pixels, diagonal contacts and holes
            m = rng.random((h, w)) > 0.6
        else:  # blobs
            low = (rng.random((h // 4 + 2, w // 4 + 2)) * 255).astype(np.uint8)
            m = np.array(Image.fromarray(low).resize((w, h), Image.BILINEAR)) > rng.integers(80, 200)
        polygons = mask_to_polygons(m)
        assert all(len(p) >= 8 and len(p) % 2 == 0 for p in polygons)
        np.testing.assert_array_equal(_rasterize(polygons, h, w), holes_filled(m), err_msg=f"case {t}")
