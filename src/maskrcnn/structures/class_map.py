"""Dataset category ids <-> the model's contiguous labels, with class names.

The model predicts labels ``1..K`` (0 is background); datasets use arbitrary category ids (COCO's
run 1..90 with gaps). A :class:`ClassMap` is the one place that maps between them: categories
sorted by id get labels 1..K. It travels inside every checkpoint and turns predictions back into
the dataset's ids and names, so a model never reports a class under the wrong id (the source of
many "AP = 0" reports). Keypoint datasets add their keypoint names and skeleton (from the
categories' ``keypoints`` and ``skeleton``), which decide the flip and what is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence


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
    def from_categories(cls, categories: Sequence[dict]) -> ClassMap:
        """From COCO ``categories``; keypoint names and skeleton from those that have ``keypoints``
        (they must agree: one model predicts one set of keypoints)."""
        with_kp = [c for c in categories if c.get("keypoints")]
        kp_names = list(with_kp[0]["keypoints"]) if with_kp else []
        for c in with_kp:
            if list(c["keypoints"]) != kp_names:
                raise ValueError(f"categories {with_kp[0].get('name')!r} and {c.get('name')!r} have different "
                                 f"keypoints; one model predicts one keypoint set")
        skeleton = with_kp[0].get("skeleton") or [] if with_kp else []
        return cls([c["id"] for c in categories], [c.get("name", str(c["id"])) for c in categories], kp_names,
                   skeleton)

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
