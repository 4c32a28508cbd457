"""Checkpoints of other libraries, picked by file and preset: detectron2 (``.pkl``, or a ``.pth`` with a
``detectron2_*`` preset) or torchvision (other ``.pth``), converted in memory, with the class map given
(``--classes``) or, for heads of COCO's layouts, COCO's."""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from maskrcnn.config import Config
from maskrcnn.interop.checkpoint import TORCH_ZIP, CheckpointError, file_head, read_state_dict, read_torch_file
from maskrcnn.interop.detectron2 import load_detectron2, read_detectron2_checkpoint
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


def external_class_map(cfg: Config, classes: ClassMap | None = None) -> ClassMap:
    """The class map of a foreign checkpoint for the model of ``cfg``: ``classes`` (fitted to the model's
    class count, else an error giving both counts), COCO's for the heads of COCO's layouts (80: detectron2,
    90: torchvision, 1 with 17 keypoints: person), else placeholder names ``"1".."K"``."""
    num_classes = cfg.model.roi_heads.num_classes
    coco_person = cfg.model.keypoint_on and cfg.model.keypoint_head.num_keypoints == 17
    if classes is not None:
        classes = classes.fit(num_classes, "--classes")
        if coco_person and not classes.keypoint_names:  # a list of names says nothing of keypoints
            person = coco_class_map(1)
            classes = ClassMap(classes.ids, classes.names, person.keypoint_names, person.skeleton)
        return classes
    if num_classes in (80, 90) or (num_classes == 1 and coco_person):
        return coco_class_map(num_classes)
    return ClassMap.placeholder(num_classes)


# the leading key names that give away whose checkpoint a file is (for the error when it is not the expected one)
_KEY_SIGNS = {
    "detectron2": ("backbone.bottom_up.", "backbone.fpn_lateral", "proposal_generator."),
    "torchvision": ("backbone.body.layer", "backbone.fpn.inner_blocks.", "rpn.head.cls_logits."),
    "maskrcnn": ("backbone.body.stem.", "backbone.body.res2.", "backbone.fpn.lateral."),
    "imagenet": ("layer1.", "fc.weight"),
}
_HINTS = {
    "detectron2": "its keys are detectron2's: use --from detectron2 or a detectron2_* --config",
    "torchvision": "its keys are torchvision's: use --from torchvision or a torchvision_* --config",
    "maskrcnn": "its keys are this package's own: a maskrcnn checkpoint needs no conversion (use it as --weights "
                "or train.init_weights)",
    "imagenet": "it is an ImageNet classification trunk: use it as model.backbone.weights to train from",
}


def _whose_keys(path: Path) -> str | None:
    try:
        raw = read_torch_file(path)
    except (CheckpointError, OSError):
        return None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    keys = [str(k) for k in raw] if isinstance(raw, dict) else []
    return next((who for who, signs in _KEY_SIGNS.items() if any(k.startswith(signs) for k in keys)), None)


def _load_weights(model: nn.Module, path: Path, fmt: str, reset_heads: bool) -> None:
    """Read ``path`` as ``fmt`` into ``model``; a file of another kind is a ``CheckpointError`` naming
    the file, what was expected and, when the key names tell, what it is instead."""
    try:
        if fmt == "torchvision":
            load_torchvision_detection(model, path)
            return
        if path.suffix == ".pkl" and not file_head(path).startswith(TORCH_ZIP):
            state = read_detectron2_checkpoint(path)  # the arrays-only unpickler of zoo .pkl files
        else:  # a detectron2-trained .pth: read safely here, where every way of failing has a message
            state = read_state_dict(path)
        try:
            load_detectron2(model, state, reset_heads=reset_heads)
        except ValueError as e:  # does not fit the model: the message lists the keys; add the file
            raise CheckpointError(f"{path}: {e}") from None
    except KeyError as e:  # the converters name the keys they do not know: the file is not fmt's
        whose = _whose_keys(path)
        hint = f"; {_HINTS[whose]}" if whose and whose != fmt else ""
        raise CheckpointError(f"{path}: {e.args[0] if e.args else e}{hint}") from None


def load_external(model: nn.Module, path: str | Path, cfg: Config, config_name: str, fmt: str = "auto",
                  reset_heads: bool = False, classes: ClassMap | None = None) -> ClassMap:
    """Load ``path`` into ``model`` (built from ``cfg``); returns its class map (see
    :func:`external_class_map`; ``classes`` are checked before the weights are read)."""
    class_map = external_class_map(cfg, classes)
    _load_weights(model, Path(path), checkpoint_format(path, config_name, fmt), reset_heads)
    if classes is None and class_map.is_placeholder:
        # a warning, not an error: the weights are right and useful without names (predict shows the
        # labels; fine-tuning resets the heads anyway), while eval compares names with the dataset's
        # and refuses these, so placeholders can never be scored silently as the wrong classes
        warnings.warn(f"{path}: {class_map.num_classes} classes is not a COCO layout and no --classes was given: "
                      f"using placeholder names 1..{class_map.num_classes}; eval needs the real ones (pass "
                      f"--classes with the training set's COCO JSON or a list of names)", stacklevel=2)
    return class_map
