"""Datasets from the config: the user's COCO files, or the built-in shapes written on first use."""

from __future__ import annotations

from pathlib import Path

from maskrcnn.config import Config
from maskrcnn.data.coco import ClassMap, CocoDataset
from maskrcnn.data.shapes import write_shapes_dataset


def dataset_paths(cfg: Config) -> dict[str, tuple[Path, Path]]:
    """``{"train": (json, images), "val": (json, images)}``; the shapes dataset when none is configured.

    The shapes are generated once per (size, counts, seed): a marker file records what is there.
    """
    d = cfg.data
    if d.train_json:
        out = {"train": (Path(d.train_json), Path(d.train_images or Path(d.train_json).parent))}
        if d.val_json:
            out["val"] = (Path(d.val_json), Path(d.val_images or Path(d.val_json).parent))
        return out
    root = Path(d.shapes_dir)
    key = f"{d.shapes_train} {d.shapes_val} {d.shapes_size} {d.shapes_min_radius} {d.shapes_max_radius} {d.shapes_seed}"
    key += " keypoints" if d.shapes_keypoints else ""
    marker = root / "GENERATED"
    if not marker.is_file() or marker.read_text() != key:
        write_shapes_dataset(root, d.shapes_train, d.shapes_val, (d.shapes_size, d.shapes_size),
                             min_radius=d.shapes_min_radius, max_radius=d.shapes_max_radius, seed=d.shapes_seed,
                             keypoints=d.shapes_keypoints)
        marker.write_text(key)
    return {"train": (root / "annotations" / "instances_train.json", root / "train"),
            "val": (root / "annotations" / "instances_val.json", root / "val")}


def build_train_dataset(cfg: Config, paths: dict) -> CocoDataset:
    d = cfg.data
    # only a keypoint model needs the categories to agree on one keypoint set
    return CocoDataset(*paths["train"], train=True, keep_empty=d.keep_empty_images, on_bad_sample=d.on_bad_sample,
                       mask_format=d.mask_format, flip_prob=d.flip_prob, min_keypoints=d.min_keypoints_per_image,
                       keypoints=cfg.model.keypoint_on, masks=cfg.model.mask_on,
                       keypoint_convention=cfg.model.keypoint_head.pixel_convention)


def build_val_dataset(cfg: Config, paths: dict, class_map: ClassMap) -> CocoDataset | None:
    if "val" not in paths:
        return None
    d = cfg.data
    val = CocoDataset(*paths["val"], class_map=class_map, train=False, on_bad_sample=d.on_bad_sample,
                      mask_format=d.mask_format, keypoint_convention=cfg.model.keypoint_head.pixel_convention,
                      masks=cfg.model.mask_on)
    val.require_ground_truth()  # before training, not after it
    return val
