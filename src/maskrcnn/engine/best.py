"""The best evaluation of a training run by one metric (``train.best_metric``), and early stopping.

Evaluations arrive as the flat records of ``metrics.jsonl`` (``segm/AP``, ``val/total_loss``, ...).
APs are better higher, losses lower. An evaluation counts as better only by more than ``min_delta``;
after ``patience`` evaluations in a row that are not, training should stop (0: never). On resume the
state is rebuilt from the records already in the log, so an interrupted run stops where an
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from maskrcnn.config import Config

LOSS_KEY = "val/total_loss"


def tracked_key(cfg: Config) -> str | None:
    """The ``metrics.jsonl`` key that ``train.best_metric`` names, or None for ``none``."""
    choice = cfg.train.best_metric
    if choice == "none":
        return None
    if choice == "val_loss":
        return LOSS_KEY
    if choice == "auto":
        return "segm/AP" if cfg.model.mask_on else "keypoints/AP" if cfg.model.keypoint_on else "bbox/AP"
    return choice


class BestMetric:
    def __init__(self, key: str, patience: int = 0, min_delta: float = 0.0) -> None:
        self.key, self.patience, self.min_delta = key, patience, min_delta
        self.lower_is_better = key.endswith("loss")
        self.best: float | None = None
        self.best_iteration: int | None = None
        self.stale = 0  # evaluations since the last better one

    def update(self, record: dict) -> bool:
        """Take an evaluation record; True when it is the best so far (then keep its checkpoint)."""
        value = record.get(self.key)
        if value is None or not math.isfinite(value) or value < 0 and not self.lower_is_better:
            return False  # not measured (pycocotools' -1: no ground truth of that kind)
        better = self.best is None or (self.best - value if self.lower_is_better else value - self.best) > self.min_delta
        if better:
            self.best, self.best_iteration, self.stale = value, int(record["iteration"]), 0
        else:
            self.stale += 1
        return better

    def replay(self, records: Iterable[dict]) -> None:
        """Rebuild the state from the log of a resumed run."""
        for r in records:
            if self.key in r:
                self.update(r)

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def describe(self) -> str:
        return f"{self.key} {self.best:.4f} at iteration {self.best_iteration}" if self.best is not None else \
            f"{self.key}: not measured yet"
