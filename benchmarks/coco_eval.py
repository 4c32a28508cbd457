"""COCO evaluation time: pycocotools (what ``maskrcnn eval`` uses) vs faster-coco-eval, on a
synthetic COCO-sized set, and whether their 12 numbers agree.

    python benchmarks/coco_eval.py [--images 5000] [--iou-type bbox|segm]

The set: ``--images`` images of 640x480 with 7 objects each (80 classes, polygon outlines), and 100
detections per image (jittered copies of the objects, some with the wrong class, plus strays, with
random scores), seeded. Each library evaluates it (``evaluate`` + ``accumulate`` + ``summarize``,
result loading included) in this process, one after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import numpy as np


def synthetic(n_images: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}
    dets = []
    for i in range(1, n_images + 1):
        gt["images"].append({"id": i, "width": 640, "height": 480})
        for _ in range(7):
            x, y = rng.uniform(0, 500), rng.uniform(0, 380)
            w, h = rng.uniform(8, 140), rng.uniform(8, 100)
            c = int(rng.integers(1, 81))
            poly = [x, y, x + w, y, x + w * 0.8, y + h, x + w * 0.1, y + h * 0.7]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": c,
                                      "bbox": [x, y, w, h], "area": w * h * 0.8, "iscrowd": 0,
                                      "segmentation": [poly]})
            for _ in range(10):
                jx, jy = rng.normal(0, 0.1 * w), rng.normal(0, 0.1 * h)
                label = c if rng.random() < 0.8 else int(rng.integers(1, 81))
                dets.append({"image_id": i, "category_id": label, "bbox": [x + jx, y + jy, w, h],
                             "segmentation": [[v + (jx if k % 2 == 0 else jy) for k, v in enumerate(poly)]],
                             "score": float(rng.random())})
        for _ in range(30):
            x, y = rng.uniform(0, 560), rng.uniform(0, 400)
            dets.append({"image_id": i, "category_id": int(rng.integers(1, 81)), "bbox": [x, y, 40, 40],
                         "segmentation": [[x, y, x + 40, y, x + 40, y + 40, x, y + 40]], "score": float(rng.random())})
    return gt, dets


def run_pycocotools(gt: dict, dets: list[dict], iou_type: str) -> tuple[float, np.ndarray]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return time.perf_counter() - start, np.asarray(ev.stats)


def run_faster(gt: dict, dets: list[dict], iou_type: str) -> tuple[float, np.ndarray]:
    from faster_coco_eval import COCO, COCOeval_faster

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(gt)
        ev = COCOeval_faster(coco, coco.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return time.perf_counter() - start, np.asarray(ev.stats[:12])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--iou-type", default="bbox", choices=["bbox", "segm"])
    args = ap.parse_args()
    gt, dets = synthetic(args.images)
    print(f"{args.images} images, {len(gt['annotations'])} objects, {len(dets)} detections, {args.iou_type}")
    t_ref, ref = run_pycocotools(gt, dets, args.iou_type)
    t_fast, fast = run_faster(gt, dets, args.iou_type)
    print(f"pycocotools      {t_ref:8.2f} s")
    print(f"faster-coco-eval {t_fast:8.2f} s   ({t_ref / t_fast:.1f}x faster)")
    print(f"12 numbers: max difference {np.abs(ref - fast).max():.2e}")
    print("pycocotools:      " + " ".join(f"{v:.4f}" for v in ref))
    print("faster-coco-eval: " + " ".join(f"{v:.4f}" for v in fast))


if __name__ == "__main__":
    main()
