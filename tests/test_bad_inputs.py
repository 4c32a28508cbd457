"""The bad-input corpus, run through the command line in-process.

Every user error must end as one line on stderr (``maskrcnn <cmd>: error: ...``) naming what is
wrong (the file, the key, the value, the image or annotation), a non-zero exit and no traceback;
an input that is odd but usable (16-bit, grayscale, CMYK images) must just work; a bad image among
good ones is skipped with one line saying which. Nothing here trains: every error happens before.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.engine.checkpoint import load_checkpoint, save_checkpoint
from maskrcnn.interop.checkpoint import CheckpointError
from maskrcnn.modeling.build import build_model
from tiny import set_args, tiny_train_config, tiny_train_overrides

D2_PKL = Path(__file__).parent / "fixtures" / "detectron2" / "mask_rcnn_R_50_FPN.pkl"
W, H = 64, 48


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``maskrcnn argv`` (argparse's usage errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def stderr_lines(err: str) -> list[str]:
    """The lines of stderr as a terminal leaves them (a progress bar redraws itself after a carriage return)."""
    return [line.rsplit("\r", 1)[-1].strip() for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def assert_one_line_error(code: int, err: str, *phrases: str) -> None:
    assert code not in (0, None), err
    assert "Traceback" not in err and "weights_only" not in err, err
    lines = stderr_lines(err)
    assert len(lines) == 1 and " error: " in lines[0], err
    for phrase in phrases:
        assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"


def _image(path: Path, seed: int = 0, size: tuple[int, int] = (W, H)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _coco() -> dict:
    """Two 64x48 images, classes a and b, a polygon, an RLE-free box each: everything valid."""
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    return {
        "images": [{"id": 1, "file_name": "1.png", "width": W, "height": H},
                   {"id": 2, "file_name": "2.png", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": square,
             "area": 400, "iscrowd": 0},
            {"id": 11, "image_id": 2, "category_id": 2, "bbox": [10, 10, 20, 20], "segmentation": square,
             "area": 400, "iscrowd": 0},
        ],
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder with the two images of :func:`_coco`, its JSON (``good.json``) and a tiny checkpoint
    (``tiny.pth``, classes a and b, never trained: no test here looks at what it predicts)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    _image(root / "1.png", 1)
    _image(root / "2.png", 2)
    (root / "good.json").write_text(json.dumps(_coco()))
    cfg = tiny_train_config(root / "run", ["model.roi_heads.num_classes=2"])
    torch.manual_seed(0)
    save_checkpoint(root / "tiny.pth", build_model(cfg).state_dict(), cfg.to_dict(),
                    {"ids": [1, 2], "names": ["a", "b"]}, 0)
    return root


def _train_argv(out: Path, extra: list[str], config: str = "shapes_R_18_FPN") -> list[str]:
    return ["train", "--config", config, "--no-progress", *set_args(tiny_train_overrides(out, extra))]


# -- annotation files: each an error before training (data.on_bad_sample=error, or a file-level problem) --
def _edit(fn):
    def make(root: Path) -> Path:
        data = _coco()
        fn(data)
        path = root / "bad.json"
        path.write_text(json.dumps(data))
        return path
    return make


def _text(text: str):
    def make(root: Path) -> Path:
        (root / "bad.json").write_text(text)
        return root / "bad.json"
    return make


def _ann(**fields):
    return _edit(lambda d: d["annotations"][0].update(fields))


def _keypoint_coco(d):
    d["categories"] = [{"id": 1, "name": "a", "keypoints": ["p", "q"], "skeleton": []}]
    d["annotations"] = [d["annotations"][0]]


JSON_CASES = {
    "missing file": (lambda root: root / "nothing.json", "annotation file not found"),
    "empty file": (_text(""), "not valid JSON"),
    "not JSON": (_text("images: [1, 2"), "not valid JSON"),
    "top level list": (_text("[1, 2, 3]"), "expected a JSON object"),
    "no images": (_edit(lambda d: d.pop("images")), "'images'"),
    "images not a list": (_edit(lambda d: d.update(images={"1": "1.png"})), "'images'"),
    "no categories": (_edit(lambda d: d.pop("categories")), "'categories'"),
    "empty categories": (_edit(lambda d: d.update(categories=[])), "no categories"),
    "category id not int": (_edit(lambda d: d["categories"][0].update(id="one")), "integer 'id'"),
    "duplicate category ids": (_edit(lambda d: d["categories"][1].update(id=1)), "bad categories"),
    "annotations not a list": (_edit(lambda d: d.update(annotations={"10": {}})), "'annotations' must be a list"),
    "annotation not an object": (_edit(lambda d: d["annotations"].append(7)), "annotation 7 is not an object"),
    "image entry without file_name": (_edit(lambda d: d["images"][0].pop("file_name")), "needs id, file_name"),
    "negative image size": (_edit(lambda d: d["images"][0].update(height=-48)), "image 1 has size 64x-48"),
    "bbox of 3 numbers": (_ann(bbox=[1, 2, 3]), "annotation 10: 'bbox' must be [x, y, width, height]"),
    "bbox with NaN": (_ann(bbox=[1, 2, float("nan"), 4]), "annotation 10: box"),
    "bbox negative width": (_ann(bbox=[30, 10, -20, 20]), "annotation 10: box [30.0, 10.0, -20.0, 20.0] has no area"),
    "bbox outside the image": (_ann(bbox=[100, 100, 5, 5]), "annotation 10: box [100.0, 100.0, 5.0, 5.0] lies outside"),
    "unknown category id": (_ann(category_id=99), "annotation 10: unknown category_id 99"),
    "unknown image id": (_ann(image_id=77), "annotation 10: unknown image_id 77"),
    "polygon of two points": (_ann(segmentation=[[1, 1, 5, 5]]), "annotation 10: no polygon with 3 or more points"),
    "segmentation missing": (_ann(segmentation=None), "annotation 10: missing segmentation"),
    "segmentation a string": (_ann(segmentation="square"), "annotation 10: missing segmentation"),
    "RLE of another size": (_ann(segmentation={"size": [10, 10], "counts": "abc"}), "annotation 10: RLE size [10, 10]"),
    "duplicate image ids": (_edit(lambda d: d["images"][1].update(id=1)), "image id 1 is used by 2 images"),
    "image file missing": (_edit(lambda d: d["images"][0].update(file_name="gone.png")), "image 1: file not found"),
    "empty annotations for training": (_edit(lambda d: d.update(annotations=[])), "no annotations"),
    "only crowd annotations": (_edit(lambda d: [a.update(iscrowd=1) for a in d["annotations"]]), "can be trained on"),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_bad_annotation_files(data, tmp_path, capsys, case):
    make, phrase = JSON_CASES[case]
    root = tmp_path / "d"
    root.mkdir()
    for name in ("1.png", "2.png"):
        (root / name).symlink_to(data / name)
    json_path = make(root)
    code, err = run(_train_argv(tmp_path, [f"data.train_json={json_path}", f"data.train_images={root}",
                                           "data.on_bad_sample=error"]), capsys)
    assert_one_line_error(code, err, phrase)
    assert not (tmp_path / "train" / "model_final.pth").exists()


def test_keypoints_of_the_wrong_length(data, tmp_path, capsys):
    d = _coco()
    _keypoint_coco(d)
    d["annotations"][0]["keypoints"] = [15, 15, 2, 20]  # 2 keypoints need 6 numbers
    (tmp_path / "kp.json").write_text(json.dumps(d))
    code, err = run(_train_argv(tmp_path, [f"data.train_json={tmp_path / 'kp.json'}", f"data.train_images={data}",
                                           "data.on_bad_sample=error"], "shapes_keypoint_R_18_FPN"), capsys)
    assert_one_line_error(code, err, "kp.json: annotation 10: 'keypoints' must be 2 finite (x, y, v) triples")


@pytest.mark.parametrize("fields,reported", [
    ({"category_id": 99}, "annotation 10: unknown category_id 99"),
    ({"bbox": [30, 10, -20, 20]}, "annotation 10: box"),
    ({"segmentation": {"size": [10, 10], "counts": "abc"}}, "annotation 10: RLE size"),
])
def test_bad_annotations_are_skipped_and_reported_by_default(data, fields, reported):
    from maskrcnn.data.coco import CocoDataset

    d = _coco()
    d["annotations"][0].update(fields)
    (data / "skip.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        dataset = CocoDataset(data / "skip.json", data, train=True)
    assert [r for r in dataset.report if reported in r] and len(dataset) == 2


def test_eval_writes_the_skipped_samples_to_its_output_folder(data, tmp_path, capsys):
    d = _coco()
    d["annotations"][0].update({"category_id": 99})
    (data / "skip_eval.json").write_text(json.dumps(d))
    code, err = run(["eval", "-w", str(data / "tiny.pth"), "--dataset", str(data / "skip_eval.json"), "--output",
                     str(tmp_path / "eval"), "--allow-class-mismatch"], capsys)
    assert code == 0 and "skipped_samples.txt" in err
    listed = (tmp_path / "eval" / "skipped_samples.txt").read_text().splitlines()
    assert listed == [f"{data / 'skip_eval.json'}: annotation 10: unknown category_id 99"]


# -- configs: all fail in `get_config`, before anything is read or written ---------------------------------
CONFIG_CASES = [
    ("solver.max_itr=3", "unknown config key 'solver.max_itr' (did you mean 'solver.max_iter'?)"),
    ("modle.mask_on=true", "unknown config key 'modle' (did you mean 'model'?)"),
    ("model.roi_heads.num_classes=abc", "'model.roi_heads.num_classes' must be an integer, got 'abc'"),
    ("model.mask_on=maybe", "'model.mask_on' must be true or false"),
    ("solver.base_lr", "must look like dotted.key=value"),
    ("solver.base_lr=0", "'solver.base_lr' must be greater than 0"),
    ("solver.base_lr=-0.01", "'solver.base_lr' must be greater than 0.0, got -0.01"),
    ("solver.base_lr=.nan", "'solver.base_lr' must be greater than 0.0, got nan"),
    ("solver.ims_per_batch=0", "'solver.ims_per_batch' must be at least 1, got 0"),
    ("solver.max_iter=0", "'solver.max_iter' must be at least 1, got 0"),
    ("solver.weight_decay=-0.0001", "'solver.weight_decay' must be at least 0.0, got -0.0001"),
    ("solver.momentum=1.0", "'solver.momentum' must be at least 0.0 and below 1.0, got 1.0"),
    ("solver.momentum=-0.5", "'solver.momentum' must be at least 0.0 and below 1.0, got -0.5"),
    ("solver.warmup_iters=-1", "'solver.warmup_iters' must be at least 0, got -1"),
    ("solver.gamma=0", "'solver.gamma' must be greater than 0, got 0.0"),
    ("solver.steps=[-5]", "'solver.steps' values must be at least 1, got -5"),
    ("train.checkpoint_period=-1", "'train.checkpoint_period' must be at least 0, got -1"),
    ("train.eval_period=-10", "'train.eval_period' must be at least 0, got -10"),
    ("train.log_period=0", "'train.log_period' must be at least 1, got 0"),
    ("model.roi_heads.score_thresh=1.5",
     "'model.roi_heads.score_thresh' must be at least 0.0 and at most 1.0, got 1.5"),
    ("model.rpn.nms_thresh=-0.1", "'model.rpn.nms_thresh' must be at least 0.0 and at most 1.0, got -0.1"),
    ("model.roi_heads.nms_thresh=2", "'model.roi_heads.nms_thresh' must be at least 0.0 and at most 1.0, got 2.0"),
    ("model.roi_heads.detections_per_image=0", "'model.roi_heads.detections_per_image' must be at least 1, got 0"),
    ("model.input.min_size_test=0", "'model.input.min_size_test' must be greater than 0, got 0"),
    ("model.input.min_size_train=[96, -1]", "'model.input.min_size_train' values must be greater than 0, got -1"),
    ("model.rpn.batch_size_per_image=0", "'model.rpn.batch_size_per_image' must be at least 1, got 0"),
    ("model.roi_heads.positive_fraction=1.5",
     "'model.roi_heads.positive_fraction' must be at least 0.0 and at most 1.0"),
    ("data.num_workers=-1", "'data.num_workers' must be at least 0, got -1"),
    ("data.flip_prob=2", "'data.flip_prob' must be at least 0.0 and at most 1.0, got 2.0"),
    ("model.anchors.sizes=[[16], [-32]]", "'model.anchors.sizes' values must be greater than 0, got -32"),
    ("model.anchors.aspect_ratios=[[0.0, 1.0]]",
     "'model.anchors.aspect_ratios' values must be greater than 0, got 0.0"),
    ("model.cascade.ious=[0.5, 1.5]", "'model.cascade.ious' values must be at least 0.0 and at most 1.0, got 1.5"),
    # YAML turns on/off into booleans: the message says why a word became True
    ("train.tensorboard=on", "'train.tensorboard' must be a string, got True (YAML reads on/off/yes/no as true/false)"),
    ("train.best_metric=foo", "'train.best_metric' must be one of"),
]


@pytest.mark.parametrize("override,phrase", CONFIG_CASES)
def test_bad_config_values(tmp_path, capsys, override, phrase):
    code, err = run(_train_argv(tmp_path, [override]), capsys)
    assert_one_line_error(code, err, phrase)
    assert not (tmp_path / "train").exists()  # refused before any folder was made


@pytest.mark.parametrize("overrides,phrase", [
    (["solver.schedule=step", "solver.steps=[4, 2]"], "'solver.steps' must be increasing, got [4, 2]"),
    (["model.input.max_size_train=64"],
     "'model.input.max_size_train' (64) must be at least model.input.min_size_train (96)"),
    (["model.rpn.bg_iou_thresh=0.8"], "'model.rpn.bg_iou_thresh' (0.8) must not exceed model.rpn.fg_iou_thresh (0.7)"),
])
def test_inconsistent_config_values(tmp_path, capsys, overrides, phrase):
    code, err = run(_train_argv(tmp_path, overrides), capsys)
    assert_one_line_error(code, err, phrase)


@pytest.mark.parametrize("content,phrase", [
    (None, "config file not found"),
    ("model: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "must hold a mapping at the top level"),
    ("model:\n  backbone:\n    dept: 50\n",
     "unknown config key 'model.backbone.dept' (did you mean 'model.backbone.depth'?)"),
    ("_base_: shapes_R_18_FPN\nsolver:\n  base_lr: -1\n", "'solver.base_lr' must be greater than 0.0, got -1.0"),
])
def test_bad_config_files(tmp_path, capsys, content, phrase):
    path = tmp_path / "cfg.yaml"
    if content is not None:
        path.write_text(content)
    code, err = run(["train", "--config", str(path), "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, phrase)


def test_unknown_preset(capsys):
    code, err = run(["train", "--config", "shapes_R18_FPN"], capsys)
    assert_one_line_error(code, err, "unknown config 'shapes_R18_FPN'", "did you mean ['shapes_R_18_FPN'")


# -- checkpoints --------------------------------------------------------------------------------------------
class Pickled:  # any class: a checkpoint holding one would run code to unpickle it
    pass


def _cut(data: Path, path: Path) -> None:
    raw = (data / "tiny.pth").read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


CHECKPOINT_CASES = {
    "missing": (None, "checkpoint not found: {p}"),
    "a folder": (lambda data, p: p.mkdir(), "checkpoint {p} is a folder"),
    "empty": (lambda data, p: p.write_bytes(b""), "checkpoint {p} is empty"),
    "truncated": (_cut, "cannot read checkpoint {p}: truncated or corrupt"),
    "a text file": (lambda data, p: p.write_text("<html>404 not found</html>"),
                    "{p}: not a file written by torch.save"),
    "random bytes": (lambda data, p: p.write_bytes(bytes(range(7, 250))), "{p}: not a file written by torch.save"),
    "a pickled class": (lambda data, p: torch.save({"model": Pickled()}, p),
                        "{p}: refused: it holds the pickled Python object"),
    "a pickled whole model": (lambda data, p: torch.save(torch.nn.Linear(2, 2), p), "refused: it holds the pickled"),
    "a plain pickle": (lambda data, p: p.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}}, protocol=4)),
                       "{p}: a plain Python pickle, not a file written by torch.save"),
    "a bare state dict": (lambda data, p: torch.save(load_checkpoint(data / "tiny.pth")["model"], p),
                          "{p} is not a maskrcnn checkpoint: it holds a bare state dict of"),
    "a list": (lambda data, p: torch.save([torch.zeros(2)], p), "{p} is not a maskrcnn checkpoint: it holds a list"),
    "no config": (lambda data, p: torch.save({**load_checkpoint(data / "tiny.pth"), "config": None}, p),
                  "{p}: damaged maskrcnn checkpoint: 'config'"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoints(data, tmp_path, capsys, case):
    make, phrase = CHECKPOINT_CASES[case]
    path = tmp_path / "weights.pth"
    if make is not None:
        make(data, path)
    code, err = run(["predict", str(data / "1.png"), "--weights", str(path), "--output", str(tmp_path / "out")],
                    capsys)
    assert_one_line_error(code, err, phrase.format(p=path))
    code, err = run(["eval", "--weights", str(path), "--dataset", str(data / "good.json"), "--output",
                     str(tmp_path / "eval")], capsys)
    assert_one_line_error(code, err, phrase.format(p=path))


def test_a_refused_checkpoint_never_suggests_unpickling_it(tmp_path):
    torch.save({"model": Pickled()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "evil.pth")
    assert "Pickled" in str(e.value) and "weights_only" not in str(e.value) and "trust" not in str(e.value)


def _random_bytes(seed: int, n: int = 300) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_random_bytes_are_never_mistaken_for_a_checkpoint(tmp_path):
    # unpickling garbage fails with whatever exception its first bytes lead to (IndexError was seen in CI)
    for seed in range(300):
        path = tmp_path / f"{seed}.pth"
        path.write_bytes(_random_bytes(seed))
        with pytest.raises(CheckpointError, match="not a file written by torch.save"):
            load_checkpoint(path)


def _torchvision_named(data, path):
    torch.save({"backbone.body.layer1.0.conv1.weight": torch.zeros(1), "rpn.head.cls_logits.weight": torch.zeros(1)},
               path)


@pytest.mark.parametrize("make,args,phrase", [
    (lambda data, p: p.write_bytes(D2_PKL.read_bytes()), ["--from", "torchvision"],
     "a plain Python pickle, not a file written by torch.save (detectron2's"),
    (_torchvision_named, ["--from", "detectron2"], "not a detectron2 (Cascade/Keypoint) Mask R-CNN ResNet-FPN "
     "checkpoint: 2 unknown keys, e.g. ['backbone.body.layer1.0.conv1.weight'"),
    (_torchvision_named, ["--from", "detectron2"], "its keys are torchvision's: use --from torchvision"),
    (lambda data, p: p.write_bytes((data / "tiny.pth").read_bytes()), [],
     "its keys are this package's own: a maskrcnn checkpoint needs no conversion"),
    (lambda data, p: p.write_bytes((data / "tiny.pth").read_bytes()), ["--from", "detectron2"],
     "its keys are this package's own"),
    (lambda data, p: p.write_bytes(_random_bytes(0)), [], "not a file written by torch.save"),
    (lambda data, p: p.write_bytes(_random_bytes(1)), ["--from", "detectron2"], "not a file written by torch.save"),
    (_cut, ["--from", "detectron2"], "truncated or corrupt"),
])
def test_convert_says_what_it_expected_and_found(data, tmp_path, capsys, make, args, phrase):
    src = tmp_path / "source.pth"
    make(data, src)
    code, err = run(["convert", str(src), str(tmp_path / "out.pth"), "--config", "shapes_R_18_FPN", *args], capsys)
    assert_one_line_error(code, err, str(src), phrase)
    assert not (tmp_path / "out.pth").exists()


# -- the command line itself --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,phrase", [
    (["trian"], "invalid choice: 'trian'"),
    (["predict", "x.png"], "the following arguments are required: --weights"),
    (["convert", "only_source.pth"], "the following arguments are required: destination"),
    (["predict", "x.png", "-w", "w.pth", "--score-thresh", "2"],
     "--score-thresh: must be a number between 0 and 1, got '2'"),
    (["predict", "x.png", "-w", "w.pth", "--score-thresh", "-0.1"], "got '-0.1'"),
    (["predict", "x.png", "-w", "w.pth", "--score-thresh", "nan"], "got 'nan'"),
    (["predict", "x.png", "-w", "w.pth", "--score-thresh", "high"], "got 'high'"),
    (["convert", "a.pth", "b.pth", "--from", "caffe2"], "argument --from: invalid choice: 'caffe2'"),
    (["eval", "-w", "w.pth", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_arguments(capsys, argv, phrase):
    code, err = run(argv, capsys)
    assert code == 2
    assert_one_line_error(code, err, phrase)


def test_prediction_inputs_that_do_not_exist_or_hold_no_images(data, tmp_path, capsys):
    code, err = run(["predict", str(tmp_path / "nope*.jpg"), "-w", str(data / "tiny.pth")], capsys)
    assert_one_line_error(code, err, f"no such file, folder or pattern: {tmp_path / 'nope*.jpg'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code, err = run(["predict", str(tmp_path / "empty"), "-w", str(data / "tiny.pth")], capsys)
    assert_one_line_error(code, err, f"no images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp) or videos in the "
                                     f"folder {tmp_path / 'empty'}")


def test_eval_with_a_missing_dataset(data, tmp_path, capsys):
    code, err = run(["eval", "-w", str(data / "tiny.pth"), "--dataset", str(tmp_path / "val.json"),
                     "--output", str(tmp_path / "eval")], capsys)
    assert_one_line_error(code, err, str(tmp_path / "val.json"))



@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["eval", "predict", "train"])
def test_a_cuda_device_on_a_machine_without_cuda(data, tmp_path, capsys, command):
    argv = _output_argv(command, tmp_path / "out", data)
    argv += ["--set", "train.device=cuda"] if command == "train" else ["--device", "cuda"]
    code, err = run(argv, capsys)
    assert_one_line_error(code, err, "device 'cuda'", "torch.cuda.is_available() is False", "use cpu or auto")

# -- output folders that cannot be made: refused before any work --------------------------------------------
def _output_argv(command: str, out: Path, data: Path) -> list[str]:
    weights = str(data / "tiny.pth")
    return {
        "train": ["train", "--output", str(out)],
        "eval": ["eval", "-w", weights, "--dataset", str(data / "good.json"), "--output", str(out)],
        "predict": ["predict", str(data / "1.png"), "-w", weights, "--output", str(out)],
        "demo": ["demo", "--output", str(out)],
        "convert": ["convert", weights, str(out / "converted.pth")],
        "smoke": ["smoke", "--out", str(out)],
    }[command]


@pytest.mark.parametrize("command", ["train", "eval", "predict", "demo", "convert", "smoke"])
def test_output_folder_under_a_file(data, tmp_path, capsys, command):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "out"
    code, err = run(_output_argv(command, out, data), capsys)
    assert_one_line_error(code, err, str(out), f"{tmp_path / 'a_file'} is a file, not a folder")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["train", "predict"])
def test_output_folder_in_a_read_only_folder(data, tmp_path, capsys, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = run(_output_argv(command, locked / "out", data), capsys)
    finally:
        locked.chmod(0o700)
    assert_one_line_error(code, err, str(locked / "out"), "is not writable")


# -- images -------------------------------------------------------------------------------------------------
def _truncated_png(path: Path) -> None:
    _image(path, 5)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(_random_bytes(2, 200)), "cannot decode image"),
    (lambda p: p.write_text("not an image"), "cannot decode image"),
    (_truncated_png, "cannot decode image"),
    (lambda p: p.write_bytes(b""), "cannot decode image"),
])
def test_a_bad_image_among_good_ones_is_skipped_and_reported(data, tmp_path, capsys, make, reason):
    bad = tmp_path / "bad.png"
    make(bad)
    code, err = run(["predict", str(data / "1.png"), str(bad), "-w", str(data / "tiny.pth"), "--output",
                     str(tmp_path / "out"), "--score-thresh", "0"], capsys)
    assert code == 0 and "Traceback" not in err
    lines = stderr_lines(err)
    assert len(lines) == 1 and str(bad) in lines[0] and reason in lines[0], err
    assert (tmp_path / "out" / "1.png").is_file() and not (tmp_path / "out" / "bad.png").exists()
    # and when no image at all can be read, that is an error
    code, err = run(["predict", str(bad), "-w", str(data / "tiny.pth"), "--output", str(tmp_path / "out2")], capsys)
    assert code == 1 and "Traceback" not in err
    assert stderr_lines(err)[-1].startswith("maskrcnn predict: error: none of the 1 images could be read")


def _cmyk(path: Path) -> None:
    Image.fromarray(np.full((H, W, 3), 200, dtype=np.uint8)).convert("CMYK").save(path.with_suffix(".jpg"))


@pytest.mark.parametrize("name,make", [
    ("gray16.png", lambda p: Image.fromarray(np.full((H, W), 40000, dtype=np.uint16)).save(p)),
    ("gray.png", lambda p: Image.fromarray(np.full((H, W), 90, dtype=np.uint8)).save(p)),
    ("cmyk.jpg", _cmyk),
    ("rgba.png", lambda p: Image.fromarray(np.full((H, W, 4), 90, dtype=np.uint8)).save(p)),
    ("palette.png", lambda p: Image.fromarray(np.full((H, W, 3), 90, dtype=np.uint8)).convert("P").save(p)),
])
def test_odd_but_valid_images_are_used(data, tmp_path, capsys, name, make):
    path = tmp_path / name
    make(path)
    code, err = run(["predict", str(path), "-w", str(data / "tiny.pth"), "--output", str(tmp_path / "out")], capsys)
    assert code == 0 and err == ""
    assert Image.open(tmp_path / "out" / f"{path.stem}.png").size == (W, H)


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    from maskrcnn.engine.predictor import to_image_tensor

    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "a.png")
    assert to_image_tensor(tmp_path / "a.png").unique().tolist() == [128]  # round(32768 * 255 / 65535)
    # the same as an opened PIL image (PIL's own convert("RGB") would saturate it to white) and as an array
    with Image.open(tmp_path / "a.png") as img:
        assert to_image_tensor(img).unique().tolist() == [128]
    assert to_image_tensor(np.full((4, 4, 3), 32768, dtype=np.uint16)).unique().tolist() == [128]


def test_files_in_a_folder_that_are_not_images_are_counted(data, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _image(folder / "a.png")
    (folder / "b.heic").write_bytes(b"\0" * 64)  # a phone photo format PIL does not read
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden files are nobody's images: not counted
    code, err = run(["predict", str(folder), "-w", str(data / "tiny.pth"), "--output", str(tmp_path / "out")], capsys)
    assert code == 0
    lines = stderr_lines(err)
    assert len(lines) == 1 and lines[0].startswith("left out 2 files that are neither an image (.jpg/") and \
        lines[0].endswith("nor a video: b.heic, notes.txt"), err
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["a.png"]
    # a folder is read flat: its subfolders are named as not searched (their images were left out unsaid)
    (folder / "more").mkdir()
    _image(folder / "more" / "c.png")
    code, err = run(["predict", str(folder), "-w", str(data / "tiny.pth"), "--output", str(tmp_path / "out2")], capsys)
    assert code == 0 and f"{folder}: its subfolder more not searched" in err and "**" in err, err
    assert [p.name for p in (tmp_path / "out2").glob("*.png")] == ["a.png"]


@pytest.mark.parametrize("on_bad_sample", ["error", "skip"])
def test_an_image_of_another_size_than_its_json_says(data, tmp_path, capsys, on_bad_sample):
    d = copy.deepcopy(_coco())
    d["images"][1].update(width=40, height=30)
    d["annotations"][1].update(bbox=[5, 5, 10, 10], segmentation=[[5.0, 5.0, 15.0, 5.0, 15.0, 15.0]])
    (tmp_path / "sizes.json").write_text(json.dumps(d))
    code, err = run(["eval", "-w", str(data / "tiny.pth"), "--dataset", str(tmp_path / "sizes.json"), "--images",
                     str(data), "--output", str(tmp_path / "eval"), "--set", f"data.on_bad_sample={on_bad_sample}"],
                    capsys)
    phrase = f"image {data / '2.png'} is 64x48 (WxH) but the annotations say 40x30"
    if on_bad_sample == "error":
        assert_one_line_error(code, err, phrase)
    else:  # evaluated without it, and told so in one line
        assert code == 0 and "Traceback" not in err
        assert [line for line in stderr_lines(err) if phrase in line and line.startswith("maskrcnn eval: warning:")]



def test_a_second_run_in_the_folder_of_another_is_refused_or_replaced(tmp_path, capsys):
    overrides = set_args(tiny_train_overrides(tmp_path, ["solver.max_iter=1", "train.eval_period=0"]))
    assert main(["train", "--no-progress", *overrides]) == 0
    out = tmp_path / "train"
    (out / "model_best.pth").write_bytes(b"an older run's best model")
    code, err = run(["train", "--no-progress", *overrides], capsys)
    assert_one_line_error(code, err, f"{out} holds another run", "--resume to continue it, --overwrite to start over")
    assert main(["train", "--no-progress", "--overwrite", *overrides]) == 0
    # the old run's files are gone, not left beside the new run's (no evaluation period: no new model_best)
    assert (out / "model_best.pth").read_bytes() != b"an older run's best model"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_an_output_folder_where_writing_fails_even_for_root(data, tmp_path, capsys):
    code, err = run(["predict", str(data / "1.png"), "-w", str(data / "tiny.pth"), "--output", "/proc/out"], capsys)
    assert_one_line_error(code, err, "cannot create or write output folder /proc/out")
