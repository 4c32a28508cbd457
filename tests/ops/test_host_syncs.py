"""The ops' hot paths do not read the device back per step, and create no float64 (MPS has none).

On a GPU every host read (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, ...) waits for all
queued kernels. The CPU tests count the calls that would read a device tensor back with a
``TorchFunctionMode``; the CUDA tests (skipped here) use torch's own sync detector.
"""

import importlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from maskrcnn._checks import check_boxes
from maskrcnn.ops import batched_nms, nms, roi_align, roi_pool
from maskrcnn.ops.nms import batched_nms_unchecked
from maskrcnn.ops.roi_align import roi_align_unchecked

from host_reads import HostReads
from test_nms import greedy_reference, random_boxes

nms_module = importlib.import_module("maskrcnn.ops.nms")  # `maskrcnn.ops.nms` is also the function
roi_align_module = importlib.import_module("maskrcnn.ops.roi_align")

def _reads(fn, *args):
    with HostReads() as mode:
        fn(*args)
    return mode.calls


@pytest.fixture
def sweep(monkeypatch):
    """The GPU schedule of NMS, run on the CPU."""
    monkeypatch.setattr(nms_module, "_COMPACT_ON", ())


def test_the_counter_sees_every_kind_of_read():
    t = torch.tensor([1.0, 0.0, 2.0])
    probes = [lambda: t[0].item(), lambda: t.tolist(), lambda: bool(t[0]), lambda: int(t[0]),
              lambda: float(t[0]), lambda: [0, 1][t[1].long()], lambda: t.nonzero(), lambda: torch.nonzero(t),
              lambda: torch.unique(t), lambda: t.unique(), lambda: t.cpu(), lambda: t.numpy(),
              lambda: torch.equal(t, t), lambda: t[t > 0], lambda: torch.where(t > 0), lambda: t.masked_select(t > 0)]
    assert [len(_reads(p)) for p in probes] == [1] * len(probes)
    assert _reads(lambda: (t[1:] * 2 + t[:2]).sum()) == []  # slicing and arithmetic are not reads


def test_compacting_nms_reads_per_block():
    # The CPU schedule reads back per block (free on a CPU): this is what the counter must catch.
    boxes, scores = random_boxes(3000, 0)
    assert len(_reads(nms, boxes, scores, 0.5)) > 20


@pytest.mark.usefixtures("sweep")
def test_nms_sweep_reads_once_whatever_the_number_of_boxes():
    for n in (300, 3000):
        boxes, scores = random_boxes(n, 1)
        idxs = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(n))
        # one for the argument checks, one for the result (its length depends on the data)
        assert len(_reads(nms, boxes, scores, 0.5)) == 2, n
        # with groups, one more before the sweep: how far each block's groups reach
        assert len(_reads(batched_nms_unchecked, boxes, scores, idxs, 0.5)) == 2, n
        assert len(_reads(batched_nms, boxes, scores, idxs, 0.5)) == 3, n


@pytest.mark.usefixtures("sweep")
def test_nms_sweep_reruns_a_long_suppression_chain_exactly():
    # Each box overlaps only its neighbours (IoU 7/13 > 0.5 at a shift of 3): whether a box is
    # kept alternates along the chain, which takes one round per box to settle.
    n = 300
    x = torch.arange(n, dtype=torch.float32) * 3
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)
    scores = torch.linspace(1, 0.1, n)
    with HostReads() as mode:
        keep = nms(boxes, scores, 0.5)
    assert torch.equal(keep, greedy_reference(boxes, scores, 0.5))
    assert torch.equal(keep, torch.arange(0, n, 2))
    assert len(mode.calls) > 2  # it did need the larger budgets


def _pyramid_rois(k, seed):
    """RoIs of many sizes (0 to 240 px) on a 2-image, stride-4 map: several sampling-grid groups."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * 150
    wh = torch.rand(k, 2, generator=g) ** 3 * 240
    batch = torch.randint(0, 2, (k, 1), generator=g).float()
    return torch.cat([batch, xy, xy + wh], 1)


def test_roi_align_reads_once_per_call_with_adaptive_sampling():
    x = torch.randn(2, 4, 48, 56, requires_grad=True)
    for k in (8, 200):
        rois = _pyramid_rois(k, k)
        if k == 200:
            assert len(roi_align_module._groups(rois, 0.25, (7, 7), -1, True)) >= 4
        with HostReads() as mode:
            out = roi_align_unchecked(x, rois, (7, 7), 0.25, -1, True)
        assert len(mode.calls) == 1, mode.calls  # the grid sizes of the groups
        with HostReads() as mode:
            out.backward(torch.ones_like(out))  # reuses the forward's groups
        assert mode.calls == []
        with HostReads() as mode:
            out = roi_align_unchecked(x, rois, (7, 7), 0.25, 2, False)
            out.backward(torch.ones_like(out))
        assert mode.calls == []  # a fixed sampling ratio needs no grouping
        assert len(_reads(roi_align, x, rois, 7, 0.25, -1, True)) == 2  # + the argument checks
        assert len(_reads(roi_pool, x, rois, 7, 0.25)) == 2


def test_argument_checks_read_once_for_all_images():
    x = torch.randn(4, 2, 16, 16)
    boxes = [torch.tensor([[1.0, 1.0, 9.0, 9.0], [2.0, 3.0, 4.0, 5.0]]) for _ in range(4)]
    assert len(_reads(roi_align, x, boxes, 2, 1.0, 2)) == 1
    assert len(_reads(check_boxes, "f", "b", boxes[0])) == 1
    # the message still names the image and the problem
    bad = [b.clone() for b in boxes]
    bad[2][1, 3] = float("nan")
    bad[3][0] = torch.tensor([5.0, 1.0, 1.0, 9.0])
    with pytest.raises(ValueError, match=r"roi_align: `boxes\[2\]` contains NaN or inf values \(rows \[1\]\)"):
        roi_align(x, bad, 2)
    with pytest.raises(ValueError, match=r"`boxes\[3\]` must be \(x1, y1, x2, y2\) boxes .* rows \[0\]"):
        roi_align(x, bad[:2] + [boxes[2], bad[3]], 2)


class Float64Made(TorchDispatchMode):
    """Records every aten op that produces a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.dtype == torch.float64 for o in outs):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("sampling_ratio,aligned", [(-1, True), (0, False), (2, False)])
def test_no_float64_from_float32_inputs(sampling_ratio, aligned):
    x = torch.randn(2, 4, 48, 56, requires_grad=True)
    rois = _pyramid_rois(30, 3)
    boxes, scores = random_boxes(300, 2)
    with Float64Made() as mode:
        roi_align(x, rois, 7, 0.25, sampling_ratio, aligned).sum().backward()
        roi_pool(x, rois, 7, 0.25).sum().backward()
        nms(boxes, scores, 0.5)
        batched_nms(boxes, scores, torch.arange(300) % 3, 0.5)
    assert mode.ops == []


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_hot_loops_do_not_synchronise():
    dev = torch.device("cuda")
    boxes, scores = random_boxes(3000, 4)
    boxes, scores = boxes.to(dev), scores.to(dev)
    idxs = (torch.arange(3000) % 7).to(dev)
    x = torch.randn(2, 4, 48, 56, device=dev, requires_grad=True)
    rois = _pyramid_rois(200, 5).to(dev)
    groups = roi_align_module._groups(rois, 0.25, (7, 7), -1, True)  # the one read, outside
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        nms_module._sweep(boxes, None, 0.5, [3000] * 24, 8)
        nms_module._sweep(boxes, idxs.sort().values, 0.5, [3000] * 24, 8)
        out = roi_align_module._forward(x.detach(), rois, (7, 7), 0.25, True, groups)
        roi_align_module._backward(out, rois, x.shape, (7, 7), 0.25, True, groups)
        out = roi_align_unchecked(x, rois, (7, 7), 0.25, 2, False)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda
def test_cuda_syncs_per_call_are_few_and_results_match_cpu():
    dev = torch.device("cuda")

    def syncs(fn, *args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = fn(*args)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return result, sum("synchroniz" in str(w.message) for w in caught)

    for n in (300, 3000):
        boxes, scores = random_boxes(n, 6)
        idxs = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(n))
        keep, k1 = syncs(nms_module._nms_sorted, boxes.to(dev), None, 0.5)
        assert torch.equal(keep.cpu(), nms_module._nms_sorted(boxes, None, 0.5))
        keep, k2 = syncs(batched_nms_unchecked, boxes.to(dev), scores.to(dev), idxs.to(dev), 0.5)
        assert torch.equal(keep.cpu(), batched_nms_unchecked(boxes, scores, idxs, 0.5))
        assert (k1, k2) == (1, 2), n
