"""COCO-format instance datasets: reading, validating, and mapping category ids to model labels.

Category ids are mapped to the model's labels 1..K by a :class:`ClassMap` built from the file's
categories (or given, for a validation set: the training set's).

Validation happens when the JSON is read. A problem that concerns one annotation or image (an
unknown image or category id, a box with no area or outside its image, a polygon with fewer than
three points or no area, an RLE of the wrong size, a missing image file) is either skipped and
recorded in ``dataset.report`` (``on_bad_sample="skip"``) or raised (``"error"``), with the file
and the annotation id. A problem with the file itself (unreadable, not JSON, no images) is
always an error.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from maskrcnn.data.transforms import BadImageError, hflip, load_image
from maskrcnn.structures.class_map import ClassMap
from maskrcnn.structures.keypoints import keypoint_flip_map
from maskrcnn.structures.masks import PolygonMasks, decode_rle

__all__ = ["KEYPOINT_OFFSETS", "ClassMap", "CocoDataset", "DatasetError", "ImageRecord", "keypoint_offset",
           "polygon_self_intersects"]

# what the model's keypoint coordinates are, given the pixel index of a keypoint file, per library
# (``model.keypoint_head.pixel_convention``; the facts and their sources are in KeypointHeadConfig)
KEYPOINT_OFFSETS = {"torchvision": 0.0, "detectron2": 0.5}


def keypoint_offset(convention: str) -> float:
    """Model coordinate minus file coordinate of a labelled keypoint under ``convention``."""
    if convention not in KEYPOINT_OFFSETS:
        raise ValueError(f"keypoint pixel convention must be one of {list(KEYPOINT_OFFSETS)}, got {convention!r}")
    return KEYPOINT_OFFSETS[convention]


# the list of skipped annotations/images that train and eval leave in their output folder
SKIPPED_FILE = "skipped_samples.txt"


def write_skipped(datasets: Sequence[CocoDataset | None], out_dir: Path) -> None:
    """One line per skipped annotation/image of ``datasets`` (prefixed by its file) in ``out_dir``; none if none."""
    files = {d.json_path: d for d in reversed(datasets) if d is not None}  # one file for train and val: once
    lines = [f"{path}: {r}" for path, d in reversed(files.items()) for r in d.report]
    if lines:
        (Path(out_dir) / SKIPPED_FILE).write_text("\n".join(lines) + "\n")


class DatasetError(ValueError):
    """A dataset that cannot be used, with the reason."""


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    height: int
    width: int
    boxes: list[list[float]] = field(default_factory=list)  # XYXY, clipped to the image
    labels: list[int] = field(default_factory=list)
    segmentations: list = field(default_factory=list)  # polygons (list of rings) or RLE dicts
    crowd_boxes: list[list[float]] = field(default_factory=list)
    keypoints: list[list[float]] = field(default_factory=list)  # (x, y, v) * K per instance, keypoint datasets


def _polygon_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def polygon_self_intersects(ring: np.ndarray) -> bool:
    """Whether two non-adjacent edges of the closed polygon ``ring: (V, 2)`` cross."""
    a, b = ring, np.roll(ring, -1, axis=0)
    n = len(ring)
    if n < 4:
        return False

    def orient(p, q, r):
        return np.sign((q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0]))

    i, j = np.triu_indices(n, k=2)
    keep = ~((i == 0) & (j == n - 1))  # the first and last edges share a vertex
    i, j = i[keep], j[keep]
    o1 = orient(a[i], b[i], a[j])
    o2 = orient(a[i], b[i], b[j])
    o3 = orient(a[j], b[j], a[i])
    o4 = orient(a[j], b[j], b[i])
    return bool(((o1 * o2 < 0) & (o3 * o4 < 0)).any())


class CocoDataset(Dataset):
    """Images and instance annotations of a COCO ``instances_*.json``.

    Args:
        json_path, image_dir: the annotation file and the folder its ``file_name`` values are in.
        class_map: map category ids to labels; default: all categories of this file (pass the
            training set's map when reading a validation set, so labels agree).
        train: enables the random flip (``flip_prob``) and drops images without annotations
            unless ``keep_empty``.
        on_bad_sample: ``"skip"`` (record in ``report``) or ``"error"``.
        mask_format: ``"polygon"`` keeps polygons (rasterised at target resolution by the model);
            images with RLE masks, or ``"bitmap"``, give ``(G, H, W)`` uint8 bitmaps.
        flip_map: keypoint index permutation for the flip; default: left/right swapped by the
            keypoint names of the class map (COCO's ``left_eye`` <-> ``right_eye`` ...).
        min_keypoints: in training, leave out images with fewer labelled keypoints (keypoint datasets).
        keypoints: whether the model predicts keypoints. Only then must the categories agree on one
            keypoint set; otherwise disagreeing sets are ignored (with a warning) and the dataset
            has no keypoints.
        masks: whether the model predicts masks. Only then is an annotation without a usable
            segmentation left out; otherwise (a box-only dataset for Faster R-CNN) its box stands
            in for the mask that nothing reads.
        keypoint_convention: ``"torchvision"`` (targets hold the file's x, y) or ``"detectron2"``
            (labelled keypoints shifted by +0.5 px); see :data:`KEYPOINT_OFFSETS`.

    Keypoint datasets are those whose categories list ``keypoints``: every instance then has K
    keypoints (an annotation without them: all unlabelled), and a malformed ``keypoints`` list is a
    bad annotation.

    ``dataset[i]`` or ``dataset[(i, seed)]`` -> ``(image (3, H, W) uint8, target)``; the target has
    ``boxes``, ``labels``, ``masks``, ``crowd_boxes``, ``image_id``, ``keypoints (G, K, 3)`` for
    keypoint datasets and, given one, the ``seed`` that decides the flip and the model's sampling.
    """

    def __init__(self, json_path: str | Path, image_dir: str | Path, class_map: ClassMap | None = None,
                 train: bool = False, keep_empty: bool = True, on_bad_sample: str = "skip",
                 mask_format: str = "polygon", flip_prob: float = 0.5, flip_map: Sequence[int] | None = None,
                 min_keypoints: int = 0, keypoints: bool = True, keypoint_convention: str = "torchvision",
                 masks: bool = True) -> None:
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
        self.keypoint_offset = keypoint_offset(keypoint_convention)
        self.keypoint_convention = keypoint_convention
        self.json_path, self.image_dir = Path(json_path), Path(image_dir)
        self.train, self.on_bad_sample, self.mask_format = train, on_bad_sample, mask_format
        self.flip_prob, self.flip_map, self.masks = flip_prob, flip_map, masks
        self.report: list[str] = []  # what was skipped, and notes on what was kept ("(kept")
        self._kept_notes = 0
        # by position in the file's annotation list: the annotations left out, those whose box stands
        # for an unusable segmentation, and those with only some of their polygon rings usable, so
        # that evaluation scores against what training saw (evaluation_ground_truth)
        self._left_out: set[int] = set()
        self._as_box: set[int] = set()
        self._kept_rings: dict[int, list] = {}
        self._unreadable: dict[int, str] = {}  # records whose image failed to load in training (this process)
        data = self._read_json()
        stat = self.json_path.stat()
        self._read_stamp = (stat.st_mtime_ns, stat.st_size)
        self.num_annotations = len(data.get("annotations") or [])
        if train and not data.get("annotations"):
            raise DatasetError(f"{self.json_path}: no annotations ('annotations' is missing or empty): a training "
                               f"set has nothing to learn from without them")
        try:
            self.class_map = class_map or ClassMap.from_categories(data["categories"], keypoints=keypoints)
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{self.json_path}: bad categories: {e}") from None
        declared = any(c.get("keypoints") for c in data["categories"])
        if class_map is None and declared and not self.class_map.keypoint_names:
            warnings.warn(f"{self.json_path}: the categories declare different keypoint sets; ignored, since the "
                          f"model predicts no keypoints", stacklevel=2)
        self.num_keypoints = len(self.class_map.keypoint_names)
        if self.flip_map is None and self.num_keypoints:
            self.flip_map = keypoint_flip_map(self.class_map.keypoint_names)
        self.records = self._parse(data, keep_empty or not train)
        if train and not any(r.boxes for r in self.records):
            raise DatasetError(f"{self.json_path}: none of its {len(data['annotations'])} annotations can be "
                               f"trained on ({self._why_no_objects()})")
        if train and min_keypoints > 0 and self.num_keypoints:
            self.records = [r for r in self.records
                            if sum(v > 0 for kp in r.keypoints for v in kp[2::3]) >= min_keypoints]
        if not self.records:
            raise DatasetError(f"{self.json_path}: no usable images"
                               + (f" ({len(self.report)} problems: {self.report[:3]})" if self.report else ""))
        if self.report:
            skipped = len(self.report) - self._kept_notes
            kept = f", kept {self._kept_notes} with a note" if self._kept_notes else ""
            warnings.warn(f"{self.json_path}: skipped {skipped} bad annotations/images{kept}, e.g. "
                          f"{self.report[:3]} (train and eval list all of them in {SKIPPED_FILE} in their output folder; "
                          f"in Python: dataset.report)", stacklevel=2)

    def _why_no_objects(self) -> str:
        crowds = sum(len(r.crowd_boxes) for r in self.records)
        problems = len(self.report) - self._kept_notes
        if not problems:
            return "all are crowd regions" if crowds else "none is an object"
        return (f"{crowds} crowd regions, " if crowds else "") + f"{problems} problems: {self.report[:3]}"

    def _note(self, msg: str) -> None:
        """Something kept as it was, or in a reading of ours, worth telling (not a skip)."""
        self.report.append(msg)
        self._kept_notes += 1

    # -- reading -------------------------------------------------------------------------------------
    def _read_json(self) -> dict:
        if not self.json_path.is_file():
            raise DatasetError(f"annotation file not found: {self.json_path}")
        try:
            data = json.loads(self.json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{self.json_path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{self.json_path}: expected a JSON object with images/annotations/categories")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{self.json_path}: missing or malformed '{key}' list")
        if not isinstance(data.get("annotations", []), list):
            raise DatasetError(f"{self.json_path}: 'annotations' must be a list")
        if not data["categories"]:
            raise DatasetError(f"{self.json_path}: no categories")
        for c in data["categories"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int):
                raise DatasetError(f"{self.json_path}: every category needs an integer 'id', got {c!r}")
        return data

    def _bad(self, msg: str) -> None:
        if self.on_bad_sample == "error":
            raise DatasetError(f"{self.json_path}: {msg}")
        self.report.append(msg)

    def _parse(self, data: dict, keep_empty: bool) -> list[ImageRecord]:
        records: dict[int, ImageRecord] = {}
        self._all_image_ids = {im.get("id") for im in data["images"] if isinstance(im, dict)}
        duplicated = self._duplicate_image_ids(data)
        for im in data["images"]:
            try:
                rec = ImageRecord(int(im["id"]), self.image_dir / str(im["file_name"]), int(im["height"]),
                                  int(im["width"]))
            except (KeyError, TypeError, ValueError):
                self._bad(f"image entry {im!r} needs id, file_name, height and width")
                continue
            if rec.image_id in duplicated:
                continue
            if rec.height <= 0 or rec.width <= 0:
                self._bad(f"image {rec.image_id} has size {rec.width}x{rec.height}")
                continue
            if not rec.path.is_file():
                self._bad(f"image {rec.image_id}: file not found: {rec.path}")
                continue
            records[rec.image_id] = rec
        for index, ann in enumerate(data.get("annotations", [])):
            if not self._add_annotation(ann, records, index):
                self._left_out.add(index)
        return [r for r in records.values() if keep_empty or r.boxes]

    def _duplicate_image_ids(self, data: dict) -> set[int]:
        """Ids that more than one image entry uses, each reported.

        Annotations name only the image id, so those of a shared id cannot be attributed to either
        image: all the images and annotations of that id are left out, rather than trained on the
        wrong picture or silently replaced by the last entry.
        """
        files: dict[int, list[str]] = {}
        for im in data["images"]:
            try:
                files.setdefault(int(im["id"]), []).append(str(im.get("file_name")))
            except (KeyError, TypeError, ValueError):
                pass  # reported when the entry is read
        duplicated = {i for i, names in files.items() if len(names) > 1}
        for i in sorted(duplicated):
            n_ann = sum(1 for a in data.get("annotations", []) if isinstance(a, dict) and a.get("image_id") == i)
            self._bad(f"image id {i} is used by {len(files[i])} images {files[i]}: all left out with the {n_ann} "
                      f"annotations of that id, which cannot be attributed to one of them")
        return duplicated

    def _add_annotation(self, ann: dict, records: dict[int, ImageRecord], index: int) -> bool:
        """Add the ``index``-th annotation of the file to its image's record; False if it is left out."""
        if not isinstance(ann, dict):
            self._bad(f"annotation {ann!r} is not an object")
            return False
        aid = ann.get("id", "?")
        rec = records.get(ann.get("image_id"))  # type: ignore[arg-type]
        if rec is None:
            if ann.get("image_id") not in self._all_image_ids:
                self._bad(f"annotation {aid}: unknown image_id {ann.get('image_id')!r}")
            return False  # (its image was skipped and reported already)
        if ann.get("category_id") not in self.class_map:
            self._bad(f"annotation {aid}: unknown category_id {ann.get('category_id')!r}")
            return False
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            self._bad(f"annotation {aid}: 'bbox' must be [x, y, width, height], got {ann.get('bbox')!r}")
            return False
        if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            self._bad(f"annotation {aid}: box {[x, y, w, h]} has no area or is not finite")
            return False
        box = [max(x, 0.0), max(y, 0.0), min(x + w, float(rec.width)), min(y + h, float(rec.height))]
        if box[2] <= box[0] or box[3] <= box[1]:
            self._bad(f"annotation {aid}: box {[x, y, w, h]} lies outside its {rec.width}x{rec.height} image (the "
                      f"size its image entry gives: are width and height swapped?)")
            return False
        seg, problem = self._segmentation(ann, rec)
        crowd = bool(ann.get("iscrowd", 0))
        if problem is not None and (crowd or not self.masks):
            # training uses a crowd region's box only, and a box-only model no mask at all; where
            # masks are evaluated, such a region (box-only, an RLE of another size) is scored as its box
            if self.masks or ann.get("segmentation") is not None:  # (box-only data for a box-only model: silent)
                self._note(f"annotation {aid}: {'crowd region' if crowd else 'object'} with {problem} (kept: its box "
                           f"stands for it)")
            self._as_box.add(index)
            seg = [[box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]]
        elif problem is not None:
            self._bad(f"annotation {aid}: {problem}")
            return False
        elif isinstance(seg, list) and len(seg) != len(ann["segmentation"]):
            self._kept_rings[index] = seg  # some rings unusable: evaluation sees the ones trained on
        if crowd:
            rec.crowd_boxes.append(box)
            return True
        if self.num_keypoints:
            kp = self._keypoints(ann)
            if kp is None:
                return False
            rec.keypoints.append(kp)
        rec.boxes.append(box)
        rec.labels.append(self.class_map.label(ann["category_id"]))
        rec.segmentations.append(seg)
        return True

    def _keypoints(self, ann: dict) -> list[float] | None:
        k = self.num_keypoints
        raw = ann.get("keypoints")
        if raw is None:
            return [0.0] * (3 * k)
        try:
            arr = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            arr = np.zeros(0)
        if arr.size != 3 * k or not np.isfinite(arr).all() or not np.isin(arr[2::3], (0, 1, 2)).all():
            self._bad(f"annotation {ann.get('id', '?')}: 'keypoints' must be {k} finite (x, y, v) triples with v in "
                      f"0/1/2, got {str(raw)[:80]}")
            return None
        return arr.tolist()

    def _segmentation(self, ann: dict, rec: ImageRecord) -> tuple[object | None, str | None]:
        """The annotation's usable segmentation (RLE or polygon rings), or what is wrong with it."""
        aid = ann.get("id", "?")
        seg = ann.get("segmentation")
        if isinstance(seg, dict):
            if list(seg.get("size") or []) != [rec.height, rec.width] or "counts" not in seg:
                return None, f"RLE size {seg.get('size')} does not match its image ({rec.height}, {rec.width})"
            return seg, None
        if not isinstance(seg, list) or not seg:
            return None, "missing segmentation"
        rings = []
        for ring in seg:
            try:
                arr = np.asarray(ring, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                arr = np.zeros(0)
            if arr.size < 6 or arr.size % 2 or not np.isfinite(arr).all():
                continue
            pts = arr.reshape(-1, 2)
            crossing = polygon_self_intersects(pts)
            # (a self-intersecting ring's signed area can cancel to 0 although it covers pixels)
            if np.ptp(pts[:, 0]) <= 0 or np.ptp(pts[:, 1]) <= 0 or (_polygon_area(pts) <= 0 and not crossing):
                continue
            if crossing:
                # rasterised with the even-odd rule by pycocotools and by us alike: kept, but reported
                self._note(f"annotation {aid}: self-intersecting polygon (kept, even-odd fill)")
            rings.append(arr.tolist())
        if not rings:
            return None, "no polygon with 3 or more points and a non-zero area"
        return rings, None

    def evaluation_ground_truth(self) -> dict:
        """The annotation file as COCO evaluation should score against it: without the annotations this
        dataset left out (those of its own are in ``report``; those of skipped images go with them),
        a region whose segmentation could not be used given its box as one, polygons reduced to the
        rings trained on, ``iscrowd``/``area`` filled in where missing (training reads them so), and
        annotation ids made unique and positive where they are not (pycocotools indexes by id, so a
        repeated id replaced the other annotation, and it treats id 0 as "no match")."""
        data = self._read_json()
        stat = self.json_path.stat()
        if (stat.st_mtime_ns, stat.st_size) != self._read_stamp:
            raise DatasetError(f"{self.json_path} changed since it was read: restart to evaluate against it")
        anns = []
        for index, ann in enumerate(data.get("annotations", [])):
            if index in self._left_out:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            ann = dict(ann, iscrowd=ann.get("iscrowd", 0), area=ann.get("area", w * h))
            if index in self._as_box:
                ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            elif index in self._kept_rings:
                ann["segmentation"] = self._kept_rings[index]
            anns.append(ann)
        ids = [a.get("id") for a in anns]
        if any(type(i) is not int or i <= 0 for i in ids) or len(set(ids)) != len(ids):
            anns = [dict(a, id=k + 1) for k, a in enumerate(anns)]
        return dict(data, annotations=anns)

    # -- access --------------------------------------------------------------------------------------
    def require_ground_truth(self) -> None:
        """Evaluation scores against the annotations: a file without any would print AP -100 for nothing."""
        if not self.num_annotations:
            raise DatasetError(f"{self.json_path}: no annotations to score against ('annotations' is missing or "
                               f"empty); `maskrcnn predict` runs a model on images without ground truth")
        if not any(r.boxes for r in self.records):  # COCO AP is undefined (-100, nan) without one object
            raise DatasetError(f"{self.json_path}: no object to score against among its {self.num_annotations} "
                               f"annotations ({self._why_no_objects()})")

    def __len__(self) -> int:
        return len(self.records)

    def aspect_wide(self) -> list[bool]:
        """Per image: wider than tall (for aspect-ratio grouping)."""
        return [r.width >= r.height for r in self.records]

    def target(self, index: int) -> dict:
        rec = self.records[index]
        n = len(rec.boxes)
        target = {"boxes": torch.tensor(rec.boxes, dtype=torch.float32).reshape(n, 4),
                  "labels": torch.tensor(rec.labels, dtype=torch.int64),
                  "crowd_boxes": torch.tensor(rec.crowd_boxes, dtype=torch.float32).reshape(-1, 4),
                  "image_id": rec.image_id}
        if self.num_keypoints:
            kp = torch.tensor(rec.keypoints, dtype=torch.float32).reshape(n, self.num_keypoints, 3)
            # unlabelled keypoints keep COCO's (0, 0), as detectron2's transform_keypoint_annotations resets them
            kp[..., :2] += torch.where(kp[..., 2:] > 0, self.keypoint_offset, 0.0)
            target["keypoints"] = kp
        polygons = all(isinstance(s, list) for s in rec.segmentations)
        if n and polygons and self.mask_format == "polygon":
            target["masks"] = PolygonMasks.from_coco(rec.segmentations)
        else:
            target["masks"] = self._bitmaps(rec)
        return target

    @staticmethod
    def _bitmaps(rec: ImageRecord) -> Tensor:
        from pycocotools import mask as mask_utils

        rles = []
        for s in rec.segmentations:
            if isinstance(s, list):
                rles.append(mask_utils.merge(mask_utils.frPyObjects(s, rec.height, rec.width)))
            else:
                rles.append(s)
        return decode_rle(rles, rec.height, rec.width) if rles else torch.zeros((0, rec.height, rec.width),
                                                                                dtype=torch.uint8)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor | None, dict]:
        """An unreadable image (``on_bad_sample="skip"``): in training, the next readable one instead
        (batches stay full); otherwise ``(None, {"image_id", "skipped": reason})``, because a stand-in
        would be scored twice under another image's id; the evaluation reports and leaves it out."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            if i in self._unreadable:  # (training only) told once, not read again
                continue
            rec = self.records[i]
            try:
                image = load_image(rec.path, (rec.height, rec.width))
            except BadImageError as e:
                if self.on_bad_sample == "error":
                    raise
                if not self.train:
                    return None, {"image_id": rec.image_id, "skipped": str(e)}
                self._unreadable[i] = str(e)
                if 2 * len(self._unreadable) > len(self.records):
                    # a file wrong throughout (width and height swapped, another folder's images) would
                    # otherwise train on the few images left, with a line for each of the others
                    raise DatasetError(f"{self.json_path}: {len(self._unreadable)} of its {len(self.records)} images "
                                       f"cannot be used, e.g. {list(self._unreadable.values())[:2]}: check the "
                                       "image folder and the image entries' width and height") from None
                warnings.warn(f"{e}; using the next image instead", stacklevel=2)
                continue
            target = self.target(i)
            if seed is not None:
                target["seed"] = int(seed)
                if self.train and np.random.default_rng(seed).random() < self.flip_prob:
                    image, target = hflip(image, target, self.flip_map)
            return image, target
        raise DatasetError(f"{self.json_path}: none of the images could be read")
