"""Other annotation formats to COCO instances JSON (``maskrcnn convert-data``): labelme, YOLO
segmentation and Pascal VOC. The result is checked by the same loader as any COCO file (``CocoDataset``).

- **labelme**: a folder of ``*.json`` files, one per image (``imagePath``, ``imageHeight``,
  ``imageWidth``, ``shapes``). ``polygon`` shapes are instances; ``rectangle`` and ``circle``
  shapes become polygons; shapes with the same ``group_id`` and label are one instance of several
  parts; ``line``, ``linestrip`` and ``point`` shapes cannot be instances and are reported.
- **YOLO segmentation**: ``images/`` and ``labels/`` (one ``.txt`` per image, a line per instance:
  ``class x1 y1 x2 y2 ...``, coordinates normalised to 0-1, class 0-based) and the class names
  (a ``data.yaml`` with ``names``, or ``--classes``); ``images/train``, ``images/val``: one split
  per JSON (``split``). A detection line (``class cx cy w h``) becomes a rectangle polygon, and
  coordinates outside 0-1 are clipped: both noted.

- **Pascal VOC** with instance masks: ``Annotations/*.xml`` (boxes, class names, ``difficult``),
  ``SegmentationObject/*.png`` (pixel value k = the k-th object of the XML, 255 = the uncertain
  border, 0 = background) and ``JPEGImages/``; ``ImageSets/Segmentation/<split>.txt`` picks the
  images when a split is given. An image without a ``SegmentationObject`` mask is left out (counted):
  VOC annotates masks for its segmentation subset only. ``difficult`` objects become crowd regions,
  which training and COCO's evaluation ignore, as VOC's own evaluation ignores them.

Classes: by name, ids 1..K in the order given (``--classes``, YOLO's names, VOC's 20 classes in
their usual order when every name is one of them), else sorted names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CIRCLE_POINTS = 32


class ImportProblems(list):
    """What could not be converted, a line each (reported, not fatal); ``notes``: what was converted
    with a change (a box taken as its rectangle, coordinates clipped to the image)."""

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []


def _polygon_area(flat: Sequence[float]) -> float:
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


def _coco(images: list[dict], instances: list[tuple[int, str, list[list[float]]]], names: list[str]) -> dict:
    """COCO instances from ``(image id, class name, polygons)``; ``names`` gives the ids (1..K)."""
    ids = {n: i + 1 for i, n in enumerate(names)}
    annotations = []
    for image_id, name, polygons in instances:
        flat = [v for p in polygons for v in p]
        x0, y0 = min(flat[0::2]), min(flat[1::2])
        x1, y1 = max(flat[0::2]), max(flat[1::2])
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[name],
                            "segmentation": polygons, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": sum(_polygon_area(p) for p in polygons), "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": ids[n], "name": n} for n in names]}


def _shape_polygon(shape: dict) -> list[float] | None:
    points = shape.get("points") or []
    kind = shape.get("shape_type") or "polygon"
    if kind == "polygon" and len(points) >= 3:
        return [float(v) for p in points for v in p[:2]]
    if kind == "rectangle" and len(points) == 2:
        (xa, ya), (xb, yb) = points
        x0, x1, y0, y1 = min(xa, xb), max(xa, xb), min(ya, yb), max(ya, yb)
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    if kind == "circle" and len(points) == 2:  # centre and a point on the circle
        (cx, cy), (px, py) = points
        r = math.hypot(px - cx, py - cy)
        return [v for k in range(CIRCLE_POINTS) for v in (cx + r * math.cos(2 * math.pi * k / CIRCLE_POINTS),
                                                          cy + r * math.sin(2 * math.pi * k / CIRCLE_POINTS))]
    return None


def from_labelme(folder: str | Path, names: Sequence[str] | None = None) -> tuple[dict, ImportProblems]:
    """COCO instances of a folder of labelme files; image ``file_name`` relative to ``folder``."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no labelme .json files in {folder}")
    problems = ImportProblems()
    images, instances = [], []
    for f in files:
        try:
            data = json.loads(f.read_text())
            shapes, image_path = data["shapes"], data["imagePath"]
            height, width = int(data["imageHeight"]), int(data["imageWidth"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{f.name}: not a labelme file ({type(e).__name__}: {e})")
            continue
        image_id = len(images) + 1
        # labelme's imagePath is relative to its JSON file, which is in ``folder``
        images.append({"id": image_id, "file_name": str(image_path).replace("\\", "/"), "height": height,
                       "width": width})
        groups: dict[tuple, list[list[float]]] = {}
        for k, shape in enumerate(shapes):
            polygon = _shape_polygon(shape)
            label = shape.get("label")
            if not label:
                problems.append(f"{f.name}: shape {k} has no label")
                continue
            if polygon is None:
                problems.append(f"{f.name}: shape {k} ({shape.get('shape_type') or 'polygon'}, "
                                f"{len(shape.get('points') or [])} points, label {label!r}) is not an instance outline")
                continue
            group = shape.get("group_id")
            key = (label, group) if group is not None else (label, f"shape{k}")
            groups.setdefault(key, []).append(polygon)
        instances += [(image_id, label, polygons) for (label, _), polygons in groups.items()]
    if not images:
        raise ValueError(f"none of the {len(files)} .json files in {folder} is a labelme file: {problems[0]}")
    names = list(names) if names else sorted({name for _, name, _ in instances})
    unknown = sorted({name for _, name, _ in instances} - set(names))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes given ({names})")
    return _coco(images, instances, names), problems


def _yolo_names(root: Path, names: Sequence[str] | None) -> list[str]:
    if names:
        return list(names)
    import yaml

    for candidate in (root / "data.yaml", root / "dataset.yaml"):
        if candidate.is_file():
            got = (yaml.safe_load(candidate.read_text()) or {}).get("names")
            if isinstance(got, dict):  # {0: person, 1: bicycle}
                return [str(got[k]) for k in sorted(got)]
            if isinstance(got, list):
                return [str(n) for n in got]
    raise FileNotFoundError(f"no class names for {root}: give --classes, or a data.yaml with 'names' in it")


def from_yolo(root: str | Path, names: Sequence[str] | None = None, split: str | None = None
              ) -> tuple[dict, ImportProblems]:
    """COCO instances of a YOLO segmentation dataset ``root/images[/split]``, ``root/labels[/split]``."""
    root = Path(root)
    image_dir, label_dir = root / "images", root / "labels"
    if split:
        image_dir, label_dir = image_dir / split, label_dir / split
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise FileNotFoundError(f"a YOLO dataset has {image_dir} and {label_dir}; one of them is missing")
    splits = sorted(d.name for d in image_dir.iterdir() if d.is_dir() and d.name in ("train", "val", "valid", "test"))
    if not split and splits:  # one JSON of train and val together would leak validation images into training
        raise ValueError(f"{image_dir} holds the splits {splits}: convert each into its own JSON with --split "
                         f"{splits[0]} (and --split {splits[-1]}, ...)")
    classes = _yolo_names(root, names)
    problems = ImportProblems()
    coco_images, instances = [], []
    for path in sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as im:
                width, height = im.size
        except OSError as e:
            problems.append(f"{path.name}: unreadable image ({e})")
            continue
        image_id = len(coco_images) + 1
        coco_images.append({"id": image_id, "file_name": str(path.relative_to(image_dir)), "height": height,
                            "width": width})
        label_file = label_dir / path.relative_to(image_dir).with_suffix(".txt")
        if not label_file.is_file():
            continue  # an image without objects
        for n, line in enumerate(label_file.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                values = [float(v) for v in parts[1:]]
                cls = int(float(parts[0])) if float(parts[0]).is_integer() else -1  # "0.0" is written by some tools
            except ValueError:
                problems.append(f"{label_file.name}:{n}: not numbers: {line.strip()!r}")
                continue
            if not 0 <= cls < len(classes):
                problems.append(f"{label_file.name}:{n}: class {parts[0]} is not one of 0..{len(classes) - 1}")
                continue
            if len(values) == 4:  # a detection line: the box is all there is
                cx, cy, w, h = values
                values = [cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cx - w / 2, cy + h / 2]
                problems.notes.append(f"{label_file.name}:{n}: a box, not a polygon: its rectangle is the mask")
            if len(values) < 6 or len(values) % 2:
                problems.append(f"{label_file.name}:{n}: {len(values)} coordinates, not a polygon")
                continue
            if min(values) < 0 or max(values) > 1:
                problems.notes.append(f"{label_file.name}:{n}: coordinates outside 0-1 clipped to the image")
                values = [min(max(v, 0.0), 1.0) for v in values]
            polygon = [v * (width if k % 2 == 0 else height) for k, v in enumerate(values)]
            instances.append((image_id, classes[cls], [polygon]))
    if not coco_images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    return _coco(coco_images, instances, classes), problems


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def from_voc(root: str | Path, split: str | None = None, names: Sequence[str] | None = None
             ) -> tuple[dict, ImportProblems]:
    """COCO instances (RLE masks) of a Pascal VOC tree with ``SegmentationObject`` masks;
    ``file_name`` relative to ``root/JPEGImages``."""
    import xml.etree.ElementTree as ET

    import numpy as np
    from pycocotools import mask as mask_utils

    root = Path(root)
    if not (root / "Annotations").is_dir():
        raise FileNotFoundError(f"{root / 'Annotations'}: no such folder (a VOC tree has Annotations/, JPEGImages/, "
                                "SegmentationObject/)")
    if split:
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing}: no such split file")
        stems = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    else:
        stems = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    problems = ImportProblems()
    images, annotations, no_masks = [], [], 0
    found: set[str] = set()
    for stem in stems:
        mask_file = root / "SegmentationObject" / f"{stem}.png"
        if not mask_file.is_file():
            no_masks += 1
            continue
        try:
            tree = ET.parse(root / "Annotations" / f"{stem}.xml").getroot()
            objects = [(o.findtext("name", "").strip(), o.findtext("difficult", "0").strip() == "1")
                       for o in tree.findall("object")]
            file_name = tree.findtext("filename") or f"{stem}.jpg"
            with Image.open(mask_file) as im:
                index = np.array(im)  # a palette image: the values are the object numbers
        except (OSError, ET.ParseError) as e:
            problems.append(f"{stem}: unreadable ({type(e).__name__}: {e})")
            continue
        height, width = index.shape[:2]
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "height": int(height), "width": int(width)})
        for k, (name, difficult) in enumerate(objects, start=1):
            m = np.asfortranarray((index == k).astype(np.uint8))
            if not m.any():
                problems.append(f"{stem}: object {k} ({name}) has no pixels in {mask_file.name}")
                continue
            rle = mask_utils.encode(m)
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            found.add(name)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_name": name,
                                "segmentation": {"size": [int(height), int(width)],
                                                 "counts": rle["counts"].decode("ascii")},
                                "bbox": [x, y, w, h], "area": float(mask_utils.area(rle)), "iscrowd": int(difficult)})
    if no_masks:
        problems.append(f"{no_masks} of {len(stems)} images have no SegmentationObject mask and were left out")
    if not images:
        raise FileNotFoundError(f"no image of {root} has a SegmentationObject mask")
    names = list(names) if names else list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)
    unknown = sorted(found - set(names))
    if unknown:
        raise ValueError(f"classes {unknown} are not among the classes given ({names})")
    ids = {n: i + 1 for i, n in enumerate(names)}
    for a in annotations:
        a["category_id"] = ids[a.pop("category_name")]
    return {"images": images, "annotations": annotations,
            "categories": [{"id": ids[n], "name": n} for n in names]}, problems
