"""faster-coco-eval (used by ``maskrcnn eval`` when installed) gives pycocotools' numbers: the 12
summaries and the precision table behind per-class AP, for boxes, masks and keypoints."""

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest

from maskrcnn.evaluation.coco_eval import coco_api

pytest.importorskip("faster_coco_eval")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from coco_eval import synthetic  # noqa: E402


def _evaluate(backend, gt, dets, iou_type, sigmas=None, image_ids=None):
    COCO, COCOeval = coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "pycocotools":
            coco = COCO()
            coco.dataset = gt
            coco.createIndex()
        else:
            coco = COCO(gt)
        ev = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), iou_type)
        if image_ids is not None:
            ev.params.imgIds = image_ids
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = sigmas
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:12 if iou_type != "keypoints" else 10]), ev.eval["precision"]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_boxes_and_masks(iou_type):
    gt, dets = synthetic(40, seed=3)
    gt["annotations"][5]["iscrowd"] = 1  # a crowd region too
    ids = list(range(1, 31))  # a partial run: only the images seen are scored
    ref_stats, ref_prec = _evaluate("pycocotools", gt, dets, iou_type, image_ids=ids)
    stats, prec = _evaluate("faster-coco-eval", gt, dets, iou_type, image_ids=ids)
    np.testing.assert_allclose(stats, ref_stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(prec, ref_prec, rtol=0, atol=1e-12)


def test_keypoints_with_their_own_sigmas():
    rng = np.random.default_rng(0)
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "star", "keypoints": list("abcde")}]}
    dets = []
    for i in range(1, 21):
        gt["images"].append({"id": i, "width": 200, "height": 200})
        for _ in range(3):
            x, y, w, h = *rng.uniform(0, 120, 2), *rng.uniform(20, 70, 2)
            kp = [v for _ in range(5) for v in (x + rng.uniform(0, w), y + rng.uniform(0, h), 2)]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": 1,
                                      "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "keypoints": kp,
                                      "num_keypoints": 5})
            moved = [v + (rng.normal(0, 3) if k % 3 < 2 else 0) for k, v in enumerate(kp)]
            dets.append({"image_id": i, "category_id": 1, "keypoints": moved, "score": float(rng.random()),
                         "bbox": [x, y, w, h]})
    sigmas = np.array([0.05, 0.06, 0.07, 0.08, 0.09])
    ref_stats, ref_prec = _evaluate("pycocotools", gt, dets, "keypoints", sigmas)
    stats, prec = _evaluate("faster-coco-eval", gt, dets, "keypoints", sigmas)
    assert ref_stats[0] > 0.1  # a real score, not an empty comparison
    np.testing.assert_allclose(stats, ref_stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(prec, ref_prec, rtol=0, atol=1e-12)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="evaluation backend must be one of"):
        coco_api("detectron2")
