"""roi_align: parity with torchvision's compiled kernel, hand-computed cases, input checks.

The backward pass has two schedules, both checked on the CPU: per window of the map (the CPU's)
and per sample corner (other devices'); ``_WINDOWS_ON`` picks them.
"""

import importlib
import itertools

import pytest
import torch

from maskrcnn.ops import RoIAlign, roi_align

roi_align_module = importlib.import_module("maskrcnn.ops.roi_align")  # `maskrcnn.ops.roi_align` is the function
SCHEDULES = {"windows": ("cpu",), "corners": ()}

TV_SCRIPT = """
import torchvision
res = []
for case in inputs["cases"]:
    x = case["input"].clone().requires_grad_(True)
    out = torchvision.ops.roi_align(x, case["rois"], case["output_size"], case["spatial_scale"],
                                    case["sampling_ratio"], case["aligned"])
    out.backward(case["grad_out"])
    res.append({"out": out.detach(), "grad": x.grad})
outputs["res"] = res
"""


def _boxes(g, k, h, w, scale, dtype):
    """Boxes in image coordinates of every kind: inside, partly/fully outside, tiny, huge, empty."""
    H, W = h / scale, w / scale
    xy = torch.rand(k, 2, generator=g, dtype=dtype) * torch.tensor([W, H], dtype=dtype) * 1.4 - 0.2 * torch.tensor([W, H], dtype=dtype)
    kind = torch.arange(k) % 5
    size = torch.rand(k, 2, generator=g, dtype=dtype) * torch.tensor([W, H], dtype=dtype) * 0.6
    size[kind == 1] *= 0.02  # tiny: below one feature cell
    size[kind == 2] *= 4  # huge: larger than the map
    size[kind == 3] = 0  # empty
    boxes = torch.cat([xy, xy + size], 1)
    boxes[kind == 4] += torch.tensor([W, H, W, H], dtype=dtype) * 1.1  # fully outside
    return boxes


def _cases(dtype):
    g = torch.Generator().manual_seed(0)
    cases = []
    configs = itertools.product([False, True], [0, 1, 2, -1], [(7, 7), (5, 3)], [1.0, 0.25])
    for i, (aligned, sr, out, scale) in enumerate(configs):
        n, c, h, w = 2, 3, 11 + i % 4, 9 + i % 5
        x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
        k = 20
        boxes = _boxes(g, k, h, w, scale, dtype)
        batch = torch.randint(0, n, (k, 1), generator=g).to(dtype)
        rois = torch.cat([batch, boxes], 1)
        cases.append(dict(input=x, rois=rois, output_size=out, spatial_scale=scale, sampling_ratio=sr,
                          aligned=aligned, grad_out=torch.randn(k, c, *out, generator=g, dtype=dtype)))
    # an FPN-like map with realistic proposals, 14x14 mask pooling
    x = torch.randn(1, 8, 50, 68, generator=g, dtype=dtype)
    xy = torch.rand(64, 2, generator=g, dtype=dtype) * 180
    rois = torch.cat([torch.zeros(64, 1, dtype=dtype), xy, xy + 8 + torch.rand(64, 2, generator=g, dtype=dtype) * 90], 1)
    for aligned, sr in [(False, 2), (True, 0)]:
        cases.append(dict(input=x, rois=rois, output_size=(14, 14), spatial_scale=0.25, sampling_ratio=sr,
                          aligned=aligned, grad_out=torch.randn(64, 8, 14, 14, generator=g, dtype=dtype)))
    # no RoIs at all
    cases.append(dict(input=x, rois=torch.zeros(0, 5, dtype=dtype), output_size=(7, 7), spatial_scale=0.25,
                      sampling_ratio=2, aligned=False, grad_out=torch.zeros(0, 8, 7, 7, dtype=dtype)))
    return cases


def _ours(case):
    x = case["input"].clone().requires_grad_(True)
    out = roi_align(x, case["rois"], case["output_size"], case["spatial_scale"], case["sampling_ratio"], case["aligned"])
    out.backward(case["grad_out"])
    return out.detach(), x.grad


@pytest.mark.reference
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_matches_torchvision(reference, dtype, tol):
    cases = _cases(dtype)
    ref = reference(TV_SCRIPT, {"cases": cases})["res"]
    for (case, r), schedule in itertools.product(zip(cases, ref), SCHEDULES):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(roi_align_module, "_WINDOWS_ON", SCHEDULES[schedule])
            out, grad = _ours(case)
        label = {k: case[k] for k in ("output_size", "spatial_scale", "sampling_ratio", "aligned")} | {"schedule": schedule}
        assert out.shape == r["out"].shape, label
        torch.testing.assert_close(out, r["out"], rtol=0, atol=tol, msg=lambda m: f"forward {label}: {m}")
        torch.testing.assert_close(grad, r["grad"], rtol=0, atol=tol, msg=lambda m: f"backward {label}: {m}")
    # the comparison is not vacuous: most outputs are non-zero
    assert sum(int((r["out"] != 0).sum()) for r in ref) > 0.5 * sum(r["out"].numel() for r in ref)


def test_hand_computed_constant_and_ramp():
    # On f(y, x) = 3x + 2y + 1, bilinear interpolation is exact, so each bin's average equals f at
    # the mean of its sample points: the bin centre.
    h, w = 8, 10
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    f = (3 * xs + 2 * ys + 1)[None, None]
    box = torch.tensor([[0, 1.0, 2.0, 5.0, 6.0]], dtype=torch.float64)
    out = roi_align(f, box, (2, 2), 1.0, 2, aligned=False)[0, 0]
    # bins are 2x2 pixels starting at (x=1, y=2): centres x in {2, 4}, y in {3, 5}
    expected = torch.tensor([[3 * 2 + 2 * 3 + 1, 3 * 4 + 2 * 3 + 1], [3 * 2 + 2 * 5 + 1, 3 * 4 + 2 * 5 + 1]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    # aligned=True shifts the box by half a pixel
    out = roi_align(f, box, (2, 2), 1.0, 2, aligned=True)[0, 0]
    torch.testing.assert_close(out, expected - 3 * 0.5 - 2 * 0.5)


def test_list_of_boxes_equals_rois_and_module():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 12, 12, generator=g)
    b0 = torch.tensor([[1.0, 1.0, 6.0, 8.0]])
    b1 = torch.tensor([[0.0, 2.0, 11.0, 5.0], [3.0, 3.0, 4.0, 4.0]])
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 8.0], [1, 0.0, 2.0, 11.0, 5.0], [1, 3.0, 3.0, 4.0, 4.0]])
    a = roi_align(x, [b0, b1], 3, 1.0, 2, True)
    torch.testing.assert_close(a, roi_align(x, rois, 3, 1.0, 2, True))
    torch.testing.assert_close(a, RoIAlign(3, 1.0, 2, True)(x, rois))
    # the image index is honoured: pooling image 1 differs from pooling image 0
    assert not torch.allclose(a[1], roi_align(x, [b1, b0], 3, 1.0, 2, True)[0])


def test_half_precision_and_channels_last_input():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 20, 24, generator=g)
    rois = torch.tensor([[0, 2.0, 3.0, 15.0, 17.0], [0, 0.0, 0.0, 23.0, 19.0]])
    ref = roi_align(x, rois, 7, 1.0, 2)
    torch.testing.assert_close(roi_align(x.contiguous(memory_format=torch.channels_last), rois, 7, 1.0, 2), ref)
    out = roi_align(x.bfloat16(), rois.bfloat16(), 7, 1.0, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), roi_align(x.bfloat16().float(), rois.bfloat16().float(), 7, 1.0, 2),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bad,match", [
    (lambda x, r: (x[0], r), r"`input` must have shape \(\*, \*, \*, \*\)"),
    (lambda x, r: (x.long(), r), "`input` must be a floating point"),
    (lambda x, r: (x, r[:, 1:]), r"`boxes` must be a \(K, 5\) tensor"),
    (lambda x, r: (x, r[:, :, None]), r"`boxes` must be a \(K, 5\) tensor"),
    (lambda x, r: (x, r.clone().index_fill_(1, torch.tensor([2]), float("nan"))), "NaN or inf"),
    (lambda x, r: (x, r.clone().index_fill_(1, torch.tensor([3]), float("inf"))), "NaN or inf"),
    (lambda x, r: (x, r[:, [0, 3, 2, 1, 4]]), "x2 >= x1"),
    (lambda x, r: (x, r.clone().index_fill_(1, torch.tensor([0]), 5.0)), r"image indices in \[0, 1\]"),
    (lambda x, r: (x, r.clone().index_fill_(1, torch.tensor([0]), 0.5)), "integer image indices"),
    (lambda x, r: (x, [r[:, 1:], r[:, 1:], r[:, 1:]]), "boxes for 3 images"),
    (lambda x, r: (x, "boxes"), "must be a \\(K, 5\\) tensor or a list"),
])
def test_bad_input_is_named(bad, match):
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0], [1, 0.0, 0.0, 3.0, 3.0]])
    args = bad(x, rois)
    with pytest.raises((ValueError, TypeError), match=match):
        roi_align(*args, output_size=2)


def test_bad_output_size_and_device_mismatch():
    x = torch.randn(1, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0]])
    with pytest.raises(ValueError, match="`output_size` must be positive"):
        roi_align(x, rois, 0)
    with pytest.raises(TypeError, match="`output_size` must be an int or a pair"):
        roi_align(x, rois, (2, 2, 2))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="same device"):
            roi_align(x.cuda(), rois, 2)


def test_backward_schedules_agree_on_proposal_like_rois():
    # FPN-level maps and proposals of the sizes a level gets (the windows' common case), plus big
    # sparsely sampled RoIs (a chunk of those goes through the corners), several images, both rules
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 16, 40, 52, generator=g, dtype=torch.float64)
    wh = torch.rand(90, 2, generator=g, dtype=torch.float64) * 100 + 2
    wh[::9] *= 3
    xy = torch.rand(90, 2, generator=g, dtype=torch.float64) * 200 - 20
    rois = torch.cat([torch.randint(0, 3, (90, 1), generator=g).double(), xy, xy + wh], 1)
    grad_out = torch.randn(90, 16, 14, 14, generator=g, dtype=torch.float64)
    for aligned, sr in [(False, 2), (True, 0), (False, 1)]:
        grads = []
        for schedule in SCHEDULES.values():
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(roi_align_module, "_WINDOWS_ON", schedule)
                t = x.clone().requires_grad_(True)
                roi_align(t, rois, 14, 0.25, sr, aligned).backward(grad_out)
                grads.append(t.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)
        assert (grads[0] != 0).float().mean() > 0.3


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_gradcheck_float64(schedule, monkeypatch):
    monkeypatch.setattr(roi_align_module, "_WINDOWS_ON", SCHEDULES[schedule])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 5.1], [0, -1.5, 2.0, 9.0, 4.4]], dtype=torch.float64)
    for aligned, sr in [(False, 2), (True, 0)]:
        assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (3, 2), 1.0, sr, aligned), (x,))
