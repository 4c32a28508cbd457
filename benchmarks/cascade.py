"""Cascade Mask R-CNN vs plain Mask R-CNN on the built-in shapes, same data and training budget, CPU.

    python benchmarks/cascade.py [--iters 2000] [--out outputs/bench_cascade]

Trains ``shapes_R_18_FPN`` and ``shapes_cascade_R_18_FPN`` (identical but for the three cascade
stages) with the same iterations, seed and data, then reports mask AP, box AP, box AP at IoU 0.75
(where the cascade's stricter stages should pay off) and inference seconds per image on the
validation images, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import maskrcnn
from maskrcnn.data.build import build_train_dataset, build_val_dataset, dataset_paths
from maskrcnn.engine.predictor import Predictor
from maskrcnn.engine.trainer import train


def infer_seconds(checkpoint: str, images: list, repeats: int = 2) -> float:
    pred = Predictor(checkpoint, "cpu")
    pred.predict(images[:2])  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for im in images:
            pred(im)
        times.append((time.perf_counter() - t) / len(images))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--out", default="outputs/bench_cascade")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = {}
    for name in ("shapes_R_18_FPN", "shapes_cascade_R_18_FPN"):
        cfg = maskrcnn.get_config(name, [f"solver.max_iter={args.iters}", f"train.output_dir={out / name}",
                                         f"data.shapes_dir={out / 'shapes'}", "train.eval_period=0"])
        t = time.perf_counter()
        result = train(cfg, progress=False)
        train_s = time.perf_counter() - t
        paths = dataset_paths(cfg)
        val = build_val_dataset(cfg, paths, build_train_dataset(cfg, paths).class_map)
        images = [val[i][0] for i in range(len(val))]
        rows[name] = (result["metrics"], train_s, infer_seconds(result["checkpoint"], images))
    print(f"\n{args.iters} iterations of 4 images each, {args.threads} threads, 50 validation images")
    print(f"| {'model':<24} | {'mask AP':>7} | {'box AP':>6} | {'box AP75':>8} | {'mask AP75':>9} | {'train s':>7} | {'infer s/img':>11} |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 8}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 13}|")
    for name, (m, train_s, infer_s) in rows.items():
        print(f"| {name:<24} | {100 * m['segm']['AP']:>7.1f} | {100 * m['bbox']['AP']:>6.1f} | "
              f"{100 * m['bbox']['AP75']:>8.1f} | {100 * m['segm']['AP75']:>9.1f} | {train_s:>7.0f} | {infer_s:>11.3f} |")
    plain, cascade = rows["shapes_R_18_FPN"], rows["shapes_cascade_R_18_FPN"]
    print(f"inference time ratio cascade/plain: {cascade[2] / plain[2]:.2f}; "
          f"training time ratio: {cascade[1] / plain[1]:.2f}")


if __name__ == "__main__":
    main()
