"""nms / batched_nms: same kept indices as torchvision, a brute-force greedy reference, ties, checks.

Both schedules are checked on the CPU: compacting (the CPU's) and the sweep (GPU/MPS).
"""

import importlib
import itertools

import pytest
import torch

from maskrcnn.ops import batched_nms, nms

nms_module = importlib.import_module("maskrcnn.ops.nms")  # `maskrcnn.ops.nms` is also the function

TV_SCRIPT = """
import torchvision
res = []
for case in inputs["cases"]:
    if case["idxs"] is None:
        res.append(torchvision.ops.nms(case["boxes"], case["scores"], case["thr"]))
    else:
        res.append(torchvision.ops.batched_nms(case["boxes"], case["scores"], case["idxs"], case["thr"]))
outputs["res"] = res
"""


def random_boxes(n, seed, dtype=torch.float32, clustered=True):
    g = torch.Generator().manual_seed(seed)
    if clustered:  # detector-like: many boxes jittered around a few objects
        obj_c = torch.rand(max(1, n // 40), 2, generator=g) * 600
        obj_s = torch.rand(obj_c.shape[0], 2, generator=g) * 200 + 10
        which = torch.randint(obj_c.shape[0], (n,), generator=g)
        c = obj_c[which] + torch.randn(n, 2, generator=g) * obj_s[which] * 0.15
        s = obj_s[which] * (1 + torch.randn(n, 2, generator=g) * 0.15).clamp(min=0.2)
    else:
        c = torch.rand(n, 2, generator=g) * 600
        s = torch.rand(n, 2, generator=g) * 100 + 1
    boxes = torch.cat([c - s / 2, c + s / 2], 1).to(dtype)
    return boxes, torch.rand(n, generator=g).to(dtype)


def greedy_reference(boxes, scores, thr):
    """The textbook definition, one box at a time, in double precision (independent of ours)."""
    b = boxes.double().tolist()
    order = sorted(range(len(b)), key=lambda i: (-float(scores[i]), i))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            iw = max(0.0, min(b[i][2], b[j][2]) - max(b[i][0], b[j][0]))
            ih = max(0.0, min(b[i][3], b[j][3]) - max(b[i][1], b[j][1]))
            inter = iw * ih
            union = (b[i][2] - b[i][0]) * (b[i][3] - b[i][1]) + (b[j][2] - b[j][0]) * (b[j][3] - b[j][1]) - inter
            if union > 0 and inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def _cases():
    cases = []
    for n, thr, clustered, seed in [(3000, 0.5, True, 0), (5000, 0.7, True, 1), (2000, 0.3, False, 2),
                                    (4000, 0.5, False, 3), (1, 0.5, True, 4), (0, 0.5, True, 5)]:
        boxes, scores = random_boxes(n, seed, clustered=clustered)
        cases.append(dict(boxes=boxes, scores=scores, thr=thr, idxs=None))
        g = torch.Generator().manual_seed(seed + 100)
        # few groups with many boxes, and many groups (classes)
        for groups in (3, 80):
            cases.append(dict(boxes=boxes, scores=scores, thr=thr, idxs=torch.randint(0, groups, (n,), generator=g)))
    boxes, scores = random_boxes(3000, 7, dtype=torch.float64)
    cases.append(dict(boxes=boxes, scores=scores, thr=0.6, idxs=None))
    # many equal scores (quantised), and exact duplicate boxes: the tie order decides the result
    boxes, scores = random_boxes(2000, 8)
    scores = (scores * 10).floor() / 10
    boxes[1::7] = boxes[0::7][: boxes[1::7].shape[0]]
    cases.append(dict(boxes=boxes, scores=scores, thr=0.5, idxs=None))
    cases.append(dict(boxes=boxes, scores=scores, thr=0.5, idxs=torch.arange(2000) % 4))
    return cases


@pytest.fixture(params=["compacting", "sweep"])
def schedule(request, monkeypatch):
    monkeypatch.setattr(nms_module, "_COMPACT_ON", ("cpu",) if request.param == "compacting" else ())
    return request.param


def _ours(case):
    if case["idxs"] is None:
        return nms(case["boxes"], case["scores"], case["thr"])
    return batched_nms(case["boxes"], case["scores"], case["idxs"], case["thr"])


@pytest.mark.reference
def test_same_indices_as_torchvision(reference):
    cases = _cases()
    ref = reference(TV_SCRIPT, {"cases": cases})["res"]
    for (i, (case, r)), compact_on in itertools.product(enumerate(zip(cases, ref)), [("cpu",), ()]):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(nms_module, "_COMPACT_ON", compact_on)
            ours = _ours(case)
        assert ours.dtype == torch.int64
        label = f"case {i}: n={case['boxes'].shape[0]} thr={case['thr']} compact_on={compact_on} " \
                f"groups={'none' if case['idxs'] is None else case['idxs'].unique().numel()}"
        if case["idxs"] is not None and case["boxes"].numel() > 4000:
            # torchvision's per-class path (over 1000 boxes on CPU) orders equal scores with an
            # unstable sort; ours orders them by index. Same boxes, same score sequence.
            assert torch.equal(ours.sort().values, r.sort().values), label
            assert torch.equal(case["scores"][ours], case["scores"][r]), label
        else:
            assert torch.equal(ours, r), label
    assert sum(r.numel() for r in ref) > 1000  # the cases keep (and drop) plenty of boxes


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_matches_textbook_greedy(thr, schedule):
    boxes, scores = random_boxes(600, int(thr * 10))
    keep = nms(boxes, scores, thr)
    assert torch.equal(keep, greedy_reference(boxes, scores, thr))
    assert 0 < keep.numel() < 600


def test_batched_is_per_group_nms(schedule):
    boxes, scores = random_boxes(800, 11)
    idxs = torch.randint(0, 5, (800,), generator=torch.Generator().manual_seed(0))
    keep = batched_nms(boxes, scores, idxs, 0.5)
    expected = []
    for gid in range(5):
        sel = torch.nonzero(idxs == gid)[:, 0]
        expected.append(sel[greedy_reference(boxes[sel], scores[sel], 0.5)])
    expected = torch.cat(expected)
    expected = expected[torch.sort(scores[expected], descending=True, stable=True).indices]
    assert set(keep.tolist()) == set(expected.tolist())
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])


@pytest.mark.parametrize("groups", [None, 5, 80])
def test_max_kept_is_the_head_of_the_full_result(groups, schedule):
    # max_kept stops early on the CPU (the RPN's and the box head's top-k); whatever it visits,
    # it must return exactly the first max_kept boxes of the full run, ties included
    g = torch.Generator().manual_seed(3)
    for n, thr, seed, clustered in [(3000, 0.7, 21, True), (2500, 0.5, 22, True), (600, 0.3, 23, False)]:
        boxes, scores = random_boxes(n, seed, clustered=clustered)
        scores = (scores * 50).floor() / 50  # many ties
        idxs = None if groups is None else torch.randint(0, groups, (n,), generator=g)
        full = nms(boxes, scores, thr) if idxs is None else batched_nms(boxes, scores, idxs, thr)
        assert 130 < full.numel() < n, full.numel()
        for k in (0, 1, 7, 128, 129, 500, full.numel(), n + 5):
            got = (nms(boxes, scores, thr, max_kept=k) if idxs is None
                   else batched_nms(boxes, scores, idxs, thr, max_kept=k))
            assert torch.equal(got, full[:k]), (n, thr, groups, k)


def test_ties_keep_the_lower_index_first(schedule):
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = box.repeat(3, 1)
    boxes[2] += 100  # a disjoint third box
    scores = torch.tensor([0.5, 0.5, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert batched_nms(boxes, scores, torch.tensor([1, 0, 0]), 0.5).tolist() == [0, 1, 2]


def test_threshold_is_strict_and_exact(schedule):
    # IoU of these two boxes is exactly 0.5: "IoU > 0.5" does not suppress
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.4999).tolist() == [0]
    # empty (zero-area) boxes never suppress each other
    z = torch.zeros(2, 4)
    assert nms(z, scores, 0.0).tolist() == [0, 1]


def test_bad_input_is_named():
    boxes, scores = random_boxes(5, 0)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="max_kept"):
            nms(boxes, scores, 0.5, max_kept=bad)
    with pytest.raises(ValueError, match=r"`boxes` must have shape \(\*, 4\)"):
        nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(ValueError, match=r"`scores` must have shape \(5\)"):
        nms(boxes, scores[:4], 0.5)
    with pytest.raises(ValueError, match="NaN or inf"):
        nms(boxes.index_fill(0, torch.tensor([1]), float("nan")), scores, 0.5)
    with pytest.raises(ValueError, match="x2 >= x1"):
        nms(boxes[:, [2, 1, 0, 3]], scores, 0.5)
    with pytest.raises(ValueError, match="`scores` contains NaN"):
        nms(boxes, scores.index_fill(0, torch.tensor([0]), float("nan")), 0.5)
    with pytest.raises(ValueError, match="`iou_threshold` must be a number in"):
        nms(boxes, scores, 1.5)
    with pytest.raises(TypeError, match="must be a floating point"):
        nms(boxes.long(), scores, 0.5)
    with pytest.raises(TypeError, match="`idxs` must be an integer tensor"):
        batched_nms(boxes, scores, scores, 0.5)
    with pytest.raises(ValueError, match=r"`idxs` must have shape \(5\)"):
        batched_nms(boxes, scores, torch.zeros(4, dtype=torch.long), 0.5)
