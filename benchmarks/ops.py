"""Detection ops, ours vs torchvision's compiled CPU kernels, timed in the same run on the same machine.

    python benchmarks/ops.py [--threads 2] [--repeats 5]

- roi_align: 1000 RoIs over the FPN levels P2-P5 of an 800x1088 image, 256 channels, 7x7 (box
  head) and 14x14 (mask head) outputs, forward and forward+backward, in torchvision's setting
  (aligned=False, sampling_ratio=2) and detectron2's (aligned=True, adaptive sampling). Both sides
  assign the RoIs to levels the same way and pool level by level.
- roi_pool: the same RoIs, 7x7.
- nms: 2000 and 10000 detector-like boxes (jittered copies around objects), IoU 0.5 and 0.7,
  against torchvision and against a naive Python-loop NMS (pick the best box, drop what it
  overlaps, repeat: the usual pure-PyTorch fallback).

torchvision runs in the reference environment (``bash scripts/make_reference_env.sh``) as a
subprocess with the same thread count; the ratio is ours / torchvision (below 1 = we are faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from reference import run_reference  # noqa: E402

from maskrcnn.modeling.poolers import assign_boxes_to_levels  # noqa: E402
from maskrcnn.ops import nms, roi_align, roi_pool  # noqa: E402
from maskrcnn.structures.boxes import pairwise_iou  # noqa: E402

STRIDES = (4, 8, 16, 32)

TIMER = """
import statistics, time
def timeit(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
"""

TV_SCRIPT = TIMER + """
import torchvision
from torchvision.ops import roi_align, roi_pool, nms
feats, rois, levels, R = inputs["feats"], inputs["rois"], inputs["levels"], inputs["repeats"]
per_level = [(rois[levels == l], 1.0 / s) for l, s in enumerate(inputs["strides"])]
res = {}
def pooled(fs, out, sr, aligned):
    return [roi_align(f, r, out, sc, sr, aligned) for f, (r, sc) in zip(fs, per_level)]
for name, out, sr, aligned in inputs["align_cases"]:
    res[name + " fwd"] = timeit(lambda: pooled(feats, out, sr, aligned), R)
    def fwbw():
        fs = [f.detach().requires_grad_(True) for f in feats]
        torch.cat([p.flatten() for p in pooled(fs, out, sr, aligned)]).sum().backward()
    res[name + " fwd+bwd"] = timeit(fwbw, R)
res["roi_pool 7x7 fwd"] = timeit(lambda: [roi_pool(f, r, 7, sc) for f, (r, sc) in zip(feats, per_level)], R)
for name, (b, s, thr) in inputs["nms_cases"].items():
    res[name] = timeit(lambda: nms(b, s, thr), R)
outputs["times"] = res
"""


def timeit(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def naive_loop_nms(boxes, scores, thr):
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = []
    while order.numel():
        i = order[0]
        keep.append(i)
        rest = order[1:]
        order = rest[pairwise_iou(boxes[i, None], boxes[rest])[0] <= thr]
    return torch.stack(keep) if keep else order


def detector_like_boxes(n, seed, n_objects=60, size=(800, 1088)):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n_objects, 2, generator=g) * torch.tensor([size[1], size[0]])
    s = torch.exp(torch.empty(n_objects, 2).uniform_(3.0, 6.0, generator=g))
    which = torch.randint(n_objects, (n,), generator=g)
    jc = c[which] + torch.randn(n, 2, generator=g) * s[which] * 0.2
    js = s[which] * torch.exp(torch.randn(n, 2, generator=g) * 0.2)
    return torch.cat([jc - js / 2, jc + js / 2], 1), torch.rand(n, generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 256, 800 // s, 1088 // s, generator=g) for s in STRIDES]
    # proposals of all sizes (8 to 700 px, aspect 1:3 to 3:1), as the box head sees them
    side = torch.exp(torch.empty(1000, 1).uniform_(2.0, 6.5, generator=g))
    aspect = torch.exp(torch.empty(1000, 1).uniform_(-0.55, 0.55, generator=g))
    xy = torch.rand(1000, 2, generator=g) * torch.tensor([1088.0, 800.0])
    boxes = torch.cat([xy, xy + torch.cat([side * aspect, side / aspect], 1)], 1)
    boxes = torch.minimum(boxes, torch.tensor([1088.0, 800.0, 1088.0, 800.0]))
    rois = torch.cat([torch.zeros(1000, 1), boxes], 1)
    levels = assign_boxes_to_levels(boxes, 2, 5)
    per_level = [(rois[levels == lv], 1.0 / s) for lv, s in enumerate(STRIDES)]

    align_cases = [("roi_align 7x7 tv", 7, 2, False), ("roi_align 14x14 tv", 14, 2, False),
                   ("roi_align 7x7 d2", 7, 0, True), ("roi_align 14x14 d2", 14, 0, True)]
    nms_cases = {}
    for n in (2000, 10000):
        b, s = detector_like_boxes(n, n)
        for thr in (0.5, 0.7):
            nms_cases[f"nms {n} boxes iou {thr}"] = (b, s, thr)

    ours = {}
    for name, out, sr, aligned in align_cases:
        def pooled(fs, out=out, sr=sr, aligned=aligned):
            return [roi_align(f, r, out, sc, sr, aligned) for f, (r, sc) in zip(fs, per_level)]

        ours[name + " fwd"] = timeit(lambda: pooled(feats), args.repeats)

        def fwbw(pooled=pooled):
            fs = [f.detach().requires_grad_(True) for f in feats]
            torch.cat([p.flatten() for p in pooled(fs)]).sum().backward()

        ours[name + " fwd+bwd"] = timeit(fwbw, args.repeats)
    ours["roi_pool 7x7 fwd"] = timeit(lambda: [roi_pool(f, r, 7, sc) for f, (r, sc) in zip(feats, per_level)],
                                      args.repeats)
    naive = {}
    for name, (b, s, thr) in nms_cases.items():
        ours[name] = timeit(lambda: nms(b, s, thr), args.repeats)
        naive[name] = timeit(lambda: naive_loop_nms(b, s, thr), max(1, args.repeats // 2))
        kept = nms(b, s, thr)
        assert torch.equal(kept, naive_loop_nms(b, s, thr)), name

    tv = run_reference(TV_SCRIPT, dict(feats=feats, rois=rois, levels=levels, strides=STRIDES, repeats=args.repeats,
                                       align_cases=align_cases, nms_cases=nms_cases), threads=args.threads)["times"]

    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}; "
          f"RoIs per level P2..P5: {[int((levels == lv).sum()) for lv in range(4)]}")
    print(f"| {'op':<34} | {'ours ms':>9} | {'torchvision ms':>14} | {'ours/tv':>7} | {'naive loop ms':>13} | {'naive/ours':>10} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 16}|{'-' * 9}|{'-' * 15}|{'-' * 12}|")
    for name, t in ours.items():
        nv = naive.get(name)
        extra = f"{nv * 1e3:>13.1f} | {nv / t:>9.1f}x" if nv is not None else f"{'':>13} | {'':>10}"
        print(f"| {name:<34} | {t * 1e3:>9.1f} | {tv[name] * 1e3:>14.1f} | {t / tv[name]:>7.2f} | {extra} |")


if __name__ == "__main__":
    main()
