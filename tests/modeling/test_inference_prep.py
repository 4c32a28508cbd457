"""prepare_for_inference (what Predictor does to a model that will only predict) changes no output."""

from __future__ import annotations

import copy

import pytest
import torch

import maskrcnn
from maskrcnn.modeling.conv import ConvNorm
from maskrcnn.modeling.inference import prepare_for_inference
from maskrcnn.modeling.norm import FrozenBatchNorm2d
from maskrcnn.modeling.roi_heads.box_head import FastRCNNConvFCHead, fc1_as_conv_pays
from tiny import shapes_sample, tiny_config

KP = ["model.keypoint_on=true", "model.keypoint_head.num_keypoints=3", "model.keypoint_head.conv_dims=[32, 32]"]


def _randomise_norms(model: torch.nn.Module) -> None:
    """Statistics away from the identity, so that folding them is visible if it is wrong."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            n = m.weight.shape[0]
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5


@pytest.mark.numerics  # a cached kernel in another layout than the plain path's rounded differently on AVX2 only
@pytest.mark.parametrize("preset, norm, precision", [
    ("mask_rcnn_R_50_FPN", "FrozenBN", "float32"),
    ("mask_rcnn_R_50_FPN", "FrozenBN", "bf16"),
    ("mask_rcnn_R_50_FPN", "BN", "bf16"),
    ("cascade_mask_rcnn_R_50_FPN", "FrozenBN", "bf16"),
])
def test_prepared_model_gives_identical_outputs(preset, norm, precision):
    torch.manual_seed(0)
    cfg = tiny_config(preset, extra=KP + [f"model.backbone.norm={norm}", f"model.fpn.norm={norm}",
                                          "model.roi_heads.score_thresh=0.0", f"model.precision={precision}"])
    model = maskrcnn.build_model(cfg)
    _randomise_norms(model)
    model.eval()
    prepared = prepare_for_inference(copy.deepcopy(model))
    images = [shapes_sample(0, size=(128, 176))[0], shapes_sample(1, size=(176, 128))[0]]
    with torch.no_grad():
        expected, got = model(images), prepared(images)
    assert sum(len(o["boxes"]) for o in expected) > 10
    for e, o in zip(expected, got):
        assert e.keys() == o.keys()
        for key in e:
            assert torch.equal(e[key], o[key]), key

    convs = [m for m in prepared.modules() if isinstance(m, ConvNorm)]
    folded = [m for m in convs if m.norm is None and m.bias is not None]
    if norm == "FrozenBN":  # every frozen norm is folded into its conv
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in prepared.modules()) and len(folded) > 10
    else:  # a trainable BN keeps its float32 statistics beside the conv
        assert all(isinstance(m.norm, torch.nn.BatchNorm2d) for m in convs if m.norm is not None)
        assert all(p.dtype == torch.float32 for m in convs if m.norm is not None for p in m.norm.parameters())
    stored = {p.dtype for m in prepared.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
              for p in (m.weight,)}
    assert stored == ({torch.bfloat16} if precision == "bf16" else {torch.float32})
    assert prepared.dtype == torch.float32  # images and geometry stay float32
    heads = [m for m in prepared.modules() if isinstance(m, FastRCNNConvFCHead)]
    if fc1_as_conv_pays(torch.device("cpu")):  # a CPU with AVX-512
        assert heads and all(h.fc1_as_conv is not None and h.fc1_as_conv.dtype == h.fcs[0].weight.dtype for h in heads)
    else:  # the FC stays a matrix product: no kernel kept
        assert heads and all(h.fc1_as_conv is None for h in heads)
