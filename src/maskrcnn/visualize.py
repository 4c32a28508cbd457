"""Draw predictions (or ground truth) over an image: translucent masks, boxes, class names and scores,
keypoints joined by their skeleton."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor


def class_color(label: int) -> tuple[int, int, int]:
    """A stable, well-separated colour per class (golden-ratio hue steps)."""
    h = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(image: Image.Image | np.ndarray | Tensor, boxes: Tensor, labels: Sequence[int],
                   names: Sequence[str], scores: Sequence[float] | None = None, masks: Tensor | None = None,
                   alpha: float = 0.45, keypoints: Tensor | None = None, skeleton: Sequence[Sequence[int]] = (),
                   text: bool = True, width: int = 2,
                   mask_crops: Sequence[tuple[int, int, np.ndarray]] | None = None) -> Image.Image:
    """An RGB PIL image with the instances drawn; ``masks`` ``(N, H, W)`` or ``(N, 1, H, W)`` bool;
    ``keypoints (N, K, 3)`` (x, y, v): those with v > 0 drawn as dots, ``skeleton`` pairs of
    1-based keypoint indices (COCO's convention) as lines between two drawn keypoints. ``text=False``
    draws the outlines only (``width`` px), for many boxes. ``mask_crops`` (instead of ``masks``):
    per instance ``(x0, y0, bool array)`` covering the pixels from (x0, y0), as sliced inference keeps
    the masks of large images."""
    if isinstance(image, Tensor):
        arr = image.permute(1, 2, 0).cpu().numpy()
        arr = (arr * 255).clip(0, 255).astype(np.uint8) if image.is_floating_point() else arr.astype(np.uint8)
    elif isinstance(image, Image.Image):
        arr = np.array(image.convert("RGB"))
    else:
        arr = np.asarray(image, dtype=np.uint8)
    canvas = arr.astype(np.float32)
    labels = [int(v) for v in labels]
    if masks is not None and len(labels):
        m = masks[:, 0] if masks.dim() == 4 else masks
        m = (m >= 0.5 if m.is_floating_point() else m.bool()).cpu().numpy()
        mask_crops = [(0, 0, m[k]) for k in range(len(labels))]
    for k, (x0, y0, crop) in enumerate(mask_crops or []):
        color = np.array(class_color(labels[k]), dtype=np.float32)
        region = canvas[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]]
        region[crop] = region[crop] * (1 - alpha) + color * alpha
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for k, box in enumerate(boxes.detach().cpu().tolist()):
        color = class_color(labels[k])
        draw.rectangle(box, outline=color, width=width)
        if not text:  # many boxes (proposals, detections before NMS): the outlines alone
            continue
        caption = names[k] + (f" {scores[k]:.2f}" if scores is not None else "")
        x, y = box[0], max(box[1] - 12, 0)
        w = draw.textlength(caption)
        draw.rectangle([x, y, x + w + 4, y + 12], fill=color)
        draw.text((x + 2, y), caption, fill=(0, 0, 0))
    if keypoints is not None:
        _draw_keypoints(draw, keypoints.detach().float().cpu().tolist(), labels, skeleton)
    return out


def draw_detections(image: Image.Image | np.ndarray | Tensor, detections: dict, class_map) -> Image.Image:
    """:func:`draw_instances` of a model's detections (``boxes``, ``labels``, ``scores`` and, where the
    model gives them, ``masks``/``mask_crops`` and ``keypoints``), named by ``class_map`` (a
    ``ClassMap``: ``name(label)`` and ``skeleton``): the overlay that ``predict`` saves for an image
    and encodes for a video frame."""
    labels = detections["labels"].tolist()
    return draw_instances(image, detections["boxes"], labels, [class_map.name(v) for v in labels],
                          detections["scores"].tolist(), detections.get("masks"), keypoints=detections.get("keypoints"),
                          skeleton=class_map.skeleton, mask_crops=detections.get("mask_crops") or None)


def _draw_keypoints(draw: ImageDraw.ImageDraw, keypoints: list, labels: Sequence[int],
                    skeleton: Sequence[Sequence[int]]) -> None:
    for k, points in enumerate(keypoints):
        color = class_color(labels[k] + 3)  # offset from the box colour, so the skeleton stands out
        for a, b in skeleton:
            (xa, ya, va), (xb, yb, vb) = points[a - 1], points[b - 1]
            if va > 0 and vb > 0:
                draw.line([xa, ya, xb, yb], fill=color, width=2)
        for x, y, v in points:
            if v > 0:
                draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=(255, 255, 255), outline=color)


def overlay_ground_truth(image: Tensor, target: dict, names: Sequence[str], skeleton: Sequence[Sequence[int]] = ()
                         ) -> Image.Image:
    """The ground truth of a dataset sample, drawn like predictions (masks only if bitmaps)."""
    masks = target.get("masks") if isinstance(target.get("masks"), torch.Tensor) else None
    labels = target["labels"].tolist()
    return draw_instances(image, target["boxes"], labels, [names[v - 1] for v in labels], masks=masks,
                          keypoints=target.get("keypoints"), skeleton=skeleton)
