"""Sliced inference on large images with small objects, against whole-image inference, and its
memory on a 10,000 x 10,000 image.

    python benchmarks/sliced.py --checkpoint outputs/demo/train/model_final.pth [--images 10] [--size 960x1344]

A validation set of the shapes generator at a large canvas (``--size``, up to 60 objects of the
training radii each), scored with COCO AP (pycocotools): once with each image resized whole to the
model's input size (``maskrcnn predict``), once window by window at the model's own scale
(``--slice`` = the model's test size, ``--overlap``). Then, in a fresh process, one 10,000 x 10,000
image of the same kind through ``predict_sliced``: seconds and peak RSS (the image itself is 300 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BIG = r'''
import json, sys, time
import numpy as np, torch
from maskrcnn.data.shapes import draw_image
from maskrcnn.engine.predictor import Predictor
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
rng = np.random.default_rng(0)
size = args["big"]
# a 1000 px scene repeated: drawing 10,000 px at once would itself take GBs of float64 scratch
block, _ = draw_image(rng, (1000, 1000), 40, 16.0, 44.0, 0.4)
image = np.tile(block, (-(-size // 1000), -(-size // 1000), 1))[:size, :size].copy()
del block
def status(key):  # kB in /proc/self/status
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
pred = Predictor(args["checkpoint"], "cpu")
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) counts from here: the inference alone
start = time.perf_counter()
out = pred.predict_sliced(image, args["tile"], args["overlap"], args["batch"])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "detections": len(out["labels"]), "rss_before_mb": before,
                  "peak_rss_mb": status("VmHWM:")}))
'''


def score(json_path: Path, results: list[dict], iou_type: str) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(json_path))
        if not results:
            return 0.0
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a model trained on the shapes (e.g. maskrcnn demo's)")
    ap.add_argument("--images", type=int, default=10, help="large images to score (0: only the memory test)")
    ap.add_argument("--size", default="960x1344")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--big", type=int, default=10000, help="side of the memory test's image (0: skip)")
    args = ap.parse_args()
    if args.images:
        compare(args)
    if args.big:
        memory(args)


def compare(args) -> None:
    import torch

    from maskrcnn.data.shapes import write_shapes_dataset
    from maskrcnn.engine.predictor import Predictor
    from maskrcnn.evaluation.coco_eval import instances_to_coco

    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="sliced_"))
    paths = write_shapes_dataset(tmp, num_train=1, num_val=args.images, size=(h, w), max_objects=60, seed=7)
    json_path, image_dir = paths["val"]
    gt = json.loads(json_path.read_text())
    pred = Predictor(args.checkpoint, "cpu")
    tile = int(pred.cfg.model.input.min_size_test)
    whole, sliced = [], []
    t_whole = t_sliced = 0.0
    for img in gt["images"]:
        path = image_dir / img["file_name"]
        start = time.perf_counter()
        out = pred(path)
        t_whole += time.perf_counter() - start
        whole += instances_to_coco(out, img["id"], pred.class_map)
        start = time.perf_counter()
        out = pred.predict_sliced(path, tile, args.overlap, batch_size=4)
        t_sliced += time.perf_counter() - start
        for k in range(len(out["labels"])):
            x1, y1, x2, y2 = out["boxes"][k].tolist()
            rle = out["masks_rle"][k]
            sliced.append({"image_id": img["id"], "category_id": out["category_ids"][k], "bbox": [x1, y1, x2 - x1, y2 - y1],
                           "score": float(out["scores"][k]),
                           "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    n_obj = len(gt["annotations"])
    print(f"{args.images} images of {w}x{h}, {n_obj} objects (radius 16-44 px), model input {tile} px, "
          f"{args.threads} threads")
    print("|                              | box AP | mask AP | s/img |")
    print("|------------------------------|--------|---------|-------|")
    for name, res, t in (("whole image, resized", whole, t_whole), (f"sliced {tile} px, overlap {args.overlap:g}",
                                                                     sliced, t_sliced)):
        print(f"| {name:<28} | {100 * score(json_path, res, 'bbox'):6.1f} | {100 * score(json_path, res, 'segm'):7.1f} "
              f"| {t / args.images:5.2f} |")


def memory(args) -> None:
    from maskrcnn.engine.predictor import Predictor

    tile = int(Predictor(args.checkpoint, "cpu").cfg.model.input.min_size_test)
    run = subprocess.run([sys.executable, "-c", BIG, json.dumps({
        "checkpoint": args.checkpoint, "big": args.big, "tile": tile, "overlap": args.overlap, "batch": 4,
        "threads": args.threads})], capture_output=True, text=True)
    if run.returncode:
        print(run.stderr[-3000:])
        return
    r = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{args.big}x{args.big} image, sliced: {r['seconds']:.0f} s, {r['detections']} detections; RSS "
          f"{r['rss_before_mb']:.0f} MB before (the image, 300 MB at 10,000 px, and the model), peak "
          f"{r['peak_rss_mb']:.0f} MB during")


if __name__ == "__main__":
    main()
