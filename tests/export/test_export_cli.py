"""``maskrcnn export`` and ``maskrcnn predict --runtime`` on a trained checkpoint, the README's
torch-free ONNX snippet, and the errors a user can cause."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.engine.predictor import Predictor
from maskrcnn.export.runtime import ExportedModel
from tests.tiny import set_args, tiny_train_overrides

pytest.importorskip("onnxruntime")

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("export_cli")
    assert main(["train", "--no-progress", *set_args(tiny_train_overrides(out, ["solver.max_iter=2"]))]) == 0
    return out, out / "train" / "model_final.pth"


@pytest.fixture(scope="module")
def onnx_file(checkpoint):
    out, ckpt = checkpoint
    path = out / "model.onnx"
    # a low score threshold so that the barely trained model reports detections
    assert main(["export", "--weights", str(ckpt), "--output", str(path),
                 "--set", "model.roi_heads.score_thresh=0.0"]) == 0
    return path


def test_exported_files_get_the_mode_of_a_plain_file(onnx_file):
    umask = os.umask(0)
    os.umask(umask)
    assert onnx_file.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by a service running as another user


def _predictions(folder: Path) -> list[dict]:
    return sorted(json.loads((folder / "predictions.json").read_text()), key=lambda r: (r["file_name"], -r["score"]))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_predict_with_runtime_matches_checkpoint(checkpoint, onnx_file, runtime):
    out, ckpt = checkpoint
    images = out / "shapes" / "val"
    assert main(["predict", str(images), "--weights", str(ckpt), "--output", str(out / "eager"), "--score-thresh", "0",
                 "--set", "model.roi_heads.score_thresh=0.0"]) == 0
    assert main(["predict", str(images), "--weights", str(onnx_file), "--runtime", runtime,
                 "--output", str(out / runtime), "--score-thresh", "0"]) == 0
    eager, got = _predictions(out / "eager"), _predictions(out / runtime)
    assert eager and len(got) == len(eager)
    for e, g in zip(eager, got):
        assert (g["file_name"], g["category_id"]) == (e["file_name"], e["category_id"])
        assert abs(g["score"] - e["score"]) <= 1e-4
        assert max(abs(a - b) for a, b in zip(g["bbox"], e["bbox"])) <= 1e-3
    assert len(list((out / runtime).glob("*.png"))) == 4


def test_exported_program_runs_with_torch_runtime_and_raw_masks(checkpoint, tmp_path, recwarn):
    _, ckpt = checkpoint
    path = tmp_path / "model.pt2"
    # the format from the file's suffix
    assert main(["export", "--weights", str(ckpt), "--masks", "raw",
                 "--output", str(path), "--set", "model.roi_heads.score_thresh=0.0"]) == 0
    # torch warns when a program is saved under a name without .pt2 (as a temporary file was)
    assert not [w for w in recwarn if "pt2" in str(w.message)], [str(w.message) for w in recwarn]
    eager = Predictor(ckpt, "cpu", ["model.roi_heads.score_thresh=0.0"])
    exported = Predictor(path, "cpu")
    assert exported.class_map.names == eager.class_map.names
    image = torch.from_numpy(__import__("numpy").array(Image.open(
        ckpt.parent.parent / "shapes" / "val" / "000000.png").convert("RGB"))).permute(2, 0, 1)
    a, b = eager(image), exported(image)
    assert a["boxes"].shape[0] > 0 and torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(b["boxes"], a["boxes"], atol=1e-3, rtol=1e-4)
    assert (a["masks"] == b["masks"]).float().mean() >= 0.999  # the runtime pasted the 28x28 masks
    assert b["class_names"] == a["class_names"]


def _readme_snippet() -> str:
    text = README.read_text()
    match = re.search(r"<!-- onnx-snippet[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its ONNX snippet"
    return match.group(1)


def test_readme_onnx_snippet_runs_without_torch(checkpoint, onnx_file, tmp_path):
    out, ckpt = checkpoint
    image_path = out / "shapes" / "val" / "000001.png"
    snippet = _readme_snippet().replace('"model.onnx"', repr(str(onnx_file))).replace('"photo.jpg"', repr(str(image_path)))
    script = tmp_path / "snippet.py"
    # importing torch or maskrcnn fails in this process: the snippet must not need them
    script.write_text("import sys\nsys.modules['torch'] = None\nsys.modules['maskrcnn'] = None\n" + snippet)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    eager = Predictor(ckpt, "cpu", ["model.roi_heads.score_thresh=0.0"])(image_path)
    assert len(lines) == eager["boxes"].shape[0] > 0
    first = lines[0].split()
    assert first[0] == eager["class_names"][0] and abs(float(first[1]) - float(eager["scores"][0])) < 1e-3


# -- errors a user can cause ---------------------------------------------------------------------
def test_export_errors_name_the_problem(checkpoint, onnx_file, tmp_path, capsys):
    out, ckpt = checkpoint
    cases = [
        (["export", "--weights", str(ckpt), "--output", str(tmp_path / "missing" / "m.onnx")], "does not exist"),
        (["export", "--weights", str(ckpt), "--output", str(tmp_path)], "is a folder"),
        (["export", "--weights", str(ckpt), "--output", str(ckpt / "m.onnx")], "is a file, not a folder"),
        # /sys refuses new files even to root, for whom os.access says yes
        *([(["export", "--weights", str(ckpt), "--output", "/sys/m.onnx"], "cannot write in the folder /sys")]
          if Path("/sys").is_dir() else []),
        (["predict", str(out / "shapes" / "val"), "--weights", str(onnx_file), "--device", "gpu",
          "--output", str(tmp_path / "p")], "not a device name"),
        (["export", "--weights", str(ckpt), "--format", "onnx", "--output", str(tmp_path / "m.pt2")], "named *.onnx"),
        (["export", "--weights", str(ckpt), "--output", str(tmp_path / "m.model")], "name it *.onnx or *.pt2"),
        # a --set that changes the architecture: the checkpoint's weights cannot fit
        (["export", "--weights", str(ckpt), "--output", str(tmp_path / "m.onnx"), "--set", "model.backbone.depth=50"],
         "its weights do not fit the model its config describes with --set model.backbone.depth=50"),
        (["predict", str(out / "shapes" / "val"), "--weights", str(ckpt), "--output", str(tmp_path / "p"),
          "--set", "model.mask_head.num_conv=2"], "--set may change inference settings, not the architecture"),
        (["export", "--weights", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "m.onnx")], "nope.pth"),
        (["export", "--weights", str(onnx_file), "--output", str(tmp_path / "m.onnx")], "already exported"),
        (["export", "--weights", str(ckpt), "--output", str(tmp_path / "m.onnx"), "--set", "model.nope=1"], "nope"),
        # settings the graph does not hold are refused rather than dropped
        (["export", "--weights", str(ckpt), "--output", str(tmp_path / "m.onnx"), "--set", "solver.base_lr=0.1"],
         "only model.* settings"),
        (["predict", str(out / "shapes" / "val"), "--weights", str(ckpt), "--runtime", "onnxruntime",
          "--output", str(tmp_path / "p")], "maskrcnn export --weights"),
        (["predict", str(out / "shapes" / "val"), "--weights", str(onnx_file), "--runtime", "torch",
          "--output", str(tmp_path / "p")], "ExportedProgram (.pt2)"),
    ]
    for argv, words in cases:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)
    # torchscript is refused with the reason and the formats to use instead
    assert main(["export", "--weights", str(ckpt), "--output", str(tmp_path / "m.ts"), "--format", "torchscript"]) == 1
    err = capsys.readouterr().err
    assert "deprecates" in err and "--format exported-program" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # an unknown format is an argparse error
        main(["export", "--weights", str(ckpt), "--output", str(tmp_path / "m.x"), "--format", "tflite"])
    assert e.value.code == 2
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp*"))


def test_exported_model_rejects_wrong_channel_count_and_foreign_files(onnx_file, tmp_path):
    model = ExportedModel(onnx_file)
    with pytest.raises(ValueError, match=r"must have shape \(3, H, W\) \(RGB"):
        model([torch.zeros((4, 50, 60), dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"must have shape \(3, H, W\) \(RGB"):
        model([torch.zeros((1, 50, 60), dtype=torch.uint8)])
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(onnx_file))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(ValueError, match="not one written by 'maskrcnn export'"):
            ExportedModel(foreign, runtime)
    with pytest.raises(ValueError, match="use --runtime onnxruntime for CUDA"):
        ExportedModel(onnx_file, "openvino", device="cuda")


def test_missing_extra_names_the_pip_line(checkpoint, onnx_file, tmp_path, monkeypatch, capsys):
    import importlib

    out, ckpt = checkpoint
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name in ("onnx", "onnxscript", "openvino"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(importlib, "import_module", fake)
    assert main(["export", "--weights", str(ckpt), "--output", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "the 'onnx' package" in err and "pip install 'maskrcnn[export]'" in err  # the first one missing
    assert main(["predict", str(out / "shapes" / "val"), "--weights", str(onnx_file), "--runtime", "openvino",
                 "--output", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "'openvino'" in err and "pip install 'maskrcnn[export]'" in err and "Traceback" not in err


def test_onnx_file_names_its_dimensions(onnx_file):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file))
    shapes = {v.name: v.shape for v in (*session.get_inputs(), *session.get_outputs())}
    assert shapes["images"] == ["batch", "height", "width", 3] and shapes["image_sizes"] == ["batch", 2]
    assert shapes["boxes"] == ["batch", "detections", 4] and shapes["num_detections"] == ["batch"]
    assert shapes["masks"] == ["batch", "detections", "height", "width"]


def test_eval_of_an_exported_model_matches_the_checkpoint(checkpoint, onnx_file, tmp_path, capsys):
    out, ckpt = checkpoint
    # no --dataset: the exported file holds its config, and with it the validation set, as a checkpoint does
    capsys.readouterr()
    assert main(["eval", "--weights", str(ckpt), "--output", str(tmp_path / "eager"), "--no-progress",
                 "--set", "model.roi_heads.score_thresh=0.0"]) == 0
    eager_table = capsys.readouterr().out
    assert main(["eval", "--weights", str(onnx_file), "--output", str(tmp_path / "onnx"), "--no-progress"]) == 0
    table = capsys.readouterr().out

    def summaries(text: str) -> list[str]:  # the bbox/segm lines of the printed table (AP in %, one decimal)
        return [line for line in text.splitlines() if line.startswith(("bbox:", "segm:"))]
    assert len(summaries(table)) == 2 and summaries(table) == summaries(eager_table)
    for kind in ("bbox", "segm"):
        eager, got = (sorted(json.loads((tmp_path / d / f"coco_{kind}_results.json").read_text()),
                             key=lambda r: (r["image_id"], -r["score"])) for d in ("eager", "onnx"))
        assert eager and len(got) == len(eager)
        assert all(g["category_id"] == e["category_id"] and abs(g["score"] - e["score"]) <= 1e-4
                   for g, e in zip(got, eager))


def test_unreadable_exported_files_give_one_line_errors(onnx_file, tmp_path, capsys):
    out = tmp_path / "images"
    out.mkdir()
    Image.new("RGB", (40, 30)).save(out / "a.png")
    data = onnx_file.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])  # an interrupted copy
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all\n" * 20)
    (tmp_path / "junk.pt2").write_bytes(b"PK\x03\x04 not a zip archive")
    cases = [("truncated.onnx", "onnxruntime", "not an ONNX file that onnxruntime can load"),
             ("truncated.onnx", "openvino", "not an ONNX file that OpenVINO can read"),
             ("junk.onnx", "onnxruntime", "not an ONNX file that onnxruntime can load"),
             ("junk.onnx", "openvino", "not an ONNX file that OpenVINO can read"),
             ("junk.pt2", "torch", "not an ExportedProgram (.pt2) written by 'maskrcnn export'")]
    for name, runtime, words in cases:
        capsys.readouterr()
        assert main(["predict", str(out), "--weights", str(tmp_path / name), "--runtime", runtime,
                     "--output", str(tmp_path / "p")]) == 1
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in err and len(lines) == 1 and words in lines[0] and name in lines[0], (name, err)


def test_images_the_eager_model_refuses_are_refused_by_the_exported_one(checkpoint, onnx_file):
    import numpy as np

    out, ckpt = checkpoint
    eager = Predictor(ckpt, "cpu", ["model.roi_heads.score_thresh=0.0"])
    exported = Predictor(onnx_file)
    image = np.array(Image.open(out / "shapes" / "val" / "000000.png").convert("RGB"))
    for pred in (eager, exported):
        # 0-255 floats (an OpenCV habit) would otherwise give no detections eagerly and some exported
        with pytest.raises(ValueError, match="float images must be in 0-1"):
            pred(image.astype(np.float32))
        with pytest.raises(ValueError, match="must be uint8"):
            pred(image.astype(np.int32))
        # 16-bit pixels are scaled to 8 bits, as 16-bit files are: the same answer as the 8-bit image
        wide = pred(image.astype(np.uint16) * 257)
        narrow = pred(image)
        assert narrow["boxes"].shape[0] > 0 and torch.equal(wide["labels"], narrow["labels"])
        torch.testing.assert_close(wide["boxes"], narrow["boxes"])
        # 0-1 floats are the images' other documented form
        unit = pred(image.astype(np.float32) / 255)
        torch.testing.assert_close(unit["scores"], narrow["scores"], atol=1e-4, rtol=0)


# -- a converted detectron2 checkpoint, against detectron2's own outputs --------------------------
D2 = Path(__file__).resolve().parents[1] / "fixtures" / "detectron2"


@pytest.mark.numerics  # float32 outputs against stored ones
def test_export_of_a_detectron2_checkpoint_reproduces_detectron2(tmp_path):
    # the cascade fixture: a detectron2 zoo .pkl (small widths, seeded weights) and detectron2's outputs
    # on one image (tests/interop/test_detectron2_fixtures.py); detectron2 itself cannot export Cascade
    spec = json.loads((D2 / "cascade_mask_rcnn_R_50_FPN.json").read_text())
    path = tmp_path / "cascade.onnx"
    assert main(["export", "--weights", str(D2 / "cascade_mask_rcnn_R_50_FPN.pkl"), "--config", spec["preset"],
                 *set_args(spec["overrides"]), "--output", str(path)]) == 0
    ref = torch.load(D2 / "cascade_mask_rcnn_R_50_FPN_outputs.pth", weights_only=True)
    image = torch.from_numpy(__import__("numpy").array(Image.open(D2 / "image.png"))).permute(2, 0, 1)
    got = ExportedModel(path)([image])[0]
    n = ref["boxes"].shape[0]
    assert n >= 50 and got["boxes"].shape[0] == n
    assert torch.equal(got["labels"] - 1, ref["classes"])  # detectron2's classes are 0-based
    torch.testing.assert_close(got["boxes"], ref["boxes"].float(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got["scores"], ref["scores"].float(), rtol=0, atol=1e-4)
    from maskrcnn.structures.masks import decode_rle
    masks = decode_rle(ref["masks_rle"], *image.shape[1:]).bool()
    assert (got["masks"][:, 0] == masks).float().mean() >= 0.999


@pytest.mark.parametrize("pooler", ["ROIPool", "ROIWarp"])
def test_export_refuses_the_ablation_poolers_by_name(pooler):
    # the exported graph pools with RoIAlign only: a model of the paper's RoIPool/RoIWarp ablations is
    # refused before tracing, with the setting to change, rather than exported with the wrong pooling
    from maskrcnn import build_model
    from maskrcnn.export.exporter import export_program
    from maskrcnn.export.graph import UnsupportedExport
    from tests.tiny import tiny_config

    model = build_model(tiny_config(extra=[f"model.box_head.pooler_type={pooler}",
                                           f"model.mask_head.pooler_type={pooler}"])).eval()
    with pytest.raises(UnsupportedExport, match=f"not {pooler} \\(model\\.\\*_head\\.pooler_type\\)"):
        export_program(model)
