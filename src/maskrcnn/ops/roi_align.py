"""RoIAlign (He et al., Mask R-CNN, section 3): bilinear sampling on a regular grid in each bin, averaged.

Semantics are exactly those of torchvision's ``roi_align`` (and detectron2's ``ROIAlign``):

- ``aligned=False`` (torchvision's Mask R-CNN, the original Detectron): box corners are used as
  they are, and RoIs smaller than one feature cell are stretched to 1x1.
- ``aligned=True`` (detectron2's ROIAlignV2): box corners are shifted by -0.5 cell so that a
  pixel's centre maps to the centre of the feature cell it came from; no minimum size.
- ``sampling_ratio > 0``: that many samples per bin along each axis; ``<= 0``: adaptive,
  ``ceil(roi_size / output_size)`` per RoI and per axis.
- a sample at ``-1 <= y <= H`` (likewise x) is clamped into ``[0, H - 1]`` before interpolation;
  a sample further outside contributes zero (but still counts in the average).

How it runs without a compiled kernel: the feature maps of the batch are viewed channels-last as
one tall image, and every RoI's sampling grid is handed to ``grid_sample`` as its own batch entry
over an *expanded* (stride-0, never copied) view of that image, so the interpolation runs in
ATen's vectorised, multi-threaded kernel; a sum over each bin's samples then averages it.
Coordinates are clamped by hand first (the torchvision rule above) and samples outside are sent far
off the map, where ``grid_sample``'s zero padding gives exactly 0. The backward pass scatters the
bilinear weights with ``index_add_`` into a channels-last gradient (autograd through the expanded
view would materialise one full feature map per RoI): on a CPU per cell of each RoI's window of
the map, after two small matmuls (``_backward_windows``); elsewhere per sample corner, with no
host read. Work is chunked so temporaries stay bounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn._checks import pair
from maskrcnn.ops._buckets import size_groups
from maskrcnn.ops._rois import check_rois

# Elements per temporary (samples x channels) tensor: ~16 MB in float32. Large enough to keep
# the per-call overhead small, small enough to stay in the last-level cache on a laptop.
_CHUNK_ELEMENTS = 1 << 22
# Where samples outside the feature map are sent so that zero padding returns exactly 0.
_OUTSIDE = -10.0
# Devices where the backward pass reads window sizes back to the host (free there) to scatter
# per window cell instead of per sample corner.
_WINDOWS_ON = ("cpu",)


def _axis_samples(start: Tensor, length: Tensor, bins: int, grid: int, own: Tensor | None) -> tuple[Tensor, Tensor]:
    """Sample coordinates ``(K, bins * grid)`` along one axis and which of them exist.

    Bin b, sample i sits at ``start + b * bin + (i + .5) * bin / g``, where g is the RoI's own grid
    size (``own``, per RoI, adaptive sampling) or ``grid``. With ``own``, the RoIs of a group share
    the padded size ``grid = max(own)`` and samples ``i >= own`` do not exist.
    """
    t = torch.arange(bins * grid, device=start.device)
    b = torch.div(t, grid, rounding_mode="floor").to(start.dtype)
    i = (t % grid).to(start.dtype)
    bin_size = (length / bins)[:, None]
    if own is None:
        exists = torch.ones((1, t.numel()), dtype=torch.bool, device=start.device)
        g: Tensor | int = grid
    else:
        exists = i[None, :] < own[:, None]
        g = own.clamp(min=1)[:, None].to(start.dtype)
    # Same operation order as torchvision's kernel, so float32 results agree to the last bits too.
    return start[:, None] + b * bin_size + (i + 0.5) * bin_size / g, exists


def _roi_geometry(rois: Tensor, spatial_scale: float, aligned: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    w = rois[:, 3] * spatial_scale - offset - x1
    h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        w = w.clamp(min=1.0)
        h = h.clamp(min=1.0)
    return x1, y1, w, h


class _Group:
    """RoIs pooled together: ``sel`` (None = all), padded grid ``(gh, gw)``, each RoI's own grid."""

    def __init__(self, sel: Tensor | None, gh: int, gw: int, own_h: Tensor | None = None,
                 own_w: Tensor | None = None) -> None:
        self.sel, self.gh, self.gw, self.own_h, self.own_w = sel, gh, gw, own_h, own_w

    def take(self, t: Tensor) -> Tensor:
        return t if self.sel is None else t[self.sel]

    def count(self, dtype: torch.dtype) -> Tensor | float:
        """Samples averaged per bin (torchvision: at least 1)."""
        if self.own_h is None or self.own_w is None:
            return float(self.gh * self.gw)
        return (self.own_h * self.own_w).clamp(min=1).to(dtype)


def _groups(rois: Tensor, spatial_scale: float, out_hw: tuple[int, int], sampling_ratio: int,
            aligned: bool) -> list[_Group]:
    """The RoIs' sampling grids: one for all with a fixed ``sampling_ratio``, else one host read."""
    if sampling_ratio > 0:
        return [_Group(None, sampling_ratio, sampling_ratio)]
    # Adaptive sampling: each RoI has its own grid, padded to its group's largest.
    _, _, w, h = _roi_geometry(rois, spatial_scale, aligned)
    gh = torch.ceil(h / out_hw[0]).long().clamp(min=0)
    gw = torch.ceil(w / out_hw[1]).long().clamp(min=0)
    return [_Group(sel, mh, mw, gh[sel], gw[sel]) for sel, mh, mw in size_groups(gh, gw)]


def _samples(group: _Group, rois: Tensor, spatial_scale: float, out_hw: tuple[int, int], aligned: bool,
             height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample coordinates ``ys: (K, out_h*gh)``, ``xs: (K, out_w*gw)`` and where each one counts."""
    x1, y1, w, h = _roi_geometry(rois, spatial_scale, aligned)
    ys, ey = _axis_samples(y1, h, out_hw[0], group.gh, group.own_h)
    xs, ex = _axis_samples(x1, w, out_hw[1], group.gw, group.own_w)
    vy = ey & (ys >= -1.0) & (ys <= height)
    vx = ex & (xs >= -1.0) & (xs <= width)
    return ys, xs, vy, vx


def _tall_channels_last(input: Tensor) -> Tensor:
    """``(N, C, H, W)`` -> a ``(1, C, N*H, W)`` view with channels-last strides (one copy if needed)."""
    n, c, h, w = input.shape
    return input.permute(0, 2, 3, 1).reshape(1, n * h, w, c).permute(0, 3, 1, 2)


def _forward(input: Tensor, rois: Tensor, out_hw: tuple[int, int], spatial_scale: float, aligned: bool,
             groups: list[_Group]) -> Tensor:
    n, c, height, width = input.shape
    out = input.new_zeros((rois.shape[0], c, out_hw[0], out_hw[1]))
    if rois.shape[0] == 0 or c == 0:
        return out
    tall = _tall_channels_last(input)
    batch_row = rois[:, 0].long() * height
    for group in groups:
        if group.gh == 0 or group.gw == 0:
            continue  # empty sampling grids: the bins average nothing and stay 0
        r = group.take(rois)
        ys, xs, vy, vx = _samples(group, r, spatial_scale, out_hw, aligned, height, width)
        # grid_sample's align_corners=False maps pixel i to (2i + 1) / size - 1.
        gy = ((ys.clamp(0, height - 1) + group.take(batch_row)[:, None]) * 2 + 1) / (n * height) - 1
        gx = (xs.clamp(0, width - 1) * 2 + 1) / width - 1
        gy = torch.where(vy, gy, _OUTSIDE)
        gx = torch.where(vx, gx, _OUTSIDE)
        # The grid is laid out (sample in bin, bin) rather than as an image, so that grid_sample's
        # (NCHW) output is averaged by a sum over its third axis, whose rows are contiguous: 3x
        # faster than avg_pool2d's 2-D windows over that output, with the same order of additions.
        kr, (oh, ow), gh, gw = r.shape[0], out_hw, group.gh, group.gw
        gy = gy.view(kr, oh, gh).transpose(1, 2)[:, :, None, :, None]  # (K, gh, 1, oh, 1)
        gx = gx.view(kr, ow, gw).transpose(1, 2)[:, None, :, None, :]  # (K, 1, gw, 1, ow)
        count = group.count(input.dtype)
        per_roi = ys.shape[1] * xs.shape[1]
        c_step = c if per_roi * c <= _CHUNK_ELEMENTS else max(1, _CHUNK_ELEMENTS // per_roi)
        k_step = max(1, _CHUNK_ELEMENTS // (per_roi * c_step))
        pieces = []
        for k0 in range(0, kr, k_step):
            sl = slice(k0, k0 + k_step)
            grid = torch.stack(torch.broadcast_tensors(gx[sl], gy[sl]), dim=-1)
            kk = grid.shape[0]
            grid = grid.reshape(kk, gh * gw, oh * ow, 2)
            chans = []
            for c0 in range(0, c, c_step):
                src = tall[:, c0:c0 + c_step].expand(kk, -1, -1, -1)
                sampled = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                total = sampled.sum(dim=2).view(kk, -1, oh, ow)
                if isinstance(count, float):
                    chans.append(total / count)
                else:
                    chans.append(total / count[sl, None, None, None])
            pieces.append(chans[0] if len(chans) == 1 else torch.cat(chans, dim=1))
        res = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if group.sel is None:
            out = res
        else:
            out.index_copy_(0, group.sel, res)
    return out


def _corners(coords: Tensor, valid: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's bilinear corner rule along one axis: low/high index and weights; 0 if invalid."""
    c = coords.clamp(min=0)
    low = torch.floor(c).long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(c), c - low.to(c.dtype))
    w_low = (1 - frac) * valid
    w_high = frac * valid
    return low, high, w_low, w_high


def _window(low: Tensor, high: Tensor, valid: Tensor) -> tuple[Tensor, int]:
    """Along one axis, the first map cell each RoI's samples touch ``(K,)`` and the chunk's largest
    number of cells touched (one host read: free on a CPU)."""
    big = torch.iinfo(low.dtype).max
    origin = torch.where(valid, low, big).amin(1)
    origin = torch.where(origin == big, 0, origin)
    return origin, int((torch.where(valid, high, 0) - origin[:, None]).amax().clamp(min=0)) + 1


def _bin_weights(corners: tuple[Tensor, Tensor, Tensor, Tensor], valid: Tensor, origin: Tensor, extent: int,
                 bins: int, grid: int) -> Tensor:
    """Along one axis, each RoI's bilinear weights summed per bin onto its window: ``(K, bins, extent)``."""
    low, high, w_low, w_high = corners
    k, s = low.shape
    weights = w_low.new_zeros((k, s, extent))
    # invalid samples weigh 0 wherever they land; put them at the window's origin
    weights.scatter_add_(2, torch.where(valid, low - origin[:, None], 0)[..., None], w_low[..., None])
    weights.scatter_add_(2, torch.where(valid, high - origin[:, None], 0)[..., None], w_high[..., None])
    return weights.view(k, bins, grid, extent).sum(2)


def _backward_windows(acc: Tensor, g: Tensor, base: Tensor, scale: Tensor | float, ys: Tensor, xs: Tensor,
                      vy: Tensor, vx: Tensor, gh: int, gw: int, height: int, width: int) -> None:
    """Adds one chunk's gradient to ``acc`` through each RoI's window of the map (the CPU's way).

    The gradient of a bin is the same for all its samples, so the bilinear weights are first summed
    per bin along each axis; the window then receives ``Wy^T grad Wx`` (two batched matmuls, laid
    out so the result is already the scatter's contiguous rows), and one row per window cell is
    scattered instead of four per sample: fewer rows, no strided copies (what costs on a CPU), the
    same sums in another order. A chunk whose windows hold more cells than its samples have corners
    (big RoIs sampled sparsely) goes through the corners instead.
    """
    kk, oh, ow, c = g.shape
    cy = _corners(ys, vy.to(ys.dtype), height)
    cx = _corners(xs, vx.to(xs.dtype), width)
    y0, hw = _window(cy[0], cy[1], vy)
    x0, ww = _window(cx[0], cx[1], vx)
    if hw * ww > 4 * ys.shape[1] * xs.shape[1]:
        _backward_corners(acc, g, base, scale, ys, xs, vy, vx, gh, gw, height, width)
        return
    wy = _bin_weights(cy, vy, y0, hw, oh, gh)  # (K, oh, hw)
    wx = _bin_weights(cx, vx, x0, ww, ow, gw)  # (K, ow, ww)
    wy = wy * (scale if isinstance(scale, float) else scale.view(-1, 1, 1))
    # along x, per bin row: (K, oh, ww, C); then along y: (K, hw, ww*C), rows of the scatter in order
    along_x = torch.matmul(wx.transpose(1, 2).to(g.dtype)[:, None], g)
    win = torch.bmm(wy.transpose(1, 2).to(g.dtype), along_x.reshape(kk, oh, ww * c))
    # window cells past the map's edge carry zero weight: clamped, they add 0 to an edge cell
    rows = (y0[:, None] + torch.arange(hw, device=g.device)).clamp_(max=height - 1)
    cols = (x0[:, None] + torch.arange(ww, device=g.device)).clamp_(max=width - 1)
    idx = base[:, None, None] + rows[:, :, None] * width + cols[:, None, :]
    acc.index_add_(0, idx.reshape(-1), win.reshape(-1, c))


def _backward_corners(acc: Tensor, g: Tensor, base: Tensor, scale: Tensor | float, ys: Tensor, xs: Tensor,
                      vy: Tensor, vx: Tensor, gh: int, gw: int, height: int, width: int) -> None:
    """Adds one chunk's gradient to ``acc``: each sample's four bilinear corners scattered (no host
    read: the GPU's way, where the scatter runs in parallel)."""
    kk, oh, ow, c = g.shape
    y_lo, y_hi, wy_lo, wy_hi = _corners(ys, vy.to(ys.dtype), height)
    x_lo, x_hi, wx_lo, wx_hi = _corners(xs, vx.to(xs.dtype), width)
    sy, sx = ys.shape[1], xs.shape[1]
    # every sample of bin (ph, pw) receives grad[ph, pw] / count
    gs = g[:, :, None, :, None, :].expand(kk, oh, gh, ow, gw, c).reshape(kk, sy, sx, c)
    scale = scale if isinstance(scale, float) else scale.view(-1, 1, 1)
    for yi, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for xi, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            idx = base[:, None, None] + yi[:, :, None] * width + xi[:, None, :]
            w = (wy[:, :, None] * wx[:, None, :]) * scale
            acc.index_add_(0, idx.reshape(-1), (gs * w[..., None]).reshape(-1, c))


def _backward(grad: Tensor, rois: Tensor, input_shape: torch.Size, out_hw: tuple[int, int], spatial_scale: float,
              aligned: bool, groups: list[_Group]) -> Tensor:
    n, c, height, width = input_shape
    acc = grad.new_zeros((n * height * width, c))  # channels-last rows of the (N, C, H, W) gradient
    add = _backward_windows if grad.device.type in _WINDOWS_ON else _backward_corners
    if rois.shape[0] and c:
        grad_cl = grad.permute(0, 2, 3, 1)  # (K, out_h, out_w, C)
        base = rois[:, 0].long() * (height * width)
        for group in groups:
            if group.gh == 0 or group.gw == 0:
                continue
            r, g, b = group.take(rois), group.take(grad_cl), group.take(base)
            ys, xs, vy, vx = _samples(group, r, spatial_scale, out_hw, aligned, height, width)
            inv = 1.0 / group.count(grad.dtype)
            k_step = max(1, _CHUNK_ELEMENTS // (ys.shape[1] * xs.shape[1] * c))
            for k0 in range(0, r.shape[0], k_step):
                sl = slice(k0, k0 + k_step)
                add(acc, g[sl], b[sl], inv if isinstance(inv, float) else inv[sl], ys[sl], xs[sl], vy[sl], vx[sl],
                    group.gh, group.gw, height, width)
    return acc.reshape(n, height, width, c).permute(0, 3, 1, 2)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, out_hw, spatial_scale, sampling_ratio, aligned):  # type: ignore[override]
        groups = _groups(rois, spatial_scale, out_hw, sampling_ratio, aligned) if rois.shape[0] else []
        ctx.save_for_backward(rois)
        # The backward pass reuses the grouping: no second host read.
        ctx.args = (input.shape, out_hw, spatial_scale, aligned, groups)
        return _forward(input, rois, out_hw, spatial_scale, aligned, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (rois,) = ctx.saved_tensors
        grad_input = _backward(grad, rois, *ctx.args)
        return grad_input, None, None, None, None, None


def roi_align_unchecked(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float = 1.0,
                        sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``roi_align`` on already validated ``(K, 5)`` RoIs (the model's own proposals)."""
    dtype = input.dtype
    if dtype not in (torch.float32, torch.float64):
        # Sample coordinates in half precision would be off by whole pixels on large maps.
        input = input.float()
    rois = rois.to(input.dtype)
    out = _RoIAlign.apply(input, rois, output_size, float(spatial_scale), int(sampling_ratio), bool(aligned))
    return out.to(dtype)


def roi_align(input: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign, with the signature and results of ``torchvision.ops.roi_align``.

    Args:
        input: ``(N, C, H, W)`` float feature maps.
        boxes: ``(K, 5)`` rows ``(batch index, x1, y1, x2, y2)`` or a list of ``(Ni, 4)`` XYXY boxes,
            one per image, in the coordinates of the image the features were computed from.
        output_size: ``int`` or ``(h, w)`` bins.
        spatial_scale: feature cells per image pixel (1/stride).
        sampling_ratio: samples per bin and axis; ``<= 0`` for adaptive ``ceil(roi_size / output_size)``.
        aligned: shift boxes by -0.5 cell (detectron2's ROIAlignV2) and drop the 1x1 minimum size.

    Returns:
        ``(K, C, h, w)`` pooled features, differentiable with respect to ``input``.
    """
    rois = check_rois("roi_align", input, boxes)
    out_hw = pair("roi_align", "output_size", output_size)
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
        raise TypeError(f"roi_align: `sampling_ratio` must be an int, got {sampling_ratio!r}")
    return roi_align_unchecked(input, rois, out_hw, spatial_scale, sampling_ratio, aligned)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (as ``torchvision.ops.RoIAlign``)."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False) -> None:
        super().__init__()
        self.output_size = pair("RoIAlign", "output_size", output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")
