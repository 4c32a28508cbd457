"""Run a model over a dataset and score it with COCO AP (each process evaluates its shard)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import inference_loader
from maskrcnn.evaluation.coco_eval import COCOEvaluator


def evaluate_model(model: nn.Module, dataset: CocoDataset, output_dir: str | Path | None = None, rank: int = 0,
                   world_size: int = 1, limit: int = 0, progress: bool = True, oks_sigmas: Sequence[float] = ()
                   ) -> dict[str, dict]:
    """COCO bbox/segm/keypoints metrics of ``model`` on ``dataset`` (returned on rank 0; results JSON in
    ``output_dir``); ``oks_sigmas`` for keypoint datasets other than COCO person."""
    net = model.module if hasattr(model, "module") else model
    types = ["bbox"] + (["segm"] if net.roi_heads.mask_on else []) + (["keypoints"] if net.roi_heads.num_keypoints else [])
    evaluator = COCOEvaluator(dataset.json_path, dataset.class_map, types, output_dir, oks_sigmas)
    was_training = net.training
    net.eval()
    loader = inference_loader(dataset, rank, world_size, limit=limit)
    with torch.no_grad():
        for images, targets in tqdm(loader, desc="evaluating", disable=not progress or rank != 0, leave=False):
            evaluator.process(net(images), [t["image_id"] for t in targets])
    net.train(was_training)
    return evaluator.evaluate()
