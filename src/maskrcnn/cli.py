"""The ``maskrcnn`` command line: train, eval, predict, demo, convert (and smoke)."""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

from maskrcnn import __version__

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FAST_HELP = ("fast mode: the network's layers in bf16 (--set model.precision=bf16), for a CPU with bf16 units "
             "(AMX or avx512_bf16) or a GPU; boxes, NMS and masks stay float32. A CPU without bf16 units "
             "keeps float32 (emulated bf16 is up to hundreds of times slower)")
RUNTIME_HELP = ("torch (default for checkpoints and .pt2), onnxruntime (default for .onnx) or openvino (.onnx, "
                "CPU): --weights is then a file written by 'maskrcnn export'")
CLASSES_HELP = ("the classes of the checkpoint: a COCO JSON (its categories: ids and names, labels by sorted id as "
                "in detectron2; a torchvision head with one slot per id 1..max id also fits), a JSON/YAML list of "
                "names, or a text file with one name per line (ids 1..K; a leading __background__ is dropped)")


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", "-c", default=default, metavar="PRESET_OR_YAML",
                   help="a preset name (see `maskrcnn train --list-presets`) or a YAML file"
                   + (f" (default: {default})" if default else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set solver.max_iter=2000 (repeatable; values are YAML)")


# exit codes (listed in `maskrcnn --help`)
EXIT_INPUT, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    """One line per usage error, and ``--debug`` on every command (before or after its name)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser must not reset a --debug given before the subcommand
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error (or set MASKRCNN_DEBUG=1)")

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN included
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


WEIGHTS_HELP = "checkpoint (from train or convert), or with --config a detectron2 .pkl/.pth or torchvision .pth"


def _add_weights_args(p: argparse.ArgumentParser, weights_help: str = WEIGHTS_HELP) -> None:
    """--weights and --config (the model of a foreign checkpoint), as eval, predict, export and serve take them."""
    p.add_argument("--weights", "-w", required=True, help=weights_help)
    p.add_argument("--config", "-c", metavar="PRESET_OR_YAML",
                   help="the model of a detectron2/torchvision --weights file (e.g. detectron2_mask_rcnn_R_50_FPN_3x)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="maskrcnn",
        description="Mask R-CNN family (Mask R-CNN, Cascade Mask R-CNN, Keypoint R-CNN) in pure PyTorch: "
                    "train on COCO-format data, evaluate with COCO AP, predict, convert checkpoints.",
        epilog="Start with `maskrcnn demo`; each command has its own --help. Exit status: 0 done; "
               f"{EXIT_INPUT} an error in the inputs (a file, the data, the config, a checkpoint, an output folder), "
               f"told in one line on stderr; {EXIT_USAGE} a wrong command line; {EXIT_BUG} an internal error (a bug: "
               f"its traceback is printed, please report it); {EXIT_INTERRUPTED} interrupted. --debug (or "
               "MASKRCNN_DEBUG=1) shows the traceback of any error.")
    p.add_argument("--version", action="version", version=f"maskrcnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (COCO-format data, or the built-in shapes)",
                       description="Train on data.train_json/data.train_images (COCO instances format), evaluating "
                       "on data.val_json if given; without data paths, on the built-in synthetic shapes. "
                       "Multi-GPU / multi-node: torchrun --nproc_per_node=N -m maskrcnn train ...")
    _add_config_args(t, "shapes_R_18_FPN")
    t.add_argument("--output", help="output folder (train.output_dir)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    t.add_argument("--overwrite", action="store_true", help="start over in an output folder that holds another run "
                   "(its checkpoints, metrics, events and analysis are removed first)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--list-presets", action="store_true", help="print the preset names and exit")

    e = sub.add_parser("eval", help="COCO AP (bbox, segm, keypoints) of a checkpoint on a dataset",
                       description="Evaluate a checkpoint on data.val_json (or --dataset) with pycocotools; prints "
                       "the 12-number summaries and per-class AP, writes COCO results JSON.")
    _add_weights_args(e)
    e.add_argument("--dataset", help="instances JSON to evaluate on (default: the checkpoint's data.val_json)")
    e.add_argument("--images", help="image folder of --dataset (default: the JSON's folder)")
    e.add_argument("--output", default="outputs/eval", help="where results JSON go (default: outputs/eval)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="inference overrides, e.g. --set model.roi_heads.score_thresh=0.01")
    e.add_argument("--device", default="auto")
    e.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino"], help=RUNTIME_HELP)
    e.add_argument("--fast", action="store_true", help=FAST_HELP)
    e.add_argument("--no-progress", action="store_true", help="no progress bar (none either when not on a terminal)")
    e.add_argument("--classes", metavar="FILE", help=CLASSES_HELP + "; replaces the checkpoint's class map")
    e.add_argument("--analyze", action="store_true",
                   help="also write the error analysis to <output>/analysis: confusion matrices, precision-recall "
                   "curves per class, and the AP50 each kind of error costs (CSV and PNG)")
    e.add_argument("--allow-class-mismatch", action="store_true",
                   help="evaluate even when the dataset's categories name other classes than the checkpoint's "
                   "(both maps are printed)")

    r = sub.add_parser("predict", help="detect and segment objects (and keypoints) in images and videos",
                       description="Run a checkpoint on images (files, folders or glob patterns); writes overlay "
                       "PNGs (masks, boxes, class names, scores) and predictions.json (COCO results format).")
    r.add_argument("inputs", nargs="+", help="image files, folders, or glob patterns; video files among them "
                   "(.mp4, .mov, .avi, .mkv, .webm, .gif, ...) and stream addresses (rtsp://, http://) give an "
                   "annotated .mp4 and one JSON line per frame (extra 'video')")
    _add_weights_args(r)
    r.add_argument("--output", default="outputs/predict", help="output folder (default: outputs/predict)")
    r.add_argument("--score-thresh", type=_unit_interval, default=0.5, help="minimum score to keep, 0-1 (default: 0.5)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an inference setting, e.g. model.roi_heads.nms_thresh=0.4 (repeatable)")
    r.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")
    r.add_argument("--fast", action="store_true", help=FAST_HELP)
    r.add_argument("--classes", metavar="FILE", help=CLASSES_HELP + "; replaces the checkpoint's class map")
    r.add_argument("--batch-size", type=_positive_int, default=1,
                   help="images per model call (default 1): faster on a GPU, but a batch pads its images to one "
                   "size, so results can differ slightly from one image at a time")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (none either when not on a terminal)")
    r.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino"], help=RUNTIME_HELP)
    r.add_argument("--slice", type=int, default=0, metavar="PX",
                   help="predict large images window by window, PX x PX each (e.g. the model's input size), "
                   "merging objects cut by window borders; --batch-size windows per model call")
    r.add_argument("--overlap", type=float, default=None, help="with --slice: how much windows overlap, as a "
                   "fraction of a window (default 0.2)")
    r.add_argument("--max-frames", type=_positive_int, metavar="N",
                   help="videos and streams: stop after N frames (a camera stream otherwise runs until Ctrl-C, "
                   "which keeps what was done)")

    x = sub.add_parser("export", help="export a model to ONNX or a torch.export program, for any image size and batch",
                       description="Write the whole detector (uint8 RGB images in, preprocessing, network, NMS, "
                       "boxes in image pixels, masks and keypoints out) as one graph that takes any batch size and "
                       "image size. Run it with 'maskrcnn predict --weights FILE', or without this package "
                       "(README: ONNX without PyTorch).")
    _add_weights_args(x)
    x.add_argument("--format", "-f", choices=["onnx", "exported-program", "torchscript"],
                   help="onnx (onnxruntime) or exported-program (.pt2, torch.export); default: by the --output "
                   "file's suffix (.onnx, .pt2). torchscript "
                   "is refused with the reason (deprecated by PyTorch)")
    x.add_argument("--output", "-o", required=True, help="file to write (e.g. model.onnx or model.pt2)")
    x.add_argument("--masks", choices=["pasted", "raw"], default="pasted",
                   help="pasted: full-image masks (default); raw: the 28x28 mask of each detection (mask_probs), "
                   "to paste into its box yourself")
    x.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="inference settings baked into the graph, e.g. model.roi_heads.score_thresh=0.3")
    x.add_argument("--classes", metavar="FILE", help=CLASSES_HELP + "; stored in the exported file")

    v = sub.add_parser("serve", help="an HTTP service and web page for a model (extra 'serve')",
                       description="Serve a model over HTTP: POST /predict (images as multipart field 'image', or "
                       "the raw body) returns detections as JSON; GET /health, GET /model; a web page at / to try "
                       "images in a browser. Concurrent requests of one image size are batched through the model.")
    _add_weights_args(v, "checkpoint (from train or convert), exported model (.onnx, .pt2), or with --config a "
                      "detectron2 .pkl/.pth or torchvision .pth")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an inference setting, e.g. model.roi_heads.nms_thresh=0.4 (repeatable)")
    v.add_argument("--classes", metavar="FILE", help=CLASSES_HELP + "; replaces the checkpoint's class map")
    v.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")
    v.add_argument("--fast", action="store_true", help=FAST_HELP)
    v.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino"], help=RUNTIME_HELP)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every network interface)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--score-thresh", type=_unit_interval, default=0.5,
                   help="default minimum score of returned detections, 0-1 (requests may set score_thresh)")
    v.add_argument("--max-batch", type=_positive_int, default=4, help="most images per model call (default 4)")
    v.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others of its size (default 5 ms)")
    v.add_argument("--queue", type=_positive_int, default=64,
                   help="most images waiting for the model; more are refused with 503 (default 64)")
    v.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a request may wait for its result before a 504 (default 30)")
    v.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    v.add_argument("--max-pixels", type=_positive_int, default=40_000_000,
                   help="most pixels (width x height) of a request's images together (default 40,000,000)")
    v.add_argument("--max-files", type=_positive_int, default=16, help="most images in one request (default 16)")

    a = sub.add_parser("ablate", help="rerun the paper's ablations (RoIAlign, mask loss, mask head, FPN/C4, "
                       "multi-task, cascade, alternating training) on synthetic shapes",
                       description="Train each variant of the Mask R-CNN paper's ablation tables (and Cascade, and "
                       "Faster R-CNN's alternating training) on the same synthetic shapes with the same seed and "
                       "budget, evaluate them, and print each table with the paper's COCO numbers beside ours and "
                       "whether the effect goes the same way. Writes ablations.md, ablations.json and a chart per "
                       "table; finished runs are reused when run again.")
    a.add_argument("--only", nargs="+", default=[], metavar="TABLE",
                   help="tables to run (default: all): roi_pooling, mask_loss, mask_class, mask_head, backbone, "
                   "multitask, cascade, alternating")
    a.add_argument("--budget", help="iterations per run (default 600 on cpu, 20000 on gpu), or minutes for "
                   "everything, e.g. 30m (a short probe sets the iterations)")
    a.add_argument("--seeds", type=_positive_int, default=1, help="runs per variant with seeds 0..N-1 (mean and "
                   "spread reported; default 1)")
    a.add_argument("--arch", choices=["fpn", "c4"], default="fpn",
                   help="the base of the RoI pooling, mask loss and class-agnostic tables: fpn (default, as the "
                   "rest) or c4 (as the paper ran them)")
    a.add_argument("--setting", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: the demo's half-width ResNet-18 at 192 px; gpu: ResNet-50-FPN at 512 px, 10,000 "
                   "images, batch 16")
    a.add_argument("--output", default="outputs/ablate", help="output folder (default: outputs/ablate)")
    a.add_argument("--device", default="auto")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (e.g. data.shapes_train=500)")
    a.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("demo", help="generate shapes, train, evaluate and predict, on the CPU in minutes",
                       description="The whole job on the built-in synthetic shapes: write the dataset, train the "
                       "CPU-sized model, print the COCO AP table, and draw predictions on a few validation images.")
    d.add_argument("--output", default="outputs/demo", help="output folder (default: outputs/demo)")
    _add_config_args(d, "shapes_R_18_FPN")
    d.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("convert", help="convert a torchvision or detectron2 checkpoint into a maskrcnn checkpoint",
                       description="Read torchvision (.pth) or detectron2 (model zoo .pkl, or .pth) weights and write "
                       "a checkpoint that eval/predict/train (train.init_weights) use, with COCO's class map. "
                       "To fine-tune on other classes, train with train.init_weights=<it> and "
                       "train.init_weights_reset_heads=true.")
    c.add_argument("source", help="e.g. maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth or model_final_f10217.pkl")
    c.add_argument("destination", help="output checkpoint path")
    c.add_argument("--from", dest="source_format", choices=["auto", "torchvision", "detectron2"], default="auto",
                   help="auto: detectron2 for .pkl files and detectron2_* presets, else torchvision")
    _add_config_args(c, "torchvision_maskrcnn_resnet50_fpn")
    c.add_argument("--classes", metavar="FILE", help=CLASSES_HELP + "; stored in the checkpoint. Without it, heads "
                   "of COCO's layouts get COCO's classes, others placeholder names 1..K that eval refuses")

    n = sub.add_parser("inspect", help="look at a dataset before training: ground-truth overlays, histograms, "
                       "and how the config's anchors fit its objects",
                       description="Writes ground-truth overlays of a few images, histograms (instances per class, "
                       "object sizes, instances per image), report.txt (counts, rare classes, what the loader "
                       "skipped) and the anchor fit (anchors.png: each object's best anchor IoU against its size, "
                       "with the RPN's thresholds, and a suggestion) for the dataset of --dataset, or the training "
                       "set of the config.")
    _add_config_args(n, None)  # the model's anchors (default shapes_R_18_FPN); with --weights, as for predict
    n.add_argument("--dataset", help="instances JSON to inspect (default: the config's data.train_json, or the "
                   "built-in shapes)")
    n.add_argument("--images", help="image folder of --dataset (default: the JSON's folder)")
    n.add_argument("--output", default="outputs/inspect", help="where the pictures and report go (default: "
                   "outputs/inspect)")
    n.add_argument("--num-images", type=int, default=8, help="ground-truth overlays to draw (default: 8)")
    n.add_argument("--max-images", type=int, default=500,
                   help="images sampled for the anchor fit (default: 500)")
    n.add_argument("--weights", "-w", help="a checkpoint: inspect what it sees in --image (or --sample) instead: "
                   "the RPN's best proposals, detections before and after NMS, the 28x28 masks before pasting")
    n.add_argument("--image", help="with --weights: the image to run it on")
    n.add_argument("--sample", type=int, help="with --weights: the N-th image of the training set (the checkpoint's, "
                   "or --dataset), with the 28x28 mask targets its ground truth gives the mask head")

    d = sub.add_parser("convert-data", help="convert labelme, YOLO segmentation or Pascal VOC annotations to COCO JSON",
                       description="Write a COCO instances JSON from a folder of labelme files, a YOLO "
                       "segmentation dataset (images/, labels/, data.yaml) or a Pascal VOC tree with instance masks "
                       "(SegmentationObject/), check it with the loader train uses, "
                       "and say what could not be converted. Train on it with data.train_json/data.train_images.")
    d.add_argument("format", choices=["labelme", "yolo", "voc"], help="the annotations' format")
    d.add_argument("source", help="labelme: the folder of .json files (and images); yolo: the dataset root; voc: "
                   "the VOC tree (Annotations/, JPEGImages/, SegmentationObject/)")
    d.add_argument("--split", help="yolo: the folder of images/ and labels/ to convert (train, val); voc: the "
                   "ImageSets/Segmentation list (train, val)")
    d.add_argument("--output", "-o", required=True, help="the COCO JSON to write")
    d.add_argument("--classes", metavar="FILE", help="class names in id order (1..K): " + CLASSES_HELP.split(": ", 1)[1]
                   + " (default: labelme: sorted labels; yolo: data.yaml's names)")

    s = sub.add_parser("smoke", help="run the detection ops (NMS, RoIAlign, RoIPool) on a generated image",
                       description="Generate an image with shapes and detector-like candidate boxes, keep the best "
                       "with NMS, pool them with RoIAlign and RoIPool, print timings and write a PNG of the result.")
    s.add_argument("--out", default="outputs/smoke", help="output folder (default: outputs/smoke)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the generated scene (default: 0)")
    return p


def _expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """The images and the videos (files, or stream addresses) named by ``inputs`` (files, folders,
    glob patterns). Other files found in a folder or by a pattern are left out and counted on
    stderr, so that a .heic the user expected to see predicted is not dropped without a word
    (hidden files are not counted)."""
    from maskrcnn.engine.video import VIDEO_SUFFIXES

    def kind(q: Path) -> str:
        suffix = q.suffix.lower()
        return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else "other"

    images: list[Path] = []
    videos: list[str] = []
    others: list[Path] = []
    for item in inputs:
        p = Path(item)
        if "://" in item:  # a stream address
            videos.append(item)
            continue
        if p.is_dir():
            entries = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
            subfolders = [q.name for q in sorted(p.iterdir()) if q.is_dir() and not q.name.startswith(".")]
            if subfolders:  # a folder is read flat: say so rather than leave their images out unsaid
                print(f"{item}: its subfolder{'s' if len(subfolders) > 1 else ''} {', '.join(subfolders[:5])}"
                      f"{', ...' if len(subfolders) > 5 else ''} not searched (a pattern such as "
                      f"\"{Path(item) / '**' / '*.jpg'}\" reads subfolders too)", file=sys.stderr)
            if not any(kind(q) != "other" for q in entries):
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or videos in the folder {item}")
        elif p.is_file():
            (videos.append(item) if kind(p) == "video" else images.append(p))
            continue
        else:
            entries = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not entries:
                what = "video file" if kind(p) == "video" else "file, folder or pattern"
                raise FileNotFoundError(f"no such {what}: {item}")
            entries = [m for m in entries if m.is_file()]
        images += [q for q in entries if kind(q) == "image"]
        videos += [str(q) for q in entries if kind(q) == "video"]
        others += [q for q in entries if kind(q) == "other"]
    if others:
        names = ", ".join(q.name for q in others[:5]) + (", ..." if len(others) > 5 else "")
        print(f"left out {len(others)} file{'s' if len(others) > 1 else ''} that {'are' if len(others) > 1 else 'is'} "
              f"neither an image ({'/'.join(IMAGE_SUFFIXES)}) nor a video: {names}", file=sys.stderr)
    if not images and not videos:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or videos among the inputs {inputs}")
    return images, videos


def _refuse_overwriting_inputs(out_dir: Path, outputs: list[str], inputs: list[Path]) -> None:
    """An output file that is one of the inputs (``--output`` the input folder, a PNG named as the
    overlay it would get) would replace the user's file with a drawing: refuse before any work."""
    sources = {q.resolve() for q in inputs}
    for name in outputs:
        target = (out_dir / name).resolve()
        if target in sources:
            raise ValueError(f"the output {target} would overwrite the input file of the same name: choose another "
                             "--output folder")


def _check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Fail before any work when ``path`` cannot be created or written (nothing is created here, so a
    later error leaves no empty folder behind)."""
    import os

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cannot use {what} {path}: it is a file, not a folder")
    existing = path
    while not existing.exists():  # the nearest existing ancestor decides whether the rest can be made
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot create {what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create or write {what} {path}: {existing} is not writable")
    # os.access says yes to root where writing still fails (/proc, /sys, read-only mounts): try it
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".maskrcnn-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"cannot create or write {what} {path}: writing in {existing} fails "
                              f"({e.strerror})") from None
    return path


def predict_images(predictor, paths: list[Path], out_dir: Path, score_thresh: float, batch_size: int = 1,
                   progress: bool = True, slice_tile: int = 0, slice_overlap: float = 0.2) -> Path:
    """Overlay PNGs and a COCO-results ``predictions.json`` for ``paths``; returns the JSON path."""
    from maskrcnn.data.transforms import BadImageError
    from maskrcnn.engine.folder import predict_files

    done = predict_files(predictor, paths, out_dir, score_thresh, batch_size=batch_size, progress=progress,
                         slice_tile=slice_tile, slice_overlap=slice_overlap)
    for f in done.skipped:
        print(f"skipped {f}", file=sys.stderr)
    if paths and not done.predicted:
        raise BadImageError(f"none of the {len(paths)} images could be read (see the lines above)")
    print(f"{done.predicted} images in {done.seconds:.1f} s: {done.images_per_second:.2f} images/s "
          "(reading, model and drawing together)")
    return done.json_path


def _cmd_train(args) -> int:
    from maskrcnn.config import PRESETS, get_config
    from maskrcnn.engine.alternating import fit

    if args.list_presets:
        print("\n".join(sorted(PRESETS)))
        return 0
    cfg = get_config(args.config, args.overrides)
    if args.output:
        cfg.train.output_dir = args.output
    _check_output_dir(cfg.train.output_dir)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in the output folder, --overwrite replaces it: give one")
    result = fit(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if result.get("checkpoint"):
        print(f"checkpoint: {result['checkpoint']}\nmetrics: {Path(result['output_dir']) / 'metrics.jsonl'}\n"
              f"curves: {result.get('curves')}")
    return 0


def _check_eval_classes(class_map, json_path: Path, allow: bool) -> None:
    """Refuse to score a checkpoint against categories that name other classes (a silent AP of 0)."""
    from maskrcnn.data.coco import DatasetError
    from maskrcnn.structures.class_map import ClassMap, class_map_mismatch

    try:
        dataset_map = ClassMap.from_file(json_path, keypoints=False)
    except (OSError, ValueError):  # the dataset's own checks report a broken file better
        return
    problem = class_map_mismatch(class_map, dataset_map)
    if problem and not allow:  # when allowed, evaluate_model prints both maps as a warning
        raise DatasetError(f"{json_path}: {problem}\n  pass --classes FILE with the classes the checkpoint was "
                           f"trained on (e.g. its training set's JSON), or --allow-class-mismatch to evaluate anyway")


def _cmd_eval(args) -> int:
    import os

    import torch.distributed as dist

    from maskrcnn.data.build import dataset_paths
    from maskrcnn.data.coco import CocoDataset, write_skipped
    from maskrcnn.evaluation.evaluate import evaluate_model
    from maskrcnn.engine.predictor import Predictor
    from maskrcnn.engine.trainer import DistInfo, init_distributed, select_device
    from maskrcnn.evaluation.coco_eval import format_metrics
    from maskrcnn.evaluation.report import write_analysis
    from maskrcnn.config import Config

    _check_output_dir(args.output)
    # under torchrun each process evaluates its shard of the images; rank 0 gathers, scores and prints
    device = select_device(args.device, DistInfo(local_rank=int(os.environ.get("LOCAL_RANK", "0"))))
    info = init_distributed(device.type)
    try:
        pred = Predictor(args.weights, str(device), args.overrides, args.config, args.classes, runtime=args.runtime,
                         fast=args.fast)
        cfg = pred.cfg
        if cfg is None:  # an exported file that does not hold its config
            if not args.dataset:
                raise ValueError(f"{args.weights} does not say which data it was trained on: pass --dataset "
                                 "(and --images)")
            cfg = Config()
        if args.dataset:
            json_path, images = Path(args.dataset), Path(args.images or Path(args.dataset).parent)
            if images.exists() and not images.is_dir():
                raise NotADirectoryError(f"--images {images} is a file: give the folder of the images")
        else:  # the validation set the checkpoint was trained with (its own files, or the built-in shapes)
            # the main process alone may generate the built-in dataset; the others wait for it
            paths = dataset_paths(cfg) if info.main else {}
            if info.world_size > 1:
                dist.barrier()
                paths = paths or dataset_paths(cfg)
            if "val" not in paths:
                raise ValueError("no dataset: pass --dataset (and --images)")
            json_path, images = paths["val"]
            if not Path(json_path).is_file():  # e.g. a relative path, and the checkpoint moved or run elsewhere
                raise FileNotFoundError(f"{json_path}, the validation set named in the config of {args.weights}, is "
                                        f"not there (from {Path.cwd()}): pass --dataset (and --images)")
        _check_eval_classes(pred.class_map, Path(json_path), args.allow_class_mismatch)
        dataset = CocoDataset(json_path, images, class_map=pred.class_map, on_bad_sample=cfg.data.on_bad_sample,
                              keypoint_convention=cfg.model.keypoint_head.pixel_convention, masks=cfg.model.mask_on)
        if info.main:
            Path(args.output).mkdir(parents=True, exist_ok=True)
            write_skipped([dataset], Path(args.output))
        metrics = evaluate_model(pred.model, dataset, args.output, info.rank, info.world_size,
                                 progress=not args.no_progress, oks_sigmas=cfg.model.keypoint_head.oks_sigmas)
        if info.main:
            print(format_metrics(metrics))
            if args.analyze:
                write_analysis(dataset.evaluation_ground_truth(), Path(args.output), pred.class_map, metrics)
            print(f"results: {Path(args.output).resolve()}")
    finally:
        if info.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _cmd_predict(args) -> int:
    from maskrcnn.engine.folder import overlay_names
    from maskrcnn.engine.predictor import Predictor
    from maskrcnn.engine.video import PIP_LINE

    paths, videos = _expand_inputs(args.inputs)  # before loading the model: a typo fails at once
    if videos:
        from maskrcnn._extras import require

        require("av", "video prediction", PIP_LINE)
        if args.slice:
            raise ValueError("--slice applies to images, not to videos")
    if args.overlap is not None and not args.slice:
        raise ValueError("--overlap is the windows' overlap of --slice: give --slice too")
    overlap = 0.2 if args.overlap is None else args.overlap
    if args.slice < 0 or not 0 <= overlap < 1:
        raise ValueError(f"--slice must be a window size in pixels (0: off) and --overlap in [0, 1), got "
                         f"{args.slice} and {overlap}")
    out = _check_output_dir(args.output)
    # videos with one stem get the images' treatment: the folder's name, then a counter
    video_names = [Path(n).stem for n in overlay_names([Path(v.split("://", 1)[-1].split("?", 1)[0]) for v in videos])]
    _refuse_overwriting_inputs(out, overlay_names(paths) + ["predictions.json"] +
                               [f"{n}{ext}" for n in video_names for ext in (".mp4", ".jsonl")],
                               paths + [Path(v) for v in videos if "://" not in v])
    pred = Predictor(args.weights, args.device, args.overrides, args.config, args.classes, runtime=args.runtime,
                     fast=args.fast)
    if paths:
        json_path = predict_images(pred, paths, out, args.score_thresh, args.batch_size,
                                   not args.no_progress, args.slice, overlap)
        print(f"wrote overlays and {json_path}")
    for item, name in zip(videos, video_names):
        from maskrcnn.engine.video import predict_video

        done = predict_video(pred, item, out, args.score_thresh, args.batch_size, not args.no_progress,
                             args.max_frames, name=name)
        print(f"{item}: {done.frames} frames in {done.seconds:.1f} s: {done.frames_per_second:.2f} frames/s "
              f"(decoding, model, drawing and encoding together){'; interrupted' if done.interrupted else ''}")
        print(f"wrote {done.video_path} and {done.json_path}")
        if done.interrupted:
            return 130  # as a shell reports Ctrl-C; what was done is written
    return 0


def _cmd_serve(args) -> int:
    import socket

    from maskrcnn._extras import require
    from maskrcnn.engine.predictor import Predictor
    from maskrcnn.serve.app import PIP_LINE, ServeSettings, create_app

    uvicorn = require("uvicorn", "maskrcnn serve", PIP_LINE)
    require("fastapi", "maskrcnn serve", PIP_LINE)
    if not 0 <= args.port <= 65535 or args.timeout <= 0 or args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise ValueError("--port must be 0-65535, --timeout and --max-upload-mb positive, --max-wait-ms >= 0")
    # the port is taken before the model loads: a port in use fails at once, and --port 0 learns its number
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    pred = Predictor(args.weights, args.device, args.overrides, args.config, args.classes, runtime=args.runtime,
                     fast=args.fast)
    settings = ServeSettings(args.score_thresh, args.max_batch, args.max_wait_ms, args.queue, args.timeout,
                             args.max_upload_mb, args.max_pixels, args.max_files)
    app = create_app(pred, args.weights, args.runtime, settings)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.weights} at http://{host}:{port}/ (web page; API: POST /predict, GET /health, "
          "GET /model, GET /openapi.json); Ctrl-C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0


def _cmd_ablate(args) -> int:
    from maskrcnn.experiments.runner import run_ablations

    _check_output_dir(args.output)
    run_ablations(args.only, Path(args.output), args.budget, args.seeds, args.arch, args.setting, args.device,
                  not args.no_progress, args.overrides)
    return 0


def _cmd_export(args) -> int:
    from maskrcnn.engine.predictor import Predictor
    from maskrcnn.export.exporter import check_format, check_output_path, export_model

    # format and output path are checked before the model is loaded, so that a mistake fails at once
    if args.format is not None:
        check_format(args.format)
    output = check_output_path(args.output)
    if args.format is None:
        args.format = {".onnx": "onnx", ".pt2": "exported-program"}.get(output.suffix)
        if args.format is None:
            raise ValueError(f"--output {output}: name it *.onnx or *.pt2, or give --format")
    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    if output.suffix != suffix:
        raise ValueError(f"--output {output}: an {args.format} file is named *{suffix}")
    for item in args.overrides:  # the graph holds the model alone: a training or data setting would be lost
        key = item.split("=", 1)[0].strip()
        if not key.startswith("model."):
            raise ValueError(f"--set {item}: only model.* settings are part of an exported model (e.g. "
                             "model.roi_heads.score_thresh); training and data settings do not apply")
    if Path(args.weights).suffix in (".onnx", ".pt2"):
        raise ValueError(f"{args.weights} is already exported; export a checkpoint (.pth) or a detectron2/torchvision "
                         "file with --config")
    pred = Predictor(args.weights, "cpu", args.overrides, args.config, args.classes)
    # the config travels too: eval finds the validation set and keypoint settings as for a checkpoint
    meta = {"classes": pred.class_map.to_dict(), "config": pred.cfg.to_dict()}
    print(f"exporting {args.weights} to {output} ({args.format}); this takes a minute or two", file=sys.stderr)
    export_model(pred.model, output, args.format, args.masks, meta)
    print(f"wrote {output}")
    return 0


def _cmd_demo(args) -> int:
    from maskrcnn.config import get_config
    from maskrcnn.engine.predictor import Predictor
    from maskrcnn.engine.trainer import train

    start = time.perf_counter()
    out = _check_output_dir(args.output)
    cfg = get_config(args.config, args.overrides)
    cfg.train.output_dir = str(out / "train")
    cfg.data.shapes_dir = str(out / "shapes")
    print(f"maskrcnn demo: synthetic shapes in {cfg.data.shapes_dir}, training {args.config} for "
          f"{cfg.solver.max_iter} iterations on {cfg.train.device}")
    result = train(cfg, progress=not args.no_progress, overwrite=True)  # the demo's folder is its own
    pred = Predictor(result["checkpoint"], cfg.train.device)
    val_images = sorted((out / "shapes" / "val").glob("*.png"))[:6]
    predict_images(pred, val_images, out / "predictions", 0.5, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    metrics = result["metrics"]
    shown = [(f"{name} AP@[.5:.95]", metrics[key]["AP"]) for key, name in
             (("segm", "mask"), ("keypoints", "keypoint (OKS)"), ("bbox", "box")) if key in metrics]
    print(f"\ndone in {elapsed / 60:.1f} min; " + ", ".join(f"{n} {100 * v:.1f}" for n, v in shown))
    print(f"  checkpoint   {result['checkpoint']}\n  predictions  {out / 'predictions'}\n"
          f"  curves       {result.get('curves')}\n  metrics      {Path(result['output_dir']) / 'metrics.jsonl'}")
    return 0


def _cmd_convert(args) -> int:
    from maskrcnn.config import get_config
    from maskrcnn.engine.checkpoint import save_checkpoint
    from maskrcnn.interop.external import load_external
    from maskrcnn.modeling.build import build_model
    from maskrcnn.structures.class_map import ClassMap

    cfg = get_config(args.config, args.overrides)
    destination = Path(args.destination)
    if destination.is_dir():
        raise IsADirectoryError(f"the destination {destination} is a folder: give the checkpoint's file name")
    _check_output_dir(destination.parent, "the destination's folder")
    classes = ClassMap.from_file(args.classes) if args.classes else None
    model = build_model(cfg)
    class_map = load_external(model, args.source, cfg, args.config, args.source_format, classes=classes)
    path = save_checkpoint(args.destination, model.state_dict(), cfg.to_dict(), class_map.to_dict(), 0)
    print(f"wrote {path} ({args.config}, {class_map.num_classes} classes)")
    return 0


def _cmd_inspect(args) -> int:
    from maskrcnn.config import get_config
    from maskrcnn.data.build import dataset_paths
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.inspection.anchors import anchor_report, best_anchor_iou, plot_anchor_fit
    from maskrcnn.inspection.dataset import inspect_dataset

    out = _check_output_dir(args.output)
    if args.weights:
        return _inspect_model(args, out)
    if args.image or args.sample is not None:
        raise ValueError("--image and --sample inspect a model: give its --weights too")
    args.config = args.config or "shapes_R_18_FPN"
    cfg = get_config(args.config, args.overrides)
    if args.num_images < 0 or args.max_images < 1:
        raise ValueError("--num-images must be at least 0 and --max-images at least 1")
    if args.dataset:
        json_path, images = Path(args.dataset), Path(args.images or Path(args.dataset).parent)
    else:
        json_path, images = dataset_paths(cfg)["train"]
    # bitmaps, so that the overlays show the masks; every problem reported, none fatal
    dataset = CocoDataset(json_path, images, mask_format="bitmap", keypoints=cfg.model.keypoint_on,
                          keypoint_convention=cfg.model.keypoint_head.pixel_convention, masks=cfg.model.mask_on)
    print(inspect_dataset(dataset, out, args.num_images))
    stats = best_anchor_iou(dataset, cfg, args.max_images)
    fit = anchor_report(stats, cfg)
    plot_anchor_fit(stats, cfg, out / "anchors.png")
    with open(out / "report.txt", "a") as f:
        f.write("\nanchors (" + (args.config or "") + "):\n" + fit + "\n")
    print(f"anchors of {args.config}:\n{fit}\npictures and report: {out.resolve()}")
    return 0


def _cmd_convert_data(args) -> int:
    import json

    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.data.importers import from_labelme, from_voc, from_yolo
    from maskrcnn.engine.checkpoint import atomic_write
    from maskrcnn.structures.class_map import ClassMap

    output = Path(args.output)
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder: give the JSON file to write")
    _check_output_dir(output.parent, "the output's folder")
    names = ClassMap.from_file(args.classes).names if args.classes else None
    source = Path(args.source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder")
    if args.split and args.format == "labelme":
        raise ValueError("--split is for yolo (images/<split>) and voc (ImageSets/Segmentation/<split>.txt)")
    if args.format == "labelme":
        (coco, problems), images = from_labelme(source, names), source
    elif args.format == "yolo":
        (coco, problems), images = from_yolo(source, names, args.split), source / "images" / (args.split or "")
    else:
        (coco, problems), images = from_voc(source, args.split, names), source / "JPEGImages"
    atomic_write(output, lambda f: f.write(json.dumps(coco).encode()))
    for line in problems:
        print(f"not converted: {line}", file=sys.stderr)
    for line in problems.notes:
        print(f"converted with a change: {line}", file=sys.stderr)
    dataset = CocoDataset(output, images, keep_empty=True)  # the checks of training; it warns what it skips
    print(f"wrote {output}: {len(coco['images'])} images, {len(coco['annotations'])} instances, "
          f"{len(coco['categories'])} classes ({', '.join(c['name'] for c in coco['categories'])}); "
          f"{len(problems)} shapes or lines not converted; the loader would skip {len(dataset.report)}"
          + (f" ({dataset.report[0]} ...)" if dataset.report else "") + f"\ntrain with --set data.train_json={output} "
          f"--set data.train_images={images}")
    return 0


def _inspect_model(args, out: Path) -> int:
    import torch

    from maskrcnn.data.build import dataset_paths
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.data.transforms import load_image
    from maskrcnn.engine.predictor import Predictor
    from maskrcnn.inspection.model import inspect_model
    from maskrcnn.modeling.roi_heads.mask_head import mask_targets

    if (args.image is None) == (args.sample is None):
        raise ValueError("with --weights, give one of --image FILE or --sample N")
    if Path(args.weights).suffix in (".onnx", ".pt2"):
        raise ValueError(f"{args.weights} is exported: inspect the checkpoint it was exported from")
    pred = Predictor(args.weights, "cpu", args.overrides, args.config)
    target, targets_of = None, None
    if args.image:
        image = load_image(args.image)
    else:
        if args.dataset:
            json_path, images = Path(args.dataset), Path(args.images or Path(args.dataset).parent)
        else:
            json_path, images = dataset_paths(pred.cfg)["train"]
            if not Path(json_path).is_file():  # a relative path of the machine or folder it was trained in
                raise FileNotFoundError(f"{json_path}: the training set named in {args.weights} is not here; give "
                                        "--dataset (and --images)")
        dataset = CocoDataset(json_path, images, class_map=pred.class_map, masks=pred.cfg.model.mask_on,
                              keypoint_convention=pred.cfg.model.keypoint_head.pixel_convention)
        if not 0 <= args.sample < len(dataset):
            raise ValueError(f"--sample {args.sample}: {json_path} has {len(dataset)} usable images (0..{len(dataset) - 1})")
        image, target = dataset[args.sample]
        heads = pred.model.roi_heads

        def targets_of(t: dict, size: int):
            return mask_targets(t["masks"], t["boxes"], torch.arange(len(t["boxes"])), size, **heads.mask_target)
    print(inspect_model(pred.model, image, pred.class_map, out, target=target,
                        mask_target_fn=targets_of if getattr(pred.model.roi_heads, "mask_on", False) else None))
    print(f"pictures: {out.resolve()}")
    return 0


def _cmd_smoke(args) -> int:
    from maskrcnn.engine.smoke import run_smoke

    run_smoke(_check_output_dir(args.out), args.seed)
    return 0


def _raised_by_us(e: BaseException) -> bool:
    """Whether the innermost frame of ``e`` is this package's code (a check of ours), not torch's or numpy's."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).resolve().parent
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def is_user_error(e: BaseException) -> bool:
    """An error the user can fix from its message (one line) rather than a bug of ours (a traceback).

    Our error classes are about the inputs by definition. Our other checks raise ValueError or
    TypeError naming the input; the same types raised inside torch or numpy by a call of ours mean we
    passed something wrong: a bug. OSError (files, permissions, a full disk) is always the
    environment's; FloatingPointError is the trainer's diverged-loss report; out of memory is about
    the sizes the user chose.
    """
    import torch

    from maskrcnn.config import ConfigError
    from maskrcnn.data.coco import DatasetError
    from maskrcnn.data.transforms import BadImageError
    from maskrcnn._extras import MissingExtra
    from maskrcnn.export.graph import UnsupportedExport
    from maskrcnn.interop.checkpoint import CheckpointError

    ours = (ConfigError, DatasetError, BadImageError, CheckpointError, MissingExtra, UnsupportedExport)
    if isinstance(e, (*ours, OSError, FloatingPointError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(e, (ValueError, TypeError)) and _raised_by_us(e)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (a multi-line message's lines joined with "; ")."""
    if isinstance(e, OSError) and e.strerror and e.filename:  # not "[Errno 2] ...": the file, then why
        text = f"{e.filename}: {e.strerror}"
    else:  # a KeyError's str() is the repr of its message
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if "Original Traceback" in text:  # raised in a DataLoader worker: the original error's own line
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    joined = ""
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        joined += ("" if not joined else " " if joined.endswith(":") else "; ") + line
    return joined or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    import os
    import traceback
    import warnings

    from maskrcnn._malloc import keep_freed_memory
    from maskrcnn._openmp import limit_spin_waiting

    limit_spin_waiting()  # before anything starts torch
    keep_freed_memory()
    parser = _parser()
    args = parser.parse_args(argv)
    commands = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "demo": _cmd_demo, "serve": _cmd_serve, "ablate": _cmd_ablate,
                "convert": _cmd_convert, "smoke": _cmd_smoke, "export": _cmd_export,
                "inspect": _cmd_inspect, "convert-data": _cmd_convert_data}
    if args.command not in commands:
        parser.print_help()
        return EXIT_USAGE
    prog = f"maskrcnn {args.command}"
    debug = getattr(args, "debug", False) or os.environ.get("MASKRCNN_DEBUG", "") not in ("", "0")

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        from tqdm import tqdm

        # a reported skip is one line too (--debug keeps Python's format, with the file and line), on
        # a line of its own while a progress bar is drawn
        text = one_line(message if isinstance(message, Warning) else Warning(message))
        tqdm.write(f"{prog}: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = show_warning
        try:
            return commands[args.command](args)
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:
            if debug:
                raise
            if is_user_error(e):
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                return EXIT_INPUT
            # a bug: its traceback is what a report needs, printed now because running again with
            # --debug to get it could cost hours of training, or not fail the same way twice
            traceback.print_exc()
            print(f"{prog}: internal error ({type(e).__name__}): a bug of maskrcnn; please report it with the "
                  f"traceback above", file=sys.stderr)
            return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
