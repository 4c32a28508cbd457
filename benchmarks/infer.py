"""R50-FPN Mask R-CNN inference, ours vs torchvision's, same weights, same image, same machine, one run.

    python benchmarks/infer.py [--threads 2] [--repeats 3] [--size 800x1066]

torchvision's ``maskrcnn_resnet50_fpn`` is built in the reference environment with seeded random
weights (``scripts/make_reference_env.sh``), its state dict is converted and loaded into our
``torchvision_maskrcnn_resnet50_fpn`` preset; each side runs in its own process (so peak RSS is
its own), float32, ``--threads`` intra-op threads, median seconds per image after one warm-up.
Outputs are compared (labels equal, boxes close, mask pixels agreeing) and the time of each
stage of ours is printed, to show where it goes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = str(REPO / "benchmarks")  # for the processes below to import timing.py
sys.path.insert(0, str(REPO / "tests"))
from reference import run_reference  # noqa: E402

TORCHVISION = """
import sys
sys.path.insert(0, inputs["bench_dir"])
from timing import median_seconds, peak_rss_mb
import torchvision
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d
torch.manual_seed(inputs["seed"])
model = MaskRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=91,
                 box_score_thresh=inputs["score_thresh"]).eval()
randomize_norms(model, inputs["seed"])
torch.save(model.state_dict(), inputs["weights"])
image = inputs["image"]
with torch.no_grad():
    outputs["seconds"], out = median_seconds(lambda: model([image])[0], inputs["repeats"])
outputs["rss_mb"] = peak_rss_mb()
outputs["dets"] = {"boxes": out["boxes"], "labels": out["labels"], "scores": out["scores"],
                   "masks": out["masks"][:, 0] >= 0.5}
"""

OURS = """
import json, statistics, sys, time
import torch
args = json.loads(sys.argv[1])
sys.path.insert(0, args["bench_dir"])
from timing import median_seconds, peak_rss_mb
import maskrcnn
from maskrcnn.interop.torchvision import load_torchvision_detection
torch.set_num_threads(args["threads"])
cfg = maskrcnn.get_config("torchvision_maskrcnn_resnet50_fpn", [f"model.roi_heads.score_thresh={args['score_thresh']}"])
model = load_torchvision_detection(maskrcnn.build_model(cfg), args["weights"]).eval()
image = torch.load(args["image"])
stages = {}
def timed(name, module):
    def pre(m, i):
        stages.setdefault(name, []).append(-time.perf_counter())
    def post(m, i, o):
        stages[name][-1] += time.perf_counter()
    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)
timed("backbone (ResNet-50 + FPN)", model.backbone)
timed("rpn (head, anchors, top-k, NMS)", model.rpn)
timed("box head (2 FC)", model.roi_heads.box_head)
timed("box pooling (RoIAlign 7x7)", model.roi_heads.box_pooler)
timed("mask branch (RoIAlign 14x14 + head)", model.roi_heads.mask_head)
with torch.no_grad():
    total, out = median_seconds(lambda: model([image])[0], args["repeats"])
prof = {k: statistics.median(v[1:]) for k, v in stages.items()}
torch.save({"boxes": out["boxes"], "labels": out["labels"], "scores": out["scores"], "masks": out["masks"][:, 0]},
           args["out"])
print(json.dumps({"seconds": total, "rss_mb": peak_rss_mb(),
                  "stages": prof}))
"""


def smooth_image(h: int, w: int) -> torch.Tensor:
    """The benchmark input: seeded noise at 1/32 scale, upsampled, ``(3, h, w)`` float in [0, 1]."""
    low = torch.rand(1, 3, h // 32, w // 32, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="800x1066", help="input HxW (default 800x1066: no resize needed)")
    ap.add_argument("--score-thresh", type=float, default=0.05)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    image = smooth_image(h, w)
    with tempfile.TemporaryDirectory() as tmp:
        weights, img_path, out_path = Path(tmp, "w.pth"), Path(tmp, "img.pt"), Path(tmp, "out.pt")
        torch.save(image, img_path)
        tv = run_reference(TORCHVISION, dict(seed=0, image=image, repeats=args.repeats, weights=str(weights),
                                             score_thresh=args.score_thresh, bench_dir=BENCH_DIR),
                           threads=args.threads, timeout=3600)
        proc = subprocess.run([sys.executable, "-c", OURS, json.dumps(dict(
            threads=args.threads, repeats=args.repeats, weights=str(weights), image=str(img_path), out=str(out_path),
            score_thresh=args.score_thresh, bench_dir=BENCH_DIR))], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr)
        ours = json.loads(proc.stdout.strip().splitlines()[-1])
        dets = torch.load(out_path)
    ref = tv["dets"]
    n = ref["boxes"].shape[0]
    same_labels = torch.equal(dets["labels"], ref["labels"])
    box_diff = (dets["boxes"] - ref["boxes"]).abs().max().item() if same_labels and n else float("nan")
    mask_agree = (dets["masks"] == ref["masks"]).double().mean().item() if same_labels and n else float("nan")
    print(f"torch {torch.__version__} vs torchvision (torch 2.14.1), {args.threads} threads, {h}x{w} input, "
          f"median of {args.repeats}, {n} detections with masks")
    print(f"| {'':<12} | {'s/img':>7} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 14}|{'-' * 9}|{'-' * 13}|")
    print(f"| {'ours':<12} | {ours['seconds']:>7.3f} | {ours['rss_mb']:>11.0f} |")
    print(f"| {'torchvision':<12} | {tv['seconds']:>7.3f} | {tv['rss_mb']:>11.0f} |")
    print(f"ratio ours/torchvision: {ours['seconds'] / tv['seconds']:.3f} (time), "
          f"{ours['rss_mb'] / tv['rss_mb']:.3f} (peak RSS)")
    print(f"outputs: labels identical: {same_labels}; max |box diff| {box_diff:.2e} px; "
          f"mask pixels agreeing {mask_agree:.6f}")
    print("where our time goes (median s per call):")
    for k, v in ours["stages"].items():
        print(f"  {k:<38} {v:7.3f}")
    rest = ours["seconds"] - ours["stages"]["backbone (ResNet-50 + FPN)"] - ours["stages"]["rpn (head, anchors, top-k, NMS)"]
    print(f"  {'roi heads + postprocess (rest)':<38} {rest:7.3f}")


if __name__ == "__main__":
    main()
