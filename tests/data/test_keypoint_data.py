"""Keypoint datasets: COCO keypoints read and validated, flip swaps left/right, the synthetic stars,
OKS evaluation through pycocotools, skeleton drawing."""

import json

import numpy as np
import pytest
import torch
from tiny import tiny_config

import maskrcnn
from maskrcnn.config import ConfigError
from maskrcnn.data.build import build_train_dataset, dataset_paths
from maskrcnn.data.coco import CocoDataset, DatasetError
from maskrcnn.data.shapes import STAR_KEYPOINTS, write_shapes_dataset
from maskrcnn.evaluation.coco_eval import COCOEvaluator
from maskrcnn.structures.class_map import ClassMap
from maskrcnn.visualize import draw_instances


def _write(tmp_path, annotations, keypoints=("left_hand", "head", "right_hand")):
    from PIL import Image

    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "a.png")
    cats = [{"id": 1, "name": "person", "keypoints": list(keypoints), "skeleton": [[1, 2], [2, 3]]}]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 60, "width": 80}], "categories": cats,
            "annotations": [dict({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                  "segmentation": [[10, 10, 50, 10, 50, 40, 10, 40]], "bbox": [10, 10, 40, 30]}, **a)
                            for i, a in enumerate(annotations)]}
    path = tmp_path / "kp.json"
    path.write_text(json.dumps(data))
    return path


def test_keypoints_are_read_validated_and_flipped(tmp_path):
    good = {"keypoints": [12, 20, 2, 30, 11, 1, 48, 20, 2]}
    path = _write(tmp_path, [good, {}, {"keypoints": [1, 2, 3]}, {"keypoints": [1, 2, 5, 0, 0, 0, 0, 0, 0]}])
    ds = CocoDataset(path, tmp_path, train=True, flip_prob=1.0)
    assert ds.num_keypoints == 3 and ds.class_map.keypoint_names == ["left_hand", "head", "right_hand"]
    assert ds.class_map.skeleton == [(1, 2), (2, 3)] and ds.flip_map == [2, 1, 0]
    assert len(ds.report) == 2 and all("'keypoints' must be 3" in r for r in ds.report)
    _, target = ds[0]
    assert target["keypoints"].shape == (2, 3, 3)
    assert target["keypoints"][0].tolist() == [[12, 20, 2], [30, 11, 1], [48, 20, 2]]
    assert target["keypoints"][1].abs().sum() == 0  # no keypoints given: all unlabelled
    _, flipped = ds[(0, 0)]
    # mirrored (x -> 80 - x) and left/right swapped: the left hand is now where the right one was
    assert flipped["keypoints"][0].tolist() == [[32, 20, 2], [50, 11, 1], [68, 20, 2]]
    with pytest.raises(DatasetError, match="keypoints"):
        CocoDataset(path, tmp_path, on_bad_sample="error")
    assert len(CocoDataset(path, tmp_path, train=True, min_keypoints=3)) == 1
    with pytest.raises(DatasetError, match="no usable images"):
        CocoDataset(path, tmp_path, train=True, min_keypoints=4, keep_empty=False)
    assert ClassMap.from_dict(ds.class_map.to_dict()) == ds.class_map


def test_synthetic_stars_have_their_tips_as_keypoints(tmp_path):
    paths = write_shapes_dataset(tmp_path, 12, 2, (96, 96), min_radius=12, max_radius=30, keypoints=True)
    data = json.loads(paths["train"][0].read_text())
    assert data["categories"][0]["keypoints"] == list(STAR_KEYPOINTS)
    anns = data["annotations"]
    assert len(anns) >= 12 and all(len(a["keypoints"]) == 15 for a in anns)
    vis = [v for a in anns for v in a["keypoints"][2::3]]
    assert vis.count(2) > 0.7 * len(vis)
    for a in anns:  # a visible tip lies within its star's box (give or take the thin tip's pixels)
        x, y, w, h = a["bbox"]
        kp = np.array(a["keypoints"]).reshape(5, 3)
        seen = kp[kp[:, 2] == 2]
        assert ((seen[:, 0] >= x - 2) & (seen[:, 0] <= x + w + 2) & (seen[:, 1] >= y - 2) & (seen[:, 1] <= y + h + 2)).all()
        top = kp[0]
        if top[2] == 2 and (kp[1:, 2] == 2).all():  # "top" is the highest tip: stars stay upright
            assert top[1] <= kp[1:, 1].min() + 1e-6
    ds = CocoDataset(*paths["train"], train=True)
    assert ds.flip_map == [0, 4, 3, 2, 1]


def test_oks_evaluation_scores_ground_truth_as_perfect(tmp_path):
    paths = write_shapes_dataset(tmp_path, 2, 6, (96, 96), min_radius=12, max_radius=30, keypoints=True)
    ds = CocoDataset(*paths["val"])
    ev = COCOEvaluator(ds.json_path, ds.class_map, ["keypoints"], oks_sigmas=[0.05] * 5)
    noisy = COCOEvaluator(ds.json_path, ds.class_map, ["keypoints"], oks_sigmas=[0.05] * 5)
    g = torch.Generator().manual_seed(0)
    for i in range(len(ds)):
        t = ds.target(i)
        n = t["boxes"].shape[0]
        out = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(1, 0.5, n), "keypoints": t["keypoints"]}
        ev.process([out], [t["image_id"]])
        shifted = t["keypoints"].clone()
        shifted[..., :2] += torch.randn(shifted[..., :2].shape, generator=g) * 4
        noisy.process([dict(out, keypoints=shifted)], [t["image_id"]])
    perfect, worse = ev.evaluate()["keypoints"]["AP"], noisy.evaluate()["keypoints"]["AP"]
    assert perfect == pytest.approx(1.0) and worse < 0.9
    with pytest.raises(ValueError, match="oks_sigmas"):
        COCOEvaluator(ds.json_path, ds.class_map, ["keypoints"])  # 5 keypoints: COCO's 17 sigmas do not apply


def test_skeleton_is_drawn():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    kps = torch.tensor([[[10.0, 10.0, 1], [50.0, 10.0, 1], [30.0, 30.0, 0]]])
    out = np.array(draw_instances(image, torch.tensor([[5.0, 5.0, 55.0, 35.0]]), [1], ["a"], keypoints=kps,
                                  skeleton=[(1, 2), (2, 3)]))
    assert (out[10, 10] == 255).all() and (out[10, 50] == 255).all()  # white keypoint dots
    assert out[10, 30].sum() > 0  # the bone between them
    assert out[20, 40].sum() == 0  # not towards the unlabelled third keypoint


def _write_two_keypoint_sets(tmp_path):
    """A person (3 keypoints) and a hand (2 other keypoints): fine for a mask model, not for one keypoint head."""
    path = _write(tmp_path, [{"keypoints": [12, 20, 2, 30, 11, 1, 48, 20, 2]},
                             {"category_id": 2, "keypoints": [15, 15, 2, 20, 20, 2]}])
    data = json.loads(path.read_text())
    data["categories"].append({"id": 2, "name": "hand", "keypoints": ["thumb", "index"], "skeleton": [[1, 2]]})
    path.write_text(json.dumps(data))
    return path, data["categories"]


def test_different_keypoint_sets_are_ignored_without_a_keypoint_model(tmp_path):
    path, categories = _write_two_keypoint_sets(tmp_path)
    with pytest.raises(ValueError, match="one model predicts one keypoint set"):
        ClassMap.from_categories(categories)
    cm = ClassMap.from_categories(categories, keypoints=False)
    assert cm.ids == [1, 2] and cm.names == ["person", "hand"] and cm.keypoint_names == [] and cm.skeleton == []
    with pytest.raises(DatasetError, match="different keypoints"):  # a keypoint model still refuses the file
        CocoDataset(path, tmp_path, train=True)
    with pytest.warns(UserWarning, match=r"kp\.json: the categories declare different keypoint sets; ignored"):
        ds = CocoDataset(path, tmp_path, train=True, keypoints=False)
    assert ds.num_keypoints == 0 and not ds.report
    _, target = ds[(0, 0)]
    assert "keypoints" not in target and target["labels"].tolist() == [1, 2]
    # one keypoint set: kept whatever the model, as before (checkpoints' class maps stay the same)
    same = _write(tmp_path, [{"keypoints": [12, 20, 2, 30, 11, 1, 48, 20, 2]}])
    assert CocoDataset(same, tmp_path, train=True, keypoints=False).num_keypoints == 3


def test_mask_model_trains_on_a_file_with_different_keypoint_sets(tmp_path):
    path, _ = _write_two_keypoint_sets(tmp_path)
    cfg = tiny_config(extra=[f"data.train_json={path}", "model.roi_heads.num_classes=2"])
    assert not cfg.model.keypoint_on
    with pytest.warns(UserWarning, match="different keypoint sets"):
        ds = build_train_dataset(cfg, dataset_paths(cfg))
    image, target = ds[(0, 1)]
    torch.manual_seed(0)
    model = maskrcnn.build_model(cfg).train()
    losses = model([image], [target])
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # a keypoint model is still told the file is ambiguous
    kp_cfg = tiny_config(extra=[f"data.train_json={path}", "model.keypoint_on=true"])
    with pytest.raises(DatasetError, match="different keypoints"):
        build_train_dataset(kp_cfg, dataset_paths(kp_cfg))


@pytest.mark.parametrize("preset, left_hand, flipped_left_hand, flipped_right_hand", [
    # detectron2: load_coco_json adds 0.5 to the file's pixel indices, the flip maps x -> W - x on those
    ("detectron2_keypoint_rcnn_R_50_FPN_3x", [10.5, 20.5], [89.5, 20.5], [29.5, 30.5]),
    # torchvision: the file's values as they are, the flip maps x -> W - x on them
    ("torchvision_keypointrcnn_resnet50_fpn", [10.0, 20.0], [90.0, 20.0], [30.0, 30.0]),
])
def test_each_preset_family_reads_and_flips_keypoints_as_its_library(tmp_path, preset, left_hand, flipped_left_hand,
                                                                     flipped_right_hand):
    from PIL import Image

    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 50, "width": 100}],
            "categories": [{"id": 1, "name": "person", "keypoints": ["left_hand", "head", "right_hand"]}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [5, 5, 80, 40],
                             "segmentation": [[5, 5, 85, 5, 85, 45, 5, 45]],
                             "keypoints": [10, 20, 2, 0, 0, 0, 70, 30, 1]}]}
    (tmp_path / "kp.json").write_text(json.dumps(data))
    convention = maskrcnn.get_config(preset).model.keypoint_head.pixel_convention
    ds = CocoDataset(tmp_path / "kp.json", tmp_path, train=True, flip_prob=1.0, keypoint_convention=convention)
    kp = ds.target(0)["keypoints"][0]
    assert kp[0].tolist() == [*left_hand, 2] and kp[1].tolist() == [0, 0, 0]  # unlabelled: never shifted
    _, flipped = ds[(0, 0)]
    kp = flipped["keypoints"][0]  # (left and right swap places in the flip)
    assert kp[2].tolist() == [*flipped_left_hand, 2] and kp[0].tolist() == [*flipped_right_hand, 1]
    assert kp[1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="'detectron'"):
        CocoDataset(tmp_path / "kp.json", tmp_path, keypoint_convention="detectron")
    with pytest.raises(ConfigError, match="pixel_convention"):
        maskrcnn.get_config(preset, ["model.keypoint_head.pixel_convention=detectron"])
