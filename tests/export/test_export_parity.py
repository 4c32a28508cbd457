"""Exported graphs against the eager model (float32), per family and runtime, on image sizes other
than the export's, a blank image, and a batch of two sizes.

Tolerances are the issue's: identical labels, boxes within 1e-3 px (or 1e-4 relative), scores
within 1e-4, masks equal on >= 99.9% of pixels, keypoints within 0.05 px. Each family is exported
once per session (an export takes a minute on two cores).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from maskrcnn.config import get_config
from maskrcnn.export.exporter import export_program, graph_metadata, save_program
from maskrcnn.export.runtime import ExportedModel
from maskrcnn.modeling.build import build_model
from tests.tiny import TINY, random_scene

pytest.importorskip("onnxruntime")

SIZES = [(150, 200), (210, 120), (64, 64), (333, 77)]  # the export traced (97, 131) and (83, 70)

C4_TINY = ["model.backbone.depth=18", "model.backbone.freeze_at=0", "model.backbone.norm=BN",
           "model.anchors.sizes=[[16, 32, 64, 128]]", "model.rpn.pre_nms_topk_test=300",
           "model.rpn.post_nms_topk_test=60", "model.roi_heads.num_classes=3", "model.roi_heads.detections_per_image=20",
           "model.mask_on=false", "model.input.min_size_test=128", "model.input.max_size_test=192"]

# preset, overrides, and a score threshold under which the random-weight model finds nothing on a
# uniform grey image but something on (most of) the textured test images
FAMILIES = {
    # torchvision conventions (its resize and anchors, unaligned RoIAlign with 2x2 samples, its mask
    # pasting and keypoint pixel convention), masks and keypoints together
    "mask_keypoint": ("torchvision_keypointrcnn_resnet50_fpn", TINY + ["model.mask_on=true", "model.keypoint_head.conv_dims=[32, 32]",
                                                        "model.roi_heads.score_thresh=0.36"]),
    # detectron2 conventions (rounded antialiased resize, aligned adaptive RoIAlign, empty boxes dropped)
    "cascade": ("detectron2_cascade_mask_rcnn_R_50_FPN_3x", TINY + ["model.roi_heads.score_thresh=0.57"]),
    "faster_c4": ("mask_rcnn_R_50_C4", C4_TINY + ["model.roi_heads.score_thresh=0.36"]),
}


def _model(name: str):
    preset, overrides = FAMILIES[name]
    torch.manual_seed(0)
    model = build_model(get_config(preset, overrides)).eval()
    with torch.no_grad():  # random weights score every class alike: favour the foreground so there are detections
        predictors = model.roi_heads.box_predictor
        for p in predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]:
            p.cls_score.bias[1:] += 3.0
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (eager model, {runtime: ExportedModel})"""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model = _model(name)
            program = export_program(model)
            folder = tmp_path_factory.mktemp(name)
            meta = graph_metadata(model, "pasted")
            onnx_path = save_program(program, folder / "model.onnx", "onnx", meta)
            pt2_path = save_program(program, folder / "model.pt2", "exported-program", meta)
            cache[name] = (model, {"onnxruntime": ExportedModel(onnx_path, "onnxruntime"),
                                   "openvino": ExportedModel(onnx_path, "openvino"),
                                   "torch": ExportedModel(pt2_path, "torch")})
        return cache[name]
    return get


def _images(sizes):
    return [(random_scene(h, w, seed=i) * 255).round().to(torch.uint8) for i, (h, w) in enumerate(sizes)]


def assert_same(eager: dict, got: dict, where: str) -> None:
    n = eager["boxes"].shape[0]
    assert got["boxes"].shape[0] == n, f"{where}: {got['boxes'].shape[0]} detections, eager {n}"
    assert torch.equal(got["labels"], eager["labels"]), where
    if n == 0:
        return
    tol = torch.maximum(torch.full_like(eager["boxes"], 1e-3), eager["boxes"].abs() * 1e-4)
    assert ((got["boxes"] - eager["boxes"]).abs() <= tol).all(), f"{where}: boxes {(got['boxes'] - eager['boxes']).abs().max()}"
    assert (got["scores"] - eager["scores"]).abs().max() <= 1e-4, where
    if "masks" in eager:
        assert got["masks"].shape == eager["masks"].shape, where
        same = (got["masks"] == eager["masks"]).float().mean().item()
        assert same >= 0.999, f"{where}: masks agree on {same:.5f} of pixels"
    if "keypoints" in eager:
        assert (got["keypoints"] - eager["keypoints"]).abs().max() <= 0.05, where
        assert (got["keypoints_scores"] - eager["keypoints_scores"]).abs().max() <= 1e-4, where


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_matches_eager_on_other_sizes_and_batches(exported, family):
    model, runtimes = exported(family)
    images = _images(SIZES)
    with torch.no_grad():
        eager = [model([image])[0] for image in images]  # a batch pads every image to the largest
        eager_pair = model(images[:2])
    assert sum(e["boxes"].shape[0] > 0 for e in eager) >= 3, "the test model should detect something"
    for runtime, run in runtimes.items():
        for i, image in enumerate(images):
            assert_same(eager[i], run([image])[0], f"{family}/{runtime} image {tuple(image.shape[1:])}")
        for i, got in enumerate(run(images[:2])):  # one batch of a wide and a tall image
            assert_same(eager_pair[i], got, f"{family}/{runtime} batch image {i}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_image_without_detections_gives_empty_outputs(exported, family, tmp_path):
    model, runtimes = exported(family)
    blank = torch.full((3, 90, 140), 128, dtype=torch.uint8)
    scene = _images(SIZES[:1])[0]
    with torch.no_grad():
        eager = model([blank])[0]
        eager_scene = model([scene])[0]
        eager_pair = model([scene, blank])
    assert eager["boxes"].shape[0] == 0, "the grey image should give the test model nothing to detect"
    assert eager_scene["boxes"].shape[0] > 0, "the textured image should give the test model detections"
    for runtime in ("torch", "openvino"):
        assert_same(eager, runtimes[runtime]([blank])[0], f"{family}/{runtime} blank")
        for i, got in enumerate(runtimes[runtime]([scene, blank])):
            assert_same(eager_pair[i], got, f"{family}/{runtime} batch with a blank image, image {i}")
    # onnxruntime once died of SIGFPE here (its Einsum with zero RoIs): a child process reports a
    # crash as a failure instead of ending the test session
    torch.save(scene, tmp_path / "scene.pt")
    child = subprocess.run([sys.executable, "-c", _BLANK_CHILD, str(runtimes["onnxruntime"].path),
                            str(tmp_path / "scene.pt"), str(tmp_path / "out.pt")],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, f"onnxruntime exited with {child.returncode}: {child.stderr[-2000:]}"
    alone, pair = torch.load(tmp_path / "out.pt")
    assert_same(eager, alone, f"{family}/onnxruntime blank")
    for i, got in enumerate(pair):
        assert_same(eager_pair[i], got, f"{family}/onnxruntime batch with a blank image, image {i}")


_BLANK_CHILD = """
import sys, torch
from maskrcnn.export.runtime import ExportedModel
model, scene = ExportedModel(sys.argv[1]), torch.load(sys.argv[2])
blank = torch.full((3, 90, 140), 128, dtype=torch.uint8)
torch.save((model([blank])[0], model([scene, blank])), sys.argv[3])
"""
