"""A dataset at a glance: ground-truth overlays, class and size histograms, annotations per image,
and what the loader skipped, as PNGs and a text report."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from maskrcnn._pyplot import pyplot
from maskrcnn.data.coco import CocoDataset
from maskrcnn.visualize import overlay_ground_truth

# COCO's object sizes, by area in pixels of the image as stored
SMALL, MEDIUM = 32 ** 2, 96 ** 2


def dataset_summary(dataset: CocoDataset) -> dict:
    """Counts over the usable images: per class, per COCO size (by box area), per image; crowd regions."""
    names = dataset.class_map.names
    per_class: Counter = Counter()
    sizes = {"small": 0, "medium": 0, "large": 0}
    per_image = []
    crowd = 0
    for rec in dataset.records:
        per_image.append(len(rec.labels))
        crowd += len(rec.crowd_boxes)
        for label, (x1, y1, x2, y2) in zip(rec.labels, rec.boxes):
            per_class[names[label - 1]] += 1
            area = (x2 - x1) * (y2 - y1)
            sizes["small" if area < SMALL else "medium" if area < MEDIUM else "large"] += 1
    return {"images": len(dataset.records), "instances": sum(per_class.values()), "crowd_regions": crowd,
            "per_class": {n: per_class.get(n, 0) for n in names}, "sizes": sizes, "per_image": per_image,
            "empty_images": sum(n == 0 for n in per_image), "skipped": list(dataset.report)}


def format_summary(summary: dict, json_path: Path) -> str:
    n = max(summary["instances"], 1)
    lines = [f"{json_path}: {summary['images']} images, {summary['instances']} instances, "
             f"{summary['crowd_regions']} crowd regions, {summary['empty_images']} images without objects",
             "per class: " + ", ".join(f"{k} {v}" for k, v in summary["per_class"].items()),
             "sizes (COCO, by box area): " + ", ".join(f"{k} {v} ({100 * v / n:.0f}%)"
                                                      for k, v in summary["sizes"].items())]
    counts = summary["per_image"]
    if counts:
        lines.append(f"instances per image: mean {np.mean(counts):.1f}, median {np.median(counts):.0f}, "
                     f"max {max(counts)}")
    rare = [k for k, v in summary["per_class"].items() if v < 0.1 * n / max(len(summary["per_class"]), 1)]
    if rare:
        lines.append(f"rare classes (under a tenth of an even share): {', '.join(rare)}; consider "
                     f"--set data.repeat_factor_threshold=0.001")
    if summary["skipped"]:
        lines.append(f"skipped by the loader ({len(summary['skipped'])}): " + "; ".join(summary["skipped"][:10])
                     + (" ..." if len(summary["skipped"]) > 10 else ""))
    else:
        lines.append("skipped by the loader: nothing")
    return "\n".join(lines)


def inspect_dataset(dataset: CocoDataset, out_dir: Path, num_images: int = 8) -> str:
    """Write overlays of the first ``num_images`` images, ``histograms.png`` and ``report.txt``;
    returns the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names, skeleton = dataset.class_map.names, dataset.class_map.skeleton
    for index in _spread(dataset, num_images):
        image, target = dataset[index]
        if image is None:
            continue
        rec = dataset.records[index]
        overlay_ground_truth(image, target, names, skeleton).save(out_dir / f"gt_{Path(rec.path).stem}.png")
    summary = dataset_summary(dataset)
    _plot_histograms(summary, out_dir / "histograms.png")
    report = format_summary(summary, dataset.json_path)
    (out_dir / "report.txt").write_text(report + "\n")
    return report


def _spread(dataset: CocoDataset, count: int) -> list[int]:
    """``count`` image indices spread over the dataset, both orientations when it has both (half each
    at most), so that portrait images are seen in a mostly landscape set."""
    if count <= 0:
        return []
    groups = [[i for i, wide in enumerate(dataset.aspect_wide()) if wide == w] for w in (True, False)]
    groups = [g for g in groups if g]
    share = [count // len(groups) + (k < count % len(groups)) for k in range(len(groups))]
    if len(groups) == 2:  # a group smaller than its share gives the rest to the other
        for k in (0, 1):
            extra = share[k] - len(groups[k])
            if extra > 0:
                share[k] -= extra
                share[1 - k] += extra
    picked = []
    for group, n in zip(groups, share):
        step = max(1, len(group) / max(n, 1))
        picked += [group[int(j * step)] for j in range(min(n, len(group)))]
    return sorted(picked)


def _plot_histograms(summary: dict, path: Path) -> None:
    plt = pyplot()
    fig, (ax_cls, ax_size, ax_img) = plt.subplots(1, 3, figsize=(15, 4.5),
                                                  gridspec_kw={"width_ratios": [2, 1, 1.4]})
    names = list(summary["per_class"])
    ax_cls.bar(range(len(names)), list(summary["per_class"].values()), color="tab:blue")
    ax_cls.set_xticks(range(len(names)), names, rotation=60 if len(names) > 6 else 0,
                      ha="right" if len(names) > 6 else "center", fontsize=8 if len(names) > 20 else 10)
    ax_cls.set_ylabel("instances")
    ax_cls.set_title("instances per class")
    ax_size.bar(list(summary["sizes"]), list(summary["sizes"].values()), color="tab:orange")
    ax_size.set_ylabel("instances")
    ax_size.set_title(f"object size (COCO: < {int(math.sqrt(SMALL))}², < {int(math.sqrt(MEDIUM))}² px)")
    counts = summary["per_image"]
    ax_img.hist(counts, bins=range(0, max(counts, default=0) + 2), color="tab:green", align="left")
    ax_img.set_xlabel("instances in the image")
    ax_img.set_ylabel("images")
    ax_img.set_title("instances per image")
    for ax in (ax_cls, ax_size, ax_img):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
