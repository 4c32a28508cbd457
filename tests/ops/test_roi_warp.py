"""RoIWarp: the RoI snapped to feature cells (as RoIPool rounds it), then sampled bilinearly."""

import torch

from maskrcnn.modeling.poolers import MultiLevelRoIPooler
from maskrcnn.ops.roi_align import roi_align
from maskrcnn.ops.roi_warp import quantize_rois, roi_warp_unchecked


def _ramp(h=12, w=16):
    """Feature value = the cell's column index: bilinear sampling at x reads x - 0.5 (cell centres at c + 0.5)."""
    return torch.arange(w, dtype=torch.float64).expand(1, 1, h, w).clone()


def test_hand_computed_ramp():
    rois = torch.tensor([[0, 13.0, 8.0, 30.0, 24.0]], dtype=torch.float64)
    # stride 4: x 3.25 -> 3, 7.5 -> 8 (half away from zero); cells 3..8 inclusive = [3, 9), 6 wide;
    # 3 bins centred at 4, 6, 8 read 3.5, 5.5, 7.5
    warp = roi_warp_unchecked(_ramp(), rois, (2, 3), 0.25, 2)[0, 0]
    assert torch.allclose(warp, torch.tensor([[3.5, 5.5, 7.5]] * 2, dtype=torch.float64))
    # RoIAlign keeps [3.25, 7.5): bins centred at 3.958, 5.375, 6.792 read 0.5 less
    align = roi_align(_ramp(), rois, (2, 3), 0.25, 2, aligned=True)[0, 0]
    assert torch.allclose(align, torch.tensor([[3.25 + 4.25 / 6 * k - 0.5 for k in (1, 3, 5)]] * 2, dtype=torch.float64))
    assert torch.equal(quantize_rois(rois, 0.25), torch.tensor([[0, 3.0, 2.0, 9.0, 7.0]], dtype=torch.float64))


def test_quantization_ignores_sub_cell_shifts_that_roialign_sees():
    feats = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    base = torch.tensor([[0, 20.0, 16.0, 52.0, 44.0]], dtype=torch.float64)
    shifted = base + torch.tensor([0, 1.5, -1.5, 1.0, 1.2], dtype=torch.float64)  # < half a cell at stride 8
    w0, w1 = (roi_warp_unchecked(feats, r, (7, 7), 0.125, 2) for r in (base, shifted))
    a0, a1 = (roi_align(feats, r, (7, 7), 0.125, 2, aligned=True) for r in (base, shifted))
    assert torch.equal(w0, w1) and not torch.allclose(a0, a1)


def test_pooler_type_roiwarp_gradients():
    pooler = MultiLevelRoIPooler(7, (4, 8), sampling_ratio=2, pooler_type="ROIWarp")
    feats = [torch.randn(1, 2, 32, 32, requires_grad=True), torch.randn(1, 2, 16, 16, requires_grad=True)]
    out = pooler(feats, [torch.tensor([[4.0, 4.0, 40.0, 50.0], [0.0, 0.0, 127.0, 127.0]])])
    out.sum().backward()
    assert out.shape == (2, 2, 7, 7) and all(f.grad.abs().sum() > 0 for f in feats)
