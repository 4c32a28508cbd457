"""Run a model over a dataset and score it with COCO AP (each process evaluates its shard)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import inference_loader
from maskrcnn.evaluation.coco_eval import COCOEvaluator
from maskrcnn.structures.class_map import ClassMap, class_map_mismatch


def evaluate_model(model: nn.Module, dataset: CocoDataset, output_dir: str | Path | None = None, rank: int = 0,
                   world_size: int = 1, limit: int = 0, progress: bool = True, oks_sigmas: Sequence[float] = ()
                   ) -> dict[str, dict]:
    """COCO bbox/segm/keypoints metrics of ``model`` (a ``MaskRCNN``, or anything with its call,
    ``eval``/``train`` and ``coco_types``: an exported model) on ``dataset`` (returned on rank 0; results JSON in
    ``output_dir``); ``oks_sigmas`` for keypoint datasets other than COCO person. Unreadable images
    are warned about, counted in ``metrics["images"]`` and left out of the scoring."""
    dataset.require_ground_truth()
    net = model.module if hasattr(model, "module") else model
    types = net.coco_types
    # scored against what the dataset accepted: an annotation it reported as left out is no object here
    evaluator = COCOEvaluator(dataset.json_path, dataset.class_map, types, output_dir, oks_sigmas,
                              keypoint_convention=dataset.keypoint_convention,
                              ground_truth=dataset.evaluation_ground_truth())
    try:
        problem = class_map_mismatch(dataset.class_map, ClassMap.from_categories(evaluator.coco.dataset["categories"],
                                                                                 keypoints=False))
    except (KeyError, TypeError, ValueError):  # a broken categories list is the dataset's to report
        problem = None
    if problem and rank == 0:
        # `maskrcnn eval` refuses this unless told to go on; other callers (the trainer's validation
        # set) at least see both maps instead of an AP of 0 under the wrong classes
        warnings.warn(f"{dataset.json_path}: {problem}", stacklevel=2)
    was_training = net.training
    net.eval()
    loader = inference_loader(dataset, rank, world_size, limit=limit)
    with torch.no_grad():
        no_bar = not progress or rank != 0 or not sys.stderr.isatty()  # none in log files
        for images, targets in tqdm(loader, desc="evaluating", disable=no_bar, leave=False):
            for t in targets:
                if "skipped" in t:
                    warnings.warn(f"{dataset.json_path}: image {t['image_id']} left out of the evaluation: "
                                  f"{t['skipped']}", stacklevel=2)
                    evaluator.skip(t["image_id"])
            kept = [(im, t["image_id"]) for im, t in zip(images, targets) if im is not None]
            if kept:
                evaluator.process(net([im for im, _ in kept]), [i for _, i in kept])
    net.train(was_training)
    return evaluator.evaluate()
