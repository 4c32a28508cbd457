"""Preparing a built model that will only predict (``Predictor``, ``maskrcnn eval``/``predict``).

Three things a forward pass would otherwise redo every time, done once: frozen batch norms folded
into their convolutions (``ConvNorm.fold_frozen_norm``); when ``model.precision`` is bf16 or fp16,
the weights of the layers that autocast runs in that type stored in it, so autocast does not cast
them again at every call (casting is exact and the same either way, so outputs do not change; the
tests check that they are identical); and the box head's first FC kept as a convolution kernel in
the feature maps' memory format (``FastRCNNConvFCHead.cache_fc1_as_conv``), so that it is not
reordered at every call. Training needs none of them: it learns the unfolded parameters in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from maskrcnn.modeling.conv import ConvNorm
from maskrcnn.modeling.detector import MaskRCNN
from maskrcnn.modeling.roi_heads.box_head import FastRCNNConvFCHead
from maskrcnn.structures.precision import LOW_PRECISION_DTYPES

# the layers whose weights autocast casts to its low-precision type (its "lower precision" op list)
_AUTOCAST_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def prepare_for_inference(model: MaskRCNN) -> MaskRCNN:
    """Fold frozen norms and, for ``model.precision`` bf16/fp16, store layer weights in that type.

    In place; returns ``model`` in eval mode. Not for a model that will train again.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, ConvNorm):
            module.fold_frozen_norm()
    low = LOW_PRECISION_DTYPES.get(model.precision)
    if low is not None:
        for module in model.modules():
            if isinstance(module, _AUTOCAST_LAYERS):
                # the layer's own weight and bias only: a ConvNorm's norm (a child module) runs
                # outside autocast's list and keeps its float32 statistics
                for name in ("weight", "bias"):
                    param = getattr(module, name)
                    if param is not None:
                        setattr(module, name, nn.Parameter(param.detach().to(low), requires_grad=param.requires_grad))
    layout = torch.channels_last if model.channels_last else torch.contiguous_format
    for module in model.modules():
        if isinstance(module, FastRCNNConvFCHead):
            module.cache_fc1_as_conv(layout)
    return model
