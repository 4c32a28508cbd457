"""Small models and synthetic data for fast CPU tests."""

from __future__ import annotations

import numpy as np
import torch

import maskrcnn
from maskrcnn.structures.masks import PolygonMasks

TINY = [
    "model.backbone.depth=18", "model.backbone.freeze_at=0", "model.backbone.norm=BN",
    "model.fpn.out_channels=32",
    "model.anchors.sizes=[[16], [32], [64], [128], [256]]",
    "model.rpn.pre_nms_topk_train=300", "model.rpn.pre_nms_topk_test=200",
    "model.rpn.post_nms_topk_train=100", "model.rpn.post_nms_topk_test=50",
    "model.rpn.batch_size_per_image=64",
    "model.roi_heads.batch_size_per_image=64", "model.roi_heads.num_classes=3",
    "model.roi_heads.detections_per_image=20",
    "model.box_head.fc_dim=64", "model.mask_head.conv_dim=32", "model.mask_head.num_conv=2",
    "model.input.min_size_train=[128]", "model.input.max_size_train=192",
    "model.input.min_size_test=128", "model.input.max_size_test=192",
]


def tiny_config(preset: str = "mask_rcnn_R_50_FPN", extra: list[str] | None = None) -> maskrcnn.Config:
    return maskrcnn.get_config(preset, TINY + (extra or []))


def shapes_sample(seed: int, size: tuple[int, int] = (128, 160), polygons: bool = False):
    """One image with 1-3 filled rectangles/triangles (class 1 = rectangle, 2 = triangle, 3 = diamond)."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.uniform(0.0, 0.25, (3, h, w)).astype(np.float32)
    boxes, labels, polys = [], [], []
    for _ in range(int(rng.integers(1, 4))):
        s = float(rng.uniform(24, 56))
        x0, y0 = float(rng.uniform(0, w - s)), float(rng.uniform(0, h - s))
        kind = int(rng.integers(1, 4))
        if kind == 1:
            ring = [x0, y0, x0 + s, y0, x0 + s, y0 + s, x0, y0 + s]
        elif kind == 2:
            ring = [x0 + s / 2, y0, x0 + s, y0 + s, x0, y0 + s]
        else:
            ring = [x0 + s / 2, y0, x0 + s, y0 + s / 2, x0 + s / 2, y0 + s, x0, y0 + s / 2]
        polys.append([ring])
        boxes.append([x0, y0, x0 + s, y0 + s])
        labels.append(kind)
    pm = PolygonMasks.from_coco(polys)
    bitmaps = _rasterize_full(pm, h, w)
    color = torch.tensor(rng.uniform(0.5, 1.0, (len(polys), 3)), dtype=torch.float32)
    image = torch.from_numpy(img)
    for k in range(len(polys)):
        image = torch.where(bitmaps[k].bool()[None], color[k][:, None, None], image)
    target = {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels),
              "masks": pm if polygons else bitmaps.to(torch.uint8)}
    return image, target


def _rasterize_full(pm: PolygonMasks, h: int, w: int) -> torch.Tensor:
    """Full-image bitmaps: rasterise each instance in the whole image box at (h, w) via a square grid."""
    side = max(h, w)
    full = pm.rasterize(torch.tensor([[0.0, 0.0, float(side), float(side)]] * len(pm)), side)
    return full[:, :h, :w]


def set_args(items: list[str]) -> list[str]:
    """Command-line ``--set`` arguments for each ``KEY=VALUE`` of ``items``."""
    return [arg for item in items for arg in ("--set", item)]


def tiny_train_overrides(out_dir, extra: list[str] | None = None) -> list[str]:
    """The demo preset shrunk for tests: 96-px shapes, a handful of images, no workers."""
    return [
        f"train.output_dir={out_dir}/train", f"data.shapes_dir={out_dir}/shapes",
        "data.shapes_train=8", "data.shapes_val=4", "data.shapes_size=96",
        "data.shapes_min_radius=12", "data.shapes_max_radius=30", "data.num_workers=0",
        "model.input.min_size_train=[96]", "model.input.max_size_train=160",
        "model.input.min_size_test=96", "model.input.max_size_test=160",
        "solver.ims_per_batch=2", "solver.max_iter=6", "solver.warmup_iters=2",
        "train.checkpoint_period=3", "train.log_period=1",
    ] + (extra or [])


def tiny_train_config(out_dir, extra: list[str] | None = None) -> maskrcnn.Config:
    return maskrcnn.get_config("shapes_R_18_FPN", tiny_train_overrides(out_dir, extra))


def random_scene(h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth random image with a few bright shapes: something for random filters to respond to."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, h // 16 + 1, w // 16 + 1, generator=g, dtype=torch.float64)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    for _ in range(6):
        y0, x0 = int(torch.randint(0, h - 40, (), generator=g)), int(torch.randint(0, w - 40, (), generator=g))
        img[:, y0:y0 + int(torch.randint(20, h // 3, (), generator=g)), x0:x0 + int(torch.randint(20, w // 3, (), generator=g))] = \
            torch.rand(3, 1, 1, generator=g, dtype=torch.float64)
    return img.clamp(0, 1)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (crowd annotations): run lengths over the column-major pixels, starting
    with a run of 0s."""
    flat, runs, cur, n = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    return {"size": list(mask.shape), "counts": runs + [n]}


def holes_filled(m):
    """The mask plus the background that cannot reach the border through 8-connected background."""
    bg = ~np.pad(m, 1)
    outside = np.zeros_like(bg)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    while True:
        g = np.pad(outside, 1)
        grown = np.zeros_like(outside)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= g[1 + dy:g.shape[0] - 1 + dy, 1 + dx:g.shape[1] - 1 + dx]
        grown &= bg
        if (grown == outside).all():
            return ~outside[1:-1, 1:-1]
        outside = grown
