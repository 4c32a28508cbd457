"""Keypoints as Mask R-CNN treats them (paper section 5, seed 004 slides 25-27): each keypoint of a
RoI is a one-hot ``m x m`` mask, so a target is one bin index per keypoint, and a prediction is the
arg-max of a heatmap upsampled to the RoI's size in pixels.

Coordinates follow COCO's files and torchvision: ``(x, y)`` as written in the annotations, no half-
pixel shift. Visibility ``v``: 0 not labelled, 1 labelled but hidden, 2 visible; both 1 and 2 train.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from maskrcnn.structures.precision import full_precision, to_geometry

COCO_PERSON_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle")
# the "skeleton" of COCO's person category (1-based keypoint indices, as in the annotation files)
COCO_PERSON_SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
                        (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))
# per-keypoint OKS falloff of the COCO keypoint benchmark (pycocotools' defaults)
COCO_PERSON_OKS_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
                          0.087, 0.087, 0.089, 0.089)


def keypoint_flip_map(names: Sequence[str]) -> list[int]:
    """Index permutation of a horizontal flip: a name containing ``left`` swaps with the same name
    with ``right`` (``left_eye`` <-> ``right_eye``, ``upper_left`` <-> ``upper_right``); others stay."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, n in enumerate(names):
        partner = n.replace("left", "\0").replace("right", "left").replace("\0", "right")
        out.append(index.get(partner, i))
    return out


def keypoints_to_heatmap(keypoints: Tensor, rois: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Training targets: ``keypoints (R, K, 3)`` of the instance matched to each RoI ``(R, 4)``.

    Returns ``(bins (R, K) long, valid (R, K) bool)``: the row-major index of the ``size x size``
    bin each keypoint falls in, and whether it is labelled and inside its RoI. A keypoint exactly
    on the RoI's right or bottom edge belongs to the last bin.
    """
    x0, y0, x1, y1 = (rois[:, i, None] for i in range(4))
    x, y = keypoints[..., 0], keypoints[..., 1]
    bx = ((x - x0) * (size / (x1 - x0))).floor().long()
    by = ((y - y0) * (size / (y1 - y0))).floor().long()
    bx = torch.where(x == x1, size - 1, bx)
    by = torch.where(y == y1, size - 1, by)
    valid = (bx >= 0) & (by >= 0) & (bx < size) & (by < size) & (keypoints[..., 2] > 0)
    return torch.where(valid, by * size + bx, 0), valid


def _bicubic_matrix(in_size: int, out_sizes: Tensor, max_out: int) -> Tensor:
    """``(R, max_out, in_size)`` weights of PyTorch's bicubic resize (a = -0.75, align_corners=False,
    borders replicated) from ``in_size`` to ``out_sizes[r]`` samples; rows past a RoI's size are 0."""
    dtype, dev = out_sizes.dtype, out_sizes.device
    scale = in_size / out_sizes[:, None]  # (R, 1)
    dst = torch.arange(max_out, dtype=dtype, device=dev)[None]
    src = (dst + 0.5) * scale - 0.5  # cubic: no clamping of the source position (unlike linear)
    base = src.floor()
    t = src - base
    a = -0.75

    def near(d: Tensor) -> Tensor:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: Tensor) -> Tensor:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    taps = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)  # (R, max_out, 4)
    idx = (base.long()[..., None] + torch.arange(-1, 3, device=dev)).clamp(0, in_size - 1)
    taps = taps * (dst < out_sizes[:, None])[..., None]
    out = torch.zeros((*taps.shape[:2], in_size), dtype=dtype, device=dev)
    return out.scatter_add_(2, idx, taps)


def heatmaps_to_keypoints(maps: Tensor, rois: Tensor, score: str = "logit", max_elements: int = 1 << 24
                          ) -> tuple[Tensor, Tensor]:
    """Decode ``maps (R, K, M, M)`` (logits) over ``rois (R, 4)`` into ``(keypoints (R, K, 3), scores (R, K))``.

    Each map is resized (bicubic) to the RoI's size rounded up to whole pixels and its arg-max bin
    centre mapped back into the image (Heckbert: continuous = discrete + 0.5), as torchvision and
    detectron2 do; the third column is 1. ``score``: ``"logit"`` the upsampled logit at the peak
    (torchvision's ``keypoints_scores``), ``"softmax"`` its probability under a softmax over the
    ``M x M`` bins (detectron2). RoIs are decoded in batches (separable resize as two matmuls) of
    at most ``max_elements`` upsampled values, with one host sync for the largest RoI size.
    """
    r, k = maps.shape[0], maps.shape[1]
    if score not in ("logit", "softmax"):
        raise ValueError(f"score must be 'logit' or 'softmax', got {score!r}")
    if r == 0:
        return maps.new_zeros((0, k, 3)), maps.new_zeros((0, k))
    maps = to_geometry(maps)
    rois = rois.to(maps.dtype)
    wc, hc = rounded_roi_size(rois)
    max_w, max_h = (int(v) for v in torch.stack([wc.max(), hc.max()]).tolist())
    return decode_heatmaps(maps, rois, score, max_h, max_w, max(1, max_elements // (k * max_h * max_w)))


def rounded_roi_size(rois: Tensor) -> tuple[Tensor, Tensor]:
    """``(R,)`` widths and heights of ``rois (R, 4)`` in whole pixels (at least 1): the size each
    heatmap is resized to."""
    return (rois[:, 2] - rois[:, 0]).clamp(min=1).ceil(), (rois[:, 3] - rois[:, 1]).clamp(min=1).ceil()


def decode_heatmaps(maps: Tensor, rois: Tensor, score: str, max_h: int, max_w: int, step: int | None = None
                    ) -> tuple[Tensor, Tensor]:
    """:func:`heatmaps_to_keypoints` given the largest rounded-up RoI height and width, with no host
    read: ``step`` RoIs at a time, or all at once (``None``, as an exported graph does)."""
    r, k, m = maps.shape[0], maps.shape[1], maps.shape[-1]
    maps = to_geometry(maps)
    rois = rois.to(maps.dtype)
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    wc, hc = rounded_roi_size(rois)
    ay, ax = _bicubic_matrix(m, hc, max_h), _bicubic_matrix(m, wc, max_w)
    inside = ((torch.arange(max_h, device=maps.device) < hc[:, None])[:, :, None]
              & (torch.arange(max_w, device=maps.device) < wc[:, None])[:, None, :])  # (R, H, W)
    peak_val, peak_pos = [], []
    for sl in [slice(None)] if step is None else [slice(s, s + step) for s in range(0, r, step)]:
        with full_precision(maps.device):
            # (two matmuls, not einsum: onnxruntime's Einsum divides by zero on zero RoIs)
            up = ay[sl, None] @ maps[sl] @ ax[sl, None].transpose(2, 3)
        up = up.masked_fill(~inside[sl, None], float("-inf"))
        # the first maximum in row-major order, found row by row (no index arithmetic on the
        # symbolic map width of an exported graph)
        row_val, row_x = up.max(dim=3)
        v, y = row_val.max(dim=2)
        peak_val.append(v)
        peak_pos.append(torch.stack([row_x.gather(2, y[..., None])[..., 0], y], -1))
    val, pos = torch.cat(peak_val), torch.cat(peak_pos)
    x_int, y_int = pos[..., 0], pos[..., 1]
    x = (x_int.to(maps.dtype) + 0.5) * (widths / wc)[:, None] + rois[:, 0, None]
    y = (y_int.to(maps.dtype) + 0.5) * (heights / hc)[:, None] + rois[:, 1, None]
    keypoints = torch.stack([x, y, torch.ones_like(x)], dim=-1)
    if score == "softmax":
        val = 1.0 / (maps.flatten(2) - val[..., None]).exp().sum(-1)
    return keypoints, val
