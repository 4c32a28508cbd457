"""Validation loss: the training losses of the model on the validation set, without changing it.

The model runs in training mode (that is where the losses are computed), under ``torch.no_grad``,
one image at a time, each with a seed fixed by (run seed, image position), so that its anchor/RoI
sampling and resize choice are the same at every evaluation and the curve moves only with the
weights. Batch norms that train (``model.backbone.norm=BN``) are switched to inference for the pass:
statistics updated from validation images would leak them into the model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from maskrcnn._seeding import derive_seed
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import inference_loader

VALIDATION_STREAM = -1  # a seed stream apart from the training iterations' (which are >= 0)


def validation_losses(model: nn.Module, dataset: CocoDataset, names: Sequence[str], device: torch.device,
                      seed: int = 0, precision=nullcontext, rank: int = 0, world_size: int = 1, limit: int = 0,
                      progress: bool = True) -> dict[str, float]:
    """Mean of each training loss ``names`` (the model's loss dict keys) over the validation images,
    all processes together, and ``total_loss`` their sum ({} without any readable image).
    ``precision`` is a factory of the training step's precision context (bf16 autocast under
    ``solver.amp=bf16``), so that both losses are computed alike."""
    modes = {m: m.training for m in model.modules()}  # restored exactly afterwards
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    loader = inference_loader(dataset, rank, world_size, limit=limit)
    no_bar = not progress or rank != 0 or not sys.stderr.isatty()
    try:
        with torch.no_grad():
            for position, (images, targets) in enumerate(tqdm(loader, desc="validation loss", disable=no_bar,
                                                             leave=False)):
                image, target = images[0], targets[0]
                if image is None:  # unreadable: evaluate_model reports it already
                    continue
                target = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in target.items()}
                target["seed"] = derive_seed(seed, VALIDATION_STREAM, rank + position * world_size)
                with precision():
                    losses = model([image.to(device)], [target])
                sums += torch.stack([losses[k].detach().double() for k in names])
                count += 1
    finally:
        for m, training in modes.items():
            m.training = training
    if world_size > 1:  # a process may have no images of its own (a validation set smaller than the world)
        dist.all_reduce(sums)
        dist.all_reduce(count)
    if float(count) == 0:
        return {}
    means = (sums / count).tolist()
    return dict(zip(names, means), total_loss=sum(means))
