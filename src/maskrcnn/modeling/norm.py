"""Normalisation layers chosen by name in the config: FrozenBN, BN, SyncBN, GN, or none."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskrcnn.config.choices import NORMS



class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers, nothing trains).

    Detection fine-tunes with 1-2 images per GPU, far too few for batch statistics, so the
    ImageNet statistics are frozen (Mask R-CNN paper, section 3.1). ``eps`` is configurable
    because torchvision's v1 COCO weights were trained with eps = 0.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel affine map ``x * scale + shift`` this layer applies."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints of nn.BatchNorm2d carry a counter that a frozen layer has no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def make_norm(name: str, channels: int, eps: float = 1e-5, gn_groups: int = 32) -> nn.Module | None:
    """A normalisation layer for ``channels`` features, or None for ``name == ""``."""
    if name == "":
        return None
    if name == "FrozenBN":
        return FrozenBatchNorm2d(channels, eps)
    if name == "BN":
        return nn.BatchNorm2d(channels, eps=eps)
    if name == "SyncBN":
        return nn.SyncBatchNorm(channels, eps=eps)
    if name == "GN":
        return nn.GroupNorm(gn_groups, channels, eps=eps)
    raise ValueError(f"unknown norm {name!r}; expected one of {NORMS}")
