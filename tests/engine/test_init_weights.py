"""train.init_weights: fine-tuning a checkpoint of ours to other classes or keypoints resets every
class/keypoint predictor (per cascade stage too) and nothing else; other mismatches are errors."""

import pytest
import torch

import maskrcnn
from maskrcnn.engine.checkpoint import save_checkpoint
from maskrcnn.engine.trainer import load_init_weights
from maskrcnn.structures.class_map import ClassMap
from tiny import tiny_config

KEYPOINTS = ["tip1", "tip2", "tip3", "tip4", "tip5"]


def _checkpoint(tmp_path, preset, extra, classes: ClassMap):
    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_config(preset, extra))
    path = save_checkpoint(tmp_path / "source.pth", model.state_dict(), {}, classes.to_dict(), 10)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def _fine_tune(preset, extra, path, classes: ClassMap):
    torch.manual_seed(1)
    model = maskrcnn.build_model(tiny_config(preset, extra))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_init_weights(model, str(path), classes, reset_heads=True)
    return model.state_dict(), fresh


def _check(loaded, fresh, source, reset: set[str]):
    for k, v in loaded.items():
        expected = fresh[k] if k in reset else source[k]
        assert torch.equal(v, expected), f"{k} {'was not reset' if k in reset else 'not loaded from the checkpoint'}"


def test_cascade_with_per_stage_masks_fine_tunes_to_other_classes(tmp_path, capsys):
    extra = ["model.cascade.mask_mode=per_stage"]
    path, source = _checkpoint(tmp_path, "shapes_cascade_R_18_FPN", extra, ClassMap([1, 2, 3], ["a", "b", "c"]))
    five = ClassMap([1, 2, 3, 4, 5], ["p", "q", "r", "s", "t"])
    loaded, fresh = _fine_tune("shapes_cascade_R_18_FPN", extra + ["model.roi_heads.num_classes=5"], path, five)
    # class scores and mask logits of all three stages; the class-agnostic box deltas are kept
    reset = {f"roi_heads.{m}.{s}.{n}.{p}" for s in range(3) for m, n in (("box_predictor", "cls_score"),
                                                                            ("mask_head", "predictor"))
             for p in ("weight", "bias")}
    assert reset <= loaded.keys() and loaded["roi_heads.box_predictor.2.bbox_pred.weight"].shape[0] == 4
    _check(loaded, fresh, source, reset)
    assert "roi_heads.mask_head.2.predictor" in capsys.readouterr().out  # the user is told what was reset
    with pytest.raises(ValueError, match="other classes .*init_weights_reset_heads"):
        load_init_weights(maskrcnn.build_model(tiny_config("shapes_cascade_R_18_FPN",
                                                           extra + ["model.roi_heads.num_classes=5"])),
                          str(path), five, reset_heads=False)


def test_keypoint_rcnn_fine_tunes_to_other_keypoints(tmp_path):
    classes = ClassMap([1, 2, 3], ["a", "b", "c"], KEYPOINTS)
    path, source = _checkpoint(tmp_path, "shapes_keypoint_R_18_FPN", [], classes)
    seven = ClassMap([1, 2, 3], ["a", "b", "c"], KEYPOINTS + ["tip6", "tip7"])
    loaded, fresh = _fine_tune("shapes_keypoint_R_18_FPN", ["model.keypoint_head.num_keypoints=7"], path, seven)
    _check(loaded, fresh, source, {"roi_heads.keypoint_head.score_lowres.weight",
                                   "roi_heads.keypoint_head.score_lowres.bias"})


def test_same_number_of_other_classes_gets_new_class_predictors(tmp_path):
    path, source = _checkpoint(tmp_path, "mask_rcnn_R_50_FPN", [], ClassMap([1, 2, 3], ["a", "b", "c"]))
    loaded, fresh = _fine_tune("mask_rcnn_R_50_FPN", [], path, ClassMap([1, 2, 3], ["x", "y", "z"]))
    _check(loaded, fresh, source, {f"roi_heads.{layer}.{p}" for p in ("weight", "bias") for layer in
                                   ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_head.predictor")})


@pytest.mark.parametrize("reset_heads", [False, True])
def test_a_backbone_shape_mismatch_names_the_layer_and_both_shapes(tmp_path, reset_heads):
    classes = ClassMap([1, 2, 3], ["a", "b", "c"])
    model = maskrcnn.build_model(tiny_config())
    state = model.state_dict()
    key = next(k for k in state if k.startswith("backbone.") and state[k].dim() == 4)
    shape = tuple(state[key].shape)
    wrong = (shape[0] * 2, *shape[1:])
    state[key] = torch.zeros(wrong)
    path = save_checkpoint(tmp_path / "other.pth", state, {}, classes.to_dict(), 1)
    with pytest.raises(ValueError, match=rf"{key}: checkpoint \({wrong[0]}, .*model \({shape[0]}, ") as info:
        load_init_weights(maskrcnn.build_model(tiny_config()), str(path), classes, reset_heads=reset_heads)
    assert "other.pth" in str(info.value) and "another model config" in str(info.value)
