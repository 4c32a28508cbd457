"""``maskrcnn eval --analyze``: the error analysis (``analysis.py``) of COCO results, written as
CSV files and matplotlib charts, and printed as a table.

For each result type (``bbox``, ``segm``) in ``out_dir``:

- ``confusion_<type>.csv`` / ``.png``: the confusion matrix with a background row and column;
- ``pr_<type>.png``: precision-recall curves per class at IoU 0.5 and 0.75 (pycocotools' own);
- ``errors_<type>.csv`` / ``.png``: the count of each error kind and the AP50 its fix would add.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from maskrcnn._pyplot import pyplot
from maskrcnn.evaluation.coco_eval import EVALUATED_IMAGES, _quiet, coco_ground_truth  # _quiet: pycocotools prints
from maskrcnn.evaluation.analysis import ERROR_KINDS, Instance, confusion_matrix, error_breakdown, pr_curves
from maskrcnn.structures.class_map import ClassMap


def _instances(coco, results, iou_type: str, image_ids: list[int]) -> list[tuple[list[Instance], list[Instance]]]:
    def geometry(ann: dict, api) -> object:
        return ann["bbox"] if iou_type == "bbox" else api.annToRLE(ann)

    images = []
    for i in image_ids:
        gts = [Instance(a["category_id"], geometry(a, coco), 1.0, bool(a.get("iscrowd", 0)))
               for a in coco.loadAnns(coco.getAnnIds(imgIds=[i]))]
        dets = [Instance(a["category_id"], geometry(a, results), float(a["score"]))
                for a in results.loadAnns(results.getAnnIds(imgIds=[i]))]
        images.append((gts, dets))
    return images


def analyze_results(ground_truth: str | Path | dict, results_json: str | Path, iou_type: str, class_map: ClassMap,
                    out_dir: str | Path, score_thresh: float = 0.5, image_ids: Sequence[int] | None = None) -> dict:
    """Write the analysis of ``results_json`` (COCO results of ``iou_type``) against ``ground_truth``
    (an annotation file, or its contents as evaluated: ``CocoDataset.evaluation_ground_truth``), on
    ``image_ids`` (the images the evaluation scored; default all of the ground truth's)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet():
        coco = coco_ground_truth(COCO, ground_truth)
        results = coco.loadRes(json.loads(Path(results_json).read_text()) or [])
        ev = COCOeval(coco, results, iou_type)
        ev.params.catIds = list(class_map.ids)
        image_ids = sorted(set(image_ids)) if image_ids is not None else sorted(coco.getImgIds())
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
    ids, names = list(class_map.ids), list(class_map.names)
    images = _instances(coco, results, iou_type, image_ids)
    errors = error_breakdown(images, ids)
    cm = confusion_matrix(images, ids, score_thresh=score_thresh)
    curves = pr_curves(ev)

    with open(out_dir / f"confusion_{iou_type}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names, "none (missed)"])
        for name, row in zip([*names, "background"], cm.tolist()):
            w.writerow([name, *row])
    with open(out_dir / f"errors_{iou_type}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["error", "count", "AP50 gained if fixed"])
        for kind in ERROR_KINDS:
            w.writerow([kind, errors["counts"][kind], f"{errors['delta_ap50'][kind]:.4f}"])
    _plot_confusion(cm, names, out_dir / f"confusion_{iou_type}.png", iou_type, score_thresh)
    _plot_pr(curves, names, out_dir / f"pr_{iou_type}.png", iou_type)
    _plot_errors(errors, out_dir / f"errors_{iou_type}.png", iou_type)
    return {"errors": errors, "confusion": cm, "pr": curves}


def format_errors(iou_type: str, errors: dict) -> str:
    rows = [f"{iou_type} errors (AP50 {100 * errors['ap50']:.1f}; what fixing each would add):"]
    rows += [f"  {kind:<15}{errors['counts'][kind]:>7}  {100 * errors['delta_ap50'][kind]:+.1f} AP50"
             for kind in ERROR_KINDS]
    return "\n".join(rows)


def _plot_confusion(cm: np.ndarray, names: list[str], path: Path, iou_type: str, score_thresh: float) -> None:
    plt = pyplot()
    k = len(names) + 1
    size = min(4 + 0.45 * k, 24)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    # each row as fractions of its true class, so rare and frequent classes read alike; counts written
    fractions = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), [*names, "none"], rotation=60, ha="right")
    ax.set_yticks(range(k), [*names, "background"])
    ax.set_xlabel("predicted class (none: missed)")
    ax.set_ylabel("true class (background: no object)")
    ax.set_title(f"{iou_type}: confusion at IoU 0.5, score >= {score_thresh:g}")
    if k <= 30:
        for r in range(k):
            for c in range(k):
                if cm[r, c]:
                    ax.text(c, r, str(cm[r, c]), ha="center", va="center", fontsize=8,
                            color="white" if fractions[r, c] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="fraction of the row")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pr(curves: dict[float, np.ndarray], names: list[str], path: Path, iou_type: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    recall = np.linspace(0, 1, 101)
    cmap = plt.get_cmap("tab20")
    for ax, (iou, precision) in zip(axes, sorted(curves.items())):
        for c, name in enumerate(names):
            if precision[c].min() < 0:  # no ground truth of this class
                continue
            ax.plot(recall, precision[c], color=cmap(c % 20), label=name, linewidth=1.5)
        ax.set_xlabel("recall")
        ax.set_title(f"{iou_type}: precision-recall at IoU {iou:g}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("precision")
    if len(names) <= 30:  # beside the charts, never over the curves
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, title="class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_errors(errors: dict, path: Path, iou_type: str) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    kinds = list(ERROR_KINDS)
    gains = [100 * errors["delta_ap50"][k] for k in kinds]
    counts = [errors["counts"][k] for k in kinds]
    left.barh(kinds[::-1], gains[::-1], color="tab:red")
    left.set_xlabel("AP50 points gained if fixed")
    left.set_title(f"{iou_type}: what each error costs (AP50 {100 * errors['ap50']:.1f})")
    right.barh(kinds[::-1], counts[::-1], color="tab:gray")
    right.set_xlabel("count (detections; missed: objects)")
    right.set_title("how often")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_analysis(ground_truth: str | Path | dict, results_dir: Path, class_map: ClassMap, metrics: dict,
                   out: Path | None = None) -> Path:
    """The analysis of the ``coco_<type>_results.json`` that an evaluation wrote to ``results_dir``
    (boxes, and masks where evaluated), into ``out`` (default ``results_dir / "analysis"``); prints
    the error tables."""
    out = out or results_dir / "analysis"
    scored = results_dir / EVALUATED_IMAGES
    image_ids = json.loads(scored.read_text()) if scored.is_file() else None
    for iou_type in ("bbox", "segm"):
        results = results_dir / f"coco_{iou_type}_results.json"
        if iou_type in metrics and results.is_file():
            report = analyze_results(ground_truth, results, iou_type, class_map, out, image_ids=image_ids)
            print(format_errors(iou_type, report["errors"]))
    print(f"analysis: {out.resolve()}")
    return out
