"""R50-FPN Mask R-CNN inference, ours vs torchvision's, same weights, same image, same machine, one run.

    python benchmarks/infer.py [--threads 2] [--repeats 3] [--size 800x1066] [--no-fast] [--no-tv-malloc]
    python benchmarks/infer.py --weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --image street.jpg

torchvision's ``maskrcnn_resnet50_fpn`` is built in the reference environment with seeded random
weights (``scripts/make_reference_env.sh``) or loaded from ``--weights`` (a torchvision state dict,
e.g. its COCO checkpoint), its state dict is converted and loaded into our
``torchvision_maskrcnn_resnet50_fpn`` preset; each side runs in its own process (so peak RSS is
its own), float32, ``--threads`` intra-op threads, median seconds per image after one warm-up.
Ours runs twice: exact (float32) and fast (``model.precision=bf16``: the layers in bf16, geometry in
float32), each as ``Predictor`` runs it (model prepared once, freed memory kept for reuse:
``maskrcnn/_malloc.py``). torchvision runs as its users run it, and again with the same malloc
setting given through glibc's environment variables, so that the share of our gain that any
torchvision user can have by setting two variables is visible.

Two cases with random weights: the score threshold 0.05 (100 detections with masks: the mask
branch at its largest) and a threshold that leaves about 5 detections, the shape of a trained model on a
real image, where few detections survive. With ``--weights`` and ``--image`` the one case is that
model on that image (resized to 800 px as both libraries do) at ``--score-thresh``.

Outputs are compared detection by detection, matched by label and box (IoU >= 0.5, best score
first), since near-tied scores of a random network can list the same detections in another order:
how many match, the largest box difference and the mask pixels agreeing among the matched. The time
of each stage of ours is printed, to show where it goes.
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
if inputs["load"]:
    model.load_state_dict(torch.load(inputs["load"], map_location="cpu"))
else:
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
from maskrcnn.modeling.inference import prepare_for_inference
from maskrcnn._malloc import keep_freed_memory
torch.set_num_threads(args["threads"])
keep_freed_memory()  # as Predictor (eval, predict) does
cfg = maskrcnn.get_config("torchvision_maskrcnn_resnet50_fpn", [f"model.roi_heads.score_thresh={args['score_thresh']}",
                                                               f"model.precision={args['precision']}"])
# as Predictor, eval and predict run it: frozen norms folded once, fast-mode weights stored in bf16
model = prepare_for_inference(load_torchvision_detection(maskrcnn.build_model(cfg), args["weights"]))
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


def match_detections(ref: dict, got: dict, min_iou: float = 0.5) -> tuple[int, float, float]:
    """Greedy matching of ``got``'s detections to ``ref``'s (best ``ref`` score first; same label,
    highest IoU >= ``min_iou``, each used once) -> (matched, max |box diff| px, mask pixels agreeing)."""
    from maskrcnn.structures.boxes import pairwise_iou

    iou = pairwise_iou(ref["boxes"].double(), got["boxes"].double())
    iou[ref["labels"][:, None] != got["labels"][None, :]] = -1
    pairs = []
    for i in torch.argsort(ref["scores"], descending=True, stable=True).tolist():
        if iou.shape[1] == 0:
            break
        j = int(iou[i].argmax())
        if iou[i, j] >= min_iou:
            pairs.append((i, j))
            iou[:, j] = -1
    if not pairs:
        return 0, float("nan"), float("nan")
    r, g = (torch.tensor(v) for v in zip(*pairs))
    box_diff = (ref["boxes"][r] - got["boxes"][g]).abs().max().item()
    agree = (ref["masks"][r] == got["masks"][g]).double().mean().item()
    return len(pairs), box_diff, agree


def run_ours(args, precision: str, score_thresh: float, weights: Path, img_path: Path, out_path: Path
             ) -> tuple[dict, dict]:
    proc = subprocess.run([sys.executable, "-c", OURS, json.dumps(dict(
        threads=args.threads, repeats=args.repeats, weights=str(weights), image=str(img_path), out=str(out_path),
        score_thresh=score_thresh, bench_dir=BENCH_DIR, precision=precision))], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(out_path)


# glibc's spelling of what maskrcnn/_malloc.py sets with mallopt, for the torchvision process
SAME_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}


def run_case(args, title: str, image: torch.Tensor, score_thresh: float, load: str | None, tmp: str) -> dict:
    """Time and compare one case; returns torchvision's detections."""
    weights = Path(load) if load else Path(tmp, "w.pth")
    img_path, out_path = Path(tmp, "img.pt"), Path(tmp, "out.pt")
    torch.save(image, img_path)

    def torchvision(env=None):
        return run_reference(TORCHVISION, dict(seed=0, image=image, repeats=args.repeats, weights=str(weights),
                                               load=load, score_thresh=score_thresh, bench_dir=BENCH_DIR),
                             threads=args.threads, timeout=3600, env=env)

    tv = torchvision()
    rows = {}
    for precision in ["float32"] + ([] if args.no_fast else ["bf16"]):
        rows[precision] = run_ours(args, precision, score_thresh, weights, img_path, out_path)
    tv_malloc = None if args.no_tv_malloc else torchvision(SAME_MALLOC)
    ref = tv["dets"]
    n = ref["boxes"].shape[0]
    names = {"float32": "ours exact", "bf16": "ours fast"}
    h, w = image.shape[-2:]
    print(f"\n## {title}: score threshold {score_thresh:.4g}, torchvision: {n} detections with masks")
    print(f"torch {torch.__version__} vs torchvision (torch 2.14.1), {args.threads} threads, {h}x{w} input, "
          f"median of {args.repeats}")
    tail = "" if tv_malloc is None else " vs tv, same malloc |"
    print(f"| {'':<27} | {'s/img':>7} | {'peak RSS MB':>11} | {'time vs tv':>10} |{tail}")
    print(f"|{'-' * 29}|{'-' * 9}|{'-' * 13}|{'-' * 12}|" + ("" if tv_malloc is None else f"{'-' * 21}|"))

    def row(name, stats):
        extra = "" if tv_malloc is None else f" {stats['seconds'] / tv_malloc['seconds']:>19.3f} |"
        print(f"| {name:<27} | {stats['seconds']:>7.3f} | {stats['rss_mb']:>11.0f} | "
              f"{stats['seconds'] / tv['seconds']:>10.3f} |{extra}")

    for precision, (stats, _) in rows.items():
        row(names[precision], stats)
    row("torchvision", tv)
    if tv_malloc is not None:
        row("torchvision, same malloc", tv_malloc)
    for precision, (_, dets) in rows.items():
        matched, box_diff, agree = match_detections(ref, dets)
        print(f"{names[precision]} vs torchvision: {matched} of {n} detections matched ({dets['boxes'].shape[0]} "
              f"found); max |box diff| {box_diff:.2e} px; mask pixels agreeing {agree:.6f}")
    stats = rows["float32"][0]
    print("where the time of ours exact goes (median s per call):")
    for k, v in stats["stages"].items():
        print(f"  {k:<38} {v:7.3f}")
    # the stages above are disjoint: what is left is preprocessing, detection NMS and mask pasting
    rest = stats["seconds"] - sum(stats["stages"].values())
    print(f"  {'the rest (resize, NMS, pasting)':<38} {rest:7.3f}")
    if "bf16" in rows:
        fast = rows["bf16"][0]
        print("where the time of ours fast goes:", ", ".join(f"{k.split(' (')[0]} {v:.3f}"
                                                             for k, v in fast["stages"].items())
              + f", the rest {fast['seconds'] - sum(fast['stages'].values()):.3f}")
    return ref


FEW = 5  # about as many detections left in the second random-weights case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="800x1066", help="input HxW of the generated image (default 800x1066: "
                    "no resize needed)")
    ap.add_argument("--score-thresh", type=float, default=0.05)
    ap.add_argument("--weights", help="a torchvision maskrcnn_resnet50_fpn state dict (e.g. its COCO checkpoint) "
                    "instead of seeded random weights; needs --image")
    ap.add_argument("--image", help="an image file to run on (with --weights)")
    ap.add_argument("--no-fast", action="store_true", help="skip the fast (bf16) row")
    ap.add_argument("--no-tv-malloc", action="store_true", help="skip torchvision with our malloc setting")
    args = ap.parse_args()
    _, why_not = fast_precision(torch.device("cpu"))
    if why_not and not args.no_fast:  # emulated bf16 would take hours here
        print(f"{why_not}: the fast row is skipped")
        args.no_fast = True
    if bool(args.weights) != bool(args.image):
        ap.error("--weights and --image go together (a trained model on a real image)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.weights:
            import numpy as np
            from PIL import Image

            rgb = np.asarray(Image.open(args.image).convert("RGB"))
            image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
            run_case(args, f"{Path(args.weights).name} on {Path(args.image).name}", image, args.score_thresh,
                     str(Path(args.weights).resolve()), tmp)
            return
        h, w = (int(v) for v in args.size.split("x"))
        image = smooth_image(h, w)
        ref = run_case(args, "random weights, all detections", image, args.score_thresh, None, tmp)
        # the same weights with a threshold in the widest gap between torchvision's 3rd and 9th best
        # scores, so that float noise between the libraries does not move a detection across it
        scores = ref["scores"].sort(descending=True).values.tolist()
        k = max(range(FEW - 2, FEW + 4), key=lambda i: scores[i - 1] - scores[i])
        few = (scores[k - 1] + scores[k]) / 2
        run_case(args, f"random weights, {k} detections", image, few, str(Path(tmp, "w.pth")), tmp)


if __name__ == "__main__":
    main()
