"""The command line: help texts, train -> eval -> predict on tiny data, config errors, convert."""

import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.engine.predictor import Predictor
from tiny import set_args, tiny_train_overrides


@pytest.mark.parametrize("command,expected", [
    ([], ["train", "eval", "predict", "demo", "convert", "serve", "ablate"]),
    (["serve"], ["--weights", "--max-batch", "--max-upload-mb", "--timeout", "0.0.0.0"]),
    (["ablate"], ["--budget", "--seeds", "--arch", "roi_pooling", "alternating"]),
    (["train"], ["--config", "--set", "--resume", "torchrun"]),
    (["eval"], ["--weights", "--dataset", "12-number"]),
    (["predict"], ["--weights", "--score-thresh", "glob", "video", "--max-frames"]),
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
    assert main(["train", "--no-progress", *set_args(tiny_train_overrides(out, ["solver.max_iter=2"]))]) == 0
    return out


def test_train_eval_predict(trained, capsys):
    ckpt = trained / "train" / "model_final.pth"
    assert ckpt.is_file()
    capsys.readouterr()
    assert main(["eval", "--weights", str(ckpt), "--output", str(trained / "eval"), "--analyze"]) == 0
    out = capsys.readouterr().out
    assert "segm: AP" in out and "per class AP: circle" in out
    assert (trained / "eval" / "coco_bbox_results.json").is_file()
    # --analyze: the tables printed, CSVs and charts written for boxes and masks
    assert "bbox errors (AP50" in out and "segm errors (AP50" in out and "missed" in out
    analysis = trained / "eval" / "analysis"
    for kind in ("bbox", "segm"):
        for name in (f"confusion_{kind}.png", f"pr_{kind}.png", f"errors_{kind}.png"):
            assert Image.open(analysis / name).size[0] > 300
        rows = list(csv.reader((analysis / f"confusion_{kind}.csv").open()))
        # every object of the validation set is in its true class's row: matched, confused or missed
        gt = json.loads((trained / "shapes" / "annotations" / "instances_val.json").read_text())
        per_class = {c["name"]: sum(a["category_id"] == c["id"] and not a.get("iscrowd") for a in gt["annotations"])
                     for c in gt["categories"]}
        assert {r[0]: sum(map(int, r[1:])) for r in rows[1:-1]} == per_class
    images = trained / "shapes" / "val"
    assert main(["predict", str(images), "--weights", str(ckpt), "--output", str(trained / "pred"),
                 "--score-thresh", "0"]) == 0
    pngs = sorted((trained / "pred").glob("*.png"))
    assert len(pngs) == 4 and Image.open(pngs[0]).size == (96, 96)
    results = json.loads((trained / "pred" / "predictions.json").read_text())
    assert results and {"file_name", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    # a glob works too
    assert main(["predict", str(images / "00000*.png"), "--weights", str(ckpt), "--output", str(trained / "p2")]) == 0



def test_predict_on_folders_batches_keeps_order_and_names_apart(trained, tmp_path, capsys):
    ckpt = trained / "train" / "model_final.pth"
    val = sorted((trained / "shapes" / "val").glob("*.png"))
    for folder, flip in (("a", False), ("b", True)):  # the same file names in two folders, other pixels
        (tmp_path / folder).mkdir()
        for path in val:
            image = Image.open(path)
            (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image).save(tmp_path / folder / path.name)
    runs = {}
    for batch in (1, 3):
        out = tmp_path / f"out{batch}"
        capsys.readouterr()
        assert main(["predict", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", str(ckpt), "--output", str(out),
                     "--score-thresh", "0", "--batch-size", str(batch)]) == 0
        text = capsys.readouterr().out
        assert f"{2 * len(val)} images in" in text and "images/s" in text
        names = sorted(p.name for p in out.glob("*.png"))
        assert names == sorted(f"{f}_{p.name}" for f in "ab" for p in val)  # none overwritten
        runs[batch] = json.loads((out / "predictions.json").read_text())
    one, three = runs[1], runs[3]
    files = [str(tmp_path / f / p.name) for f in "ab" for p in val]
    ids = [r["image_id"] for r in one]
    assert ids == sorted(ids) and {r["file_name"] for r in one} <= set(files)  # in input order
    for r in one:
        assert r["file_name"] == files[r["image_id"] - 1]
    # all images are 96x96, so a batch pads nothing and gives each image's own results
    assert [(r["image_id"], r["category_id"]) for r in three] == [(r["image_id"], r["category_id"]) for r in one]
    for a, b in zip(one, three):
        assert abs(a["score"] - b["score"]) <= 1e-4 and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) <= 1e-3
    with pytest.raises(SystemExit) as e:
        main(["predict", str(tmp_path / "a"), "--weights", str(ckpt), "--batch-size", "0"])
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_fast_mode_runs_the_checkpoint_in_bf16_through_eval_and_predict(trained, capsys, monkeypatch):
    import maskrcnn.structures.precision as precision

    ckpt = trained / "train" / "model_final.pth"
    # a CPU without bf16 units would emulate bf16 (hundreds of times slower): fast mode stays float32, and says so
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    with pytest.warns(UserWarning, match=r"fast mode: this CPU has no bf16 instructions .*stay float32"):
        assert Predictor(ckpt, "cpu", fast=True).model.precision == "float32"
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)  # eval and predict below run bf16 on any CPU
    assert Predictor(ckpt, "cpu", fast=True).model.precision == "bf16"
    assert Predictor(ckpt, "cpu").model.precision == "float32"
    capsys.readouterr()
    assert main(["eval", "--weights", str(ckpt), "--output", str(trained / "eval_fast"), "--fast"]) == 0
    assert "segm: AP" in capsys.readouterr().out
    images = trained / "shapes" / "val"
    assert main(["predict", str(images), "--weights", str(ckpt), "--output", str(trained / "pred_fast"),
                 "--score-thresh", "0", "--fast"]) == 0
    fast = json.loads((trained / "pred_fast" / "predictions.json").read_text())
    assert fast and {"file_name", "category_id", "bbox", "score", "segmentation"} <= set(fast[0])
    onnx = trained / "model.onnx"
    onnx.write_bytes(b"")  # refused before it is read
    with pytest.raises(ValueError, match="fast mode runs a checkpoint in bf16; .*exported float32 graph"):
        Predictor(onnx, "cpu", fast=True)


def test_a_read_only_array_is_predicted_without_a_warning(trained):
    pred = Predictor(trained / "train" / "model_final.pth", "cpu")
    array = np.asarray(Image.open(trained / "shapes" / "val" / "000000.png"))  # a read-only view of the image
    assert not array.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pred(array)
    torch.testing.assert_close(out["boxes"], pred(np.array(array))["boxes"])

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
    assert main(["predict", str(tmp_path / "none*.png"), "--weights", "x.pth"]) == 1
    assert "maskrcnn predict: error: no such file, folder or pattern" in capsys.readouterr().err


def _fail_in_train(monkeypatch, error: BaseException) -> None:
    import maskrcnn.engine.trainer as trainer

    def train(cfg, **kwargs):
        raise error

    monkeypatch.setattr(trainer, "train", train)


def test_help_lists_the_exit_codes_and_debug(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("1 an error in the inputs", "2 a wrong command line", "3 an internal error", "130 interrupted",
                  "--debug", "MASKRCNN_DEBUG=1"):
        assert words in text


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["train", "--set", "solver.base_lr=-1", "--output", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "maskrcnn train: error: config key 'solver.base_lr' must be greater than 0.0, got -1.0\n"
    from maskrcnn.config import ConfigError

    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):  # before or after the command
        with pytest.raises(ConfigError, match="solver.base_lr"):
            main(debug_argv)
    monkeypatch.setenv("MASKRCNN_DEBUG", "1")
    with pytest.raises(ConfigError, match="solver.base_lr"):
        main(argv)


def test_multi_line_messages_become_one_line(tmp_path, capsys, monkeypatch):
    from maskrcnn.data.coco import DatasetError

    _fail_in_train(monkeypatch, DatasetError("x.json: classes differ:\n  ours: a, b\n  theirs: c\nfix it"))
    assert main(["train", "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "maskrcnn train: error: x.json: classes differ: ours: a, b; theirs: c; fix it\n"


@pytest.mark.parametrize("error", [IndexError("index 7 is out of bounds"), KeyError("boxes"),
                                   AssertionError("shapes differ")])
def test_internal_errors_show_their_traceback(tmp_path, capsys, monkeypatch, error):
    _fail_in_train(monkeypatch, error)
    assert main(["train", "--output", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{type(error).__name__}" in err
    assert err.strip().splitlines()[-1].startswith(f"maskrcnn train: internal error ({type(error).__name__})")


def test_a_value_error_from_inside_torch_is_a_bug_not_a_user_error(tmp_path, capsys, monkeypatch):
    import maskrcnn.engine.trainer as trainer

    def train(cfg, **kwargs):  # a call of ours that passes torch something wrong
        torch.nn.functional.interpolate(torch.zeros(1, 1, 4, 4), size=(2, 2), mode="no-such-mode")

    monkeypatch.setattr(trainer, "train", train)
    assert main(["train", "--output", str(tmp_path)]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_an_os_error_is_the_users(tmp_path, capsys, monkeypatch):
    _fail_in_train(monkeypatch, PermissionError(13, "Permission denied", str(tmp_path / "metrics.jsonl")))
    assert main(["train", "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"maskrcnn train: error: {tmp_path / 'metrics.jsonl'}: Permission denied\n"


def test_interrupt_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    _fail_in_train(monkeypatch, KeyboardInterrupt())
    assert main(["train", "--output", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "maskrcnn train: interrupted\n"


def test_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    import warnings

    import maskrcnn.engine.trainer as trainer

    def train(cfg, **kwargs):
        warnings.warn("skipped 2 bad annotations:\n  annotation 4: no area", stacklevel=2)
        return {}

    monkeypatch.setattr(trainer, "train", train)
    assert main(["train", "--output", str(tmp_path)]) == 0
    assert capsys.readouterr().err == "maskrcnn train: warning: skipped 2 bad annotations: annotation 4: no area\n"


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
    sets = set_args(tiny_train_overrides(tmp_path, ["solver.max_iter=2"]))
    assert main(["train", "--config", "shapes_cascade_R_18_FPN", "--no-progress", *sets]) == 0
    ckpt = tmp_path / "train" / "model_final.pth"
    assert main(["eval", "--weights", str(ckpt), "--output", str(tmp_path / "eval")]) == 0
    assert main(["predict", str(tmp_path / "shapes" / "val"), "--weights", str(ckpt), "--output",
                 str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred").glob("*.png"))) == 4
    assert "loss_cls_stage2" in (tmp_path / "train" / "metrics.jsonl").read_text()


def test_keypoint_preset_trains_evaluates_and_predicts_through_the_cli(tmp_path, capsys):
    sets = set_args(tiny_train_overrides(tmp_path, ["solver.max_iter=2", "model.keypoint_head.conv_dims=[32, 32]"]))
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
    sets = set_args(spec["overrides"])
    pkl = str(fixtures / "mask_rcnn_R_50_FPN.pkl")
    assert main(["predict", str(fixtures / "image.png"), "--weights", pkl, "--config", spec["preset"], *sets,
                 "--output", str(tmp_path / "pred"), "--score-thresh", "0"]) == 0
    assert (tmp_path / "pred" / "image.png").is_file()
    assert len(json.loads((tmp_path / "pred" / "predictions.json").read_text())) > 10
    assert main(["convert", pkl, str(tmp_path / "ours.pth"), "--config", spec["preset"], *sets]) == 0
    pred = Predictor(tmp_path / "ours.pth", "cpu")
    assert pred.class_map.num_classes == 5 and pred.cfg.model.input.channel_order == "BGR"


@pytest.mark.parametrize("command", ["eval", "predict", "convert"])
def test_classes_option_is_documented(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--classes FILE" in text and "COCO JSON" in text and "one name per line" in text
    assert ("--allow-class-mismatch" in text) == (command == "eval")


def test_openmp_spin_waiting_is_limited_before_torch_starts(monkeypatch):
    """benchmarks/cpu_load.py: the CLI's default keeps demo training within ~2x beside a busy process."""
    import os
    import subprocess

    from maskrcnn._openmp import SPINCOUNT, limit_spin_waiting

    # the command line can only set the OpenMP environment if importing it does not start torch
    probe = "import sys, maskrcnn.cli; assert 'torch' not in sys.modules, 'maskrcnn.cli imports torch'"
    subprocess.run([sys.executable, "-c", probe], check=True)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delitem(sys.modules, "torch")
    limit_spin_waiting()
    assert os.environ["GOMP_SPINCOUNT"] == SPINCOUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")  # the user's own setting wins
    limit_spin_waiting()
    assert os.environ["GOMP_SPINCOUNT"] == "5"


def test_errors_raised_in_data_loader_workers_are_one_line():
    from maskrcnn.cli import one_line

    # how torch re-raises an exception from a DataLoader worker: its message carries the worker's traceback
    wrapped = ValueError("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"worker.py\", line 374, in _worker_loop\n    data = fetcher.fetch(index)\n"
                         "maskrcnn.data.transforms.BadImageError: cannot decode image a.png: OSError: truncated\n")
    assert one_line(wrapped) == "cannot decode image a.png: OSError: truncated"


def test_inspect_a_checkpoint_on_an_image_and_a_training_sample(trained, capsys):
    import re

    from maskrcnn.data.transforms import load_image
    from maskrcnn.engine.predictor import Predictor
    from maskrcnn.inspection.model import model_stages

    ckpt = trained / "train" / "model_final.pth"
    image = trained / "shapes" / "val" / "000000.png"
    out = trained / "inspect_model"
    capsys.readouterr()
    assert main(["inspect", "--weights", str(ckpt), "--image", str(image), "--output", str(out),
                 "--set", "model.roi_heads.score_thresh=0.0"]) == 0
    report = capsys.readouterr().out
    before, after = map(int, re.search(r"(\d+) detections above the score threshold before NMS .*, (\d+) after",
                                       report).groups())
    assert before >= after > 0
    assert {"proposals.png", "detections_before_nms.png", "detections.png", "masks_28x28.png"} <= \
        {p.name for p in out.iterdir()}
    assert main(["inspect", "--weights", str(ckpt), "--sample", "1", "--output", str(trained / "inspect_sample")]) == 0
    assert (trained / "inspect_sample" / "mask_targets.png").is_file()
    # inspecting changes nothing: the model predicts as before, and NMS is on again
    pred = Predictor(ckpt, "cpu", ["model.roi_heads.score_thresh=0.0"])
    first = pred(image)
    stages = model_stages(pred.model, load_image(image))
    again = pred(image)
    assert torch.equal(first["boxes"], again["boxes"]) and len(stages["before_nms"]["boxes"]) >= len(again["boxes"])
    assert main(["inspect", "--weights", str(ckpt), "--output", str(out)]) == 1  # neither --image nor --sample


def test_predict_sliced_writes_whole_image_rles_and_overlays(trained, capsys):
    from pycocotools import mask as mask_utils

    ckpt = trained / "train" / "model_final.pth"
    image = trained / "shapes" / "val" / "000000.png"
    out = trained / "pred_sliced"
    assert main(["predict", str(image), "--weights", str(ckpt), "--output", str(out), "--slice", "64",
                 "--overlap", "0.25", "--score-thresh", "0", "--set", "model.roi_heads.score_thresh=0.0"]) == 0
    results = json.loads((out / "predictions.json").read_text())
    assert results and all(r["file_name"] == str(image) for r in results)
    for r in results:  # masks of the whole 96x96 image, inside their boxes
        m = mask_utils.decode(r["segmentation"])
        assert m.shape == (96, 96)
        if m.any():
            ys, xs = np.nonzero(m)
            x, y, w, h = r["bbox"]
            assert xs.min() >= int(x) - 1 and xs.max() <= x + w + 1 and ys.min() >= int(y) - 1 and ys.max() <= y + h + 1
    assert Image.open(out / "000000.png").size == (96, 96)
    assert main(["predict", str(image), "--weights", str(ckpt), "--output", str(out), "--slice", "64",
                 "--overlap", "1.5"]) == 1
    assert "--overlap in [0, 1)" in capsys.readouterr().err
