"""Load torchvision checkpoints: the detection models and the ImageNet classification trunks.

Supported state dicts (a path to a ``.pth`` file or an already loaded dict; nothing is downloaded):

- ``maskrcnn_resnet50_fpn`` (v1), with the key names of torchvision >= 0.8 and the older ones
  (``fpn.inner_blocks.0.weight``, ``rpn.head.conv.weight``, ``mask_head.mask_fcn1.weight``);
- ``maskrcnn_resnet50_fpn_v2``; ``fasterrcnn_resnet50_fpn`` and ``fasterrcnn_resnet50_fpn_v2``;
- ``keypointrcnn_resnet50_fpn`` (person, 17 keypoints);
- ImageNet ``resnet*`` / ``resnext*`` classification weights as a backbone initialisation.

Use the matching preset (``torchvision_maskrcnn_resnet50_fpn`` ...). torchvision's released v1
COCO weights were trained with frozen-BN eps 0, so ``model.backbone.norm_eps=0`` for them.
Layouts already agree (background is class 0 in both), so conversion is renaming only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from maskrcnn.interop.checkpoint import load_state_dict_checked, read_state_dict, rename_by_rules
from maskrcnn.structures.class_map import ClassMap
from maskrcnn.structures.keypoints import COCO_PERSON_KEYPOINTS, COCO_PERSON_SKELETON

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"

# COCO 2017 category ids and names; torchvision's 91-way heads keep a slot for every id 1..90,
# the ten ids COCO never used included ("N/A").
COCO_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck", 9: "boat",
    10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat",
    18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife",
    50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot",
    58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard",
    77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def coco_class_map(num_classes: int = 90) -> ClassMap:
    """The class map of COCO-trained heads: 90 slots (torchvision: label k is COCO category id k),
    80 (detectron2: the 80 used ids in order), or 1 (the person of the keypoint models, with COCO's
    17 keypoints and skeleton)."""
    if num_classes == 1:
        return ClassMap([1], ["person"], COCO_PERSON_KEYPOINTS, COCO_PERSON_SKELETON)
    if num_classes == 80:  # detectron2's (and most libraries') contiguous labels of COCO's 80 categories
        return ClassMap(list(COCO_NAMES), list(COCO_NAMES.values()))
    ids = list(range(1, num_classes + 1))
    return ClassMap(ids, [COCO_NAMES.get(i, "N/A") if num_classes == 90 else str(i) for i in ids])


def _rename_trunk_key(key: str, src: str, dst: str, stage_dst: Mapping[int, str] | None = None) -> str | None:
    """One torchvision ResNet key -> ours, or None if it is not a trunk key."""
    m = re.match(rf"^{re.escape(src)}conv1\.weight$", key)
    if m:
        return f"{dst}stem.conv1.weight"
    m = re.match(rf"^{re.escape(src)}bn1\.{_BN}$", key)
    if m:
        return f"{dst}stem.conv1.norm.{m.group(1)}"
    m = re.match(rf"^{re.escape(src)}layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(\w+)$", key)
    if not m:
        return None
    layer, block, part, leaf = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    stage = (stage_dst or {}).get(layer, f"{dst}res{layer + 1}.")
    if part.startswith("conv"):
        return f"{stage}{block}.{part}.{leaf}"
    if part.startswith("bn"):
        return f"{stage}{block}.conv{part[2:]}.norm.{leaf}"
    if part == "downsample.0":
        return f"{stage}{block}.shortcut.{leaf}"
    return f"{stage}{block}.shortcut.norm.{leaf}"


def _rename_detection_key(key: str, num_box_convs: int) -> str | None:
    """One torchvision detection-model key -> ours (None: not a key we know)."""
    if key.startswith("backbone.body."):
        return _rename_trunk_key(key, "backbone.body.", "backbone.body.")
    rules: list[tuple[str, str]] = [
        # FPN: new layout (Conv2dNormActivation: .0 conv, .1 norm) and the pre-0.8 one (bare conv)
        (r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.(weight|bias)$", r"backbone.fpn.lateral.\1.\2"),
        (rf"^backbone\.fpn\.inner_blocks\.(\d+)\.1\.{_BN}$", r"backbone.fpn.lateral.\1.norm.\2"),
        (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(weight|bias)$", r"backbone.fpn.lateral.\1.\2"),
        (r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.(weight|bias)$", r"backbone.fpn.output.\1.\2"),
        (rf"^backbone\.fpn\.layer_blocks\.(\d+)\.1\.{_BN}$", r"backbone.fpn.output.\1.norm.\2"),
        (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(weight|bias)$", r"backbone.fpn.output.\1.\2"),
        # RPN
        (r"^rpn\.head\.conv\.(\d+)\.0\.(weight|bias)$", r"rpn.head.convs.\1.\2"),
        (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.convs.0.\1"),
        (r"^rpn\.head\.cls_logits\.(weight|bias)$", r"rpn.head.objectness.\1"),
        (r"^rpn\.head\.bbox_pred\.(weight|bias)$", r"rpn.head.deltas.\1"),
        # box head: TwoMLPHead (v1) or FastRCNNConvFCHead (v2)
        (r"^roi_heads\.box_head\.fc6\.(weight|bias)$", r"roi_heads.box_head.fcs.0.\1"),
        (r"^roi_heads\.box_head\.fc7\.(weight|bias)$", r"roi_heads.box_head.fcs.1.\1"),
        (r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", r"roi_heads.box_predictor.\1.\2"),
        # mask head
        (r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$", r"roi_heads.mask_head.convs.\1.\2"),
        (rf"^roi_heads\.mask_head\.(\d+)\.1\.{_BN}$", r"roi_heads.mask_head.convs.\1.norm.\2"),
        (r"^roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)$", r"roi_heads.mask_head.deconv.\1"),
        (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)$", r"roi_heads.mask_head.predictor.\1"),
        # keypoint head (conv, ReLU, conv, ReLU, ...) and predictor
        (r"^roi_heads\.keypoint_predictor\.kps_score_lowres\.(weight|bias)$", r"roi_heads.keypoint_head.score_lowres.\1"),
    ]
    renamed = rename_by_rules(key, rules)
    if renamed is not None:
        return renamed
    m = re.match(r"^roi_heads\.keypoint_head\.(\d+)\.(weight|bias)$", key)
    if m and int(m.group(1)) % 2 == 0:
        return f"roi_heads.keypoint_head.convs.{int(m.group(1)) // 2}.{m.group(2)}"
    m = re.match(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$", key)
    if m:
        return f"roi_heads.mask_head.convs.{int(m.group(1)) - 1}.{m.group(2)}"
    m = re.match(rf"^roi_heads\.box_head\.(\d+)\.(0|1)\.{_BN}$", key)
    if m and int(m.group(1)) < num_box_convs:
        leaf = m.group(3)
        return f"roi_heads.box_head.convs.{m.group(1)}.{leaf}" if m.group(2) == "0" \
            else f"roi_heads.box_head.convs.{m.group(1)}.norm.{leaf}"
    m = re.match(r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$", key)
    if m and int(m.group(1)) > num_box_convs:  # after the Flatten: Linear, ReLU, Linear, ...
        return f"roi_heads.box_head.fcs.{(int(m.group(1)) - num_box_convs - 1) // 2}.{m.group(2)}"
    return None


def convert_detection_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision Mask/Faster/Keypoint R-CNN state dict -> this package's key layout.

    Raises ``KeyError`` listing any key it does not recognise.
    """
    num_box_convs = len({k.split(".")[2] for k in state if re.match(r"^roi_heads\.box_head\.\d+\.0\.weight$", k)})
    out, unknown = {}, []
    for k, v in state.items():
        new = _rename_detection_key(k, num_box_convs)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise KeyError(f"not a torchvision Mask/Faster/Keypoint R-CNN (ResNet-FPN) checkpoint: {len(unknown)} unknown keys, "
                       f"e.g. {unknown[:8]}")
    return out


def load_torchvision_detection(model: nn.Module, checkpoint: str | Path | Mapping[str, Tensor]) -> nn.Module:
    """Load a torchvision detection checkpoint into ``model`` (built from the matching preset)."""
    state = read_state_dict(checkpoint)
    load_state_dict_checked(model, convert_detection_state_dict(state), source=str(checkpoint)[:200]
                            if not isinstance(checkpoint, Mapping) else "state dict")
    return model


def load_imagenet_backbone(model: nn.Module, checkpoint: str | Path | Mapping[str, Tensor]) -> nn.Module:
    """Initialise the trunk of ``model`` from a torchvision ImageNet ResNet/ResNeXt classification state dict.

    ``fc.*`` is dropped; for the C4 architecture ``layer4`` goes to the res5 box head.
    """
    state = read_state_dict(checkpoint)
    ours = model.state_dict()
    c4 = "roi_heads.box_head.0.conv1.weight" in ours
    stage_dst = {4: "roi_heads.box_head."} if c4 else None
    out, unknown = {}, []
    for k, v in state.items():
        if k.startswith("fc."):
            continue
        new = _rename_trunk_key(k, "", "backbone.body.", stage_dst)
        if new is None:
            unknown.append(k)
        elif new in ours or new.endswith("num_batches_tracked"):
            out[new] = v
        else:
            unknown.append(k)
    if unknown:
        raise KeyError(f"not a torchvision ResNet/ResNeXt classification checkpoint for this backbone: "
                       f"{len(unknown)} unexpected keys, e.g. {unknown[:8]}")
    trunk = {k for k in ours if k.startswith("backbone.body.") or (c4 and k.startswith("roi_heads.box_head."))}
    load_state_dict_checked(model, out, source="ImageNet backbone", expected=trunk)
    return model
