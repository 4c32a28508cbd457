"""maskrcnn inspect: the dataset summary and the anchor fit, on cases with known answers."""

import json

import pytest
from PIL import Image

import maskrcnn
from maskrcnn.cli import main
from maskrcnn.data.coco import CocoDataset
from maskrcnn.inspection.anchors import anchor_report, best_anchor_iou
from maskrcnn.inspection.dataset import dataset_summary
from tiny import set_args, tiny_train_overrides


def _dataset(tmp_path, boxes, size=64, categories=("cat", "dog")):
    anns = [{"id": k + 1, "image_id": 1, "category_id": label, "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
             "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3], box[0],
                               box[1] + box[3]]]} for k, (label, box) in enumerate(boxes)]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": size, "height": size}], "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    Image.new("RGB", (size, size)).save(tmp_path / "a.png")
    return CocoDataset(tmp_path / "d.json", tmp_path)


def test_summary_counts_classes_and_coco_sizes(tmp_path):
    # areas: 10x10 = 100 (small, < 32^2), 40x40 = 1600 (medium), 100x100 (large, >= 96^2)
    ds = _dataset(tmp_path, [(1, [0, 0, 10, 10]), (1, [10, 10, 40, 40]), (2, [0, 0, 100, 100])], size=128)
    s = dataset_summary(ds)
    assert s["per_class"] == {"cat": 2, "dog": 1} and s["sizes"] == {"small": 1, "medium": 1, "large": 1}
    assert s["images"] == 1 and s["per_image"] == [3] and s["skipped"] == []


def test_an_object_shaped_like_an_anchor_fits_it_exactly(tmp_path):
    cfg = maskrcnn.get_config("shapes_R_18_FPN", ["model.input.min_size_train=[64]", "model.input.max_size_train=64"])
    # detectron2-style anchors: a 16-px square centred on the stride-4 grid, e.g. (8, 8): [0, 0, 16, 16];
    # a 12x60 box (height/width 5) is more than twice as elongated as the tallest anchor (ratio 2)
    ds = _dataset(tmp_path, [(1, [0, 0, 16, 16]), (2, [20, 0, 12, 60])])
    stats = best_anchor_iou(ds, cfg)
    assert stats["best_iou"][0] == pytest.approx(1.0) and stats["size"][0] == pytest.approx(16.0)
    assert stats["ratio"][1] == pytest.approx(5.0) and stats["best_iou"][1] < 0.7
    report = anchor_report(stats, cfg)
    assert "2 objects" in report and "more elongated than twice the anchors' aspect ratios" in report


def test_inspect_command_writes_pictures_and_report(tmp_path, capsys):
    overrides = tiny_train_overrides(tmp_path)
    assert main(["inspect", *set_args(overrides), "--output", str(tmp_path / "insp"), "--num-images", "2"]) == 0
    out = capsys.readouterr().out
    assert "8 images" in out and "per class:" in out and "best anchor IoU" in out
    files = {p.name for p in (tmp_path / "insp").iterdir()}
    assert {"histograms.png", "anchors.png", "report.txt"} <= files and len([f for f in files if f.startswith("gt_")]) == 2
    report = (tmp_path / "insp" / "report.txt").read_text()
    assert "skipped by the loader: nothing" in report and "anchors (" in report


def test_overlays_show_both_orientations():
    from types import SimpleNamespace

    from maskrcnn.inspection.dataset import _spread

    wide = [True] * 18 + [False] * 2  # a mostly landscape set with two portrait images
    picked = _spread(SimpleNamespace(aspect_wide=lambda: wide), 8)
    assert len(picked) == 8 and {18, 19} <= set(picked)  # both portrait images, six landscape ones
    assert _spread(SimpleNamespace(aspect_wide=lambda: [True] * 5), 8) == [0, 1, 2, 3, 4]
