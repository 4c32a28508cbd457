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
from tiny import uncompressed_rle


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


def test_results_files_hold_only_the_predictions(gt, tmp_path):
    # pycocotools' loadRes adds id/area/iscrowd to the dicts it is given; they leaked into the
    # segm file, numbered in the order the results happened to arrive in
    ev = COCOEvaluator(gt, CLASSES, output_dir=tmp_path)
    ev.process([_pred([[10, 10, 50, 50]], [1], [0.9], [_box_mask(10, 10, 50, 50)])], [1])
    ev.evaluate()
    for t in ("bbox", "segm"):
        (r,) = json.loads((tmp_path / f"coco_{t}_results.json").read_text())
        assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}


# -- crowd regions: a detection matched to one is neither a true nor a false positive ------------------

@pytest.fixture(params=["rle", "polygon"])
def crowd_gt(request, tmp_path):
    """One 100x100 image: a cat at [10, 10, 50, 50] (XYXY) and a crowd of cats at [60, 10, 90, 90]."""
    crowd = (uncompressed_rle(_box_mask(60, 10, 90, 90)) if request.param == "rle"
             else [[60, 10, 90, 10, 90, 90, 60, 90]])
    data = {"images": [{"id": 1, "file_name": "1.png", "height": 100, "width": 100}],
            "categories": [{"id": 5, "name": "cat"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0,
                 "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]]},
                {"id": 2, "image_id": 1, "category_id": 5, "bbox": [60, 10, 30, 80], "area": 2400, "iscrowd": 1,
                 "segmentation": crowd}]}
    path = tmp_path / "crowd.json"
    path.write_text(json.dumps(data))
    return path


CAT = ClassMap([5], ["cat"])


def _crowd_ap(path, extra_boxes, iou_types=("bbox", "segm")):
    """AP of the exact cat detection (score 0.9) plus ``extra_boxes`` (score 0.95, ranked first)."""
    boxes = [[10, 10, 50, 50]] + extra_boxes
    scores = [0.9] + [0.95] * len(extra_boxes)
    ev = COCOEvaluator(path, CAT, iou_types)
    ev.process([_pred(boxes, [1] * len(boxes), scores, [_box_mask(*b) for b in boxes])], [1])
    m = ev.evaluate()
    return {t: m[t]["AP"] for t in iou_types}


def test_detections_inside_a_crowd_region_are_ignored(crowd_gt):
    # both lie wholly inside the crowd: COCO's crowd IoU (intersection / detection area) is 1, so
    # they match the crowd (which absorbs any number of detections) and drop out: AP stays 1
    assert _crowd_ap(crowd_gt, []) == {"bbox": pytest.approx(1.0), "segm": pytest.approx(1.0)}
    assert _crowd_ap(crowd_gt, [[65, 20, 85, 50], [62, 55, 88, 85]]) == {"bbox": pytest.approx(1.0),
                                                                         "segm": pytest.approx(1.0)}
    # control: the same kind of detection on the background is a false positive ranked first:
    # precision 0 then 1/2 at recall 1, so the interpolated precision is 1/2 everywhere: AP 0.5
    assert _crowd_ap(crowd_gt, [[5, 60, 25, 90]]) == {"bbox": pytest.approx(0.5), "segm": pytest.approx(0.5)}


def test_a_detection_half_inside_a_crowd_region_is_ignored_at_iou_050_only(crowd_gt):
    # box [50, 60, 70, 80]: 200 of its 400 px lie in the crowd box, crowd IoU exactly 0.5; it is
    # ignored at the threshold 0.50 (AP 1) and a first-ranked false positive at 0.55 ... 0.95 (AP 0.5,
    # as above): AP = (1 + 9 * 0.5) / 10 = 0.55
    assert _crowd_ap(crowd_gt, [[50, 60, 70, 80]], ("bbox",))["bbox"] == pytest.approx(0.55)


# -- keypoints -------------------------------------------------------------------------------------------

def test_keypoint_ground_truth_without_keypoints_or_num_keypoints(tmp_path):
    # pycocotools reads gt["num_keypoints"] and gt["keypoints"] of every annotation (KeyError
    # before); an instance without labelled keypoints is ignored, so one exact prediction on the
    # labelled person gives AP 1 and the unlabelled one is not a miss
    data = {"images": [{"id": 1, "file_name": "1.png", "height": 100, "width": 100}],
            "categories": [{"id": 1, "name": "person", "keypoints": ["a", "b", "c"], "skeleton": []}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0,
                 "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]], "keypoints": [20, 20, 2, 30, 30, 2, 40, 40, 1]},
                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0,
                 "segmentation": [[60, 60, 90, 60, 90, 90, 60, 90]]}]}
    path = tmp_path / "person_keypoints.json"
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    classes = ClassMap([1], ["person"], keypoint_names=["a", "b", "c"])
    ev = COCOEvaluator(path, classes, ["keypoints"], oks_sigmas=[0.1] * 3)
    out = _pred([[10, 10, 50, 50]], [1], [0.9])
    out["keypoints"] = torch.tensor([[[20.0, 20.0, 1.0], [30.0, 30.0, 1.0], [40.0, 40.0, 1.0]]])
    ev.process([out], [1])
    assert ev.evaluate()["keypoints"]["AP"] == pytest.approx(1.0)
    assert path.read_bytes() == before


def test_keypoints_are_written_back_in_the_file_convention(tmp_path):
    # detectron2's instances_to_coco_json subtracts 0.5 from predicted x, y (its loader added 0.5);
    # torchvision writes them unchanged. A tiny person (area 16) makes the half pixel cost AP.
    data = {"images": [{"id": 1, "file_name": "1.png", "height": 100, "width": 100}],
            "categories": [{"id": 1, "name": "person", "keypoints": ["a", "b"], "skeleton": []}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 20, 4, 4], "area": 16,
                             "iscrowd": 0, "segmentation": [[20, 20, 24, 20, 24, 24, 20, 24]],
                             "keypoints": [21, 21, 2, 23, 22, 2], "num_keypoints": 2}]}
    path = tmp_path / "person_keypoints.json"
    path.write_text(json.dumps(data))
    classes = ClassMap([1], ["person"], keypoint_names=["a", "b"])
    out = _pred([[20, 20, 24, 24]], [1], [0.9])
    out["keypoints"] = torch.tensor([[[21.5, 21.5, 1.0], [23.5, 22.5, 1.0]]])  # model coordinates
    ap, written = {}, {}
    for convention in ("detectron2", "torchvision"):
        ev = COCOEvaluator(path, classes, ["keypoints"], tmp_path / convention, oks_sigmas=[0.1] * 2,
                           keypoint_convention=convention)
        ev.process([out], [1])
        ap[convention] = ev.evaluate()["keypoints"]["AP"]
        results = json.loads((tmp_path / convention / "coco_keypoints_results.json").read_text())
        written[convention] = results[0]["keypoints"]
    assert written["detectron2"] == [21.0, 21.0, 1.0, 23.0, 22.0, 1.0]
    assert written["torchvision"] == [21.5, 21.5, 1.0, 23.5, 22.5, 1.0]
    assert ap["detectron2"] == pytest.approx(1.0)
    # OKS = exp(-(0.5^2 + 0.5^2) / (2 * area * (2 * sigma)^2)) = exp(-0.390625) = 0.677 per keypoint:
    # a match at OKS thresholds 0.50-0.65 only, 4 of the 10
    assert ap["torchvision"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="pixel convention"):
        COCOEvaluator(path, classes, ["keypoints"], oks_sigmas=[0.1] * 2, keypoint_convention="d2")


def test_a_class_without_instances_reads_as_such_in_the_table():
    from maskrcnn.evaluation.coco_eval import format_metrics

    table = format_metrics({"bbox": {"AP": 0.5, "per_class": {"cat": 0.5, "never seen": float("nan")}}})
    assert "per class AP: cat 50.0, never seen n/a (no instances)" in table and "nan" not in table
