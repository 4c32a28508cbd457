"""The ``maskrcnn`` command line: train, eval, predict, demo, convert (and smoke)."""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

from maskrcnn import __version__

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", "-c", default=default, metavar="PRESET_OR_YAML",
                   help="a preset name (see `maskrcnn train --list-presets`) or a YAML file"
                   + (f" (default: {default})" if default else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set solver.max_iter=2000 (repeatable; values are YAML)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maskrcnn",
        description="Mask R-CNN family (Mask R-CNN, Cascade Mask R-CNN, Keypoint R-CNN) in pure PyTorch: "
                    "train on COCO-format data, evaluate with COCO AP, predict, convert checkpoints.",
        epilog="Start with `maskrcnn demo`; each command has its own --help.")
    p.add_argument("--version", action="version", version=f"maskrcnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (COCO-format data, or the built-in shapes)",
                       description="Train on data.train_json/data.train_images (COCO instances format), evaluating "
                       "on data.val_json if given; without data paths, on the built-in synthetic shapes. "
                       "Multi-GPU / multi-node: torchrun --nproc_per_node=N -m maskrcnn train ...")
    _add_config_args(t, "shapes_R_18_FPN")
    t.add_argument("--output", help="output folder (train.output_dir)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--list-presets", action="store_true", help="print the preset names and exit")

    e = sub.add_parser("eval", help="COCO AP (bbox, segm, keypoints) of a checkpoint on a dataset",
                       description="Evaluate a checkpoint on data.val_json (or --dataset) with pycocotools; prints "
                       "the 12-number summaries and per-class AP, writes COCO results JSON.")
    e.add_argument("--weights", "-w", required=True, help="checkpoint (from train or convert), or with --config a "
                   "detectron2 .pkl/.pth or torchvision .pth")
    e.add_argument("--config", "-c", metavar="PRESET_OR_YAML",
                   help="the model of a detectron2/torchvision --weights file (e.g. detectron2_mask_rcnn_R_50_FPN_3x)")
    e.add_argument("--dataset", help="instances JSON to evaluate on (default: the checkpoint's data.val_json)")
    e.add_argument("--images", help="image folder of --dataset (default: the JSON's folder)")
    e.add_argument("--output", default="outputs/eval", help="where results JSON go (default: outputs/eval)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="inference overrides, e.g. --set model.roi_heads.score_thresh=0.01")
    e.add_argument("--device", default="auto")

    r = sub.add_parser("predict", help="detect and segment objects (and keypoints) in images",
                       description="Run a checkpoint on images (files, folders or glob patterns); writes overlay "
                       "PNGs (masks, boxes, class names, scores) and predictions.json (COCO results format).")
    r.add_argument("inputs", nargs="+", help="image files, folders, or glob patterns")
    r.add_argument("--weights", "-w", required=True, help="checkpoint (from train or convert), or with --config a "
                   "detectron2 .pkl/.pth or torchvision .pth")
    r.add_argument("--config", "-c", metavar="PRESET_OR_YAML",
                   help="the model of a detectron2/torchvision --weights file (e.g. detectron2_mask_rcnn_R_50_FPN_3x)")
    r.add_argument("--output", default="outputs/predict", help="output folder (default: outputs/predict)")
    r.add_argument("--score-thresh", type=float, default=0.5, help="minimum score to keep (default: 0.5)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--device", default="auto")

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

    s = sub.add_parser("smoke", help="run the detection ops (NMS, RoIAlign, RoIPool) on a generated image",
                       description="Generate an image with shapes and detector-like candidate boxes, keep the best "
                       "with NMS, pool them with RoIAlign and RoIPool, print timings and write a PNG of the result.")
    s.add_argument("--out", default="outputs/smoke", help="output folder (default: outputs/smoke)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the generated scene (default: 0)")
    return p


def _expand_inputs(inputs: list[str]) -> list[Path]:
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise SystemExit(f"maskrcnn predict: no such file, folder or pattern: {item}")
            found += [m for m in matches if m.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise SystemExit("maskrcnn predict: no images found in the inputs")
    return found


def predict_images(predictor, paths: list[Path], out_dir: Path, score_thresh: float) -> Path:
    """Overlay PNGs and a COCO-results ``predictions.json`` for ``paths``; returns the JSON path."""
    from maskrcnn.evaluation.coco_eval import instances_to_coco
    from maskrcnn.visualize import draw_instances

    out_dir.mkdir(parents=True, exist_ok=True)
    results, failures = [], []
    for k, path in enumerate(paths):
        try:
            out = predictor(path)
        except ValueError as e:  # unreadable image: report and go on
            failures.append(f"{path}: {e}")
            continue
        keep = out["scores"] >= score_thresh
        sel = {key: out[key][keep] for key in ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores")
               if key in out}
        labels = sel["labels"].tolist()
        from maskrcnn.engine.predictor import to_image_tensor

        image = to_image_tensor(path)
        overlay = draw_instances(image, sel["boxes"], labels, [predictor.class_map.name(v) for v in labels],
                                 sel["scores"].tolist(), sel.get("masks"), keypoints=sel.get("keypoints"),
                                 skeleton=predictor.class_map.skeleton)
        overlay.save(out_dir / f"{path.stem}.png")
        for r in instances_to_coco(sel, k + 1, predictor.class_map):
            r["file_name"] = str(path)
            results.append(r)
    json_path = out_dir / "predictions.json"
    json_path.write_text(json.dumps(results))
    for f in failures:
        print(f"skipped {f}", file=sys.stderr)
    return json_path


def _cmd_train(args) -> int:
    from maskrcnn.config import PRESETS, get_config
    from maskrcnn.engine.trainer import train

    if args.list_presets:
        print("\n".join(sorted(PRESETS)))
        return 0
    cfg = get_config(args.config, args.overrides)
    if args.output:
        cfg.train.output_dir = args.output
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if result.get("checkpoint"):
        print(f"checkpoint: {result['checkpoint']}\nmetrics: {Path(result['output_dir']) / 'metrics.jsonl'}\n"
              f"curves: {result.get('curves')}")
    return 0


def _cmd_eval(args) -> int:
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.engine.evaluate import evaluate_model
    from maskrcnn.engine.predictor import Predictor
    from maskrcnn.evaluation.coco_eval import format_metrics

    from maskrcnn.data.build import dataset_paths

    pred = Predictor(args.weights, args.device, args.overrides, args.config)
    if args.dataset:
        json_path, images = Path(args.dataset), Path(args.images or Path(args.dataset).parent)
    else:  # the validation set the checkpoint was trained with (its own files, or the built-in shapes)
        paths = dataset_paths(pred.cfg)
        if "val" not in paths:
            raise SystemExit("maskrcnn eval: no dataset: pass --dataset (and --images)")
        json_path, images = paths["val"]
    dataset = CocoDataset(json_path, images, class_map=pred.class_map, on_bad_sample=pred.cfg.data.on_bad_sample)
    metrics = evaluate_model(pred.model, dataset, args.output, oks_sigmas=pred.cfg.model.keypoint_head.oks_sigmas)
    print(format_metrics(metrics))
    print(f"results: {Path(args.output).resolve()}")
    return 0


def _cmd_predict(args) -> int:
    from maskrcnn.engine.predictor import Predictor

    paths = _expand_inputs(args.inputs)  # before loading the model: a typo fails at once
    pred = Predictor(args.weights, args.device, args.overrides, args.config)
    json_path = predict_images(pred, paths, Path(args.output), args.score_thresh)
    print(f"wrote overlays and {json_path}")
    return 0


def _cmd_demo(args) -> int:
    from maskrcnn.config import get_config
    from maskrcnn.engine.predictor import Predictor
    from maskrcnn.engine.trainer import train

    start = time.perf_counter()
    out = Path(args.output)
    cfg = get_config(args.config, args.overrides)
    cfg.train.output_dir = str(out / "train")
    cfg.data.shapes_dir = str(out / "shapes")
    print(f"maskrcnn demo: synthetic shapes in {cfg.data.shapes_dir}, training {args.config} for "
          f"{cfg.solver.max_iter} iterations on {cfg.train.device}")
    result = train(cfg, progress=not args.no_progress)
    pred = Predictor(result["checkpoint"], cfg.train.device)
    val_images = sorted((out / "shapes" / "val").glob("*.png"))[:6]
    predict_images(pred, val_images, out / "predictions", 0.5)
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

    cfg = get_config(args.config, args.overrides)
    model = build_model(cfg)
    class_map = load_external(model, args.source, cfg, args.config, args.source_format)
    path = save_checkpoint(args.destination, model.state_dict(), cfg.to_dict(), class_map.to_dict(), 0)
    print(f"wrote {path} ({args.config}, {class_map.num_classes} classes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "smoke":
        from maskrcnn.smoke import run_smoke

        run_smoke(args.out, args.seed)
        return 0
    commands = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "demo": _cmd_demo,
                "convert": _cmd_convert}
    if args.command not in commands:
        parser.print_help()
        return 2
    from maskrcnn.config import ConfigError
    from maskrcnn.data.coco import DatasetError

    try:
        return commands[args.command](args)
    except (ConfigError, DatasetError, FileNotFoundError, FloatingPointError) as e:
        print(f"maskrcnn {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
