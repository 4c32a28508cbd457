"""R50-FPN Mask R-CNN inference: torchvision eager vs ours eager, exported (ONNX on onnxruntime and
OpenVINO, ExportedProgram on torch), same weights, same image, same machine, one run.

    python benchmarks/export.py [--threads 2] [--repeats 3] [--size 800x1066]
    python benchmarks/export.py --checkpoint outputs/demo/train/model_final.pth \
        --image outputs/demo/shapes/val/000000.png

torchvision's model is built in the reference environment with seeded random weights (as
``benchmarks/infer.py``) and loaded into our ``torchvision_maskrcnn_resnet50_fpn`` preset; with
``--checkpoint`` (e.g. the trained demo model) torchvision is left out. Every runtime runs in its
own process (peak RSS is its own), float32, ``--threads`` intra-op threads, median seconds per
image after one warm-up, on the same uint8 image. Export time is printed but not counted.
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
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from infer import BENCH_DIR, TORCHVISION, smooth_image  # noqa: E402
from reference import run_reference  # noqa: E402

# builds the model (from torchvision's weights or a checkpoint), exports it if asked, times one runtime
RUN = """
import json, sys, time
import torch
args = json.loads(sys.argv[1])
sys.path.insert(0, args["bench_dir"])
from timing import median_seconds, peak_rss_mb
torch.set_num_threads(args["threads"])
from maskrcnn._malloc import keep_freed_memory
keep_freed_memory()  # as Predictor does, whichever runtime it runs
image = torch.load(args["image"])  # (3, H, W) uint8
runtime = args["runtime"]
if runtime == "eager" or args.get("export_to"):
    import maskrcnn
    from maskrcnn.engine.predictor import Predictor
    if args["checkpoint"]:
        model = Predictor(args["checkpoint"], "cpu", [f"model.roi_heads.score_thresh={args['score_thresh']}"]).model
    else:
        from maskrcnn.interop.torchvision import load_torchvision_detection
        cfg = maskrcnn.get_config("torchvision_maskrcnn_resnet50_fpn", [f"model.roi_heads.score_thresh={args['score_thresh']}"])
        model = load_torchvision_detection(maskrcnn.build_model(cfg), args["weights"])
    model.eval()
if args.get("export_to"):
    from maskrcnn.export.exporter import export_model
    t = time.perf_counter()
    export_model(model, args["export_to"], args["format"])
    print(json.dumps({"export_seconds": time.perf_counter() - t}))
    raise SystemExit(0)
if runtime != "eager":
    from maskrcnn.export.runtime import ExportedModel
    model = ExportedModel(args["file"], runtime, threads=args["threads"])
with torch.no_grad():
    seconds, out = median_seconds(lambda: model([image])[0], args["repeats"])
torch.save({k: out[k] for k in ("boxes", "labels", "scores")}, args["out"])
print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_mb()}))
"""


def _run(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="800x1066", help="input HxW (default 800x1066)")
    ap.add_argument("--score-thresh", type=float, default=0.05)
    ap.add_argument("--checkpoint", help="a maskrcnn checkpoint to time instead of torchvision's R50-FPN weights")
    ap.add_argument("--image", help="an image file to time on (default: smooth random noise of --size)")
    args = ap.parse_args()
    if args.image:
        import numpy as np
        from PIL import Image
        image8 = torch.from_numpy(np.array(Image.open(args.image).convert("RGB"))).permute(2, 0, 1).contiguous()
        h, w = image8.shape[1:]
    else:
        h, w = (int(v) for v in args.size.split("x"))
        image8 = (smooth_image(h, w) * 255).round().to(torch.uint8)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights, img_path = Path(tmp, "w.pth"), Path(tmp, "img.pt")
        torch.save(image8, img_path)
        if not args.checkpoint:
            tv = run_reference(TORCHVISION, dict(seed=0, image=image8.float() / 255, repeats=args.repeats, load=None,
                                                 weights=str(weights), score_thresh=args.score_thresh,
                                                 bench_dir=BENCH_DIR),
                               threads=args.threads, timeout=3600)
            rows["torchvision eager"] = tv
        common = dict(threads=args.threads, repeats=args.repeats, weights=str(weights), image=str(img_path),
                      score_thresh=args.score_thresh, checkpoint=args.checkpoint, bench_dir=BENCH_DIR)
        onnx_file, pt2_file = str(Path(tmp, "m.onnx")), str(Path(tmp, "m.pt2"))
        exports = {"onnx": _run(dict(common, runtime="eager", export_to=onnx_file, format="onnx")),
                   "exported-program": _run(dict(common, runtime="eager", export_to=pt2_file, format="exported-program"))}
        outs = {}
        for name, runtime, file in (("ours eager", "eager", None), ("ours onnxruntime", "onnxruntime", onnx_file),
                                    ("ours openvino", "openvino", onnx_file),
                                    ("ours torch .pt2", "torch", pt2_file)):
            out = str(Path(tmp, f"{runtime}.pt"))
            rows[name] = _run(dict(common, runtime=runtime, file=file, out=out))
            outs[name] = torch.load(out)
    base_name = "torchvision eager" if "torchvision eager" in rows else "ours eager"
    base = rows[base_name]
    what = args.checkpoint or "R50-FPN Mask R-CNN (torchvision's architecture, seeded random weights)"
    print(f"{what}; torch {torch.__version__}; {args.threads} threads; {h}x{w} uint8 input; median of {args.repeats}")
    print(f"export time: onnx {exports['onnx']['export_seconds']:.0f} s, "
          f".pt2 {exports['exported-program']['export_seconds']:.0f} s")
    print(f"| {'':<18} | {'s/img':>7} | {'peak RSS MB':>11} | {'speed vs ' + base_name:>26} |")
    print(f"|{'-' * 20}|{'-' * 9}|{'-' * 13}|{'-' * 28}|")
    for name, r in rows.items():
        print(f"| {name:<18} | {r['seconds']:>7.3f} | {r['rss_mb']:>11.0f} | {base['seconds'] / r['seconds']:>25.2f}x |")
    ref = outs["ours eager"]
    for name, o in outs.items():
        same = torch.equal(o["labels"], ref["labels"])
        diff = (o["boxes"] - ref["boxes"]).abs().max().item() if same and ref["boxes"].numel() else float("nan")
        print(f"{name}: {o['labels'].numel()} detections, labels as ours eager: {same}, max |box diff| {diff:.2e} px")


if __name__ == "__main__":
    main()
