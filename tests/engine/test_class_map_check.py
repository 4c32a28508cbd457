"""eval compares the checkpoint's classes with the dataset's categories; eval/predict take --classes."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from maskrcnn.cli import main
from maskrcnn.data.coco import CocoDataset
from maskrcnn.engine.checkpoint import save_checkpoint
from maskrcnn.evaluation.evaluate import evaluate_model
from maskrcnn.engine.predictor import Predictor
from maskrcnn.modeling.build import build_model
from maskrcnn.structures.class_map import ClassMap, class_map_mismatch
from tiny import tiny_config

ANIMALS = ClassMap([1, 2, 3], ["cat", "dog", "bird"])
SHAPES = [{"id": 1, "name": "square"}, {"id": 2, "name": "triangle"}, {"id": 3, "name": "circle"}]
BOXES = [[10, 20, 26, 50], [40, 20, 56, 50], [70, 20, 86, 50]]  # XYXY, one per category, in every image


def _dataset(root, categories, name="val.json"):
    """Two 96x96 images with one object of each category (at BOXES, in the order given)."""
    root.mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(2):
        arr = np.full((96, 96, 3), 40, np.uint8)
        Image.fromarray(arr).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 96, "width": 96})
        for c, (x0, y0, x1, y1) in zip(categories, BOXES):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c["id"], "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def animals_ckpt(tmp_path_factory):
    """An (untrained) tiny 3-class checkpoint of cats, dogs and birds."""
    torch.manual_seed(0)
    cfg = tiny_config(extra=["model.roi_heads.score_thresh=0.0"])
    path = tmp_path_factory.mktemp("ckpt") / "animals.pth"
    return save_checkpoint(path, build_model(cfg).state_dict(), cfg.to_dict(), ANIMALS.to_dict(), 0)


def _warned(recwarn, capsys) -> str:
    """What was warned: recorded by pytest, or printed by the command line's own warning handler."""
    return " ".join(str(w.message) for w in recwarn) + capsys.readouterr().err


def _eval(ckpt, json_path, out, *extra):
    return main(["eval", "--weights", str(ckpt), "--dataset", str(json_path), "--output", str(out),
                 "--device", "cpu", *extra])


def test_same_ids_other_names_is_an_error_showing_both_maps(animals_ckpt, tmp_path, capsys, recwarn):
    shapes = _dataset(tmp_path / "shapes", SHAPES)
    assert _eval(animals_ckpt, shapes, tmp_path / "out") != 0
    err = capsys.readouterr().err
    assert "1: 'cat' (checkpoint) vs 'square' (dataset)" in err
    assert "{1: 'cat', 2: 'dog', 3: 'bird'}" in err and "{1: 'square', 2: 'triangle', 3: 'circle'}" in err
    assert "--classes" in err and not (tmp_path / "out" / "coco_bbox_results.json").exists()
    # the escape hatch evaluates, and prints both maps as a warning
    assert _eval(animals_ckpt, shapes, tmp_path / "out", "--allow-class-mismatch") == 0
    assert re.search(r"'cat' \(checkpoint\) vs 'square' \(dataset\).*checkpoint: \{1: 'cat'.*dataset: +\{1: 'square'",
                     _warned(recwarn, capsys), re.S)


def test_classes_from_the_dataset_json_make_eval_fine(animals_ckpt, tmp_path, capsys, recwarn):
    shapes = _dataset(tmp_path / "shapes", SHAPES)
    assert _eval(animals_ckpt, shapes, tmp_path / "out", "--classes", str(shapes)) == 0
    captured = capsys.readouterr()
    assert "per class AP: square" in " ".join(captured.out.split())
    assert "do not match" not in " ".join(str(w.message) for w in recwarn) + captured.err


def test_dataset_ids_the_checkpoint_lacks_are_an_error(animals_ckpt, tmp_path, capsys):
    other = _dataset(tmp_path / "d", [{"id": 1, "name": "cat"}, {"id": 7, "name": "fish"}])
    assert _eval(animals_ckpt, other, tmp_path / "out") != 0
    err = capsys.readouterr().err
    assert "1 dataset ids are not in the checkpoint: [7]" in err and "--classes" in err


def test_placeholder_names_say_how_to_fix_it():
    problem = class_map_mismatch(ClassMap.placeholder(3), ClassMap.from_categories(SHAPES))
    assert "placeholders" in problem and "{1: '1', 2: '2', 3: '3'}" in problem
    swapped = class_map_mismatch(ANIMALS, ClassMap([1, 2, 3], ["dog", "cat", "bird"]))
    assert "numbers its categories differently" in swapped


class _Oracle(nn.Module):
    """Stands for a model of ANIMALS: finds the cat and the bird where they are, and a dog in each
    image, a class the dataset below does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.coco_types = ["bbox"]  # what evaluate_model asks a model: the COCO result types it predicts

    def forward(self, images):
        boxes = torch.tensor([BOXES[0], BOXES[1], [0, 0, 30, 30]], dtype=torch.float32)
        return [{"boxes": boxes, "labels": torch.tensor([1, 3, 2]), "scores": torch.tensor([0.9, 0.8, 0.95])}
                for _ in images]


def test_subset_datasets_and_spelling_are_fine(animals_ckpt, tmp_path, recwarn, capsys):
    assert class_map_mismatch(ANIMALS, ClassMap([3, 1], [" Bird", "CAT "])) is None  # case and spaces
    # categories cat and bird only (ids 1 and 3), like a COCO model on a person-only set
    subset = _dataset(tmp_path / "subset", [{"id": 1, "name": "cat"}, {"id": 3, "name": "bird"}])
    assert _eval(animals_ckpt, subset, tmp_path / "out") == 0
    assert "do not match" not in _warned(recwarn, capsys)
    # detections of the classes the dataset lacks (dogs, with the best scores) cost nothing:
    # COCOeval scores the dataset's categories only
    dataset = CocoDataset(subset, tmp_path / "subset", class_map=ANIMALS)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*classes do not match.*")
        metrics = evaluate_model(_Oracle(), dataset, progress=False)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert set(metrics["bbox"]["per_class"]) == {"cat", "bird"}


def test_predict_reports_the_given_classes(animals_ckpt, tmp_path):
    classes = _dataset(tmp_path / "d", [{"id": 10, "name": "square"}, {"id": 20, "name": "triangle"},
                                        {"id": 30, "name": "circle"}])
    pred = Predictor(animals_ckpt, "cpu", classes=classes)
    out = pred(tmp_path / "d" / "0.png")
    assert len(out["labels"]) and set(out["category_ids"]) <= {10, 20, 30}
    assert set(out["class_names"]) <= {"square", "triangle", "circle"}
    assert main(["predict", str(tmp_path / "d" / "0.png"), "--weights", str(animals_ckpt), "--classes", str(classes),
                 "--output", str(tmp_path / "p"), "--score-thresh", "0", "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert results and {r["category_id"] for r in results} <= {10, 20, 30}
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    with pytest.raises(ValueError, match="--classes has 2 classes .* but the model has 3"):
        Predictor(animals_ckpt, "cpu", classes=two)
