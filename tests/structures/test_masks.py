"""Mask pasting (both conventions), polygon rasterisation and polygon handling."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.nn import functional as F

from maskrcnn.structures.masks import PolygonMasks, paste_masks_in_image

TV_PASTE = """
from torchvision.models.detection.roi_heads import paste_masks_in_image
outputs["pasted"] = paste_masks_in_image(inputs["masks"][:, None], inputs["boxes"], inputs["size"])[:, 0]
"""


def _masks_and_boxes(n, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, 28, 28, generator=g, dtype=dtype)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * torch.tensor([w, h], dtype=dtype) * 1.2 - 20
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * torch.tensor([w, h], dtype=dtype) * 0.6 + 0.3
    return masks, torch.cat([xy, xy + wh], 1)


@pytest.mark.reference
def test_torchvision_paste_matches_torchvision(reference):
    masks, boxes = _masks_and_boxes(60, 90, 130, 0)
    # detections are clipped to the image (torchvision's paste fails on boxes entirely outside it)
    boxes = torch.stack([boxes[:, 0].clamp(0, 130), boxes[:, 1].clamp(0, 90), boxes[:, 2].clamp(0, 130),
                         boxes[:, 3].clamp(0, 90)], 1)
    boxes[0] = torch.tensor([0.0, 0.0, 130.0, 90.0], dtype=torch.float64)  # the whole image
    boxes[1] = torch.tensor([5.0, 6.0, 5.4, 6.2], dtype=torch.float64)  # smaller than a pixel
    ref = reference(TV_PASTE, {"masks": masks, "boxes": boxes, "size": (90, 130)})["pasted"]
    ours = paste_masks_in_image(masks, boxes, (90, 130), "torchvision", threshold=None)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert (ref > 0).sum() > 10000
    binary = paste_masks_in_image(masks, boxes, (90, 130), "torchvision", threshold=0.5)
    assert torch.equal(binary, ref >= 0.5)


def test_detectron2_paste_matches_grid_sample():
    # detectron2 pastes by sampling each pixel centre of the image with grid_sample: do exactly that
    masks, boxes = _masks_and_boxes(20, 70, 90, 1)
    h, w = 70, 90
    # each mask is computed on its box's window only: windows off the image, or under a pixel wide
    boxes[0] = torch.tensor([95.0, 10.0, 140.0, 40.0], dtype=torch.float64)  # right of the image
    boxes[1] = torch.tensor([-50.0, -30.0, -2.0, -1.0], dtype=torch.float64)  # above and left of it
    boxes[2] = torch.tensor([30.2, 40.1, 30.6, 40.3], dtype=torch.float64)  # inside one pixel
    boxes[3] = torch.tensor([-10.0, -10.0, 100.0, 80.0], dtype=torch.float64)  # beyond every edge
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    expected = []
    for m, (x0, y0, x1, y1) in zip(masks, boxes.tolist()):
        gy = (ys - y0) / (y1 - y0) * 2 - 1
        gx = (xs - x0) / (x1 - x0) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
        expected.append(F.grid_sample(m[None, None], grid, align_corners=False)[0, 0])
    expected = torch.stack(expected)
    ours = paste_masks_in_image(masks, boxes, (h, w), "detectron2", threshold=None)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert (expected > 0.1).sum() > 1000
    assert not expected[:2].any() and (expected[3] > 0).all()  # the cases above are what they say


def test_paste_is_chunked_and_handles_empty():
    masks, boxes = _masks_and_boxes(9, 40, 50, 2, torch.float32)
    full = paste_masks_in_image(masks, boxes, (40, 50), "detectron2")
    chunked = paste_masks_in_image(masks, boxes, (40, 50), "detectron2", chunk_pixels=40 * 50 * 2)
    assert full.dtype == torch.bool and torch.equal(full, chunked)
    assert paste_masks_in_image(masks[:0], boxes[:0], (40, 50)).shape == (0, 40, 50)
    with pytest.raises(ValueError, match="paste style"):
        paste_masks_in_image(masks, boxes, (40, 50), "nope")


def _coco_raster(polygons, h, w):
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def test_polygon_rasterisation_agrees_with_pycocotools():
    # a triangle, an L-shaped (non-convex) polygon, and an instance made of two disjoint parts
    instances = [
        [[10, 10, 90, 20, 40, 85]],
        [[5, 5, 60, 5, 60, 25, 25, 25, 25, 70, 5, 70]],
        [[10, 10, 30, 10, 30, 30, 10, 30], [50, 50, 80, 50, 80, 90, 50, 90]],
    ]
    polys = PolygonMasks.from_coco(instances, dtype=torch.float64)
    full = torch.tensor([[0.0, 0.0, 100.0, 100.0]] * 3, dtype=torch.float64)
    ours = polys.rasterize(full, 100).bool().numpy()
    for i, inst in enumerate(instances):
        ref = _coco_raster(inst, 100, 100)
        disagree = (ours[i] != ref).sum()
        # the two rasterisers differ only along edges
        assert disagree < 0.02 * ref.sum(), f"instance {i}: {disagree} of {ref.sum()} pixels differ"
        assert ref.sum() > 300
    # the L's notch is empty, its arms are full
    assert not ours[1][50, 45] and ours[1][50, 15] and ours[1][15, 45]


def test_polygon_rasterisation_in_a_box_crops_and_resizes():
    square = PolygonMasks.from_coco([[[20, 20, 60, 20, 60, 60, 20, 60]]])
    # the box is the left half of the square plus as much empty space to its left
    out = square.rasterize(torch.tensor([[0.0, 20.0, 40.0, 60.0]]), 8)[0]
    assert torch.equal(out[:, :4], torch.zeros(8, 4)) and torch.equal(out[:, 4:], torch.ones(8, 4))


def test_polygon_transforms_and_checks():
    p = PolygonMasks.from_coco([[[0, 0, 10, 0, 10, 5]], [[1, 1, 3, 1, 3, 3, 1, 3], [5, 5, 6, 5, 6, 6]]])
    assert len(p) == 2 and p.points.shape == (2, 2, 4, 2)
    torch.testing.assert_close(p.boxes(), torch.tensor([[0.0, 0.0, 10.0, 5.0], [1.0, 1.0, 6.0, 6.0]]))
    torch.testing.assert_close(p.scale(2, 3).boxes()[0], torch.tensor([0.0, 0.0, 20.0, 15.0]))
    torch.testing.assert_close(p.flip(20).boxes()[0], torch.tensor([10.0, 0.0, 20.0, 5.0]))
    assert len(p[torch.tensor([1])]) == 1 and len(p[0]) == 1
    with pytest.raises(ValueError, match="instance 0 ring 0 must hold >= 3"):
        PolygonMasks.from_coco([[[0, 0, 1, 1]]])
    with pytest.raises(ValueError, match="NaN or inf"):
        PolygonMasks.from_coco([[[0, 0, 1, np.nan, 2, 2]]])
    with pytest.raises(ValueError, match="has no polygon"):
        PolygonMasks.from_coco([[]])


def test_rle_decoding_compressed_and_uncompressed():
    from maskrcnn.structures.masks import decode_rle

    m = np.zeros((20, 30), dtype=np.uint8, order="F")
    m[3:9, 4:20] = 1
    m[12:18, 25:28] = 1
    compressed = mask_utils.encode(m)
    as_str = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}
    # uncompressed COCO RLE: run lengths in column-major order, starting with zeros
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    out = decode_rle([compressed, as_str, {"size": [20, 30], "counts": runs}], 20, 30)
    for i in range(3):
        assert torch.equal(out[i], torch.from_numpy(m)), i
    with pytest.raises(ValueError, match=r"RLE 0 has size \[20, 30\], expected \[21, 30\]"):
        decode_rle([compressed], 21, 30)
    with pytest.raises(ValueError, match="must be a dict"):
        decode_rle([[1, 2, 3]], 20, 30)
