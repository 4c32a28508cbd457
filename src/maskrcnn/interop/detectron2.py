"""Load detectron2 checkpoints: model-zoo ``model_final_*.pkl`` files and detectron2-trained ``.pth``.

A zoo ``.pkl`` is a pickle of ``{"model": {name: numpy array}, "__author__": ..., ...}`` (latin-1
strings, from Python 2 days). It is read by an unpickler that only admits numpy arrays, dtypes and
plain containers, so a file cannot run code while it loads. A ``.pth`` is read with
``torch.load(weights_only=True)``.

Names map one to one onto this package's modules (ResNet stages, ``fpn_lateral{2-5}`` ->
``fpn.lateral.{0-3}``, RPN head, box/mask/keypoint heads, cascade stages ``box_head.{k}`` /
``box_predictor.{k}``). Two layouts differ and are rearranged: detectron2 puts background *last*
in ``cls_score`` (we put it first) and has no background rows in class-specific box deltas and
mask predictors (we keep unused ones, as torchvision does). ``pixel_mean``/``pixel_std`` and
anchor buffers are not weights and are ignored; the input convention comes from the preset
(``detectron2_*``: BGR 0-255, stride in the 1x1 conv, detectron2's resize, pooler and paste, and
its keypoint pixel convention, so that its keypoint checkpoints are scored as detectron2 scores them).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from maskrcnn.interop.checkpoint import load_state_dict_checked, rename_by_rules

IGNORED = re.compile(r"^(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors|num_batches_tracked$")


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and builtin containers; refuses every other global (no code runs)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a detectron2 .pkl holds only arrays")


def read_detectron2_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The model weights of a detectron2 ``.pkl`` or ``.pth`` file, as tensors under detectron2's names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".pkl":
        with path.open("rb") as f:
            try:
                data = _ArraysOnly(f, encoding="latin1").load()
            except (pickle.UnpicklingError, EOFError, ValueError) as e:
                raise ValueError(f"{path}: not a detectron2 .pkl checkpoint: {e}") from None
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    state = data.get("model", data) if isinstance(data, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: expected a dict with a 'model' mapping of weights")
    out = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, Tensor):
            raise ValueError(f"{path}: weight {k!r} is a {type(v).__name__}, not an array")
        out[str(k)] = v
    return out


_RULES: list[tuple[str, str]] = [
    (r"^backbone\.bottom_up\.(stem|res\d)\.", r"backbone.body.\1."),
    (r"^proposal_generator\.rpn_head\.conv\.(weight|bias)$", r"rpn.head.convs.0.\1"),
    (r"^proposal_generator\.rpn_head\.conv\.conv(\d+)\.(weight|bias)$", r"rpn.head.convs.\1.\2"),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.", r"rpn.head.objectness."),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.", r"rpn.head.deltas."),
    (r"^roi_heads\.mask_head\.(deconv|predictor)\.", r"roi_heads.mask_head.\1."),
    (r"^roi_heads\.keypoint_head\.score_lowres\.", r"roi_heads.keypoint_head.score_lowres."),
    (r"^roi_heads\.box_predictor\.((\d+)\.)?(cls_score|bbox_pred)\.", r"roi_heads.box_predictor.\1\3."),
]


def _rename(key: str) -> str | None:
    m = re.match(r"^backbone\.fpn_(lateral|output)(\d)\.(.*)$", key)
    if m:
        return f"backbone.fpn.{m.group(1)}.{int(m.group(2)) - 2}.{m.group(3)}"
    m = re.match(r"^roi_heads\.box_head\.((\d+)\.)?(conv|fc)(\d+)\.(.*)$", key)
    if m:
        kind = "convs" if m.group(3) == "conv" else "fcs"
        return f"roi_heads.box_head.{m.group(1) or ''}{kind}.{int(m.group(4)) - 1}.{m.group(5)}"
    m = re.match(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(.*)$", key)
    if m:
        return f"roi_heads.mask_head.convs.{int(m.group(1)) - 1}.{m.group(2)}"
    m = re.match(r"^roi_heads\.keypoint_head\.conv_fcn(\d+)\.(.*)$", key)
    if m:
        return f"roi_heads.keypoint_head.convs.{int(m.group(1)) - 1}.{m.group(2)}"
    return rename_by_rules(key, _RULES)


def _background_first(key: str, v: Tensor, class_agnostic: bool) -> Tensor:
    """detectron2's class layouts -> ours (background first; unused background rows as zeros)."""
    if re.search(r"box_predictor\.(\d+\.)?cls_score\.", key):  # K + 1 rows, background last
        return torch.cat([v[-1:], v[:-1]])
    # class-specific deltas: 4K rows (cascade stages are always class-agnostic in detectron2)
    if re.search(r"box_predictor\.bbox_pred\.", key) and not class_agnostic:
        return torch.cat([v.new_zeros((4, *v.shape[1:])), v])
    if key.startswith("roi_heads.mask_head.predictor.") and v.shape[0] != 1:  # K masks
        return torch.cat([v.new_zeros((1, *v.shape[1:])), v])
    return v


def convert_detectron2_state_dict(state: Mapping[str, Tensor], class_agnostic: bool | None = None) -> dict[str, Tensor]:
    """detectron2 names and layouts -> this package's; raises ``KeyError`` listing unknown keys.

    ``class_agnostic``: whether the (non-cascade) box regressor has 4 outputs rather than 4 per class;
    None guesses from the shapes (ambiguous for one class: then it reads as class-agnostic).
    """
    if class_agnostic is None:
        cls, reg = state.get("roi_heads.box_predictor.cls_score.weight"), state.get("roi_heads.box_predictor.bbox_pred.weight")
        class_agnostic = cls is None or reg is None or reg.shape[0] != 4 * (cls.shape[0] - 1) or reg.shape[0] == 4
    out, unknown = {}, []
    for k, v in state.items():
        if IGNORED.search(k):
            continue
        new = _rename(k)
        if new is None:
            unknown.append(k)
            continue
        out[new] = _background_first(k, v, class_agnostic)
    if unknown:
        raise KeyError(f"not a detectron2 (Cascade/Keypoint) Mask R-CNN ResNet-FPN checkpoint: {len(unknown)} unknown "
                       f"keys, e.g. {unknown[:8]}")
    return out


PREDICTORS = re.compile(r"^roi_heads\.(box_predictor\.(\d+\.)?(cls_score|bbox_pred)|mask_head\.predictor)\.")


def load_detectron2(model: nn.Module, checkpoint: str | Path | Mapping[str, Tensor], reset_heads: bool = False
                    ) -> nn.Module:
    """Load a detectron2 checkpoint (path or state dict under detectron2's names) into ``model``,
    built from the matching ``detectron2_*`` preset.

    A mismatch is one error listing the keys. ``reset_heads``: fine-tune to other classes: the class
    predictors (box classifier and regressor, mask predictor) keep their fresh initialisation
    when their shapes differ from the checkpoint's; everything else must fit.
    """
    state = checkpoint if isinstance(checkpoint, Mapping) else read_detectron2_checkpoint(checkpoint)
    ours = model.state_dict()
    reg = ours.get("roi_heads.box_predictor.bbox_pred.weight")
    converted = convert_detectron2_state_dict(state, class_agnostic=reg is None or reg.shape[0] == 4)
    source = "state dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
    expected = None
    if reset_heads:
        reset = {k for k in converted if PREDICTORS.match(k) and k in ours and converted[k].shape != ours[k].shape}
        converted = {k: v for k, v in converted.items() if k not in reset}
        expected = set(ours) - reset
    load_state_dict_checked(model, converted, source=source[:200], expected=expected)
    return model
