"""The command line: help texts, train -> eval -> predict on tiny data, config errors, convert."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.engine.predictor import Predictor
from tiny import tiny_train_overrides


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize("command,expected", [
    ([], ["train", "eval", "predict", "demo", "convert"]),
    (["train"], ["--config", "--set", "--resume", "torchrun"]),
    (["eval"], ["--weights", "--dataset", "12-number"]),
    (["predict"], ["--weights", "--score-thresh", "glob"]),
    (["demo"], ["--output", "shapes"]),
    (["convert"], ["torchvision", "destination"]),
])
def test_help_is_complete(capsys, command, expected):
    with pytest.raises(SystemExit) as e:
        main(command + ["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in expected:
        assert word in text, f"{command}: {word!r} missing from help"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert main(["train", "--no-progress", *_sets(tiny_train_overrides(out, ["solver.max_iter=2"]))]) == 0
    return out


def test_train_eval_predict(trained, capsys):
    ckpt = trained / "train" / "model_final.pth"
    assert ckpt.is_file()
    capsys.readouterr()
    assert main(["eval", "--weights", str(ckpt), "--output", str(trained / "eval")]) == 0
    out = capsys.readouterr().out
    assert "segm: AP" in out and "per class AP: circle" in out
    assert (trained / "eval" / "coco_bbox_results.json").is_file()
    images = trained / "shapes" / "val"
    assert main(["predict", str(images), "--weights", str(ckpt), "--output", str(trained / "pred"),
                 "--score-thresh", "0"]) == 0
    pngs = sorted((trained / "pred").glob("*.png"))
    assert len(pngs) == 4 and Image.open(pngs[0]).size == (96, 96)
    results = json.loads((trained / "pred" / "predictions.json").read_text())
    assert results and {"file_name", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    # a glob works too
    assert main(["predict", str(images / "00000*.png"), "--weights", str(ckpt), "--output", str(trained / "p2")]) == 0


@pytest.mark.numerics
def test_predictor_accepts_every_image_kind(trained):
    pred = Predictor(trained / "train" / "model_final.pth", "cpu", ["model.roi_heads.score_thresh=0.0"])
    path = trained / "shapes" / "val" / "000000.png"
    pil = Image.open(path)
    arr = np.array(pil)
    outs = [pred(path), pred(pil), pred(arr), pred(torch.from_numpy(arr).permute(2, 0, 1)),
            pred(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)]
    for o in outs[1:]:
        torch.testing.assert_close(o["boxes"], outs[0]["boxes"], atol=1e-3, rtol=1e-4)
    assert outs[0]["class_names"] and set(outs[0]["class_names"]) <= {"circle", "rectangle", "triangle", "star"}
    with pytest.raises(ValueError, match="must be \\(H, W, 3\\)"):
        pred(np.zeros((4, 4, 7), dtype=np.uint8))


def test_config_errors_name_the_key(tmp_path, capsys):
    assert main(["train", "--set", "solver.max_itr=3", "--set", f"train.output_dir={tmp_path}"]) == 1
    assert "unknown config key 'solver.max_itr' (did you mean 'solver.max_iter'?)" in capsys.readouterr().err
    assert main(["train", "--config", "no_such_preset"]) == 1
    assert "unknown config 'no_such_preset'" in capsys.readouterr().err
    assert main(["train", "--set", "data.train_json=/nonexistent.json", "--set", f"train.output_dir={tmp_path}"]) == 1
    assert "annotation file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such file"):
        main(["predict", str(tmp_path / "none*.png"), "--weights", "x.pth"])


CONVERT = """
from torchvision.models.detection import maskrcnn_resnet50_fpn
torch.manual_seed(0)
torch.save(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), inputs["path"])
"""


@pytest.mark.reference
def test_convert_torchvision_checkpoint(reference, tmp_path):
    src = tmp_path / "tv.pth"
    reference(CONVERT, {"path": str(src)})
    dst = tmp_path / "ours.pth"
    assert main(["convert", str(src), str(dst)]) == 0
    pred = Predictor(dst, "cpu")
    assert pred.class_map.name(1) == "person" and pred.class_map.name(12) == "N/A" and pred.class_map.num_classes == 90
    out = pred(torch.rand(3, 64, 80))
    assert set(out) >= {"boxes", "masks", "category_ids", "class_names"}


def test_cascade_preset_trains_evaluates_and_predicts_through_the_cli(tmp_path):
    sets = _sets(tiny_train_overrides(tmp_path, ["solver.max_iter=2"]))
    assert main(["train", "--config", "shapes_cascade_R_18_FPN", "--no-progress", *sets]) == 0
    ckpt = tmp_path / "train" / "model_final.pth"
    assert main(["eval", "--weights", str(ckpt), "--output", str(tmp_path / "eval")]) == 0
    assert main(["predict", str(tmp_path / "shapes" / "val"), "--weights", str(ckpt), "--output",
                 str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred").glob("*.png"))) == 4
    assert "loss_cls_stage2" in (tmp_path / "train" / "metrics.jsonl").read_text()


def test_keypoint_preset_trains_evaluates_and_predicts_through_the_cli(tmp_path, capsys):
    sets = _sets(tiny_train_overrides(tmp_path, ["solver.max_iter=2", "model.keypoint_head.conv_dims=[32, 32]"]))
    assert main(["train", "--config", "shapes_keypoint_R_18_FPN", "--no-progress", *sets]) == 0
    ckpt = tmp_path / "train" / "model_final.pth"
    assert main(["eval", "--weights", str(ckpt), "--output", str(tmp_path / "eval")]) == 0
    assert "keypoints: AP" in capsys.readouterr().out  # OKS AP reported
    assert main(["predict", str(tmp_path / "shapes" / "val"), "--weights", str(ckpt), "--output",
                 str(tmp_path / "pred"), "--score-thresh", "0"]) == 0
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert results and all(len(r["keypoints"]) == 15 for r in results)
    assert "loss_keypoint" in (tmp_path / "train" / "metrics.jsonl").read_text()


def test_detectron2_pkl_predicts_and_converts_through_the_cli(tmp_path):
    fixtures = Path(__file__).parent / "fixtures" / "detectron2"
    spec = json.loads((fixtures / "mask_rcnn_R_50_FPN.json").read_text())
    sets = _sets(spec["overrides"])
    pkl = str(fixtures / "mask_rcnn_R_50_FPN.pkl")
    assert main(["predict", str(fixtures / "image.png"), "--weights", pkl, "--config", spec["preset"], *sets,
                 "--output", str(tmp_path / "pred"), "--score-thresh", "0"]) == 0
    assert (tmp_path / "pred" / "image.png").is_file()
    assert len(json.loads((tmp_path / "pred" / "predictions.json").read_text())) > 10
    assert main(["convert", pkl, str(tmp_path / "ours.pth"), "--config", spec["preset"], *sets]) == 0
    pred = Predictor(tmp_path / "ours.pth", "cpu")
    assert pred.class_map.num_classes == 5 and pred.cfg.model.input.channel_order == "BGR"
