"""The training curves (``training_curves.png``) from the records of ``metrics.jsonl``, with matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def _series(history: Sequence[dict]) -> tuple[dict, dict, list, dict]:
    """Training losses, validation losses, learning rate and AP, each as ``name -> [(iteration, value)]``."""
    losses: dict[str, list] = {}
    val: dict[str, list] = {}
    lr: list = []
    ap: dict[str, list] = {}
    for rec in history:
        it = rec.get("iteration", 0)
        for k, v in rec.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            if k.startswith("loss") or k == "total_loss":
                losses.setdefault(k, []).append((it, v))
            elif k.startswith("val/"):
                val.setdefault(k, []).append((it, v))
            elif k.endswith("/AP") and v >= 0:  # pycocotools' -1: not measured
                ap.setdefault(k, []).append((it, v))
            elif k == "lr":
                lr.append((it, v))
    return losses, val, lr, ap


def plot_training(history: Sequence[dict], path: str | Path) -> Path:
    """Three panels: the losses on a log scale (training, and validation as dashed lines of the same
    colour), the learning rate, and AP at each evaluation. Legends sit beside the panels."""
    from maskrcnn._pyplot import pyplot

    plt = pyplot()
    losses, val, lr, ap = _series(history)
    fig, (ax_loss, ax_lr, ax_ap) = plt.subplots(3, 1, figsize=(10, 10), sharex=True,
                                                gridspec_kw={"height_ratios": [2, 1, 1.3]})
    colors = plt.get_cmap("tab10")
    names = sorted(losses, key=lambda k: (k != "total_loss", k))
    for i, name in enumerate(names):
        xs, ys = zip(*losses[name])
        ax_loss.plot(xs, ys, color=colors(i % 10), linewidth=1.5 if name == "total_loss" else 1, label=name)
        if f"val/{name}" in val:
            vx, vy = zip(*val[f"val/{name}"])
            ax_loss.plot(vx, vy, color=colors(i % 10), linestyle="--", marker="o", markersize=3,
                         label=f"{name} (validation)")
    if any(y > 0 for s in losses.values() for _, y in s):
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training losses (mean per log period) and validation losses (dashed)")
    if lr:
        xs, ys = zip(*lr)
        ax_lr.plot(xs, ys, color="black", linewidth=1)
    ax_lr.set_ylabel("learning rate")
    for i, (name, points) in enumerate(sorted(ap.items())):
        xs, ys = zip(*points)
        ax_ap.plot(xs, [100 * y for y in ys], marker="o", markersize=4, color=colors(i % 10), label=name)
    if ap:  # from 0, so that a change reads at its true size
        ax_ap.set_ylim(0, min(100.0, 1.15 * max(100 * y for s in ap.values() for _, y in s) + 1))
    ax_ap.set_ylabel("AP (%)")
    ax_ap.set_xlabel("iteration")
    ax_ap.set_title("AP on the validation set")
    for ax in (ax_loss, ax_lr, ax_ap):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
