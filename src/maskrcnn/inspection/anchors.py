"""How the RPN's anchors fit a dataset's objects: for each ground-truth box, resized as training
resizes its image (the first ``model.input.min_size_train``), the best IoU of any anchor of the
padded image. An object whose best anchor stays under ``model.rpn.fg_iou_thresh`` (0.7) gets no
positive anchor by the threshold: it is learned only through the low-quality match of its best
anchor, and under ``model.rpn.bg_iou_thresh`` (0.3) that anchor is a poor start; the classic cause
of missed small or elongated objects. Reported per object size, with a suggestion.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from maskrcnn.config import Config
from maskrcnn.data.coco import CocoDataset
from maskrcnn.modeling.build import build_anchor_generator
from maskrcnn.modeling.preprocess import resized_size
from maskrcnn.structures.boxes import box_iou

SIZE_EDGES = (0, 16, 32, 64, 128, 256, 512, math.inf)  # sqrt(area) in the resized image, px


def best_anchor_iou(dataset: CocoDataset, cfg: Config, max_images: int = 500) -> dict[str, np.ndarray]:
    """Per ground-truth box (of up to ``max_images`` images): its size and aspect ratio in the
    resized image and the best IoU of any anchor."""
    m = cfg.model
    generator = build_anchor_generator(cfg)
    divisor = max(1, m.input.size_divisibility)
    min_size = m.input.min_size_train[0]
    cache: dict[tuple[int, int], torch.Tensor] = {}
    sizes, ratios, best = [], [], []
    step = max(1, len(dataset.records) // max_images)
    for rec in dataset.records[::step][:max_images]:
        if not rec.boxes:
            continue
        h, w, scale = resized_size(rec.height, rec.width, min_size, m.input.max_size_train, m.input.resize_style)
        padded = (math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor)
        if padded not in cache:
            grids = [(math.ceil(padded[0] / s), math.ceil(padded[1] / s)) for s in generator.strides]
            cache[padded] = torch.cat(generator(padded, grids, torch.float32, torch.device("cpu")))
        boxes = torch.tensor(rec.boxes, dtype=torch.float32) * torch.tensor([w / rec.width, h / rec.height] * 2)
        iou = box_iou(boxes, cache[padded])
        best.append(iou.max(dim=1).values)
        bw, bh = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6), (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
        sizes.append((bw * bh).sqrt())
        ratios.append(bh / bw)
    if not best:
        return {"size": np.zeros(0), "ratio": np.zeros(0), "best_iou": np.zeros(0)}
    return {"size": torch.cat(sizes).numpy(), "ratio": torch.cat(ratios).numpy(), "best_iou": torch.cat(best).numpy()}


def anchor_report(stats: dict[str, np.ndarray], cfg: Config) -> str:
    fg, bg = cfg.model.rpn.fg_iou_thresh, cfg.model.rpn.bg_iou_thresh
    size, ratio, best = stats["size"], stats["ratio"], stats["best_iou"]
    if not len(best):
        return "no ground-truth boxes to match"
    lines = [f"{len(best)} objects; best anchor IoU >= {fg:g} (a positive anchor by the threshold): "
             f"{100 * np.mean(best >= fg):.1f}%; under {bg:g} (even the best anchor a poor start): "
             f"{100 * np.mean(best < bg):.1f}%",
             f"{'object size (px, resized)':<28}{'objects':>8}{f'>= {fg:g}':>9}{f'< {bg:g}':>9}"]
    poor = []
    for lo, hi in zip(SIZE_EDGES, SIZE_EDGES[1:]):
        sel = (size >= lo) & (size < hi)
        if not sel.any():
            continue
        matched, weak = np.mean(best[sel] >= fg), np.mean(best[sel] < bg)
        label = f"{lo}-{hi}" if math.isfinite(hi) else f">= {lo}"
        lines.append(f"{label:<28}{int(sel.sum()):>8}{100 * matched:>8.1f}%{100 * weak:>8.1f}%")
        if sel.mean() >= 0.05 and weak >= 0.2:  # many objects of this size without a usable anchor
            poor.append((lo, hi))
    levels = cfg.model.anchors.sizes
    sizes = sorted(s for level in levels for s in level)
    shapes = sorted({r for level in cfg.model.anchors.aspect_ratios for r in level})
    for lo, hi in poor:
        if hi <= sizes[0] * 1.5:
            lines.append(f"suggestion: objects of {lo}-{hi} px are small for the smallest anchor ({sizes[0]:g} px): "
                         f"add smaller sizes to model.anchors.sizes, or train at a larger model.input.min_size_train")
        elif lo >= sizes[-1]:
            lines.append(f"suggestion: objects over {lo} px exceed the largest anchor ({sizes[-1]:g} px): add larger "
                         "sizes to model.anchors.sizes")
        else:
            lines.append(f"suggestion: objects of {lo}-{hi} px have no anchor close in shape: see the aspect ratios")
    far = np.mean((ratio < shapes[0] / 2) | (ratio > shapes[-1] * 2))
    if far >= 0.05:
        lines.append(f"suggestion: {100 * far:.0f}% of the objects are more elongated than twice the anchors' aspect "
                     f"ratios {shapes} (height/width): add ratios to model.anchors.aspect_ratios "
                     f"(median object ratio {np.median(ratio):.2f})")
    if np.mean(best >= fg) < 0.5 and all(len(level) == 1 for level in levels):
        # one size per level, doubling: an object halfway between two sizes meets either at about 0.5 IoU
        between = [[s, round(s * math.sqrt(2))] for level in levels for s in level]
        lines.append(f"note: with one anchor size per level (doubling), objects between two sizes reach about 0.5 "
                     f"IoU at best; the RPN still takes each object's best anchor as a positive, so this is usual. "
                     f"A second size per level raises the fraction: --set \"model.anchors.sizes={between}\"")
    if not poor and far < 0.05:
        lines.append(f"every object size and shape has a usable anchor (best IoU >= {bg:g} for at least 80% of "
                     "each size)")
    return "\n".join(lines)


def plot_anchor_fit(stats: dict[str, np.ndarray], cfg: Config, path: Path) -> None:
    from maskrcnn._pyplot import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.scatter(stats["size"], stats["best_iou"], s=6, alpha=0.5, color="tab:blue", label="an object")
    ax.axhline(cfg.model.rpn.fg_iou_thresh, color="tab:green", linestyle="--",
               label=f"positive threshold {cfg.model.rpn.fg_iou_thresh:g}")
    ax.axhline(cfg.model.rpn.bg_iou_thresh, color="tab:red", linestyle="--",
               label=f"negative threshold {cfg.model.rpn.bg_iou_thresh:g}")
    for s in sorted({s for level in cfg.model.anchors.sizes for s in level}):
        ax.axvline(s, color="gray", alpha=0.3)
    if len(stats["size"]) and stats["size"].min() > 0:
        ax.set_xscale("log")
    ax.set_xlabel("object size in the resized image (sqrt of box area, px; gray: anchor sizes)")
    ax.set_ylabel("best anchor IoU")
    ax.set_ylim(0, 1)
    ax.set_title("how the RPN's anchors fit the objects")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
