"""Config: presets, YAML round trip and inheritance, overrides, and errors that name the key."""

import pytest

import maskrcnn
from maskrcnn.config import PRESETS, ConfigError, apply_overrides, get_config, load_yaml


def test_every_preset_builds_and_round_trips_through_yaml(tmp_path):
    for name in PRESETS:
        cfg = get_config(name)
        path = tmp_path / f"{name}.yaml"
        cfg.save(path)
        assert load_yaml(path) == cfg, name


def test_presets_differ_where_they_should():
    tv = get_config("torchvision_maskrcnn_resnet50_fpn")
    assert tv.model.box_head.pooler_aligned is False and tv.model.roi_heads.num_classes == 90
    assert get_config("mask_rcnn_R_50_FPN").model.box_head.pooler_aligned is True
    x101 = get_config("mask_rcnn_X_101_32x8d_FPN").model.backbone
    assert (x101.depth, x101.groups, x101.width_per_group) == (101, 32, 8)
    assert get_config("mask_rcnn_R_50_C4").model.architecture == "C4"
    v2 = get_config("torchvision_maskrcnn_resnet50_fpn_v2").model
    assert v2.fpn.norm == "BN" and v2.rpn.num_convs == 2 and v2.box_head.num_conv == 4


def test_yaml_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("_base_: mask_rcnn_R_101_FPN\nmodel:\n  roi_heads:\n    num_classes: 7\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nmodel:\n  rpn:\n    nms_thresh: 0.6\n")
    cfg = get_config(str(tmp_path / "child.yaml"), ["model.roi_heads.score_thresh=0.3", "model.input.min_size_train=[640, 672]"])
    assert cfg.model.backbone.depth == 101 and cfg.model.roi_heads.num_classes == 7
    assert cfg.model.rpn.nms_thresh == 0.6 and cfg.model.roi_heads.score_thresh == 0.3
    assert cfg.model.input.min_size_train == (640, 672)


@pytest.mark.parametrize("override,match", [
    ("model.roi_heads.score_tresh=0.3", r"unknown config key 'model.roi_heads.score_tresh' \(did you mean 'model.roi_heads.score_thresh'"),
    ("model.roi_heads.num_classes=3.5", "'model.roi_heads.num_classes' must be an integer"),
    ("model.roi_heads.num_classes=true", "'model.roi_heads.num_classes' must be an integer"),
    ("model.mask_on=1", "'model.mask_on' must be true or false"),
    ("model.backbone.norm=LayerNorm", r"'model.backbone.norm' must be one of"),
    ("model.backbone.depth=77", r"'model.backbone.depth' must be one of"),
    ("model.input.pixel_mean=[1, 2]", "'model.input.pixel_mean' must be a list of 3 values"),
    ("model.rpn=3", "'model.rpn' must be a mapping"),
    ("model.roi_heads.score_thresh", "must look like dotted.key=value"),
    ("solver.ims_per_batch=0", "'solver.ims_per_batch' must be at least 1, got 0"),
    ("solver.base_lr=-0.01", "'solver.base_lr' must be greater than 0.0, got -0.01"),
    ("solver.base_lr=.nan", "'solver.base_lr' must be greater than 0.0, got nan"),
    ("solver.max_iter=0", "'solver.max_iter' must be at least 1, got 0"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_config("mask_rcnn_R_50_FPN"), [override])


def test_bad_files_and_names(tmp_path):
    with pytest.raises(ConfigError, match="did you mean"):
        get_config("mask_rcnn_R50_FPN")
    with pytest.raises(FileNotFoundError):
        get_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        get_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  backbone:\n    dept: 50\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'model.backbone.dept'"):
        get_config(str(typo))


def test_public_api():
    cfg = maskrcnn.get_config("mask_rcnn_R_50_FPN")
    assert isinstance(cfg, maskrcnn.Config)
    assert "torchvision_maskrcnn_resnet50_fpn_v2" in maskrcnn.PRESETS


@pytest.mark.parametrize("override,match", [
    ("solver.momentum=1.0", r"'solver.momentum' must be at least 0.0 and below 1.0, got 1.0"),
    ("solver.weight_decay=-0.1", r"'solver.weight_decay' must be at least 0.0, got -0.1"),
    ("solver.gamma=0", r"'solver.gamma' must be greater than 0, got 0.0"),
    ("solver.warmup_iters=-5", r"'solver.warmup_iters' must be at least 0, got -5"),
    ("train.log_period=0", r"'train.log_period' must be at least 1, got 0"),
    ("model.roi_heads.score_thresh=-0.5", r"'model.roi_heads.score_thresh' must be at least 0.0 and at most 1.0"),
    ("model.rpn.positive_fraction=.nan",
     r"'model.rpn.positive_fraction' must be at least 0.0 and at most 1.0, got nan"),
    ("model.mask_head.mask_threshold=1.5", r"'model.mask_head.mask_threshold' must be at most 1.0, got 1.5"),
    ("model.anchors.sizes=[[32], [0]]",
     r"'model.anchors.sizes' values must be greater than 0, got 0.0 in \[\[32.0\], \[0.0\]\]"),
    ("model.keypoint_head.oks_sigmas=[0.1, -0.1]", r"'model.keypoint_head.oks_sigmas' values must be greater than 0"),
    ("model.backbone.freeze_at=6", r"'model.backbone.freeze_at' must be at least 0 and at most 5, got 6"),
])
def test_values_out_of_range_name_the_key_and_value(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_config("mask_rcnn_R_50_FPN"), [override])


def test_values_at_their_bounds_are_accepted():
    cfg = apply_overrides(get_config("mask_rcnn_R_50_FPN"), [
        "solver.momentum=0", "solver.weight_decay=0", "solver.warmup_iters=0", "train.checkpoint_period=0",
        "model.roi_heads.score_thresh=1", "model.rpn.nms_thresh=0", "model.mask_head.mask_threshold=-1",
        "data.flip_prob=1", "data.num_workers=0"])
    assert cfg.solver.momentum == 0.0 and cfg.model.mask_head.mask_threshold == -1.0


@pytest.mark.parametrize("overrides,match", [
    (["solver.steps=[800, 600]"], r"'solver.steps' must be increasing, got \[800, 600\]"),
    (["model.input.max_size_test=700"],
     r"'model.input.max_size_test' \(700\) must be at least model.input.min_size_test \(800\)"),
    (["model.input.min_size_train=[640, 1400]"], r"'model.input.max_size_train' \(1333\) must be at least"),
    (["model.roi_heads.bg_iou_thresh=0.6"], r"'model.roi_heads.bg_iou_thresh' \(0.6\) must not exceed"),
])
def test_values_that_contradict_each_other(overrides, match):
    with pytest.raises(ConfigError, match=match):
        get_config("mask_rcnn_R_50_FPN", overrides)


def test_steps_beyond_max_iter_are_a_warning():
    with pytest.warns(UserWarning, match=r"'solver.steps' \[60000, 80000\] goes beyond solver.max_iter=1000"):
        assert get_config("mask_rcnn_R_50_FPN", ["solver.max_iter=1000"]).solver.max_iter == 1000


def test_numbers_in_exponent_notation_are_numbers():
    assert get_config("mask_rcnn_R_50_FPN", ["solver.base_lr=1e-3"]).solver.base_lr == 0.001
    cfg = get_config("mask_rcnn_R_50_FPN", ["solver.max_iter=2e3", "solver.steps=[1e3, 1.5e3]"])
    assert (cfg.solver.max_iter, cfg.solver.steps) == (2000, (1000, 1500))
    with pytest.raises(ConfigError, match="must be an integer, got 2.5"):
        get_config("mask_rcnn_R_50_FPN", ["solver.max_iter=2.5"])
    with pytest.raises(ConfigError, match="must be a string, got None .an empty string is written ''"):
        get_config("mask_rcnn_R_50_FPN", ["data.val_json="])
    with pytest.raises(ConfigError, match="must be a number"):
        get_config("mask_rcnn_R_50_FPN", ["solver.base_lr=fast"])


def test_keys_checked_together_are_checked_once_all_overrides_are_in():
    # max_iter alone would leave the default steps beyond it: set together, in either order, they fit
    for overrides in (["solver.max_iter=1000", "solver.steps=[600, 800]"],
                      ["solver.steps=[600, 800]", "solver.max_iter=1000"]):
        assert get_config("mask_rcnn_R_50_FPN", overrides).solver.steps == (600, 800)
    assert get_config("mask_rcnn_R_50_FPN", ["solver.max_iter=1000", "solver.schedule=cosine"]).solver.max_iter == 1000
