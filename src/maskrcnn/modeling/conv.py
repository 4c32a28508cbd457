"""A convolution with an optional normalisation and ReLU, the unit every backbone and head is made of."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maskrcnn.modeling.norm import FrozenBatchNorm2d


class ConvNorm(nn.Conv2d):
    """``Conv2d`` followed by ``self.norm`` (if any) and a ReLU (if ``relu``).

    The norm lives inside the conv module (``conv.norm.weight``) so that one name addresses both;
    a conv followed by a norm needs no bias, so ``bias`` defaults to "only without norm".

    A frozen batch norm is an affine map per output channel, so it is folded into the conv's
    weight and bias on the fly: one pass over the output instead of two (the fold costs a
    multiply over the weights, which are far smaller than the feature maps).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool | None = None, norm: nn.Module | None = None,
                 relu: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=norm is None if bias is None else bias)
        self.norm = norm
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm, FrozenBatchNorm2d):
            scale, shift = self.norm.scale_and_shift()
            weight = self.weight * scale.to(self.weight.dtype).reshape(-1, 1, 1, 1)
            bias = shift.to(self.weight.dtype) if self.bias is None else shift + self.bias * scale
            x = self._conv_forward(x, weight, bias)
        else:
            x = super().forward(x)
            if self.norm is not None:
                x = self.norm(x)
        return F.relu_(x) if self.relu else x

    @torch.no_grad()
    def fold_frozen_norm(self) -> None:
        """Fold a frozen batch norm into the weight and bias for good, with the arithmetic of
        ``forward``'s fold (so outputs stay bit-identical), for a model that will only predict:
        the fold then costs nothing per call. The norm's buffers leave the state dict."""
        if not isinstance(self.norm, FrozenBatchNorm2d):
            return
        scale, shift = self.norm.scale_and_shift()
        weight = self.weight * scale.to(self.weight.dtype).reshape(-1, 1, 1, 1)
        bias = shift.to(self.weight.dtype) if self.bias is None else shift + self.bias * scale
        self.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=self.weight.requires_grad)
        self.norm = None
