"""Parity with real detectron2, without detectron2: small-width detectron2 models with seeded random
weights in its zoo ``.pkl`` layout and detectron2's own outputs on one image, made by
``scripts/make_detectron2_fixtures.py``. We load each checkpoint through our converter and must
reproduce detectron2's detections, masks and keypoints."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import maskrcnn
from maskrcnn.evaluation.coco_eval import instances_to_coco
from maskrcnn.interop.detectron2 import convert_detectron2_state_dict, load_detectron2, read_detectron2_checkpoint
from maskrcnn.structures.class_map import ClassMap
from maskrcnn.structures.keypoints import COCO_PERSON_KEYPOINTS
from maskrcnn.structures.masks import decode_rle

pytestmark = pytest.mark.numerics  # float32 results compared with fixed expectations (see pyproject.toml)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "detectron2"
NAMES = ["mask_rcnn_R_50_FPN", "cascade_mask_rcnn_R_50_FPN", "keypoint_rcnn_R_50_FPN"]


def _model(name):
    spec = json.loads((FIXTURES / f"{name}.json").read_text())
    model = maskrcnn.build_model(maskrcnn.get_config(spec["preset"], spec["overrides"]))
    load_detectron2(model, FIXTURES / f"{name}.pkl")
    return model.double().eval()


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_detectron2(name):
    ref = torch.load(FIXTURES / f"{name}_outputs.pth", weights_only=True)
    image = torch.from_numpy(np.array(Image.open(FIXTURES / "image.png"))).permute(2, 0, 1)
    with torch.no_grad():
        out = _model(name)([image])[0]
    n = ref["boxes"].shape[0]
    assert n >= 50, "the fixture should send many detections through the heads"
    assert out["boxes"].shape[0] == n
    assert torch.equal(out["labels"] - 1, ref["classes"])  # detectron2's classes are 0-based
    # (detectron2 keeps boxes in float32 even in a float64 model; its presets make us decode in float32 too)
    torch.testing.assert_close(out["boxes"], ref["boxes"], rtol=0, atol=1e-4, check_dtype=False)
    torch.testing.assert_close(out["scores"], ref["scores"], rtol=0, atol=1e-4, check_dtype=False)
    if "masks_rle" in ref:
        masks = decode_rle(ref["masks_rle"], *image.shape[1:]).bool()
        same = (out["masks"][:, 0] == masks).double().mean().item()
        assert same >= 0.999, f"only {same:.5f} of mask pixels agree"
        assert masks.flatten(1).any(1).double().mean() > 0.2  # masks are not all empty
    if "keypoints" in ref:
        torch.testing.assert_close(out["keypoints"][..., :2], ref["keypoints"][..., :2], rtol=0, atol=1e-3, check_dtype=False)
        torch.testing.assert_close(out["keypoints_scores"], ref["keypoints"][..., 2], rtol=0, atol=1e-4, check_dtype=False)
        assert ref["keypoints"][..., 0].std() > 5  # keypoints spread over the boxes


def test_keypoint_results_are_written_as_detectron2_writes_them():
    # detectron2's instances_to_coco_json writes pred_keypoints with 0.5 subtracted from x and y (the
    # inverse of load_coco_json's +0.5); the preset carries that convention, and so the checkpoint's config
    spec = json.loads((FIXTURES / "keypoint_rcnn_R_50_FPN.json").read_text())
    convention = maskrcnn.get_config(spec["preset"], spec["overrides"]).model.keypoint_head.pixel_convention
    assert convention == "detectron2"
    ref = torch.load(FIXTURES / "keypoint_rcnn_R_50_FPN_outputs.pth", weights_only=True)
    image = torch.from_numpy(np.array(Image.open(FIXTURES / "image.png"))).permute(2, 0, 1)
    with torch.no_grad():
        out = _model("keypoint_rcnn_R_50_FPN")([image])[0]
    results = instances_to_coco(out, 1, ClassMap([1], ["person"], COCO_PERSON_KEYPOINTS), convention)
    written = torch.tensor([r["keypoints"] for r in results], dtype=torch.float64).reshape(-1, 17, 3)
    torch.testing.assert_close(written[..., :2], ref["keypoints"][..., :2] - 0.5, rtol=0, atol=1e-3)


def test_pkl_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": Evil()}}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        read_detectron2_checkpoint(path)


def test_mismatches_are_clear_errors():
    state = read_detectron2_checkpoint(FIXTURES / "mask_rcnn_R_50_FPN.pkl")
    spec = json.loads((FIXTURES / "mask_rcnn_R_50_FPN.json").read_text())
    with pytest.raises(KeyError, match="roi_heads.box_head.bogus"):
        convert_detectron2_state_dict({**state, "roi_heads.box_head.bogus.weight": torch.zeros(1)})
    # anchors and pixel statistics are not weights: ignored
    assert convert_detectron2_state_dict({**state, "pixel_mean": torch.zeros(3, 1, 1)}).keys() == \
        convert_detectron2_state_dict(state).keys()
    wrong = maskrcnn.build_model(maskrcnn.get_config(spec["preset"], spec["overrides"] + ["model.roi_heads.num_classes=7"]))
    with pytest.raises(ValueError, match="number of classes"):
        load_detectron2(wrong, state)
    load_detectron2(wrong, state, reset_heads=True)  # fine-tuning to 7 classes: predictors stay fresh
    missing = dict(state)
    missing.pop("roi_heads.mask_head.deconv.weight")
    with pytest.raises(ValueError, match="missing keys: roi_heads.mask_head.deconv.weight"):
        load_detectron2(maskrcnn.build_model(maskrcnn.get_config(spec["preset"], spec["overrides"])), missing)


def test_a_detectron2_trained_pth_loads_as_its_zoo_pkl(tmp_path):
    # what detectron2's Checkpointer writes during training: torch.save of the model's tensors under
    # "model" beside the optimizer, scheduler and iteration; the same weights must give the same model
    name = "mask_rcnn_R_50_FPN"
    state = read_detectron2_checkpoint(FIXTURES / f"{name}.pkl")
    first = next(iter(state))
    trained = {"model": {k: v.clone() for k, v in state.items()},
               "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "momentum": 0.9, "params": [0, 1]}]},
               "scheduler": {"base_lrs": [0.02], "last_epoch": 90000}, "iteration": 89999}
    torch.save(trained, tmp_path / "model_final.pth")
    assert set(read_detectron2_checkpoint(tmp_path / "model_final.pth")) == set(state)
    from_pkl = _model(name).state_dict()
    spec = json.loads((FIXTURES / f"{name}.json").read_text())
    model = maskrcnn.build_model(maskrcnn.get_config(spec["preset"], spec["overrides"]))
    load_detectron2(model, tmp_path / "model_final.pth")
    from_pth = model.double().state_dict()
    assert from_pth.keys() == from_pkl.keys()
    assert all(torch.equal(from_pth[k], from_pkl[k]) for k in from_pkl)
    # a .pth of the weights alone (no "model" key), as some users save them, loads too
    torch.save({k: v.clone() for k, v in state.items()}, tmp_path / "weights_only.pth")
    assert torch.equal(read_detectron2_checkpoint(tmp_path / "weights_only.pth")[first], state[first])
