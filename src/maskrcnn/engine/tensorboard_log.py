"""TensorBoard event files beside ``metrics.jsonl`` (``train.tensorboard``), so that
``tensorboard --logdir <output_dir>`` shows a run while it trains.

The same records as ``metrics.jsonl``: the training losses, learning rate and timings under
``train/``, each evaluation's COCO metrics under their own names (``segm/AP`` ...) and the
validation losses under ``val/``; at each evaluation a few validation images with the model's
detections drawn (score >= 0.5), under ``predictions/``. The ``tensorboard`` package is an
optional extra: ``auto`` writes events when it is installed, ``always`` requires it, ``never``
writes none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maskrcnn._extras import MissingExtra

TENSORBOARD_EXTRA = "pip install 'maskrcnn[tensorboard]'"
OVERLAY_SCORE = 0.5


def _summary_writer(mode: str):
    """``SummaryWriter`` if events are to be written (``always``, or ``auto`` with tensorboard installed)."""
    if mode == "never":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's module imports the tensorboard package
        if mode == "auto":
            return None
        raise MissingExtra(f"train.tensorboard=always needs the 'tensorboard' package, which is not installed: "
                           f"{TENSORBOARD_EXTRA}") from e
    return SummaryWriter


class TensorBoardLog:
    def __init__(self, output_dir: Path, mode: str, enabled: bool = True, purge_step: int | None = None) -> None:
        writer_class = _summary_writer(mode) if enabled else None
        # purge_step: a resumed run drops the events after the iteration it resumes from, as metrics.jsonl does
        self.writer = writer_class(str(output_dir), purge_step=purge_step) if writer_class else None

    @property
    def active(self) -> bool:
        return self.writer is not None

    def write(self, record: dict) -> None:
        """One ``metrics.jsonl`` record: training scalars under ``train/``, evaluation metrics as named."""
        if self.writer is None:
            return
        step = int(record["iteration"])
        for key, value in record.items():
            if key == "iteration" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            self.writer.add_scalar(key if "/" in key else f"train/{key}", float(value), step)
        self.writer.flush()

    def overlays(self, model: nn.Module, dataset, iteration: int, count: int = 3) -> None:
        """The first ``count`` readable validation images with the model's detections drawn."""
        if self.writer is None or count <= 0:
            return
        from maskrcnn.visualize import draw_instances

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        shown = 0
        try:
            for index in range(len(dataset)):
                image, _ = dataset[index]
                if image is None:
                    continue
                with torch.no_grad():
                    out = model([image.to(device)])[0]
                keep = out["scores"] >= OVERLAY_SCORE
                labels = out["labels"][keep].tolist()
                names: Sequence[str] = [dataset.class_map.name(v) for v in labels]
                drawn = draw_instances(image, out["boxes"][keep], labels, names, out["scores"][keep].tolist(),
                                       out["masks"][keep] if "masks" in out else None,
                                       keypoints=out["keypoints"][keep] if "keypoints" in out else None,
                                       skeleton=dataset.class_map.skeleton)
                array = torch.from_numpy(np.asarray(drawn).copy()).permute(2, 0, 1)
                self.writer.add_image(f"predictions/{shown}", array, iteration)
                shown += 1
                if shown == count:
                    break
        finally:
            model.train(was_training)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
