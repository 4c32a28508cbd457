"""Feature Pyramid Network (Lin et al. 2017): P2-P5 from res2-res5, P6 by stride-2 subsampling of P5."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maskrcnn.modeling.conv import ConvNorm, autograd_records
from maskrcnn.modeling.norm import make_norm


def add_upsampled(lateral: Tensor, coarse: Tensor) -> Tensor:
    """``lateral + nearest-upsampled coarse``. When autograd does not record it and the sizes are exactly
    2x (inputs padded to a multiple of 32), the sum is written into ``lateral`` with ``coarse``
    broadcast over 2x2 blocks, the same values as ``interpolate``'s (pixel i takes i // 2) without
    materialising the upsampled map: at P2 of an 800-px image those are 55 MB tensors (this and the
    add took ~9 ms per level on 2 AMD EPYC cores)."""
    n, c, h, w = lateral.shape
    # graph capture first: under export the sizes are symbols, and comparing them would specialise them
    if not torch.compiler.is_compiling() and not autograd_records(lateral, coarse) and coarse.dtype == lateral.dtype \
            and (h, w) == (2 * coarse.shape[2], 2 * coarse.shape[3]) and coarse.shape[:2] == (n, c):
        lateral.view(n, c, h // 2, 2, w // 2, 2).add_(coarse[:, :, :, None, :, None])
        return lateral
    return lateral + F.interpolate(coarse, size=(h, w), mode="nearest")


class FPN(nn.Module):
    """Top-down pathway with lateral 1x1 and output 3x3 convs.

    ``forward`` takes the bottom-up features (finest first) and returns ``[P2, ..., P5, P6]``.
    P6 is P5 subsampled with stride 2 (a kernel-1 max pool), used by the RPN only; the
    top-down upsampling is nearest-neighbour to the lateral's exact size, which equals 2x
    because inputs are padded to a multiple of 32.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, norm: str = "", norm_eps: float = 1e-5,
                 top_block: bool = True) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(
            ConvNorm(c, out_channels, 1, norm=make_norm(norm, out_channels, norm_eps)) for c in in_channels)
        self.output = nn.ModuleList(
            ConvNorm(out_channels, out_channels, 3, 1, 1, norm=make_norm(norm, out_channels, norm_eps))
            for _ in in_channels)
        self.top_block = top_block
        self.out_channels = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # "a=1" keeps the output variance of the linear (no ReLU) convs of the pyramid
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        inner = self.lateral[-1](features[-1])
        results = [self.output[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            inner = add_upsampled(self.lateral[i](features[i]), inner)
            results.insert(0, self.output[i](inner))
        if self.top_block:
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results

