"""Inference without autograd fuses passes (conv+ReLU in one oneDNN call, residual sum and ReLU in one
pass in place, FPN's upsample-and-add in place): same values as the plain ops, and inputs that
autograd records are never overwritten."""

import pytest
import torch
from torch.nn import functional as F

import maskrcnn
from maskrcnn.modeling import conv as conv_module
from maskrcnn.modeling.backbone.fpn import add_upsampled
from maskrcnn.modeling.conv import ConvNorm, residual_relu
from maskrcnn.modeling.inference import prepare_for_inference
from maskrcnn.modeling.norm import FrozenBatchNorm2d


def _frozen_norm(channels: int, seed: int) -> FrozenBatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    norm = FrozenBatchNorm2d(channels)
    norm.weight.copy_(torch.rand(channels, generator=g) + 0.5)
    norm.bias.copy_(torch.randn(channels, generator=g))
    norm.running_mean.copy_(torch.randn(channels, generator=g))
    norm.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return norm


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kind", ["plain", "strided", "grouped", "dilated", "frozen-norm", "bias"])
def test_conv_relu_equals_the_plain_ops(kind, layout, monkeypatch):
    torch.manual_seed(0)
    args = {"plain": {}, "strided": {"stride": 2}, "grouped": {"groups": 4}, "dilated": {"dilation": 2, "padding": 2},
            "frozen-norm": {"norm": _frozen_norm(16, 1)}, "bias": {"bias": True}}[kind]
    layer = ConvNorm(8, 16, 3, **{"padding": 1, **args}, relu=True).eval()
    x = torch.randn(2, 8, 23, 37).contiguous(memory_format=layout)
    with torch.no_grad():
        fused = layer(x)
        monkeypatch.setattr(conv_module, "_CONV_RELU", None)
        plain = layer(x)
    assert torch.equal(fused, plain)
    assert (fused >= 0).all() and (fused == 0).any()  # the ReLU ran


def test_conv_relu_under_bf16_autocast_equals_autocasts_own_conv(monkeypatch):
    if torch.bfloat16 not in conv_module._FUSED_DTYPES:
        pytest.skip("this CPU has no oneDNN bf16 kernels: the plain ops run (tested above)")
    torch.manual_seed(0)
    layer = ConvNorm(8, 16, 3, padding=1, relu=True).eval()
    x = torch.randn(1, 8, 20, 30)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x)
        monkeypatch.setattr(conv_module, "_CONV_RELU", None)
        plain = layer(x)
    assert fused.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(fused, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_residual_relu_in_place_equals_add_then_relu(dtype):
    a, b = torch.randn(2, 6, 9, 11, dtype=dtype), torch.randn(2, 6, 9, 11, dtype=dtype)
    expected = F.relu(a + b)
    out = a.clone()
    with torch.no_grad():
        got = residual_relu(out, b)
    assert torch.equal(got, expected) and got.data_ptr() == out.data_ptr()


def test_residual_relu_and_upsampled_add_leave_recorded_inputs_alone():
    out = torch.randn(1, 4, 8, 10, requires_grad=True)
    residual, coarse = torch.randn(1, 4, 8, 10), torch.randn(1, 4, 4, 5, requires_grad=True)
    before, lateral = out.detach().clone(), torch.randn(1, 4, 8, 10, requires_grad=True)
    lateral_before = lateral.detach().clone()
    y = residual_relu(out, residual)
    z = add_upsampled(lateral, coarse)
    (y.sum() + z.sum()).backward()
    assert torch.equal(out.detach(), before) and torch.equal(lateral.detach(), lateral_before)
    assert torch.equal(out.grad, ((before + residual) > 0).float())
    assert torch.equal(coarse.grad, torch.full((1, 4, 4, 5), 4.0))  # each coarse pixel feeds 2x2


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [(10, 14), (11, 14)])  # exactly 2x, and not (then the plain ops)
def test_upsampled_add_equals_nearest_interpolation(size, layout):
    coarse = torch.randn(2, 8, 5, 7).contiguous(memory_format=layout)
    lateral = torch.randn(2, 8, *size).contiguous(memory_format=layout)
    expected = lateral + F.interpolate(coarse, size=size, mode="nearest")
    with torch.no_grad():
        got = add_upsampled(lateral.clone(memory_format=torch.preserve_format), coarse)
    assert torch.equal(got, expected)
    assert got.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("preset,extra", [
    ("torchvision_maskrcnn_resnet50_fpn", []),
    ("mask_rcnn_R_50_FPN", ["model.backbone.groups=8", "model.backbone.width_per_group=8", "model.precision=bf16"]),
    ("shapes_R_18_FPN", []),
])
@pytest.mark.parametrize("threads", [1, 2])  # ATen picks another float32 conv kernel for some shapes on one thread
def test_a_models_detections_do_not_change_with_the_fused_passes(preset, extra, threads):
    # the same prepared model run with autograd recording (every plain op, nothing in place) and
    # without (the fused and in-place passes): identical detections, bit for bit; small maps (5x7
    # at res5) included, where ATen's float32 convolution is not oneDNN's
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_fused_equals_plain(preset, extra)
    finally:
        torch.set_num_threads(previous)


def _check_fused_equals_plain(preset: str, extra: list[str]) -> None:
    torch.manual_seed(0)
    model = prepare_for_inference(maskrcnn.build_model(maskrcnn.get_config(
        preset, ["model.roi_heads.score_thresh=0.0", "model.input.min_size_test=160",
                 "model.input.max_size_test=224"] + extra)))
    image = torch.rand(3, 150, 211)
    with torch.no_grad():
        fused = model([image])[0]
    for p in model.parameters():
        p.requires_grad_(True)
    plain = model([image])[0]
    assert len(fused["boxes"]) > 10
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(fused[key], plain[key].detach()), key
