"""Dataset category ids <-> the model's contiguous labels, with class names.

The model predicts labels ``1..K`` (0 is background); datasets use arbitrary category ids (COCO's
run 1..90 with gaps). A :class:`ClassMap` is the one place that maps between them: categories
sorted by id get labels 1..K. It travels inside every checkpoint and turns predictions back into
the dataset's ids and names, so a model never reports a class under the wrong id (the source of
many "AP = 0" reports).
"""

from __future__ import annotations

from collections.abc import Sequence


class ClassMap:
    """Dataset category ids <-> contiguous labels ``1..K`` (0 is background), with names."""

    def __init__(self, ids: Sequence[int], names: Sequence[str]) -> None:
        if len(ids) != len(names) or len(set(ids)) != len(ids):
            raise ValueError(f"class map needs unique ids with one name each, got ids {list(ids)}")
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        self.ids = [int(ids[i]) for i in order]
        self.names = [str(names[i]) for i in order]
        self._label = {cid: k + 1 for k, cid in enumerate(self.ids)}

    @classmethod
    def from_categories(cls, categories: Sequence[dict]) -> ClassMap:
        return cls([c["id"] for c in categories], [c.get("name", str(c["id"])) for c in categories])

    @classmethod
    def from_dict(cls, d: dict) -> ClassMap:
        return cls(d["ids"], d["names"])

    def to_dict(self) -> dict:
        return {"ids": list(self.ids), "names": list(self.names)}

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
        return isinstance(other, ClassMap) and self.ids == other.ids and self.names == other.names

    def __repr__(self) -> str:
        return f"ClassMap({dict(zip(self.ids, self.names))})"
