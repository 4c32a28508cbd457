"""``maskrcnn smoke``: run the detection ops end to end on a generated image and show the result.

Draws a few shapes on a noisy background, makes detector-like candidate boxes around them
(jittered copies with random scores), keeps the best with NMS, and pools each kept box with
RoIAlign and RoIPool from the image itself. Writes a PNG with the kept boxes and the pooled crops
side by side, and prints what it did and how long each op took.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from maskrcnn.ops import batched_nms, box_iou, nms, roi_align, roi_pool


def _scene(seed: int, height: int = 360, width: int = 480) -> tuple[np.ndarray, list[tuple[str, list[float]]]]:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(40, 90, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    shapes = []
    for kind, color in [("circle", (230, 80, 60)), ("rectangle", (60, 200, 90)), ("triangle", (70, 110, 240)),
                        ("circle", (240, 210, 60))]:
        size = float(rng.uniform(50, 120))
        x0 = float(rng.uniform(0, width - size))
        y0 = float(rng.uniform(0, height - size))
        box = [x0, y0, x0 + size, y0 + size]
        if kind == "circle":
            draw.ellipse(box, fill=color)
        elif kind == "rectangle":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=color)
        shapes.append((kind, box))
    return np.array(img), shapes


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1e3


def run_smoke(out_dir: str | Path = "outputs/smoke", seed: int = 0) -> Path:
    """Run the ops on a generated scene; returns the path of the written PNG."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image, shapes = _scene(seed)
    g = torch.Generator().manual_seed(seed)
    truth = torch.tensor([b for _, b in shapes])
    labels = torch.tensor([["circle", "rectangle", "triangle"].index(k) for k, _ in shapes])
    # 200 candidates per object: jittered boxes, scored higher the closer they are to the object
    n = 200
    wh = (truth[:, 2:] - truth[:, :2]).repeat(1, 2)
    jitter = torch.randn(len(shapes), n, 4, generator=g) * 0.12
    cand = (truth[:, None] + jitter * wh[:, None]).reshape(-1, 4)
    cand = torch.cat([torch.minimum(cand[:, :2], cand[:, 2:]), torch.maximum(cand[:, :2], cand[:, 2:])], 1)
    scores = torch.exp(-jitter.abs().sum(-1)).reshape(-1) * torch.rand(len(shapes) * n, generator=g).add(1).div(2)
    cand_labels = labels[:, None].expand(-1, n).reshape(-1)

    keep, t_nms = _timed(lambda: nms(cand, scores, 0.3))
    keep_b, t_bnms = _timed(lambda: batched_nms(cand, scores, cand_labels, 0.3))
    top = keep[: len(shapes)]
    feats = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    crops, t_align = _timed(lambda: roi_align(feats, [cand[top]], 56, 1.0, 2, aligned=True))
    pooled, t_pool = _timed(lambda: roi_pool(feats, [cand[top]], 56, 1.0))

    canvas = Image.new("RGB", (image.shape[1] + 2 * 60, max(image.shape[0], 60 * len(top))), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, k in enumerate(top.tolist()):
        draw.rectangle(cand[k].tolist(), outline=(255, 255, 255), width=2)
        draw.text((cand[k, 0].item() + 3, cand[k, 1].item() + 2), f"{scores[k]:.2f}", fill=(255, 255, 255))
        for j, t in enumerate((crops, pooled)):
            tile = (t[i].permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(tile), (image.shape[1] + 2 + 60 * j, 60 * i + 2))
    path = out_dir / "smoke.png"
    canvas.save(path)

    print(f"maskrcnn smoke: {len(shapes)} shapes, {cand.shape[0]} candidate boxes on a {image.shape[1]}x{image.shape[0]} image")
    print(f"  nms(iou 0.3)          kept {keep.numel():4d} boxes  {t_nms:7.1f} ms")
    print(f"  batched_nms per class kept {keep_b.numel():4d} boxes  {t_bnms:7.1f} ms")
    print(f"  roi_align 56x56       {tuple(crops.shape)}  {t_align:7.1f} ms")
    print(f"  roi_pool 56x56        {tuple(pooled.shape)}  {t_pool:7.1f} ms")
    best = box_iou(cand[top], truth).amax(0)
    print("  best kept box IoU with each shape: " + ", ".join(f"{k} {v:.2f}" for (k, _), v in zip(shapes, best.tolist())))
    print(f"  wrote {path} (kept boxes; RoIAlign and RoIPool crops on the right)")
    return path
