"""Bitmap masks -> polygons (COCO's ``[x0, y0, x1, y1, ...]`` lists), for clients that draw or store
outlines rather than run-length encodings.

The outline follows the pixel borders exactly: each polygon vertex is a pixel corner, so a polygon
encloses exactly the pixels of its region (no smoothing, no lost thin parts), and pycocotools rasterizes it
back to those pixels. A region touching another only at a corner is a separate polygon. COCO
polygons cannot have holes, so only outer outlines are returned: a ring comes back filled (a hole
open to the outside through a corner is outside). Use RLE where the exact mask matters.
"""

from __future__ import annotations

import numpy as np

# the directed pixel-border edges, walking with the region on the right (x right, y down):
# for each side of a pixel whose neighbour is outside, (start corner, step) as (dy, dx) offsets
_SIDES = (
    ((-1, 0), (0, 0), (0, 1)),   # neighbour above: the top side, walked east
    ((0, 1), (0, 1), (1, 0)),    # neighbour right: the right side, walked south
    ((1, 0), (1, 1), (0, -1)),   # neighbour below: the bottom side, walked west
    ((0, -1), (1, 0), (-1, 0)),  # neighbour left: the left side, walked north
)


def mask_to_polygons(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[list[float]]:
    """The outer outlines of a 2-D boolean mask, as COCO polygons in pixel coordinates (a pixel
    (row i, column j) covers x in [j, j + 1], y in [i, i + 1]), largest first; ``offset`` (x0, y0)
    is added (for a mask cropped out of a larger image)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    padded = np.pad(m, 1)
    starts: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (ny, nx), (cy, cx), step in _SIDES:
        neighbour = padded[1 + ny:padded.shape[0] - 1 + ny, 1 + nx:padded.shape[1] - 1 + nx]
        ys, xs = np.nonzero(m & ~neighbour)
        for y, x in zip((ys + cy).tolist(), (xs + cx).tolist()):
            starts.setdefault((y, x), []).append(step)
    polygons: list[tuple[float, list[float]]] = []
    while starts:
        origin = next(iter(starts))
        corners = _trace(starts, origin)
        area = _signed_area(corners)
        if area > 0:  # outer outline (clockwise on screen); holes run the other way
            flat = [float(v) for y, x in corners for v in (x + offset[0], y + offset[1])]
            polygons.append((area, flat))
    polygons.sort(key=lambda p: -p[0])
    return [p for _, p in polygons]


def _trace(starts: dict, origin: tuple[int, int]) -> list[tuple[int, int]]:
    """Follow edges from ``origin`` until the loop is back there, consuming them; the corners where
    the direction changes. Where two edges leave one corner (regions touching diagonally) the right
    turn is taken, which keeps the two regions' outlines apart."""
    corners = []
    at, heading = origin, None
    first = None
    while True:
        steps = starts[at]
        step = steps[0]
        if len(steps) > 1 and heading is not None:
            right = (heading[1], -heading[0])  # (dy, dx) turned clockwise on screen
            if right in steps:
                step = right
        steps.remove(step)
        if not steps:
            del starts[at]
        if step != heading:
            corners.append(at)
        first = first or step
        heading = step
        at = (at[0] + step[0], at[1] + step[1])
        if at == origin:
            break
    if heading == first:  # the loop started in the middle of a straight run: not a corner
        corners.pop(0)
    return corners


def _signed_area(corners: list[tuple[int, int]]) -> float:
    """Shoelace area in (x, y) with y down: positive for loops that run clockwise on screen."""
    if len(corners) < 3:
        return 0.0
    ys = np.array([c[0] for c in corners], dtype=np.float64)
    xs = np.array([c[1] for c in corners], dtype=np.float64)
    return 0.5 * float(np.sum(xs * np.roll(ys, -1) - np.roll(xs, -1) * ys))
