"""Sliced inference for images larger than the model was sized for (aerial, microscopy, scans).

The image is cut into ``tile`` x ``tile`` windows overlapping by ``overlap`` (a fraction of the tile;
the last window of a row or column is moved back to end at the border, so every window is full),
the windows go through the model in batches, and the detections are brought back to image pixels
and merged. Two detections of one class from two windows are one object when they agree where both
windows saw the image: in the windows' common area, their masks (boxes for a model without masks)
overlap with an IoU of at least ``merge_iou``. That joins an object seen whole in one window and
cut in another, and the pieces of an object larger than any window, while two objects side by side
stay two (in the common area one of them is absent from the other's mask). Two detections from
one window are never merged: the model saw both whole and kept both, as it does on a whole image
(so an image that fits one window gets exactly the model's detections). The best-scored detection
of an object is its base; another window adds only what it saw outside the windows the object was
already seen in, so a blob reported by a window that saw a cut-off view cannot swallow a neighbour
the first window saw separately; the box grows to cover the added mask pixels (boxes without
masks: only past the edges of the windows already seen). Masks are kept as crops of their boxes
(``SlicedDetections.masks``), never as an image-sized array per detection, so memory grows with
the objects, not with the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Window starts along one axis: every ``tile * (1 - overlap)`` pixels, the last one ending at
    ``length`` (one window from 0 when the image is not longer than a tile)."""
    if tile < 1 or not 0 <= overlap < 1:
        raise ValueError(f"a tile of {tile} px overlapping by {overlap}: the tile must be at least 1 px and the "
                         "overlap in [0, 1)")
    if length <= tile:
        return [0]
    step = max(1, int(round(tile * (1 - overlap))))
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


@dataclass
class SlicedDetections:
    """Detections of a whole image: ``boxes (N, 4)`` XYXY image pixels, ``scores``, ``labels``, and
    per detection its mask as ``(x0, y0, crop)``: a bool array covering the pixels from (x0, y0)."""
    image_size: tuple[int, int]
    boxes: Tensor = field(default_factory=lambda: torch.zeros((0, 4)))
    scores: Tensor = field(default_factory=lambda: torch.zeros(0))
    labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    masks: list[tuple[int, int, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def full_mask(self, k: int) -> np.ndarray:
        """Detection ``k``'s mask at image size (for small images; the crops are what scales)."""
        h, w = self.image_size
        out = np.zeros((h, w), dtype=bool)
        x0, y0, crop = self.masks[k]
        out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        return out

    def rle(self, k: int) -> dict:
        """Detection ``k``'s mask as COCO RLE of the whole image, built from the crop's runs (no
        image-sized array)."""
        x0, y0, crop = self.masks[k]
        return crop_rle(x0, y0, crop, *self.image_size)


def crop_rle(x0: int, y0: int, crop: np.ndarray, h: int, w: int) -> dict:
    """COCO's compressed RLE of an ``(h, w)`` mask that is ``crop`` at (x0, y0) and empty elsewhere.

    COCO runs go down the columns, alternating empty and set, starting with empty: every column
    outside the crop, and the rows above and below it, only lengthen the current empty run."""
    from pycocotools import mask as mask_utils

    ch, cw = crop.shape
    if ch == 0 or cw == 0:
        return mask_utils.frPyObjects({"counts": [h * w], "size": [h, w]}, h, w)
    counts: list[int] = []
    run, value = 0, False  # the current run's length and kind
    columns = np.asarray(crop, dtype=bool).T  # column by column
    run += x0 * h + y0  # the columns left of the crop, and the top of its first column
    for c in range(cw):
        col = columns[c]
        changes = np.flatnonzero(col[1:] != col[:-1]) + 1
        edges = [0, *changes.tolist(), ch]
        for a, b in zip(edges[:-1], edges[1:]):
            if bool(col[a]) == value:
                run += b - a
            else:
                counts.append(run)
                run, value = b - a, bool(col[a])
        gap = (h - y0 - ch) + (y0 if c < cw - 1 else 0)  # below this column, above the next
        if gap:
            if value:
                counts.append(run)
                run, value = 0, False
            run += gap
    trailing = (w - x0 - cw) * h  # the columns right of the crop
    if value:  # COCO ends on the last run: no empty run of length 0 after a set one
        counts.append(run)
        if trailing:
            counts.append(trailing)
    else:
        counts.append(run + trailing)
    return mask_utils.frPyObjects({"counts": counts, "size": [h, w]}, h, w)


class _Instance:
    """One (merged) detection: box, score, label, mask crop, and the windows it was seen in."""

    __slots__ = ("box", "score", "label", "x0", "y0", "crop", "windows")

    def __init__(self, box: list[float], score: float, label: int, x0: int, y0: int, crop: np.ndarray | None,
                 window: tuple[int, int, int, int]):
        self.box, self.score, self.label, self.x0, self.y0, self.crop = box, score, label, x0, y0, crop
        self.windows = [window]

    def pixels(self, region: tuple[int, int, int, int]) -> np.ndarray:
        """The mask (the box, without masks) inside ``region`` (x0, y0, x1, y1), as a bool array."""
        rx0, ry0, rx1, ry1 = region
        out = np.zeros((ry1 - ry0, rx1 - rx0), dtype=bool)
        if self.crop is None:
            bx0, by0 = max(rx0, int(round(self.box[0]))), max(ry0, int(round(self.box[1])))
            bx1, by1 = min(rx1, int(round(self.box[2]))), min(ry1, int(round(self.box[3])))
            if bx1 > bx0 and by1 > by0:
                out[by0 - ry0:by1 - ry0, bx0 - rx0:bx1 - rx0] = True
            return out
        cx0, cy0 = max(rx0, self.x0), max(ry0, self.y0)
        cx1, cy1 = min(rx1, self.x0 + self.crop.shape[1]), min(ry1, self.y0 + self.crop.shape[0])
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - ry0:cy1 - ry0, cx0 - rx0:cx1 - rx0] = \
                self.crop[cy0 - self.y0:cy1 - self.y0, cx0 - self.x0:cx1 - self.x0]
        return out

    def agrees_with(self, other: _Instance, min_iou: float) -> bool:
        """Whether the two are one object: seen by different windows, and in some common area of
        their windows, IoU >= ``min_iou``."""
        if self.label != other.label or _box_overlap(self.box, other.box) <= 0:
            return False
        if any(a == b for a in self.windows for b in other.windows):  # one window reported both: two objects
            return False
        for a in self.windows:
            for b in other.windows:
                region = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
                if region[2] <= region[0] or region[3] <= region[1]:
                    continue
                mine, theirs = self.pixels(region), other.pixels(region)
                union = np.count_nonzero(mine | theirs)
                if union and np.count_nonzero(mine & theirs) / union >= min_iou:
                    return True
        return False

    def absorb(self, other: _Instance) -> None:
        """Join ``other`` (seen by other windows, scored no higher): its pixels outside the windows
        this object was already seen in are added, and the box grows to cover them."""
        seen = list(self.windows)
        self.score = max(self.score, other.score)
        self.windows += other.windows
        if self.crop is None or other.crop is None:  # boxes only: grow only past the seen windows' edges
            b, o = self.box, other.box
            self.box = [min(b[0], o[0]) if o[0] < min(w[0] for w in seen) else b[0],
                        min(b[1], o[1]) if o[1] < min(w[1] for w in seen) else b[1],
                        max(b[2], o[2]) if o[2] > max(w[2] for w in seen) else b[2],
                        max(b[3], o[3]) if o[3] > max(w[3] for w in seen) else b[3]]
            return
        added = other.crop.copy()
        for wx0, wy0, wx1, wy1 in seen:  # what this object's own windows saw stays theirs
            ys = slice(max(wy0 - other.y0, 0), max(min(wy1 - other.y0, added.shape[0]), 0))
            xs = slice(max(wx0 - other.x0, 0), max(min(wx1 - other.x0, added.shape[1]), 0))
            added[ys, xs] = False
        rows, cols = np.flatnonzero(added.any(1)), np.flatnonzero(added.any(0))
        if not len(rows):
            return
        ax0, ay0 = other.x0 + int(cols[0]), other.y0 + int(rows[0])
        ax1, ay1 = other.x0 + int(cols[-1]) + 1, other.y0 + int(rows[-1]) + 1
        added = added[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        x0, y0 = min(self.x0, ax0), min(self.y0, ay0)
        x1, y1 = max(self.x0 + self.crop.shape[1], ax1), max(self.y0 + self.crop.shape[0], ay1)
        union = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        union[self.y0 - y0:self.y0 - y0 + self.crop.shape[0], self.x0 - x0:self.x0 - x0 + self.crop.shape[1]] |= \
            self.crop
        union[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] |= added
        self.x0, self.y0, self.crop = x0, y0, union
        b = self.box
        self.box = [min(b[0], ax0), min(b[1], ay0), max(b[2], ax1), max(b[3], ay1)]


def _box_overlap(a: list[float], b: list[float]) -> float:
    """The intersection area of two XYXY boxes."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _mask_crop(mask: Tensor, box: Sequence[float], h: int, w: int) -> tuple[int, int, np.ndarray]:
    """The part of a window's ``(h, w)`` mask inside ``box`` (rounded outwards), as (x0, y0, array)."""
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    return x0, y0, mask[y0:y1, x0:x1].cpu().numpy().astype(bool)


@torch.no_grad()
def predict_sliced(model, image: Tensor, tile: int = 640, overlap: float = 0.2, batch_size: int = 4,
                   merge_iou: float = 0.5) -> SlicedDetections:
    """Detections of ``model`` (eval mode, ``model([images]) -> dicts``) on ``image`` ``(3, H, W)``
    window by window, merged (module docstring)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 < merge_iou <= 1:
        raise ValueError(f"merge_iou must be in (0, 1], got {merge_iou}")
    h, w = int(image.shape[-2]), int(image.shape[-1])
    windows = [(x, y) for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)]
    found: list[_Instance] = []
    has_masks = False
    for k in range(0, len(windows), batch_size):
        chunk = windows[k:k + batch_size]
        crops = [image[:, y:y + tile, x:x + tile] for x, y in chunk]
        for (x, y), crop, out in zip(chunk, crops, model(crops)):
            ch, cw = int(crop.shape[-2]), int(crop.shape[-1])
            masks = out.get("masks")
            has_masks = has_masks or masks is not None
            for d, (box, score, label) in enumerate(zip(out["boxes"].tolist(), out["scores"].tolist(),
                                                        out["labels"].tolist())):
                mx, my, mcrop = _mask_crop(masks[d, 0], box, ch, cw) if masks is not None else (0, 0, None)
                found.append(_Instance([box[0] + x, box[1] + y, box[2] + x, box[3] + y], score, int(label),
                                       mx + x, my + y, mcrop, (x, y, x + cw, y + ch)))
    kept: list[_Instance] = []
    for inst in sorted(found, key=lambda i: -i.score):  # greedy: each joins the best kept one it overlaps
        target = next((k for k in kept if k.agrees_with(inst, merge_iou)), None)
        if target is None:
            kept.append(inst)
        else:
            target.absorb(inst)
    out = SlicedDetections((h, w))
    if kept:
        out.boxes = torch.tensor([k.box for k in kept], dtype=torch.float32)
        out.scores = torch.tensor([k.score for k in kept], dtype=torch.float32)
        out.labels = torch.tensor([k.label for k in kept], dtype=torch.int64)
    if has_masks:
        out.masks = [(k.x0, k.y0, k.crop if k.crop is not None else np.zeros((0, 0), dtype=bool)) for k in kept]
    return out
