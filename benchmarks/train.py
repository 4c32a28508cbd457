"""R50-FPN Mask R-CNN training step on the CPU, ours vs torchvision's, same weights and batch, one run.

    python benchmarks/train.py [--threads 2] [--steps 4] [--size 512] [--batch 2] [--no-bf16]

torchvision's ``maskrcnn_resnet50_fpn`` (frozen-BN ResNet-50 trunk, stem and res2 frozen: its
default ``trainable_backbone_layers=3``) is built with seeded random weights in the reference
environment; its state dict is converted into our ``torchvision_maskrcnn_resnet50_fpn`` preset
(the same freezing). Both train on the same batch of images resized to ``--size`` (shortest side)
with boxes, labels and full-image masks; a step is forward + backward + SGD update. Each side runs
in its own process; the median seconds per step after one warm-up step are compared. Ours also runs
with ``solver.amp=bf16`` (bf16 autocast for the network's layers, geometry in float32), the
fast training mode on a CPU with bf16 units, again against torchvision's float32 step.
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

from maskrcnn.structures.precision import fast_precision  # noqa: E402

# the timed loop, run by both interpreters on their own model, images and targets
STEPS = """
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
times = []
for _ in range(STEP_COUNT + 1):
    t = time.perf_counter()
    with PRECISION:
        losses = model(IMAGES, TARGETS)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    times.append(time.perf_counter() - t)
seconds = statistics.median(times[1:])
"""

TORCHVISION = """
import contextlib, statistics, sys, time
sys.path.insert(0, inputs["bench_dir"])
from timing import peak_rss_mb
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d
torch.manual_seed(0)
model = MaskRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=91,
                 min_size=inputs["size"], max_size=int(inputs["size"] * 1333 / 800))
randomize_norms(model, 0)
torch.save(model.state_dict(), inputs["weights"])
model.train()
STEP_COUNT, IMAGES, TARGETS = inputs["steps"], inputs["images"], inputs["targets"]
PRECISION = contextlib.nullcontext()
""" + STEPS + """
outputs["seconds"] = seconds
outputs["rss_mb"] = peak_rss_mb()
"""

OURS = """
import json, statistics, sys, time
import torch
import maskrcnn
from maskrcnn.interop.torchvision import load_torchvision_detection
from maskrcnn.structures.precision import network_precision
from maskrcnn._malloc import keep_freed_memory
args = json.loads(sys.argv[1])
sys.path.insert(0, args["bench_dir"])
from timing import peak_rss_mb
torch.set_num_threads(args["threads"])
keep_freed_memory()  # as train() and the command line do
size = args["size"]
cfg = maskrcnn.get_config("torchvision_maskrcnn_resnet50_fpn", [
    f"model.input.min_size_train=[{size}]", f"model.input.max_size_train={int(size * 1333 / 800)}"])
model = load_torchvision_detection(maskrcnn.build_model(cfg), args["weights"]).train()
data = torch.load(args["data"])
STEP_COUNT, IMAGES, TARGETS = args["steps"], data["images"], data["targets"]
PRECISION = network_precision(torch.device("cpu"), args["amp"], "solver.amp")
""" + STEPS + """
print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_mb()}))
"""


def batch(n: int, h: int, w: int):
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(n):
        low = torch.rand(1, 3, h // 32, w // 32, generator=g)
        images.append(torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0])
        k = 5
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.25, h * 0.25]) + 16
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(k, h, w, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 91, (k,), generator=g), "masks": masks})
    return images, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=512, help="shortest side of the training images")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 (solver.amp=bf16) row")
    args = ap.parse_args()
    _, why_not = fast_precision(torch.device("cpu"))
    if why_not and not args.no_bf16:  # emulated bf16 would take hours here
        print(f"{why_not}: the bf16 row is skipped")
        args.no_bf16 = True
    images, targets = batch(args.batch, args.size, int(args.size * 4 / 3))
    with tempfile.TemporaryDirectory() as tmp:
        weights, data = Path(tmp, "w.pth"), Path(tmp, "data.pt")
        torch.save({"images": images, "targets": targets}, data)
        tv = run_reference(TORCHVISION, dict(images=images, targets=targets, size=args.size, steps=args.steps,
                                             weights=str(weights), bench_dir=BENCH_DIR), threads=args.threads, timeout=3600)
        rows = {}
        for amp in [""] + ([] if args.no_bf16 else ["bf16"]):
            proc = subprocess.run([sys.executable, "-c", OURS, json.dumps(dict(
                threads=args.threads, steps=args.steps, weights=str(weights), data=str(data), size=args.size,
                amp=amp, bench_dir=BENCH_DIR))], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr)
            rows["ours, bf16" if amp else "ours"] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"torch {torch.__version__} vs torchvision (torch 2.14.1), {args.threads} threads, batch {args.batch} "
          f"of {args.size}x{int(args.size * 4 / 3)}, median of {args.steps} steps (forward+backward+SGD)")
    print(f"| {'':<12} | {'s/step':>7} | {'peak RSS MB':>11} | {'time / torchvision':>18} |")
    print(f"|{'-' * 14}|{'-' * 9}|{'-' * 13}|{'-' * 20}|")
    for name, r in {**rows, "torchvision": tv}.items():
        print(f"| {name:<12} | {r['seconds']:>7.3f} | {r['rss_mb']:>11.0f} | {r['seconds'] / tv['seconds']:>18.3f} |")
    for name, r in rows.items():
        print(f"ratio {name}/torchvision: {r['seconds'] / tv['seconds']:.3f} (time), "
              f"{r['rss_mb'] / tv['rss_mb']:.3f} (peak RSS)")


if __name__ == "__main__":
    main()
