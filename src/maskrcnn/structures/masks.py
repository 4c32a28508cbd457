"""Instance masks: polygons, RLE and bitmaps; cropping them into RoI targets; pasting predictions back.

Ground truth comes as COCO polygons, RLE or ``(G, H, W)`` bitmaps. RLE is decoded to bitmaps with
pycocotools; polygons stay polygons (:class:`PolygonMasks`), because rasterising them directly at
the 28x28 target resolution is both cheaper and sharper than cropping a full-size bitmap.

Polygons are rasterised inside arbitrary boxes at any resolution in one vectorised op
(:meth:`PolygonMasks.rasterize`: an even-odd point-in-polygon test at the cell centres, no
per-instance Python loop); the mask head uses it for its ``M x M`` targets.

Pasting (:func:`paste_masks_in_image`): an ``M x M`` probability map resized to its box and placed
in the image is a separable bilinear map, ``Ry @ mask @ Rx^T``, with one sparse weight matrix per
axis. Both conventions we must reproduce are such maps; they only build ``Ry``/``Rx`` differently:

- ``"torchvision"``: the mask is zero-padded by one cell, its box grown to match and truncated to
  integers, resized with ``interpolate(bilinear, align_corners=False)`` to the integer box size
  and copied into the image (the legacy Detectron paste);
- ``"detectron2"``: each image pixel centre is mapped into the box with floating-point corners
  and sampled bilinearly with zero padding (``grid_sample``), as detectron2's ``paste_masks_in_image``.

Masks are processed in chunks so memory stays bounded by ``chunk_pixels`` no matter how many
detections an image has; the result is thresholded per chunk into a bool tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from maskrcnn.config.choices import PASTE_STYLES
from maskrcnn.structures.precision import full_precision, geometry_dtype



def decode_rle(rles: Sequence[dict], height: int, width: int) -> Tensor:
    """COCO RLE masks (compressed ``counts`` string or uncompressed list) -> ``(G, H, W)`` uint8."""
    from pycocotools import mask as mask_utils

    out = np.zeros((len(rles), height, width), dtype=np.uint8)
    for i, rle in enumerate(rles):
        if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
            raise ValueError(f"RLE {i} must be a dict with 'counts' and 'size', got {type(rle).__name__}")
        if list(rle["size"]) != [height, width]:
            raise ValueError(f"RLE {i} has size {list(rle['size'])}, expected [{height}, {width}]")
        if isinstance(rle["counts"], list):  # uncompressed: convert
            rle = mask_utils.frPyObjects(rle, height, width)
        elif isinstance(rle["counts"], str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        out[i] = mask_utils.decode(rle)
    return torch.from_numpy(out)


class PolygonMasks:
    """Polygons of ``G`` instances, each a list of flat ``[x0, y0, x1, y1, ...]`` rings (COCO format).

    Stored padded as ``points: (G, P, V, 2)``: a ring shorter than V repeats its last vertex (the
    extra edges have zero length and never cross anything) and a missing ring is a single point,
    so vectorised geometry needs no validity mask.
    """

    def __init__(self, points: Tensor) -> None:
        if points.dim() != 4 or points.shape[-1] != 2:
            raise ValueError(f"PolygonMasks: points must be (G, P, V, 2), got {tuple(points.shape)}")
        self.points = points

    @classmethod
    def from_coco(cls, polygons: Sequence[Sequence[Sequence[float]]], dtype: torch.dtype = torch.float32
                  ) -> PolygonMasks:
        """``polygons[g]`` = list of rings of instance g, each a flat list of >= 3 (x, y) pairs."""
        rings: list[list[np.ndarray]] = []
        for g, inst in enumerate(polygons):
            inst_rings = []
            for r, ring in enumerate(inst):
                arr = np.asarray(ring, dtype=np.float64).reshape(-1)
                if arr.size < 6 or arr.size % 2:
                    raise ValueError(f"PolygonMasks: instance {g} ring {r} must hold >= 3 (x, y) pairs, "
                                     f"got {arr.size} numbers")
                if not np.isfinite(arr).all():
                    raise ValueError(f"PolygonMasks: instance {g} ring {r} has NaN or inf coordinates")
                inst_rings.append(arr.reshape(-1, 2))
            if not inst_rings:
                raise ValueError(f"PolygonMasks: instance {g} has no polygon")
            rings.append(inst_rings)
        p = max((len(r) for r in rings), default=1)
        v = max((len(ring) for r in rings for ring in r), default=1)
        out = np.zeros((len(rings), p, v, 2), dtype=np.float64)
        for g, inst in enumerate(rings):
            for r in range(p):
                ring = inst[r] if r < len(inst) else inst[0][:1]
                out[g, r, : len(ring)] = ring
                out[g, r, len(ring):] = ring[-1]
        return cls(torch.from_numpy(out).to(dtype))

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, idx: Tensor | slice | int) -> PolygonMasks:
        pts = self.points[idx]
        return PolygonMasks(pts[None] if pts.dim() == 3 else pts)

    def to(self, device: torch.device | str) -> PolygonMasks:
        return PolygonMasks(self.points.to(device))

    def scale(self, sx: float, sy: float) -> PolygonMasks:
        return PolygonMasks(self.points * torch.tensor([sx, sy], dtype=self.points.dtype, device=self.points.device))

    def flip(self, width: float) -> PolygonMasks:
        """Mirror horizontally in an image of ``width`` pixels."""
        pts = self.points.clone()
        pts[..., 0] = width - pts[..., 0]
        return PolygonMasks(pts)

    def boxes(self) -> Tensor:
        """Tight ``(G, 4)`` XYXY boxes around each instance's polygons."""
        flat = self.points.flatten(1, 2)
        return torch.cat([flat.amin(1), flat.amax(1)], dim=1)

    def rasterize(self, boxes: Tensor, size: int, chunk: int = 1 << 24) -> Tensor:
        """Instance g rasterised in ``boxes[g]`` at ``size x size``: ``(G, size, size)`` float 0/1.

        A cell is inside if its centre is inside any ring (even-odd rule per ring, union of rings).
        """
        g, p, v, _ = self.points.shape
        out = torch.zeros((g, size, size), dtype=self.points.dtype, device=self.points.device)
        if g == 0:
            return out
        boxes = boxes.to(self.points.dtype)
        t = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
        step = max(1, chunk // (p * v * size * size))
        for k0 in range(0, g, step):
            pts, b = self.points[k0:k0 + step], boxes[k0:k0 + step]
            px = b[:, 0, None] + t * (b[:, 2] - b[:, 0])[:, None]  # (k, size)
            py = b[:, 1, None] + t * (b[:, 3] - b[:, 1])[:, None]
            a, c = pts, pts.roll(-1, dims=2)  # edges a -> c, (k, P, V, 2)
            ay, cy = a[..., 1, None], c[..., 1, None]  # (k, P, V, 1)
            yy = py[:, None, None, :]  # (k, 1, 1, size)
            spans = (ay > yy) != (cy > yy)  # (k, P, V, size_y)
            dy = torch.where(cy == ay, torch.ones_like(cy), cy - ay)
            x_cross = a[..., 0, None] + (yy - ay) * (c[..., 0, None] - a[..., 0, None]) / dy  # (k, P, V, size_y)
            crosses = spans[..., None] & (px[:, None, None, None, :] < x_cross[..., None])  # (k, P, V, y, x)
            inside = (crosses.sum(dim=2) % 2 == 1).any(dim=1)  # (k, y, x)
            out[k0:k0 + step] = inside.to(out.dtype)
        return out


def _torchvision_weights(lo: Tensor, hi: Tensor, length_px: int, cells: int, dtype: torch.dtype) -> Tensor:
    """``(n, length_px, cells)``: bilinear weights of ``interpolate(align_corners=False)`` from ``cells``
    to the integer box ``[lo, hi]`` (inclusive), zero outside it."""
    size = (hi - lo + 1).clamp(min=1)
    pix = torch.arange(length_px, device=lo.device)
    inside = (pix[None] >= lo[:, None]) & (pix[None] <= hi[:, None])
    scale = (cells / size.to(dtype))[:, None]
    src = ((pix[None] - lo[:, None]).to(dtype) + 0.5) * scale - 0.5
    src = src.clamp(min=0)
    i0 = src.floor().long().clamp(max=cells - 1)
    i1 = (i0 + 1).clamp(max=cells - 1)
    lam = (src - i0.to(dtype)) * inside
    w = torch.zeros((lo.shape[0], length_px, cells), dtype=dtype, device=lo.device)
    w.scatter_add_(2, i0[..., None], (inside.to(dtype) - lam)[..., None])
    w.scatter_add_(2, i1[..., None], lam[..., None])
    return w


def _detectron2_weights(lo: Tensor, hi: Tensor, length_px: int, cells: int, dtype: torch.dtype) -> Tensor:
    """``(n, length_px, cells)``: pixel centres mapped into ``[lo, hi]`` (float box edges), bilinear with
    zero padding outside the ``cells`` grid (``grid_sample(align_corners=False)``)."""
    centre = torch.arange(length_px, device=lo.device, dtype=dtype) + 0.5
    src = (centre[None] - lo[:, None]) / (hi - lo)[:, None] * cells - 0.5
    i0 = src.floor()
    lam = src - i0
    i0 = i0.long()
    w = torch.zeros((lo.shape[0], length_px, cells + 2), dtype=dtype, device=lo.device)
    # columns 0 and cells + 1 collect the weight of samples that fall off the grid, then are dropped
    w.scatter_add_(2, (i0 + 1).clamp(0, cells + 1)[..., None], (1 - lam)[..., None])
    w.scatter_add_(2, (i0 + 2).clamp(0, cells + 1)[..., None], lam[..., None])
    return w[..., 1:-1]


def paste_weights(masks: Tensor, boxes: Tensor, height: int, width: int, style: str) -> tuple[Tensor, Tensor, Tensor]:
    """The separable paste of ``masks: (N, M, M)`` into ``boxes: (N, 4)``: ``(ry (N, H, C), rx (N, W, C),
    masks (N, C, C))`` with ``pasted = ry @ masks @ rx^T`` (C = M, or M + 2 with torchvision's border)."""
    m = masks.shape[-1]
    dtype = geometry_dtype(masks.dtype)
    masks, boxes = masks.to(dtype), boxes.to(dtype)
    if style == "torchvision":
        masks = torch.nn.functional.pad(masks, (1, 1, 1, 1))
        scale = (m + 2) / m
        half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
        centre = (boxes[:, 2:] + boxes[:, :2]) * 0.5
        grown = torch.cat([centre - half, centre + half], dim=1).long()  # truncation, as .to(int64)
        lo_x, lo_y, hi_x, hi_y = grown.unbind(1)
        weights = _torchvision_weights
    else:
        lo_x, lo_y, hi_x, hi_y = boxes.unbind(1)
        weights = _detectron2_weights
    cells = masks.shape[-1]
    return weights(lo_y, hi_y, height, cells, dtype), weights(lo_x, hi_x, width, cells, dtype), masks


def _nonzero_span(weights: Tensor) -> Tensor:
    """``(k, L, C)`` paste weights -> ``(k, 2)``: ``[first, last + 1)`` of the rows with a nonzero
    weight (``[L, 0)``, empty, when there are none)."""
    length = weights.shape[1]
    used = (weights != 0).any(dim=2)
    pos = torch.arange(length, device=weights.device)
    first = torch.where(used, pos, length).amin(dim=1)
    last = torch.where(used, pos + 1, 0).amax(dim=1)
    return torch.stack([first, last], dim=1)


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], style: str = "torchvision",
                         threshold: float | None = 0.5, chunk_pixels: int = 1 << 24) -> Tensor:
    """Paste ``masks: (N, M, M)`` probabilities into their ``boxes: (N, 4)`` of an image of ``(H, W)``.

    Returns ``(N, H, W)``: bool (``mask >= threshold``) or, with ``threshold=None``, probabilities.
    """
    if style not in PASTE_STYLES:
        raise ValueError(f"paste style must be one of {PASTE_STYLES}, got {style!r}")
    h, w = int(image_size[0]), int(image_size[1])
    n = masks.shape[0]
    out_dtype = torch.bool if threshold is not None else masks.dtype
    out = torch.zeros((n, h, w), dtype=out_dtype, device=masks.device)
    if n == 0 or h == 0 or w == 0:
        return out
    step = max(1, chunk_pixels // (h * w))
    for k0 in range(0, n, step):
        sl = slice(k0, k0 + step)
        ry, rx, chunk = paste_weights(masks[sl], boxes[sl], h, w, style)  # (k, H, C), (k, W, C), (k, C, C)
        # A mask is zero outside its box (the rows and columns where its weights are), so each is
        # computed on that window only: a box covering a tenth of the image costs a tenth of the
        # image. One host read of all the windows per chunk; then one small product per mask.
        windows = torch.cat([_nonzero_span(ry), _nonzero_span(rx)], dim=1).tolist()
        with full_precision(masks.device):
            for i, (y0, y1, x0, x1) in enumerate(windows):
                if y1 <= y0 or x1 <= x0:
                    continue
                pasted = ry[i, y0:y1] @ (chunk[i] @ rx[i, x0:x1].T)
                out[k0 + i, y0:y1, x0:x1] = pasted >= threshold if threshold is not None else pasted
    return out
