"""A small line-chart renderer (PIL only) for the training curves: losses, learning rate, AP."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: dict[str, Sequence[tuple[float, float]]], log_y: bool = False) -> None:
    x0, y0, x1, y1 = box
    draw.text((x0 + 4, y0 + 2), title, fill=(0, 0, 0))
    px0, py0, px1, py1 = x0 + 50, y0 + 18, x1 - 10, y1 - 20
    draw.rectangle([px0, py0, px1, py1], outline=(160, 160, 160))
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        draw.text((px0 + 10, py0 + 10), "no data", fill=(120, 120, 120))
        return
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    ymin, ymax = min(fy(p[1]) for p in pts), max(fy(p[1]) for p in pts)
    xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1e-9)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (px0 + (x - xmin) / (xmax - xmin) * (px1 - px0), py1 - (fy(y) - ymin) / (ymax - ymin) * (py1 - py0))

    for frac in (0.0, 0.5, 1.0):
        v = ymin + frac * (ymax - ymin)
        label = f"{10 ** v:.3g}" if log_y else f"{v:.3g}"
        draw.text((x0 + 2, py1 - frac * (py1 - py0) - 6), label, fill=(80, 80, 80))
    draw.text((px0, py1 + 4), f"{xmin:.0f}", fill=(80, 80, 80))
    draw.text((px1 - 40, py1 + 4), f"{xmax:.0f} it", fill=(80, 80, 80))
    for k, (name, s) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        line = [to_px(x, y) for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line if len(line) <= 20 else []:  # few points (evaluations): mark each one
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    # the legend, boxed in the top right corner so it never hides the curves' start
    width = max(int(draw.textlength(n)) for n in series) + 26
    lx0, ly0 = px1 - width - 6, py0 + 6
    draw.rectangle([lx0, ly0, px1 - 6, ly0 + 12 * len(series) + 6], fill=(255, 255, 255), outline=(200, 200, 200))
    for k, name in enumerate(series):
        color = COLORS[k % len(COLORS)]
        y = ly0 + 4 + 12 * k
        draw.line([lx0 + 4, y + 6, lx0 + 16, y + 6], fill=color, width=2)
        draw.text((lx0 + 20, y), name, fill=(0, 0, 0))


def plot_training(history: Sequence[dict], path: str | Path) -> Path:
    """Three panels from the metrics JSONL records: losses (log scale), learning rate, AP."""
    losses: dict[str, list] = {}
    lr, ap = [], {}
    for rec in history:
        it = rec.get("iteration", 0)
        for k, v in rec.items():
            if k.startswith("loss") and isinstance(v, (int, float)):
                losses.setdefault(k, []).append((it, v))
            elif k.endswith("/AP") and isinstance(v, (int, float)):
                ap.setdefault(k, []).append((it, v))
        if "lr" in rec:
            lr.append((it, rec["lr"]))
    img = Image.new("RGB", (900, 780), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    _panel(draw, (0, 0, 900, 340), "losses", losses, log_y=True)
    _panel(draw, (0, 340, 900, 560), "learning rate", {"lr": lr})
    _panel(draw, (0, 560, 900, 780), "AP on the validation set", ap)
    path = Path(path)
    img.save(path)
    return path
