"""The error analysis on a fixture with one error of each kind, its answers worked out by hand, and
AP50 against pycocotools on the same data."""

import contextlib
import io

import numpy as np
import pytest

from maskrcnn.evaluation.analysis import (ERROR_KINDS, Instance, average_precision, confusion_matrix,
                                          error_breakdown, mean_ap, pr_curves)

CAT, DOG = 1, 2
BOX = [0.0, 0.0, 10.0, 10.0]  # XYWH

# per image: (ground truth, detections); each image holds one situation
IMAGES = [
    ([Instance(CAT, BOX)], [Instance(CAT, BOX, 0.9), Instance(CAT, BOX, 0.8)]),  # a hit and its duplicate
    ([Instance(DOG, BOX)], [Instance(CAT, BOX, 0.7)]),  # classification: the right box, the wrong class
    ([Instance(CAT, BOX)], [Instance(CAT, [0.0, 0.0, 10.0, 4.0], 0.6)]),  # localisation: IoU 0.4
    ([Instance(DOG, BOX)], [Instance(CAT, [0.0, 0.0, 10.0, 3.0], 0.5)]),  # both: IoU 0.3, another class
    ([Instance(CAT, BOX)], [Instance(DOG, [50.0, 50.0, 10.0, 10.0], 0.4)]),  # background; the cat is missed
    ([Instance(CAT, [0.0, 0.0, 20.0, 20.0], crowd=True)], [Instance(CAT, BOX, 0.95)]),  # on a crowd: ignored
]


def test_each_error_kind_is_found_once():
    result = error_breakdown(IMAGES, [CAT, DOG])
    assert result["counts"] == {kind: 1 for kind in ERROR_KINDS}


def test_ap50_and_the_gain_of_each_fix_worked_out_by_hand():
    # cat: 3 objects (the crowd region is none), detections 0.9 hit, 0.8 / 0.7 / 0.6 / 0.5 false: recall
    # 1/3 at precision 1, so 34 of COCO's 101 recall points (0.00-0.33) read 1; dog: no hit, AP 0
    result = error_breakdown(IMAGES, [CAT, DOG])
    assert result["ap50"] == pytest.approx(34 / 101 / 2)
    gains = result["delta_ap50"]
    # classification fixed: the dog is found at precision 1 (recall 1/2: 51 points)
    assert gains["classification"] == pytest.approx(51 / 101 / 2)
    # localisation fixed: cat hits at ranks 1 and 4: recall 2/3 at precision 1/2 adds 33 points of 0.5
    assert gains["localisation"] == pytest.approx(16.5 / 101 / 2)
    # the missed cat removed: 2 cats, recall 1/2 at precision 1 (51 points instead of 34)
    assert gains["missed"] == pytest.approx(17 / 101 / 2)
    # the duplicate, the both error and the background detection all rank after the last hit
    assert gains["duplicate"] == gains["both"] == gains["background"] == 0


def test_confusion_matrix_worked_out_by_hand():
    cm = confusion_matrix(IMAGES, [CAT, DOG], score_thresh=0.5)
    # rows: true cat, dog, background; columns: predicted cat, dog, nothing. The hit; the duplicate,
    # the localisation and both errors as background predictions; the classification error as
    # dog -> cat; the cats of images 3 and 5 and the dog of image 4 missed (0.4 is under the
    # threshold); the detection on the crowd region nowhere
    assert cm.tolist() == [[1, 0, 2], [1, 0, 1], [3, 0, 0]]


def _coco(images):
    from pycocotools.coco import COCO

    gt = {"images": [], "annotations": [], "categories": [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}]}
    results = []
    for i, (gts, dets) in enumerate(images, start=1):
        gt["images"].append({"id": i, "width": 100, "height": 100})
        for g in gts:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": g.label,
                                      "bbox": g.geometry, "area": g.geometry[2] * g.geometry[3],
                                      "iscrowd": int(g.crowd)})
        results += [{"image_id": i, "category_id": d.label, "bbox": d.geometry, "score": d.score} for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        return coco, coco.loadRes(results)


def _cocoeval(images):
    from pycocotools.cocoeval import COCOeval

    coco, dets = _coco(images)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, dets, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_ap50_equals_pycocotools_on_the_fixture_and_on_random_scenes():
    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(20):  # objects, jittered detections of them with random classes, and strays
        gts = [Instance(int(rng.integers(1, 3)), [float(v) for v in rng.uniform(0, 60, 2)] +
                        [float(v) for v in rng.uniform(5, 40, 2)], crowd=bool(rng.random() < 0.1))
               for _ in range(int(rng.integers(0, 5)))]
        dets = [Instance(g.label if rng.random() < 0.8 else 3 - g.label,
                         [v + float(rng.normal(0, 3)) for v in g.geometry[:2]] + g.geometry[2:], float(rng.random()))
                for g in gts for _ in range(int(rng.integers(0, 3)))]
        dets += [Instance(int(rng.integers(1, 3)), [float(v) for v in rng.uniform(0, 80, 2)] + [10.0, 10.0],
                          float(rng.random())) for _ in range(int(rng.integers(0, 3)))]
        scenes.append((gts, dets))
    for images in (IMAGES, scenes):
        ev = _cocoeval(images)
        assert mean_ap(average_precision(images, [CAT, DOG])) == pytest.approx(ev.stats[1], abs=1e-12)


def test_pr_curves_read_pycocotools_precision():
    curves = pr_curves(_cocoeval(IMAGES))
    assert set(curves) == {0.5, 0.75} and curves[0.5].shape == (2, 101)
    assert curves[0.5][0] == pytest.approx([1.0] * 34 + [0.0] * 67)  # the cat: recall 1/3 at precision 1
    assert curves[0.5][1].tolist() == [0.0] * 101  # the dog: never found


def test_fixing_an_error_never_lowers_ap():
    # a cat found by a hit (0.9), and a dog detection (0.8) on the same cat: a classification error whose
    # fix would be a duplicate of the hit, so the oracle suppresses it instead of adding a false positive;
    # likewise two localisation errors on one missed cat: only the better one becomes the hit
    images = [
        ([Instance(CAT, BOX)], [Instance(CAT, BOX, 0.9), Instance(DOG, BOX, 0.8)]),
        ([Instance(DOG, BOX)], [Instance(DOG, BOX, 0.3)]),
        ([Instance(CAT, BOX)], [Instance(CAT, [0.0, 0.0, 10.0, 4.0], 0.7), Instance(CAT, [0.0, 0.0, 10.0, 4.5], 0.6)]),
    ]
    result = error_breakdown(images, [CAT, DOG])
    assert result["counts"]["classification"] == 1 and result["counts"]["localisation"] == 2
    assert all(gain >= 0 for gain in result["delta_ap50"].values()), result["delta_ap50"]
    rng = np.random.default_rng(1)
    for _ in range(30):  # and on random scenes
        scene = []
        for _ in range(6):
            gts = [Instance(int(rng.integers(1, 3)), [float(v) for v in rng.uniform(0, 40, 2)] + [20.0, 20.0])
                   for _ in range(int(rng.integers(1, 4)))]
            dets = [Instance(int(rng.integers(1, 3)), [v + float(rng.normal(0, 4)) for v in g.geometry[:2]] +
                             [20.0, 20.0], float(rng.random())) for g in gts for _ in range(int(rng.integers(0, 3)))]
            scene.append((gts, dets))
        gains = error_breakdown(scene, [CAT, DOG])["delta_ap50"]
        assert all(g >= -1e-12 for g in gains.values()), gains
