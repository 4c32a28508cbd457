"""Keypoint targets and decoding: hand-computed cases and PyTorch's own bicubic resize as the reference."""

import math

import pytest
import torch
from torch.nn import functional as F

from maskrcnn.structures.keypoints import (COCO_PERSON_KEYPOINTS, heatmaps_to_keypoints, keypoint_flip_map,
                                           keypoints_to_heatmap)


def test_keypoints_to_heatmap_hand_computed():
    rois = torch.tensor([[10.0, 20.0, 66.0, 76.0]])  # 56 px wide and tall: one bin per pixel at size 56
    kps = torch.tensor([[[10.0, 20.0, 2], [65.5, 30.2, 1], [66.0, 76.0, 2], [40.0, 50.0, 0], [9.9, 30.0, 2],
                         [30.0, 76.5, 2]]])
    bins, valid = keypoints_to_heatmap(kps, rois, 56)
    # (0, 0); (55, 10); on the right/bottom edge -> last bin; unlabelled; left of the RoI; below it
    assert valid.tolist() == [[True, True, True, False, False, False]]
    assert bins[0, :3].tolist() == [0, 10 * 56 + 55, 55 * 56 + 55]
    # a RoI twice the heatmap: two pixels per bin
    bins, valid = keypoints_to_heatmap(torch.tensor([[[7.0, 6.0, 2]]]), torch.tensor([[0.0, 0.0, 8.0, 8.0]]), 4)
    assert bins.item() == 3 * 4 + 3 and valid.item()


def _reference_decode(maps, rois):
    """Per RoI: PyTorch's bicubic resize to the RoI's size in whole pixels, arg-max, bin centre.

    Returns the keypoints, their scores and the resized maps ``(K, hc * wc)`` of every RoI.
    """
    kps, scores, resized = [], [], []
    for m, (x0, y0, x1, y1) in zip(maps, rois.tolist()):
        w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        wc, hc = math.ceil(w), math.ceil(h)
        up = F.interpolate(m[:, None], size=(hc, wc), mode="bicubic", align_corners=False)[:, 0].flatten(1)
        val, pos = up.max(1)
        x = (pos % wc).to(m.dtype) + 0.5
        y = (pos // wc).to(m.dtype) + 0.5
        kps.append(torch.stack([x * (w / wc) + x0, y * (h / hc) + y0], 1))
        scores.append(val)
        resized.append(up)
    return torch.stack(kps), torch.stack(scores), resized


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_heatmaps_to_keypoints_matches_bicubic_resize(dtype):
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(24, 4, 56, 56, generator=g, dtype=torch.float64).to(dtype)
    xy = torch.rand(24, 2, generator=g, dtype=torch.float64) * 200
    wh = torch.rand(24, 2, generator=g, dtype=torch.float64) * 150 + 0.2  # includes sub-pixel boxes
    rois = torch.cat([xy, xy + wh], 1).to(dtype)
    kps, scores = heatmaps_to_keypoints(maps, rois, max_elements=1 << 18)  # several batches
    ref_xy, ref_scores, resized = _reference_decode(maps, rois)
    assert torch.equal(kps[..., 2], torch.ones_like(scores))
    if dtype == torch.float64:
        torch.testing.assert_close(kps[..., :2], ref_xy)
        torch.testing.assert_close(scores, ref_scores)
        return
    # float32: the two resizes sum the same 16 products in different orders (and other CPUs' kernels
    # in others again), so values agree to a few dozen ulps and a peak within that of the runner-up
    # may be decided either way. Our peak must be one of the reference's peaks up to that rounding.
    tol = 1e-5 * ref_scores.abs().amax()
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=float(tol))
    for r, (x0, y0, x1, y1) in enumerate(rois.tolist()):
        w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        wc, hc = math.ceil(w), math.ceil(h)
        ix = ((kps[r, :, 0] - x0) * (wc / w) - 0.5).round().long()
        iy = ((kps[r, :, 1] - y0) * (hc / h) - 0.5).round().long()
        assert ((ix >= 0) & (ix < wc) & (iy >= 0) & (iy < hc)).all(), r
        at_ours = resized[r].gather(1, (iy * wc + ix)[:, None])[:, 0]
        assert (at_ours >= ref_scores[r] - tol).all(), f"RoI {r}: not a peak of the reference resize"
        same = (ix.double() + 0.5) * (w / wc) + x0, (iy.double() + 0.5) * (h / hc) + y0
        torch.testing.assert_close(kps[r, :, 0].double(), same[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(kps[r, :, 1].double(), same[1], rtol=0, atol=1e-4)


def test_heatmap_peak_decodes_to_its_bin_centre_and_softmax_score():
    maps = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    maps[0, 0, 2, 5] = 10.0
    maps[0, 1, 7, 0] = 10.0
    rois = torch.tensor([[100.0, 50.0, 108.0, 58.0]])  # the map's own size: the resize is the identity
    kps, scores = heatmaps_to_keypoints(maps, rois)
    assert kps[0, :, :2].tolist() == [[105.5, 52.5], [100.5, 57.5]]
    assert scores[0].tolist() == [10.0, 10.0]
    _, probs = heatmaps_to_keypoints(maps, rois, score="softmax")
    expected = math.exp(10) / (math.exp(10) + 63)
    torch.testing.assert_close(probs[0], torch.tensor([expected, expected], dtype=torch.float64))
    empty, empty_scores = heatmaps_to_keypoints(maps[:0], rois[:0])
    assert empty.shape == (0, 2, 3) and empty_scores.shape == (0, 2)


def test_flip_map_swaps_left_and_right():
    fm = keypoint_flip_map(COCO_PERSON_KEYPOINTS)
    names = [COCO_PERSON_KEYPOINTS[i] for i in fm]
    assert names[:5] == ["nose", "right_eye", "left_eye", "right_ear", "left_ear"]
    assert names[-1] == "left_ankle" and sorted(fm) == list(range(17))
    assert keypoint_flip_map(["top", "upper_left", "upper_right", "left_only"]) == [0, 2, 1, 3]
