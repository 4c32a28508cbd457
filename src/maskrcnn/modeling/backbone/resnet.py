"""ResNet and ResNeXt (He et al. 2016; Xie et al. 2017) as detection backbones.

Stages are named ``res2``..``res5`` (strides 4..32) as in the Mask R-CNN paper; block names are
``conv1``/``conv2``/``conv3``/``shortcut`` with the norm inside each conv (``res2.0.conv1.norm``).

``stride_in_1x1`` puts a stage's stride in the first 1x1 conv of its first block (the original
MSRA ResNet, whose weights detectron2 and Detectron ship) rather than in the 3x3 conv (the
"ResNet v1.5" of torchvision's ImageNet weights). Loading a checkpoint with the other choice
gives wrong features without any error, so it is a config field and not a guess.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from maskrcnn.modeling.conv import ConvNorm
from maskrcnn.modeling.norm import FrozenBatchNorm2d, make_norm

# (blocks per stage res2..res5, bottleneck?) for each depth
DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
STAGES = ("res2", "res3", "res4", "res5")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, eps: float, **_unused) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_channels, out_channels, 3, stride, 1, norm=make_norm(norm, out_channels, eps), relu=True)
        self.conv2 = ConvNorm(out_channels, out_channels, 3, 1, 1, norm=make_norm(norm, out_channels, eps))
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvNorm(in_channels, out_channels, 1, stride, norm=make_norm(norm, out_channels, eps))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x), residual=x if self.shortcut is None else self.shortcut(x))


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand (ResNet-50 and deeper)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, eps: float,
                 bottleneck_channels: int, groups: int, stride_in_1x1: bool) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        b = bottleneck_channels
        self.conv1 = ConvNorm(in_channels, b, 1, s1, norm=make_norm(norm, b, eps), relu=True)
        self.conv2 = ConvNorm(b, b, 3, s3, 1, groups=groups, norm=make_norm(norm, b, eps), relu=True)
        self.conv3 = ConvNorm(b, out_channels, 1, norm=make_norm(norm, out_channels, eps))
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvNorm(in_channels, out_channels, 1, stride, norm=make_norm(norm, out_channels, eps))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.conv2(self.conv1(x)), residual=x if self.shortcut is None else self.shortcut(x))


class Stem(nn.Module):
    """7x7 stride-2 conv, norm, ReLU, 3x3 stride-2 max pool: stride 4."""


    def __init__(self, norm: str, eps: float, out_channels: int = 64) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, 2, 3, norm=make_norm(norm, out_channels, eps), relu=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


def freeze(module: nn.Module) -> nn.Module:
    """Stop training ``module``: no gradients, and batch norms become FrozenBatchNorm2d."""
    for p in module.parameters():
        p.requires_grad_(False)
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze(child)
    return module


def make_stage(depth: int, stage: int, in_channels: int, stride: int, norm: str, eps: float, groups: int,
               width_per_group: int, stride_in_1x1: bool, res2_channels: int = 0) -> tuple[nn.Sequential, int]:
    """Stage ``stage`` (0 = res2 .. 3 = res5) of a ResNet: ``(module, out_channels)``.

    ``res2_channels``: output channels of res2 (doubling per stage); 0 for the standard 256
    (bottleneck) or 64 (basic blocks). Smaller values make the thin trunks of ``maskrcnn demo``.
    """
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
    blocks, bottleneck = DEPTHS[depth]
    scale = 2 ** stage
    if bottleneck:
        block_cls, out_channels = BottleneckBlock, (res2_channels or 256) * scale
    else:
        if groups != 1 or width_per_group != 64:
            raise ValueError("ResNeXt (groups > 1) needs bottleneck blocks: depth 50 or more")
        block_cls, out_channels = BasicBlock, (res2_channels or 64) * scale
    mods = []
    for i in range(blocks[stage]):
        mods.append(block_cls(in_channels, out_channels, stride if i == 0 else 1, norm=norm, eps=eps,
                              bottleneck_channels=groups * width_per_group * scale, groups=groups,
                              stride_in_1x1=stride_in_1x1))
        in_channels = out_channels
    return nn.Sequential(*mods), out_channels


class ResNet(nn.Module):
    """ResNet/ResNeXt trunk returning the feature maps named in ``out_features``.

    Args:
        depth: 18, 34, 50, 101 or 152.
        groups, width_per_group: ResNeXt cardinality and width (1, 64 for ResNet; 32, 8 for X-101-32x8d).
        stem_channels, res2_channels: trunk widths (64 and 0 = standard); smaller for thin CPU models.
        norm, norm_eps: see :func:`maskrcnn.modeling.norm.make_norm`.
        stride_in_1x1: see the module docstring.
        freeze_at: 0 trains everything, 1 freezes the stem, k >= 2 also res2..res{k}.
        out_features: stage names to return, e.g. ``("res2", "res3", "res4", "res5")``; stages after
            the last one requested are not built (the C4 model builds res5 as its box head).
    """

    def __init__(self, depth: int = 50, groups: int = 1, width_per_group: int = 64, norm: str = "FrozenBN",
                 norm_eps: float = 1e-5, stride_in_1x1: bool = False, freeze_at: int = 2,
                 out_features: Sequence[str] = STAGES, stem_channels: int = 64, res2_channels: int = 0) -> None:
        super().__init__()
        unknown = [f for f in out_features if f not in STAGES]
        if unknown or not out_features:
            raise ValueError(f"ResNet out_features must be a non-empty subset of {STAGES}, got {tuple(out_features)}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"ResNet freeze_at must be in 0..5, got {freeze_at}")
        self.stem = Stem(norm, norm_eps, stem_channels)
        self.out_features = tuple(out_features)
        self.out_channels: dict[str, int] = {}
        self.strides = {name: 4 * 2 ** i for i, name in enumerate(STAGES)}
        last = max(STAGES.index(f) for f in out_features)
        channels = stem_channels
        for i, name in enumerate(STAGES[: last + 1]):
            stage, channels = make_stage(depth, i, channels, 1 if i == 0 else 2, norm, norm_eps, groups,
                                         width_per_group, stride_in_1x1, res2_channels)
            self.add_module(name, stage)
            self.out_channels[name] = channels
        self._init_weights()
        if freeze_at >= 1:
            freeze(self.stem)
        for name in STAGES[: max(0, freeze_at - 1)]:
            if hasattr(self, name):
                freeze(getattr(self, name))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        """The ``out_features`` maps, finest first."""
        out = []
        x = self.stem(x)
        for name in STAGES:
            if not hasattr(self, name):
                break
            x = getattr(self, name)(x)
            if name in self.out_features:
                out.append(x)
        return out
