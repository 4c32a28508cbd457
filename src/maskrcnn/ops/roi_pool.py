"""RoIPool (Girshick, Fast R-CNN): the quantised max pooling that Mask R-CNN's RoIAlign replaces.

Kept for the paper's ablation (RoIAlign vs RoIPool, seed 004) and for users switching from
``torchvision.ops.roi_pool``, whose results it reproduces exactly: box corners are rounded to the
nearest feature cell (half away from zero, as C's ``round``), the RoI spans ``x2 - x1 + 1`` cells
(at least 1), bin b covers cells ``[floor(b * size / n), ceil((b + 1) * size / n))``, clipped to
the map; an empty bin gives 0 and no gradient; ties go to the first cell in row-major order.

Vectorised over RoIs: every bin is read as a ``(Lh, Lw)`` window gathered from a channels-last
view (each gathered row is a contiguous channel vector); RoIs whose bins have similar sizes
(same powers of two) share one window size, shorter bins are masked. The backward pass scatters
the gradient to the saved argmax positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn._checks import pair
from maskrcnn.ops._buckets import size_groups
from maskrcnn.ops._rois import check_rois

_CHUNK_ELEMENTS = 1 << 22


def round_half_away(v: Tensor) -> Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _bin_edges(start: Tensor, end: Tensor, bins: int, size: int) -> tuple[Tensor, Tensor]:
    """``start``/``end``: rounded RoI corners ``(K,)`` -> bin ``[lo, hi)`` cells ``(K, bins)``, clipped."""
    length = (end - start + 1).clamp(min=1)
    bin_size = length / bins
    b = torch.arange(bins, device=start.device, dtype=start.dtype)
    lo = torch.floor(b * bin_size[:, None]) + start[:, None]
    hi = torch.ceil((b + 1) * bin_size[:, None]) + start[:, None]
    return lo.clamp(0, size).long(), hi.clamp(0, size).long()


def _forward(input: Tensor, rois: Tensor, out_hw: tuple[int, int], spatial_scale: float) -> tuple[Tensor, Tensor]:
    n, c, height, width = input.shape
    k = rois.shape[0]
    out = input.new_zeros((k, c) + out_hw)
    argmax = torch.full((k, c) + out_hw, -1, dtype=torch.long, device=input.device)
    if k == 0 or c == 0 or height == 0 or width == 0:
        return out, argmax
    corners = round_half_away(rois[:, 1:] * spatial_scale)
    h_lo, h_hi = _bin_edges(corners[:, 1], corners[:, 3], out_hw[0], height)
    w_lo, w_hi = _bin_edges(corners[:, 0], corners[:, 2], out_hw[1], width)
    span_h, span_w = (h_hi - h_lo).amax(1), (w_hi - w_lo).amax(1)
    batch = rois[:, 0].long()
    flat = input.permute(0, 2, 3, 1).reshape(n * height * width, c)
    chan = torch.arange(c, device=input.device)
    for sel, lh, lw in size_groups(span_h, span_w):
        if lh <= 0 or lw <= 0:
            continue  # every bin of these RoIs lies outside the map: zeros, no gradient
        per_roi = out_hw[0] * lh * out_hw[1] * lw * c
        step = max(1, _CHUNK_ELEMENTS // per_roi)
        for k0 in range(0, sel.numel(), step):
            s = sel[k0:k0 + step]
            hl, hh, wl, wh, b = h_lo[s], h_hi[s], w_lo[s], w_hi[s], batch[s]
            rows = hl[:, :, None] + torch.arange(lh, device=input.device)  # (k, out_h, Lh)
            cols = wl[:, :, None] + torch.arange(lw, device=input.device)  # (k, out_w, Lw)
            valid = (rows < hh[:, :, None])[:, :, :, None, None] & (cols < wh[:, :, None])[:, None, None, :, :]
            cell = (b[:, None, None, None, None] * height + rows.clamp(max=height - 1)[:, :, :, None, None]) * width \
                + cols.clamp(max=width - 1)[:, None, None, :, :]  # (k, out_h, Lh, out_w, Lw)
            kk = s.numel()
            win = flat.index_select(0, cell.reshape(-1)).reshape(kk, out_hw[0], lh, out_hw[1], lw, c)
            win = win.masked_fill(~valid[..., None], float("-inf"))
            win = win.permute(0, 1, 3, 2, 4, 5).reshape(kk, out_hw[0], out_hw[1], lh * lw, c)
            val, pos = win.max(dim=3)  # first maximum in row-major window order, as torchvision
            empty = ((hh <= hl)[:, :, None] | (wh <= wl)[:, None, :])[..., None]
            y = hl[:, :, None, None] + torch.div(pos, lw, rounding_mode="floor")
            x = wl[:, None, :, None] + pos % lw
            idx = ((b[:, None, None, None] * c + chan) * height + y) * width + x  # NCHW flat index
            out[s] = torch.where(empty, 0.0, val).permute(0, 3, 1, 2)
            argmax[s] = torch.where(empty, -1, idx).permute(0, 3, 1, 2)
    return out, argmax


class _RoIPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, out_hw, spatial_scale):  # type: ignore[override]
        out, argmax = _forward(input, rois, out_hw, spatial_scale)
        ctx.save_for_backward(argmax)
        ctx.input_shape = input.shape
        ctx.mark_non_differentiable(argmax)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (argmax,) = ctx.saved_tensors
        grad_input = grad.new_zeros(ctx.input_shape).reshape(-1)
        hit = argmax >= 0
        grad_input.index_add_(0, argmax[hit], grad[hit])
        return grad_input.reshape(ctx.input_shape), None, None, None


def roi_pool(input: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | tuple[int, int],
             spatial_scale: float = 1.0) -> Tensor:
    """RoIPool with the signature and results of ``torchvision.ops.roi_pool``.

    ``input: (N, C, H, W)``; ``boxes``: ``(K, 5)`` rows ``(batch index, x1, y1, x2, y2)`` or a list of
    per-image ``(Ni, 4)`` boxes. Returns ``(K, C, h, w)``, differentiable with respect to ``input``.
    """
    rois = check_rois("roi_pool", input, boxes)
    out_hw = pair("roi_pool", "output_size", output_size)
    dtype = input.dtype
    if dtype not in (torch.float32, torch.float64):
        input = input.float()
    return _RoIPool.apply(input, rois.to(input.dtype), out_hw, float(spatial_scale)).to(dtype)


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool` (as ``torchvision.ops.RoIPool``)."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float) -> None:
        super().__init__()
        self.output_size = pair("RoIPool", "output_size", output_size)
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
