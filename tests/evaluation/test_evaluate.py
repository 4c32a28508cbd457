"""evaluate_model and `maskrcnn eval`: unreadable images are skipped, not scored twice; torchrun shards."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from maskrcnn.cli import main
from maskrcnn.data.build import dataset_paths
from maskrcnn.data.coco import CocoDataset, DatasetError
from maskrcnn.engine.checkpoint import save_checkpoint
from maskrcnn.evaluation.coco_eval import coco_api, format_metrics
from maskrcnn.evaluation.evaluate import evaluate_model
from maskrcnn.modeling.build import build_model
from tiny import tiny_train_config

REPO = Path(__file__).resolve().parents[2]
# (file, id, height, width, the cat's box XYXY); a.png is corrupt
IMAGES = [("a.png", 1, 48, 64, [5, 5, 25, 15]), ("b.png", 2, 40, 50, [10, 10, 30, 30]),
          ("c.png", 3, 48, 64, [30, 20, 60, 40])]


class BoxPerSize(nn.Module):
    """Stands for a detector: one 'cat' per image at the box stored for the image's size."""

    def __init__(self, boxes: dict) -> None:
        super().__init__()
        self.coco_types = ["bbox"]  # what evaluate_model asks a model: the COCO result types it predicts
        self.boxes = boxes

    def forward(self, images):
        return [{"boxes": torch.tensor([self.boxes[tuple(im.shape[-2:])]], dtype=torch.float32),
                 "labels": torch.tensor([1]), "scores": torch.tensor([0.9])} for im in images]


@pytest.fixture
def val_set(tmp_path):
    anns = []
    for name, image_id, h, w, (x0, y0, x1, y1) in IMAGES:
        Image.new("RGB", (w, h), (90, 90, 90)).save(tmp_path / name)
        anns.append({"id": image_id, "image_id": image_id, "category_id": 4, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    (tmp_path / "a.png").write_bytes(b"not a png")
    data = {"images": [{"id": i, "file_name": n, "height": h, "width": w} for n, i, h, w, _ in IMAGES],
            "categories": [{"id": 4, "name": "cat"}], "annotations": anns}
    (tmp_path / "val.json").write_text(json.dumps(data))
    return tmp_path


def test_unreadable_image_is_reported_and_left_out_of_the_scoring(val_set, monkeypatch):
    # before: a.png was replaced by b.png, so b's detection was scored twice (once a false positive)
    scored = []
    _, COCOeval = coco_api("auto")  # the evaluation class that evaluate_model will use
    real_evaluate = COCOeval.evaluate

    def spy(self):
        scored.append(list(self.params.imgIds))
        return real_evaluate(self)

    monkeypatch.setattr(COCOeval, "evaluate", spy)
    model = BoxPerSize({(h, w): box for _, _, h, w, box in IMAGES[1:]})
    dataset = CocoDataset(val_set / "val.json", val_set)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = evaluate_model(model, dataset, val_set / "out", progress=False)
    results = json.loads((val_set / "out" / "coco_bbox_results.json").read_text())
    assert sorted(r["image_id"] for r in results) == [2, 3]
    assert scored == [[2, 3]]
    assert any(re.search(r"image 1 left out of the evaluation: cannot decode image .*a\.png", str(w.message))
               for w in caught), [str(w.message) for w in caught]
    # both scored images found exactly, and image 1's cat is not counted as missed: AP 1
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["images"] == {"evaluated": 2, "skipped": 1}
    assert "images: 2 evaluated, 1 skipped" in format_metrics(metrics)


def test_training_still_substitutes_the_next_image(val_set):
    with pytest.warns(UserWarning, match="using the next image"):
        image, target = CocoDataset(val_set / "val.json", val_set, train=True)[0]
    assert target["image_id"] == 2 and image.shape == (3, 40, 50)
    image, target = CocoDataset(val_set / "val.json", val_set)[0]
    assert image is None and target["image_id"] == 1 and "a.png" in target["skipped"]


def test_no_readable_image_is_an_error(val_set):
    model = BoxPerSize({})
    dataset = CocoDataset(val_set / "val.json", val_set)
    dataset.records = dataset.records[:1]
    with pytest.raises(DatasetError, match="none of the 1 images could be read"), pytest.warns(UserWarning):
        evaluate_model(model, dataset, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model (it detects plenty at score_thresh 0) and the built-in shapes."""
    out = tmp_path_factory.mktemp("eval")
    cfg = tiny_train_config(out)
    paths = dataset_paths(cfg)
    class_map = CocoDataset(*paths["train"]).class_map
    torch.manual_seed(0)
    return save_checkpoint(out / "model.pth", build_model(cfg).state_dict(), cfg.to_dict(), class_map.to_dict(), 0)


EVAL = ["eval", "--set", "model.roi_heads.score_thresh=0.0"]


def _results(out):
    results = json.loads((out / "coco_segm_results.json").read_text())
    return sorted(results, key=lambda r: (r["image_id"], -r["score"], r["bbox"]))


def _table(stdout):
    return [line for line in stdout.splitlines() if not line.startswith("results:")]


def test_eval_under_torchrun_shards_the_images_and_prints_once(checkpoint, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun process: the same kernels, the same numbers
    try:
        assert main([*EVAL, "--weights", str(checkpoint), "--output", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one = capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "maskrcnn", *EVAL, "--weights", str(checkpoint), "--output", str(tmp_path / "two")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _results(tmp_path / "one"), "the untrained model should detect something at score_thresh 0"
    # every image once: nothing missing, nothing twice; rank 0 alone prints the same table
    assert _results(tmp_path / "two") == _results(tmp_path / "one")
    assert proc.stdout.count("bbox: AP") == 1 and "images: 4 evaluated" in proc.stdout
    assert _table(proc.stdout) == _table(one)


def test_a_file_without_annotations_is_an_error_not_ap_minus_100(val_set, checkpoint, tmp_path, capsys):
    data = json.loads((val_set / "val.json").read_text())
    for name, annotations in (("missing", None), ("empty", [])):
        path = val_set / f"no_annotations_{name}.json"
        path.write_text(json.dumps({k: v for k, v in data.items() if k != "annotations"}
                                   | ({"annotations": annotations} if annotations is not None else {})))
        dataset = CocoDataset(path, val_set)  # a test split is still a dataset (predict uses them)
        with pytest.raises(DatasetError, match="no annotations to score against"):
            evaluate_model(BoxPerSize({}), dataset, progress=False)
        code = main(EVAL + ["-w", str(checkpoint), "--dataset", str(path), "--images", str(val_set),
                            "--output", str(tmp_path / name), "--allow-class-mismatch"])
        err = capsys.readouterr().err
        assert code == 1 and "no annotations to score against" in err and "AP" not in err


def test_the_evaluation_bar_stays_out_of_logs(val_set, capsys):
    dataset = CocoDataset(val_set / "val.json", val_set)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate_model(BoxPerSize({(h, w): box for _, _, h, w, box in IMAGES}), dataset, progress=True)  # not a tty
    assert "evaluating" not in capsys.readouterr().err


def test_a_validation_set_the_checkpoint_names_but_cannot_be_found(checkpoint, tmp_path, capsys, monkeypatch):
    # a config with relative data paths, evaluated from another folder (or on another machine): the
    # error says where the path came from and what to pass instead
    state = torch.load(checkpoint, weights_only=False)
    state["config"]["data"].update(train_json="data/train.json", val_json="data/val.json",
                                   train_images="data/train", val_images="data/val")
    moved = tmp_path / "moved.pth"
    torch.save(state, moved)
    monkeypatch.chdir(tmp_path)
    assert main([*EVAL, "--weights", str(moved), "--output", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "data/val.json, the validation set named in the config of" in err and "pass --dataset" in err, err
    assert "Traceback" not in err


def test_images_given_as_a_file_is_named(checkpoint, tmp_path, capsys):
    val_json = dataset_paths(tiny_train_config(checkpoint.parent))["val"][0]
    assert main([*EVAL, "--weights", str(checkpoint), "--dataset", str(val_json), "--images", str(val_json),
                 "--output", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert f"--images {val_json} is a file: give the folder of the images" in err and "Traceback" not in err, err
