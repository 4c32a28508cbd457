"""Dataset category ids <-> the model's contiguous labels, with class names.

The model predicts labels ``1..K`` (0 is background); datasets use arbitrary category ids (COCO's
run 1..90 with gaps). A :class:`ClassMap` is the one place that maps between them: categories
sorted by id get labels 1..K. It travels inside every checkpoint and turns predictions back into
the dataset's ids and names, so a model never reports a class under the wrong id (the source of
many "AP = 0" reports). Keypoint datasets add their keypoint names and skeleton (from the
categories' ``keypoints`` and ``skeleton``), which decide the flip and what is drawn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


class ClassMap:
    """Dataset category ids <-> contiguous labels ``1..K`` (0 is background), with names."""

    def __init__(self, ids: Sequence[int], names: Sequence[str], keypoint_names: Sequence[str] = (),
                 skeleton: Sequence[Sequence[int]] = ()) -> None:
        if len(ids) != len(names) or len(set(ids)) != len(ids):
            raise ValueError(f"class map needs unique ids with one name each, got ids {list(ids)}")
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        self.ids = [int(ids[i]) for i in order]
        self.names = [str(names[i]) for i in order]
        self._label = {cid: k + 1 for k, cid in enumerate(self.ids)}
        self.keypoint_names = [str(n) for n in keypoint_names]
        # pairs of 1-based keypoint indices, as COCO writes them
        self.skeleton = [(int(a), int(b)) for a, b in skeleton]
        bad = [p for p in self.skeleton if not all(1 <= v <= len(self.keypoint_names) for v in p)]
        if bad:
            raise ValueError(f"skeleton pairs {bad[:3]} refer to keypoints outside 1..{len(self.keypoint_names)}")

    @classmethod
    def from_categories(cls, categories: Sequence[dict], keypoints: bool = True) -> ClassMap:
        """From COCO ``categories``; keypoint names and skeleton from those that have ``keypoints``.

        Those lists must agree when ``keypoints`` (the model predicts keypoints: one head, one
        set). A model without a keypoint head has no use for them: if they disagree, the map is
        made without keypoints instead of refusing the categories (the caller says so to the user).
        """
        ids, names = [c["id"] for c in categories], [c.get("name", str(c["id"])) for c in categories]
        with_kp = [c for c in categories if c.get("keypoints")]
        kp_names = list(with_kp[0]["keypoints"]) if with_kp else []
        for c in with_kp:
            if list(c["keypoints"]) != kp_names:
                if not keypoints:
                    return cls(ids, names)
                raise ValueError(f"categories {with_kp[0].get('name')!r} and {c.get('name')!r} have different "
                                 f"keypoints; one model predicts one keypoint set")
        skeleton = with_kp[0].get("skeleton") or [] if with_kp else []
        return cls(ids, names, kp_names, skeleton)

    @classmethod
    def placeholder(cls, num_classes: int) -> ClassMap:
        """Ids ``1..K`` named ``"1".."K"``: for weights whose classes nobody has named yet."""
        return cls(list(range(1, num_classes + 1)), [str(i) for i in range(1, num_classes + 1)])

    @property
    def is_placeholder(self) -> bool:
        return self.names == [str(i) for i in self.ids]

    @classmethod
    def from_file(cls, path: str | Path, keypoints: bool = True) -> ClassMap:
        """The classes in ``path`` (the ``--classes`` option):

        - a COCO JSON (a dict with ``categories``): their ids and names, labels by sorted id, as
          detectron2's ``register_coco_instances`` numbers them;
        - a JSON or YAML list of names (ids ``1..K`` in order; a leading ``__background__``, as in
          torchvision's examples, is dropped) or of ``{"id", "name"}`` categories;
        - a text file (any other suffix) with one name per line.
        """
        import yaml

        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"the class file {path} is a folder: give the file")
        if not path.is_file():
            raise FileNotFoundError(f"class file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            elif path.suffix.lower() in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            else:
                data = [line.strip() for line in text.splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: cannot read the classes: not UTF-8 text ({e.reason} at byte {e.start}); "
                             f"save it as UTF-8") from None
        except (ValueError, yaml.YAMLError) as e:  # (a YAML error is no ValueError)
            raise ValueError(f"{path}: cannot read the classes: {' '.join(str(e).split())}") from None
        if isinstance(data, dict) and "categories" in data:
            data = data["categories"]
        if not isinstance(data, list) or not data:
            raise ValueError(f"{path}: expected a COCO JSON with 'categories', or a non-empty list of class names")
        try:
            if all(isinstance(c, dict) for c in data):
                return cls.from_categories(data, keypoints=keypoints)
            if not all(isinstance(c, str) for c in data):
                raise ValueError("a list of classes must hold only names or only {id, name} categories")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad classes: {e}") from None
        if data[0].strip().lower() in ("__background__", "background"):
            data = data[1:]
        repeated = sorted({n for n in data if data.count(n) > 1})
        if repeated:  # a name twice would label two outputs alike: one of them is surely a mistake
            raise ValueError(f"{path}: class names repeated: {', '.join(repeated)}")
        return cls(list(range(1, len(data) + 1)), data)

    def fit(self, num_classes: int, source: str = "the class map") -> ClassMap:
        """This map for a model with ``num_classes`` outputs: as it is when the counts agree, or
        with one slot per id ``1..max id`` (unused ones named "N/A") when the model has exactly that
        many, as torchvision's COCO heads have (and torchvision users who train with label =
        category id); anything else is an error giving both counts."""
        if self.num_classes == num_classes:
            return self
        if self.ids[0] >= 1 and self.ids[-1] == num_classes:
            names = dict(zip(self.ids, self.names))
            return ClassMap(list(range(1, num_classes + 1)), [names.get(i, "N/A") for i in range(1, num_classes + 1)],
                            self.keypoint_names, self.skeleton)
        raise ValueError(f"{source} has {self.num_classes} classes (ids {_short(self.ids)}) but the model has "
                         f"{num_classes}")

    @classmethod
    def from_dict(cls, d: dict) -> ClassMap:
        return cls(d["ids"], d["names"], d.get("keypoint_names", ()), d.get("skeleton", ()))

    def to_dict(self) -> dict:
        out: dict = {"ids": list(self.ids), "names": list(self.names)}
        if self.keypoint_names:
            out["keypoint_names"] = list(self.keypoint_names)
            out["skeleton"] = [list(p) for p in self.skeleton]
        return out

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def label(self, category_id: int) -> int:
        return self._label[int(category_id)]

    def category_id(self, label: int) -> int:
        return self.ids[int(label) - 1]

    def name(self, label: int) -> str:
        return self.names[int(label) - 1]

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._label

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ClassMap) and self.ids == other.ids and self.names == other.names
                and self.keypoint_names == other.keypoint_names)

    def __repr__(self) -> str:
        return f"ClassMap({dict(zip(self.ids, self.names))})"


def _short(items: Sequence, n: int = 30) -> str:
    return str(list(items[:n]))[:-1] + (f", ... ({len(items)} in all)]" if len(items) > n else "]")


def describe(class_map: ClassMap, n: int = 30) -> str:
    """``{id: name, ...}`` of the first ``n`` classes (an 80-class map on one line stays readable)."""
    items = [f"{i}: {name!r}" for i, name in zip(class_map.ids, class_map.names)]
    return "{" + ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "") + "}"


def _same_name(a: str, b: str) -> bool:
    # case and spacing never make a different class ("Person", "traffic  light "), while any other
    # difference may (cat/dog; "tv"/"tvmonitor" is the user's to confirm with --classes)
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def class_map_mismatch(model: ClassMap, dataset: ClassMap) -> str | None:
    """Why scoring ``model``'s predictions against ``dataset``'s categories would be wrong, or None.

    Fine: the same ids with the same names (compared ignoring case and spacing), and a dataset
    with fewer categories than the model (a COCO model on a person-only set: COCOeval scores only
    the dataset's categories, so detections of the others are left out). Wrong: a dataset id the
    model has another name for (it would be scored as that class), or one the model lacks (its
    objects could only be missed).
    """
    renamed = [(i, model.names[model.ids.index(i)], name) for i, name in zip(dataset.ids, dataset.names)
               if i in model and not _same_name(model.names[model.ids.index(i)], name)]
    missing = [i for i in dataset.ids if i not in model]
    if not renamed and not missing:
        return None
    lines = ["the checkpoint's classes do not match the dataset's categories:"]
    if renamed:
        pairs = ", ".join(f"{i}: {a!r} (checkpoint) vs {b!r} (dataset)" for i, a, b in renamed[:10])
        lines.append(f"  {len(renamed)} ids name other classes: {pairs}" + (" ..." if len(renamed) > 10 else ""))
    if missing:
        lines.append(f"  {len(missing)} dataset ids are not in the checkpoint: {_short(missing)}")
    lines += [f"  checkpoint: {describe(model)}", f"  dataset:    {describe(dataset)}"]
    if model.is_placeholder:
        lines.append("  the checkpoint's names are placeholders (it was converted without its classes)")
    elif renamed and all(any(_same_name(b, a) for a in model.names) for _, _, b in renamed):
        lines.append("  the same names under other ids: the dataset numbers its categories differently (relabel "
                     "its category ids rather than the checkpoint's classes)")
    return "\n".join(lines)
