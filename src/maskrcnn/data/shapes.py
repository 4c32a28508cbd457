"""The built-in synthetic dataset: coloured shapes on textured backgrounds, written as real COCO.

``write_shapes_dataset(root, ...)`` draws, with a seeded generator, images of circles, rectangles,
triangles and five-pointed stars (the non-convex class), of random size, colour and rotation,
overlapping each other. Later shapes occlude earlier ones and the masks say so: an instance's
segmentation is its *visible* region, written as a polygon when nothing covers it and as
compressed RLE when something does (so both COCO formats are exercised). Instances hidden below
``min_visible`` of their area are left out. The output is the usual layout::

    root/train/000000.png ...          root/annotations/instances_train.json
    root/val/000000.png ...            root/annotations/instances_val.json

The same seed gives byte-identical files.

With ``keypoints=True`` it is a keypoint dataset instead: only the stars are annotated (one
category with the five tips as keypoints, ``top``, ``upper_right``, ``lower_right``, ``lower_left``,
``upper_left``, upright within +-25 degrees so that left and right stay meaningful under a flip);
circles, rectangles and triangles are drawn as unannotated distractors. A tip is visible (v=2),
hidden under a later shape (v=1), or outside the image (0, 0, 0), as in COCO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CLASSES = ("circle", "rectangle", "triangle", "star")
STAR_KEYPOINTS = ("top", "upper_right", "lower_right", "lower_left", "upper_left")
STAR_SKELETON = ((1, 2), (2, 3), (3, 4), (4, 5), (5, 1))


def _outline(kind: str, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator) -> list[tuple]:
    """Polygon vertices of a shape of "radius" r centred at (cx, cy), rotated by ``angle``."""
    if kind == "rectangle":
        aspect = rng.uniform(0.5, 1.0)
        hw, hh = r, r * aspect
        pts = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]
    elif kind == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "star":
        pts = [((r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour gradients plus a blocky texture plus pixel noise."""
    low = rng.uniform(0, 160, (3, 4, 4))
    img = np.stack([np.asarray(Image.fromarray(c.astype(np.uint8)).resize((w, h), Image.BILINEAR)) for c in low], -1)
    cells = rng.integers(4, 16)
    texture = rng.uniform(-30, 30, (h // cells + 1, w // cells + 1, 1)).repeat(cells, 0).repeat(cells, 1)[:h, :w]
    noise = rng.normal(0, 12, (h, w, 3))
    return np.clip(img + texture + noise, 0, 255).astype(np.uint8)


def draw_image(rng: np.random.Generator, size: tuple[int, int], max_objects: int, min_radius: float,
               max_radius: float, min_visible: float, keypoints: bool = False) -> tuple[np.ndarray, list[dict]]:
    """One image ``(H, W, 3)`` uint8 and its instances: ``{"label", "mask" (H, W) bool, "polygon" or None}``
    (the polygon of a shape nothing covers; None when the visible part is smaller), plus
    ``"keypoints"`` (5 x (x, y, v)) of the stars in keypoint mode, where only stars are instances."""
    h, w = size
    img = _background(rng, h, w)
    drawn = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        if keypoints:  # mostly stars, the annotated class
            kind = "star" if rng.random() < 0.6 else CLASSES[int(rng.integers(len(CLASSES) - 1))]
        else:
            kind = CLASSES[int(rng.integers(len(CLASSES)))]
        r = float(rng.uniform(min_radius, max_radius))
        cx, cy = float(rng.uniform(r * 0.6, w - r * 0.6)), float(rng.uniform(r * 0.6, h - r * 0.6))
        tips = None
        if kind == "circle":
            poly = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
        elif keypoints and kind == "star":
            poly = _outline(kind, cx, cy, r, float(rng.uniform(-1, 1)) * math.radians(25), rng)
            tips = [(round(x, 2), round(y, 2)) for x, y in poly[0::2]]
        else:
            poly = _outline(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), rng)
        # paint exactly the pixels COCO's rasteriser assigns to the polygon as written to the JSON
        # (rounded to 0.01 px), so that the image, the annotation and the evaluation agree pixel for pixel
        poly = [(round(x, 2), round(y, 2)) for x, y in poly]
        mask = mask_utils.decode(mask_utils.frPyObjects([[v for p in poly for v in p]], h, w))[:, :, 0].astype(bool)
        if mask.sum() < 16:
            continue
        color = rng.integers(0, 256, 3)
        while np.abs(color.astype(int) - img[mask].mean(0)).sum() < 150:  # keep the shape visible
            color = rng.integers(0, 256, 3)
        shade = rng.normal(0, 6, (int(mask.sum()), 3))
        img[mask] = np.clip(color + shade, 0, 255).astype(np.uint8)
        for prev in drawn:  # the new shape hides what it covers
            prev["mask"] &= ~mask
            prev["occluded"] = prev["occluded"] or bool((prev["full"] & mask).any())
            for tip in prev["tips"]:
                if tip[2] == 2 and mask[min(int(tip[1]), h - 1), min(int(tip[0]), w - 1)]:
                    tip[2] = 1
        label = (1 if kind == "star" else 0) if keypoints else CLASSES.index(kind) + 1
        tip_list = [[x, y, 2] if 0 <= x < w and 0 <= y < h else [0.0, 0.0, 0] for x, y in (tips or [])]
        drawn.append({"label": label, "mask": mask.copy(), "full": mask, "polygon": poly, "occluded": False,
                      "tips": tip_list})
    out = []
    for d in drawn:
        if d["label"] == 0 or d["mask"].sum() < max(16, min_visible * d["full"].sum()):
            continue
        inst = {"label": d["label"], "mask": d["mask"], "polygon": None if d["occluded"] else d["polygon"]}
        if keypoints:
            inst["keypoints"] = [v for tip in d["tips"] for v in tip]
        out.append(inst)
    return img, out


def _annotation(inst: dict, ann_id: int, image_id: int) -> dict:
    m = inst["mask"]
    ys, xs = np.nonzero(m)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    if inst["polygon"] is not None:
        seg = [[float(v) for p in inst["polygon"] for v in p]]
    else:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        seg = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    ann = {"id": ann_id, "image_id": image_id, "category_id": inst["label"], "segmentation": seg,
           "area": float(m.sum()), "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "iscrowd": 0}
    if "keypoints" in inst:
        ann["keypoints"] = inst["keypoints"]
        ann["num_keypoints"] = sum(1 for v in inst["keypoints"][2::3] if v > 0)
    return ann


def write_shapes_dataset(root: str | Path, num_train: int = 400, num_val: int = 50, size: tuple[int, int] = (192, 192),
                         max_objects: int = 4, min_radius: float = 16.0, max_radius: float = 44.0,
                         min_visible: float = 0.4, seed: int = 0, keypoints: bool = False
                         ) -> dict[str, tuple[Path, Path]]:
    """Write the dataset; returns ``{"train": (json, image_dir), "val": (json, image_dir)}``."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    if keypoints:
        categories = [{"id": 1, "name": "star", "supercategory": "shape", "keypoints": list(STAR_KEYPOINTS),
                       "skeleton": [list(p) for p in STAR_SKELETON]}]
    else:
        categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    out = {}
    for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
        rng = np.random.default_rng(split_seed)
        img_dir = root / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, insts = draw_image(rng, size, max_objects, min_radius, max_radius, min_visible, keypoints)
            name = f"{i:06d}.png"
            Image.fromarray(img).save(img_dir / name, optimize=False)
            images.append({"id": i + 1, "file_name": name, "height": size[0], "width": size[1]})
            for inst in insts:
                annotations.append(_annotation(inst, len(annotations) + 1, i + 1))
        path = root / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        out[split] = (path, img_dir)
    return out
