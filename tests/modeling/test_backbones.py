"""ResNet/ResNeXt trunks and the FPN: sizes against published parameter counts, strides, norms, freezing."""

import pytest
import torch
from torch import nn

from maskrcnn.modeling.backbone.fpn import FPN
from maskrcnn.modeling.backbone.resnet import ResNet
from maskrcnn.modeling.norm import FrozenBatchNorm2d

# torchvision's published parameter counts for the ImageNet classifiers, minus the 1000-way fc
FC = 2048 * 1000 + 1000
PUBLISHED = {
    (18, 1, 64): 11_689_512 - (512 * 1000 + 1000),
    (50, 1, 64): 25_557_032 - FC,
    (101, 1, 64): 44_549_160 - FC,
    (152, 1, 64): 60_192_808 - FC,
    (50, 32, 4): 25_028_904 - FC,
    (101, 32, 8): 88_791_336 - FC,
    (101, 64, 4): 83_455_272 - FC,
}


@pytest.mark.parametrize("depth,groups,width", list(PUBLISHED))
def test_parameter_counts_match_published_architectures(depth, groups, width):
    net = ResNet(depth, groups, width, norm="BN", freeze_at=0)
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED[(depth, groups, width)]


def test_strides_channels_and_stride_placement():
    x = torch.rand(1, 3, 64, 96)
    net = ResNet(50, norm="FrozenBN")
    feats = net(x)
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
    assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert net.res3[0].conv2.stride == (2, 2) and net.res3[0].conv1.stride == (1, 1)
    msra = ResNet(50, stride_in_1x1=True)
    assert msra.res3[0].conv1.stride == (2, 2) and msra.res3[0].conv2.stride == (1, 1)
    c4 = ResNet(50, out_features=("res4",))
    assert not hasattr(c4, "res5") and len(c4(x)) == 1


def test_norms_and_freezing():
    gn = ResNet(50, norm="GN", freeze_at=0)
    assert isinstance(gn.res2[0].conv1.norm, nn.GroupNorm)
    bn = ResNet(50, norm="BN", freeze_at=3)  # stem, res2 and res3 frozen
    assert isinstance(bn.stem.conv1.norm, FrozenBatchNorm2d) and isinstance(bn.res3[0].conv1.norm, FrozenBatchNorm2d)
    assert isinstance(bn.res4[0].conv1.norm, nn.BatchNorm2d)
    assert not any(p.requires_grad for p in bn.res3.parameters())
    assert all(p.requires_grad for p in bn.res4.parameters())
    assert sum(p.numel() for p in ResNet(50, freeze_at=5).parameters() if p.requires_grad) == 0
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(77)
    with pytest.raises(ValueError, match="needs bottleneck blocks"):
        ResNet(18, groups=32, width_per_group=4)
    with pytest.raises(ValueError, match="out_features"):
        ResNet(50, out_features=("res6",))


def test_frozen_bn_folding_equals_the_layer():
    # ConvNorm folds a frozen BN into its conv; the result must equal conv followed by the BN
    net = ResNet(50, norm="FrozenBN", norm_eps=0.0).double()
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    conv = net.stem.conv1
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    unfolded = torch.relu(conv.norm(torch.nn.functional.conv2d(x, conv.weight, None, 2, 3)))
    torch.testing.assert_close(conv(x), unfolded)


def test_fpn_levels_and_p6():
    fpn = FPN([256, 512, 1024, 2048], 64, norm="GN")
    feats = [torch.rand(1, c, 32 // 2 ** i, 48 // 2 ** i) for i, c in enumerate([256, 512, 1024, 2048])]
    out = fpn(feats)
    assert [o.shape for o in out] == [(1, 64, 32, 48), (1, 64, 16, 24), (1, 64, 8, 12), (1, 64, 4, 6), (1, 64, 2, 3)]
    torch.testing.assert_close(out[4], out[3][:, :, ::2, ::2])  # P6: stride-2 subsampling of P5
