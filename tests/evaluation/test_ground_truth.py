"""Evaluation scores against the ground truth the dataset accepted: an annotation reported as left
out is not an object that the model missed, a crowd region without a usable segmentation is its box,
and a file of crowd regions only is refused."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from maskrcnn.data.coco import CocoDataset, DatasetError
from maskrcnn.evaluation.evaluate import evaluate_model

# every image has its own size, so that the oracle below can tell them apart
SIZES = {1: (60, 80), 2: (70, 50), 3: (64, 64)}


def _square(ann_id, image_id, x, y, s, cat=1, **extra):
    ring = [x, y, x + s, y, x + s, y + s, x, y + s]
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, s, s], "area": s * s,
            "iscrowd": 0, "segmentation": [ring], **extra}


def _write(tmp_path, annotations):
    for i, (h, w) in SIZES.items():
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / f"{i}.png")
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in SIZES.items()],
            "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}], "annotations": annotations}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))
    return path


class Oracle(nn.Module):
    """Predicts exactly the objects the dataset accepted (boxes and masks, score 1): a consistent
    evaluation must give it AP 100."""

    coco_types = ["bbox", "segm"]

    def __init__(self, dataset: CocoDataset) -> None:
        super().__init__()
        self.by_size = {(r.height, r.width): i for i, r in enumerate(dataset.records)}
        self.dataset = dataset

    def forward(self, images):
        outs = []
        for im in images:
            t = self.dataset.target(self.by_size[tuple(im.shape[-2:])])
            h, w = im.shape[-2:]
            masks = t["masks"]  # (the datasets here give bitmaps)
            outs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                         "masks": masks.bool()[:, None]})
        return outs


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_left_out_annotations_and_odd_crowd_regions_are_scored_as_reported(tmp_path):
    crowd = np.zeros((64, 64), bool)
    crowd[40:60, 40:60] = True
    annotations = [
        _square(1, 1, 5, 5, 20), _square(2, 1, 40, 20, 25, cat=2), _square(3, 2, 10, 30, 20),
        _square(4, 3, 4, 4, 16),
        _square(10, 1, 30, 35, 10, segmentation=None),                 # no segmentation: left out
        {**_square(11, 2, 5, 5, 10), "bbox": [5, float("nan"), 10, 10]},  # NaN box: left out
        _square(12, 3, 30, 5, 12, segmentation=[[30, 5, 42, 17]]),     # a 2-point polygon: left out
        _square(13, 2, 30, 50, 15, iscrowd=1, segmentation=None),      # box-only crowd: its box
        _square(14, 3, 40, 40, 20, iscrowd=1, segmentation={"size": [10, 10], "counts": "abc"}),  # wrong size
        _square(15, 3, 40, 40, 20, iscrowd=1, segmentation=_rle(crowd)),  # a good crowd RLE
        _square(16, 1, 60, 40, 12, id=None),                           # no id: ids are made unique
    ]
    annotations[-1]["id"] = 4  # ... and a repeated id (pycocotools would keep only one of the two)
    dataset = CocoDataset(_write(tmp_path, annotations), tmp_path, mask_format="bitmap")
    assert sum(len(r.boxes) for r in dataset.records) == 5
    report = " | ".join(dataset.report)
    for words in ("annotation 10: missing segmentation", "annotation 11: box", "annotation 12: no polygon",
                  "annotation 13: crowd region with missing segmentation (kept: its box stands for it)",
                  "annotation 14: crowd region with RLE size [10, 10]"):
        assert words in report, report
    metrics = evaluate_model(Oracle(dataset), dataset, tmp_path / "out", progress=False)
    # before: a KeyError deep in COCO evaluation (the annotation without segmentation), and objects
    # reported as skipped still counted as missed
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0), metrics
    assert metrics["bbox"]["AR100"] == pytest.approx(1.0)
    # the error analysis reads the same ground truth: nothing missed
    from maskrcnn.evaluation.report import analyze_results

    for iou_type in ("bbox", "segm"):
        errors = analyze_results(dataset.evaluation_ground_truth(), tmp_path / "out" / f"coco_{iou_type}_results.json",
                                 iou_type, dataset.class_map, tmp_path / "analysis")["errors"]
        assert errors["counts"]["missed"] == 0 and errors["counts"]["classification"] == 0, errors
    # the file itself is untouched
    assert json.loads((tmp_path / "val.json").read_text())["annotations"][4]["segmentation"] is None


def test_a_detection_inside_a_box_only_crowd_region_is_not_a_false_positive(tmp_path):
    annotations = [_square(1, 1, 5, 5, 20), _square(2, 2, 10, 30, 20), _square(3, 3, 4, 4, 16),
                   _square(4, 2, 25, 2, 20, iscrowd=1, segmentation=None)]
    dataset = CocoDataset(_write(tmp_path, annotations), tmp_path, mask_format="bitmap")
    oracle = Oracle(dataset)

    class OracleAndCrowd(Oracle):
        def forward(self, images):
            outs = super().forward(images)
            for im, out in zip(images, outs):
                if tuple(im.shape[-2:]) == SIZES[2]:  # one more detection, inside the crowd region
                    box = torch.tensor([[28.0, 5.0, 40.0, 17.0]])
                    mask = torch.zeros(1, 1, *SIZES[2], dtype=torch.bool)
                    mask[..., 5:17, 28:40] = True
                    out.update(boxes=torch.cat([out["boxes"], box]), labels=torch.cat([out["labels"], out["labels"][:1]]),
                               scores=torch.cat([out["scores"], torch.ones(1)]), masks=torch.cat([out["masks"], mask]))
            return outs

    crowded = OracleAndCrowd(dataset)
    assert evaluate_model(oracle, dataset, progress=False)["segm"]["AP"] == pytest.approx(1.0)
    assert evaluate_model(crowded, dataset, progress=False)["segm"]["AP"] == pytest.approx(1.0)


def test_a_file_of_crowd_regions_only_is_refused(tmp_path):
    annotations = [_square(1, 1, 5, 5, 20, iscrowd=1), _square(2, 2, 10, 30, 20, iscrowd=1)]
    dataset = CocoDataset(_write(tmp_path, annotations), tmp_path)
    with pytest.raises(DatasetError, match="no object to score against among its 2 annotations .all are crowd regions"):
        evaluate_model(Oracle(dataset), dataset, progress=False)


class BoxOracle(Oracle):
    coco_types = ["bbox"]

    def forward(self, images):
        return [{k: v for k, v in out.items() if k != "masks"} for out in super().forward(images)]


def test_a_box_only_file_for_a_box_only_model(tmp_path):
    # detection datasets (no segmentation at all) train and evaluate Faster R-CNN; a mask model
    # leaves such annotations out, and says so
    annotations = [_square(1, 1, 5, 5, 20, segmentation=None), _square(2, 2, 10, 30, 20, segmentation=None),
                   _square(3, 3, 4, 4, 16, segmentation=None), _square(4, 3, 30, 30, 16)]
    path = _write(tmp_path, annotations)
    boxes_only = CocoDataset(path, tmp_path, masks=False, mask_format="bitmap")
    assert sum(len(r.boxes) for r in boxes_only.records) == 4 and not boxes_only.report
    assert boxes_only[0][1]["masks"] is not None  # a stand-in that nothing reads, not a crash
    training = CocoDataset(path, tmp_path, train=True, masks=False)  # (a mask model's training set refuses it)
    assert sum(len(r.boxes) for r in training.records) == 4
    metrics = evaluate_model(BoxOracle(boxes_only), boxes_only, progress=False)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AR100"] == pytest.approx(1.0)
    with pytest.warns(UserWarning, match="skipped 3 bad"):
        with_masks = CocoDataset(path, tmp_path)
    assert sum(len(r.boxes) for r in with_masks.records) == 1


def test_what_pycocotools_would_trip_on_is_given_as_trained(tmp_path):
    annotations = [
        _square(0, 1, 5, 5, 20),  # id 0: pycocotools' "no match" marker
        _square(2, 2, 10, 30, 20, segmentation=[[10, 30, 30, 50], [10, 30, 30, 30, 30, 50, 10, 50]]),  # a 2-point ring first
        _square(3, 3, 4, 4, 16),
    ]
    for a in annotations:  # files without area and iscrowd (training reads them as 0 and the box)
        del a["area"], a["iscrowd"]
    annotations.append(_square(4, 3, 40, 40, 20, iscrowd=1, segmentation={"size": None, "counts": "x"}))
    dataset = CocoDataset(_write(tmp_path, annotations), tmp_path, mask_format="bitmap")
    assert sum(len(r.boxes) for r in dataset.records) == 3
    assert any("annotation 4: crowd region with RLE size None" in r for r in dataset.report), dataset.report
    metrics = evaluate_model(Oracle(dataset), dataset, tmp_path / "out", progress=False)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0), metrics
    from maskrcnn.evaluation.report import write_analysis

    write_analysis(dataset.evaluation_ground_truth(), tmp_path / "out", dataset.class_map, metrics)  # pycocotools


def test_the_analysis_looks_at_the_images_the_evaluation_scored(tmp_path, capsys):
    annotations = [_square(1, 1, 5, 5, 20), _square(2, 2, 10, 30, 20), _square(3, 3, 4, 4, 16)]
    dataset = CocoDataset(_write(tmp_path, annotations), tmp_path, mask_format="bitmap")
    from maskrcnn.evaluation.report import write_analysis

    metrics = evaluate_model(Oracle(dataset), dataset, tmp_path / "out", limit=2, progress=False)
    assert metrics["images"]["evaluated"] == 2 and metrics["segm"]["AP"] == pytest.approx(1.0)
    write_analysis(dataset.evaluation_ground_truth(), tmp_path / "out", dataset.class_map, metrics)
    missed = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("missed")]
    assert [m[1] for m in missed] == ["0", "0"], missed  # boxes and masks: the unscored image's object is no miss
    assert (tmp_path / "out" / "analysis" / "errors_segm.csv").read_text().count("missed,0,") == 1


def test_a_file_edited_after_it_was_read_is_not_scored_by_stale_positions(tmp_path):
    path = _write(tmp_path, [_square(1, 1, 5, 5, 20), _square(9, 2, 10, 30, 20, segmentation=None),
                             _square(3, 3, 4, 4, 16)])
    dataset = CocoDataset(path, tmp_path)
    data = json.loads(path.read_text())
    data["annotations"].insert(0, _square(7, 1, 40, 30, 10))
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="changed since it was read"):
        dataset.evaluation_ground_truth()
