"""roi_pool: parity with torchvision's kernel (forward, argmax gradient), hand cases, input checks."""

import pytest
import torch

from maskrcnn.ops import RoIPool, roi_pool

TV_SCRIPT = """
import torchvision
res = []
for case in inputs["cases"]:
    x = case["input"].clone().requires_grad_(True)
    out = torchvision.ops.roi_pool(x, case["rois"], case["output_size"], case["spatial_scale"])
    out.backward(case["grad_out"])
    res.append({"out": out.detach(), "grad": x.grad})
outputs["res"] = res
"""


def _cases(dtype):
    g = torch.Generator().manual_seed(0)
    cases = []
    for i, (out, scale) in enumerate([((7, 7), 1.0), ((7, 7), 0.25), ((3, 5), 0.5), ((14, 14), 0.125), ((2, 2), 1.0)]):
        n, c, h, w = 2, 3, 13 + i, 11 + 2 * i
        x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
        k = 30
        H, W = h / scale, w / scale
        xy = (torch.rand(k, 2, generator=g, dtype=dtype) * 1.4 - 0.2) * torch.tensor([W, H], dtype=dtype)
        size = torch.rand(k, 2, generator=g, dtype=dtype) * torch.tensor([W, H], dtype=dtype) * 0.8
        size[::6] = 0  # empty boxes still cover one cell after rounding
        size[1::6] *= 3  # larger than the map
        rois = torch.cat([torch.randint(0, n, (k, 1), generator=g).to(dtype), xy, xy + size], 1)
        rois[2::6, 1:] += torch.tensor([W, H, W, H], dtype=dtype) * 1.3  # fully outside: empty bins
        cases.append(dict(input=x, rois=rois, output_size=out, spatial_scale=scale,
                          grad_out=torch.randn(k, c, *out, generator=g, dtype=dtype)))
    cases.append(dict(input=x, rois=torch.zeros(0, 5, dtype=dtype), output_size=(7, 7), spatial_scale=1.0,
                      grad_out=torch.zeros(0, 3, 7, 7, dtype=dtype)))
    return cases


@pytest.mark.reference
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torchvision(reference, dtype):
    cases = _cases(dtype)
    ref = reference(TV_SCRIPT, {"cases": cases})["res"]
    for case, r in zip(cases, ref):
        x = case["input"].clone().requires_grad_(True)
        out = roi_pool(x, case["rois"], case["output_size"], case["spatial_scale"])
        out.backward(case["grad_out"])
        label = (case["output_size"], case["spatial_scale"])
        # max pooling selects input values: the results must be identical, not merely close
        assert torch.equal(out, r["out"]), label
        torch.testing.assert_close(x.grad, r["grad"], rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    assert sum(int((r["out"] == 0).sum()) for r in ref) > 0  # some bins are empty
    # (a third of the bins lie outside the maps on purpose; the rest pool real values)
    assert sum(int((r["out"] != 0).sum()) for r in ref) > 0.25 * sum(r["out"].numel() for r in ref)


def test_hand_computed():
    x = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6)
    # box (1, 1)-(4, 4) covers cells 1..4 (4 cells, inclusive) -> 2x2 bins of 2x2 cells: max at bottom-right
    out = roi_pool(x, torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]]), 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[14.0, 16.0], [26.0, 28.0]]))
    # corners round half away from zero: 0.5 -> 1, 3.5 -> 4
    torch.testing.assert_close(roi_pool(x, torch.tensor([[0, 0.5, 0.5, 3.5, 3.5]]), 2), out)
    # gradient goes to the argmax cell only
    xg = x.clone().requires_grad_(True)
    roi_pool(xg, torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]]), 2).sum().backward()
    assert xg.grad.sum() == 4 and xg.grad[0, 0, 4, 4] == 1 and xg.grad[0, 0, 1, 1] == 0
    # a box entirely outside the map pools nothing: zeros
    assert roi_pool(x, torch.tensor([[0, 50.0, 50.0, 60.0, 60.0]]), 3).abs().sum() == 0
    torch.testing.assert_close(RoIPool(2, 1.0)(x, [torch.tensor([[1.0, 1.0, 4.0, 4.0]])]), out)


def test_bad_input_is_named():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="x2 >= x1"):
        roi_pool(x, torch.tensor([[0, 5.0, 1.0, 1.0, 6.0]]), 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        roi_pool(x, torch.tensor([[0, float("nan"), 1.0, 1.0, 6.0]]), 2)
    with pytest.raises(ValueError, match=r"`input` must have shape"):
        roi_pool(x[0], torch.tensor([[0, 1.0, 1.0, 2.0, 6.0]]), 2)
