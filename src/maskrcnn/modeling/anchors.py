"""Anchor boxes: a few sizes and aspect ratios tiled over every feature map location (Faster R-CNN).

Two styles, because the checkpoints we load were trained with each and anchors must match bit
for bit for the RPN's deltas to mean the same thing:

- ``"torchvision"``: cell anchors ``(-w/2, -h/2, w/2, h/2)`` with ``w = size / sqrt(ratio)``,
  ``h = size * sqrt(ratio)``, rounded to integers; ordered ratio-major; the stride of a level is
  ``padded image size // feature size`` (61 rather than 64 for P6 of an 800-px input).
- ``"detectron2"``: the same boxes unrounded, ordered size-major, nominal strides, an optional
  ``offset`` (in strides) of the grid.

Anchors are ordered location-major (row, column) then cell anchor, matching the RPN head outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn.config.choices import ANCHOR_STYLES


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], style: str) -> Tensor:
    """``(A, 4)`` anchors centred at 0 for one level; ratio = height / width."""
    if style == "torchvision":
        scales = torch.tensor(sizes, dtype=torch.float32)
        ratios = torch.tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        ws = (1 / h_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
    if style == "detectron2":
        out = []
        for size in sizes:
            area = float(size) ** 2
            for ratio in aspect_ratios:
                w = math.sqrt(area / ratio)
                h = ratio * w
                out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(out, dtype=torch.float32)
    raise ValueError(f"anchor style must be one of {ANCHOR_STYLES}, got {style!r}")


class AnchorGenerator(nn.Module):
    """Anchors for each feature level.

    Args:
        sizes: per level, the anchor sizes (sqrt of area) in input pixels, e.g. ``((32,), (64,), ...)``.
        aspect_ratios: per level (or one tuple for all levels), height / width ratios.
        strides: nominal stride of each level.
        style: ``"torchvision"`` or ``"detectron2"`` (module docstring).
        offset: grid offset in units of the stride (detectron2's ANCHOR_GENERATOR.OFFSET).
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int], style: str = "torchvision", offset: float = 0.0) -> None:
        super().__init__()
        if len(aspect_ratios) == 1 and len(sizes) > 1:
            aspect_ratios = list(aspect_ratios) * len(sizes)
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ValueError(f"anchor sizes ({len(sizes)} levels), aspect ratios ({len(aspect_ratios)}) and strides "
                             f"({len(strides)}) must describe the same number of levels")
        if style not in ANCHOR_STYLES:
            raise ValueError(f"anchor style must be one of {ANCHOR_STYLES}, got {style!r}")
        self.style = style
        self.offset = float(offset)
        self.strides = tuple(int(s) for s in strides)
        self.cells = [cell_anchors(s, r, style) for s, r in zip(sizes, aspect_ratios)]

    @property
    def num_anchors(self) -> list[int]:
        return [c.shape[0] for c in self.cells]

    def level_strides(self, image_size: Sequence[int], grid_sizes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        if self.style == "torchvision":
            return [(image_size[0] // g[0], image_size[1] // g[1]) for g in grid_sizes]
        return [(s, s) for s in self.strides]

    def forward(self, image_size: Sequence[int], grid_sizes: Sequence[Sequence[int]], dtype: torch.dtype,
                device: torch.device) -> list[Tensor]:
        """``image_size``: padded batch (H, W); ``grid_sizes``: (H_l, W_l) per level -> ``(H_l*W_l*A, 4)`` each."""
        out = []
        for cell, (sh, sw), (gh, gw) in zip(self.cells, self.level_strides(image_size, grid_sizes), grid_sizes):
            xs = (torch.arange(gw, device=device, dtype=torch.float32) + self.offset) * sw
            ys = (torch.arange(gh, device=device, dtype=torch.float32) + self.offset) * sh
            y, x = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)
            out.append((shifts + cell.to(device)[None]).reshape(-1, 4).to(dtype))
        return out
