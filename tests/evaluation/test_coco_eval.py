"""COCO evaluation: known answers, equality with pycocotools run directly, per-class AP."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.data.coco import ClassMap
from maskrcnn.evaluation.coco_eval import SUMMARY, COCOEvaluator


@pytest.fixture
def gt(tmp_path):
    """Two 100x100 images; image 1 has a 'cat' (id 5) box, image 2 a 'dog' (id 9) box."""
    data = {"images": [{"id": 1, "file_name": "1.png", "height": 100, "width": 100},
                       {"id": 2, "file_name": "2.png", "height": 100, "width": 100}],
            "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0,
                 "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]]},
                {"id": 2, "image_id": 2, "category_id": 9, "bbox": [20, 30, 60, 40], "area": 2400, "iscrowd": 0,
                 "segmentation": [[20, 30, 80, 30, 80, 70, 20, 70]]}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def _pred(boxes, labels, scores, masks=None):
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
           "scores": torch.tensor(scores)}
    if masks is not None:
        out["masks"] = torch.from_numpy(np.stack(masks))[:, None]
    return out


def _box_mask(x0, y0, x1, y1):
    m = np.zeros((100, 100), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


CLASSES = ClassMap([5, 9], ["cat", "dog"])


def test_perfect_predictions_score_one(gt):
    ev = COCOEvaluator(gt, CLASSES)
    ev.process([_pred([[10, 10, 50, 50]], [1], [0.9], [_box_mask(10, 10, 50, 50)]),
                _pred([[20, 30, 80, 70]], [2], [0.8], [_box_mask(20, 30, 80, 70)])], [1, 2])
    m = ev.evaluate()
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == pytest.approx(1.0) and m[t]["AP75"] == pytest.approx(1.0)
        assert m[t]["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}


def test_known_answer_for_a_shifted_box(gt, tmp_path):
    # image 1: the cat box shifted right by 10 px: IoU = 30*40 / (50*40) = 0.6, which passes the
    # thresholds .50 .55 .60 only: AP = 3/10 for cat; the dog is perfect; a wrong-class extra
    # detection on image 2 (a cat, with no cat there) has a lower score and changes nothing.
    ev = COCOEvaluator(gt, CLASSES, iou_types=("bbox",), output_dir=tmp_path / "out")
    ev.process([_pred([[20, 10, 60, 50]], [1], [0.9]),
                _pred([[20, 30, 80, 70], [0, 0, 10, 10]], [2, 1], [0.8, 0.1])], [1, 2])
    m = ev.evaluate()["bbox"]
    assert m["per_class"]["cat"] == pytest.approx(0.3) and m["per_class"]["dog"] == pytest.approx(1.0)
    assert m["AP"] == pytest.approx(0.65) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(0.5)
    # identical to pycocotools used directly on the written results (with the dataset's ids)
    results = json.loads((tmp_path / "out" / "coco_bbox_results.json").read_text())
    assert {r["category_id"] for r in results} == {5, 9}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt))
        ce = COCOeval(coco, coco.loadRes(results), "bbox")
        ce.evaluate(), ce.accumulate(), ce.summarize()
    assert [m[k] for k in SUMMARY] == pytest.approx(list(ce.stats))


def test_no_detections_scores_zero(gt):
    ev = COCOEvaluator(gt, CLASSES)
    ev.process([_pred(np.zeros((0, 4)), [], [], None), _pred(np.zeros((0, 4)), [], [], None)], [1, 2])
    m = ev.evaluate()
    assert m["bbox"]["AP"] == 0 and m["segm"]["AP"] == 0
