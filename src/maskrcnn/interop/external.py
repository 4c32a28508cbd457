"""Checkpoints of other libraries, picked by file and preset: detectron2 (``.pkl``, or a ``.pth`` with a
``detectron2_*`` preset) or torchvision (other ``.pth``), converted in memory, with COCO's class map."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from maskrcnn.config import Config
from maskrcnn.interop.detectron2 import load_detectron2
from maskrcnn.interop.torchvision import coco_class_map, load_torchvision_detection
from maskrcnn.structures.class_map import ClassMap

FORMATS = ("auto", "torchvision", "detectron2")


def checkpoint_format(path: str | Path, config_name: str, fmt: str = "auto") -> str:
    """``"detectron2"`` or ``"torchvision"``: given, or from the file suffix and the preset's name."""
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    if Path(path).suffix == ".pkl" or Path(str(config_name)).name.startswith("detectron2_"):
        return "detectron2"
    return "torchvision"


def load_external(model: nn.Module, path: str | Path, cfg: Config, config_name: str, fmt: str = "auto",
                  reset_heads: bool = False) -> ClassMap:
    """Load ``path`` into ``model`` (built from ``cfg``); returns the class map of its COCO heads."""
    if checkpoint_format(path, config_name, fmt) == "detectron2":
        load_detectron2(model, path, reset_heads=reset_heads)
    else:
        load_torchvision_detection(model, path)
    return coco_class_map(cfg.model.roi_heads.num_classes)
