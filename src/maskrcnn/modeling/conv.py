"""A convolution with an optional normalisation, residual sum and ReLU, the unit every backbone and head is made of."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maskrcnn.modeling.norm import FrozenBatchNorm2d

# oneDNN's convolution with the ReLU applied as it writes its output (the op torch.compile's CPU
# backend emits): one pass fewer over the map. Private to torch, so looked up once, unused if absent.
_CONV_RELU = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None) \
    if torch.backends.mkldnn.is_available() else None


def _fused_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes ``_CONV_RELU`` runs natively here: bf16 kernels need AVX-512 (or AVX-NE-CONVERT),
    where ATen's own convolution would emulate them."""
    if _CONV_RELU is None:
        return ()
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


_FUSED_DTYPES = _fused_dtypes()


def autograd_records(*tensors: Tensor) -> bool:
    """Whether autograd records an op on ``tensors`` (then nothing may be overwritten in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _aten_picks_onednn(x: Tensor, weight: Tensor, stride: tuple, dilation: tuple, groups: int) -> bool:
    """Whether ATen's own float32 CPU convolution would run oneDNN here (its ``use_mkldnn`` rule, torch
    2.x), not its im2col fallback: only then does the fused call give bit-identical values (on a
    5x7 map of ResNet-50's res5 the fallback rounds differently, up to 3e-4)."""
    n, c, h, w = x.shape
    one_by_one = weight.shape[-1] == 1 and weight.shape[-2] == 1
    if not (any(s != 1 for s in stride) or any(d != 1 for d in dilation) or n >= 16 or not one_by_one
            or torch.get_num_threads() > 1):
        return False
    return groups > 1 or (weight.shape[-1] > 3 and weight.shape[-2] > 3) or n > 1 or n * c * h * w > 20480


def residual_relu(out: Tensor, residual: Tensor) -> Tensor:
    """``relu(out + residual)``; written into ``out`` when autograd does not record it, in one pass on
    the CPU for float32/64 (ATen's fused add-ReLU kernel; oneDNN's convolution with a sum post-op was
    slower: 12.7 vs 8.4 ms for ResNet-50's res2 expansion at 800 px, AMD EPYC, 2 threads)."""
    if autograd_records(out, residual) or torch.compiler.is_compiling():
        return F.relu_(out + residual)
    if out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64) and residual.dtype == out.dtype:
        return torch.ops.aten._add_relu_(out, residual)
    return out.add_(residual).relu_()


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

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``residual`` (a ResNet block's shortcut) is added before the ReLU, which it implies.

        Where autograd does not record (inference, frozen layers in training) on the CPU, the ReLU is
        done by oneDNN as the convolution writes its output and the residual sum and its ReLU in one
        pass in place, with the same values: the separate passes over ResNet-50's largest maps (55 MB
        at 800 px) took ~12% of the backbone's time."""
        if isinstance(self.norm, FrozenBatchNorm2d):
            weight, bias = self._folded_weight_and_bias()
        elif self.norm is None:
            weight, bias = self.weight, self.bias
        else:  # a norm with batch statistics or groups: its own pass
            x = self.norm(super().forward(x))
            if residual is not None:
                return residual_relu(x, residual)
            return F.relu_(x) if self.relu else x
        if residual is not None:
            return residual_relu(self._conv_forward(x, weight, bias), residual)
        if not self.relu:
            return self._conv_forward(x, weight, bias)
        dtype = self._fused_relu_dtype(x, weight)
        if dtype is None:
            return F.relu_(self._conv_forward(x, weight, bias))
        return _CONV_RELU(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), list(self.padding),
                          list(self.stride), list(self.dilation), self.groups, "relu", [], "")

    def _folded_weight_and_bias(self) -> tuple[Tensor, Tensor]:
        """The weight and bias with the frozen batch norm's affine map folded in."""
        scale, shift = self.norm.scale_and_shift()
        weight = self.weight * scale.to(self.weight.dtype).reshape(-1, 1, 1, 1)
        bias = shift.to(self.weight.dtype) if self.bias is None else shift + self.bias * scale
        return weight, bias

    def _fused_relu_dtype(self, x: Tensor, weight: Tensor) -> torch.dtype | None:
        """The dtype to run conv+ReLU in as one oneDNN call, or None for the plain ops. Fused only on
        the CPU, without autograd recording or graph capture (export keeps the plain ops), with plain
        zero padding, in float32 only where ATen's own convolution would run oneDNN (so values stay
        bit-identical), in bf16 under autocast (cast as autocast casts the conv's inputs) where oneDNN
        has bf16 kernels; float64, which autocast leaves alone, never."""
        if (_CONV_RELU is None or self.padding_mode != "zeros" or not isinstance(self.padding, tuple)
                or x.device.type != "cpu" or torch.compiler.is_compiling() or autograd_records(x, weight)):
            return None
        if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if dtype == torch.float32 and not _aten_picks_onednn(x, weight, self.stride, self.dilation, self.groups):
            return None
        return dtype if dtype in _FUSED_DTYPES else None

    @torch.no_grad()
    def fold_frozen_norm(self) -> None:
        """Fold a frozen batch norm into the weight and bias for good, with the arithmetic of
        ``forward``'s fold (so outputs stay bit-identical), for a model that will only predict:
        the fold then costs nothing per call. The norm's buffers leave the state dict."""
        if not isinstance(self.norm, FrozenBatchNorm2d):
            return
        weight, bias = self._folded_weight_and_bias()
        self.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=self.weight.requires_grad)
        self.norm = None
