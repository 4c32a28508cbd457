"""``train(cfg)``: the training loop behind ``maskrcnn train`` and ``maskrcnn demo``.

One process or many (``torchrun --nproc_per_node=N maskrcnn train ...``: DistributedDataParallel,
NCCL on GPUs, Gloo on CPUs; several machines through torchrun's ``--nnodes/--node_rank/
--rdzv_endpoint``). ``solver.ims_per_batch`` is the global batch: each process takes its slice.

Every ``train.checkpoint_period`` iterations a checkpoint is written atomically to
``train.output_dir``; ``resume=True`` continues from the newest one and replays exactly what an
uninterrupted run would have done (data order, augmentation and sampling are functions of the
seed and the iteration; RNG states are restored). A NaN or infinite loss stops the run with the
name of the loss and the iteration; the last checkpoint written before it is kept. Metrics go to
``metrics.jsonl``; at the end ``training_curves.png`` plots losses, learning rate and AP.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from maskrcnn._seeding import derive_seed
from maskrcnn.config import Config
from maskrcnn.data.build import build_train_dataset, build_val_dataset, dataset_paths
from maskrcnn.data.coco import ClassMap
from maskrcnn.data.loader import training_loader
from maskrcnn.engine.checkpoint import last_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from maskrcnn.engine.evaluate import evaluate_model
from maskrcnn.engine.plot import plot_training
from maskrcnn.evaluation.coco_eval import format_metrics
from maskrcnn.interop.torchvision import load_imagenet_backbone
from maskrcnn.modeling.build import build_model
from maskrcnn.modeling.norm import FrozenBatchNorm2d


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def select_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def learning_rate(cfg: Config, iteration: int) -> float:
    """Linear warm-up from ``warmup_factor``, then step decay or cosine to 0 at ``max_iter``."""
    s = cfg.solver
    if iteration < s.warmup_iters:
        alpha = iteration / max(s.warmup_iters, 1)
        warm = s.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    if s.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(iteration / max(s.max_iter, 1), 1.0)))
    else:
        decay = s.gamma ** sum(iteration >= step for step in s.steps)
    return s.base_lr * warm * decay


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """SGD groups: norm layers' scales/shifts get ``weight_decay_norm`` (decaying them only fights
    the normalisation), everything else ``weight_decay``."""
    norm_types = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in norm_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": weight_decay_norm}]


def _sync_bn_for(model: nn.Module, info: DistInfo) -> nn.Module:
    """SyncBatchNorm needs a process group; with one process it is plain batch norm."""
    if info.world_size > 1:
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            _sync_bn_for(child, info)
    return model


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device) if hasattr(v, "to") else v) for k, v in t.items()} for t in targets]


def load_init_weights(model: nn.Module, path: str, class_map: ClassMap, reset_heads: bool) -> None:
    """Start from a checkpoint of ours; with another class map only if ``reset_heads`` (fine-tuning)."""
    state = load_checkpoint(path)
    theirs = ClassMap.from_dict(state["classes"])
    weights = state["model"]
    if theirs != class_map:
        if not reset_heads:
            raise ValueError(f"{path} was trained on other classes ({theirs}) than this dataset's ({class_map}); "
                             f"set train.init_weights_reset_heads=true to fine-tune with new class predictors")
        heads = ("roi_heads.box_predictor.", "roi_heads.mask_head.predictor.")
        weights = {k: v for k, v in weights.items() if not k.startswith(heads)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or (missing and not reset_heads):
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


class MetricsLog:
    """Append-only JSONL of metrics; on resume, records after the resumed iteration are dropped."""

    def __init__(self, path: Path, start_iter: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.records: list[dict] = []
        if enabled and path.is_file():
            self.records = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("iteration", 0) <= start_iter]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _flat_metrics(metrics: dict[str, dict]) -> dict[str, float]:
    return {f"{t}/{k}": v for t, m in metrics.items() for k, v in m.items() if k != "per_class"}


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg``; returns the final evaluation metrics (on the main process) and where things are."""
    device = select_device(cfg.train.device, DistInfo(local_rank=int(os.environ.get("LOCAL_RANK", "0"))))
    info = init_distributed(device.type)
    out_dir = Path(cfg.train.output_dir)
    if info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    # only the main process may generate the built-in dataset; the others wait for it
    if info.main:
        paths = dataset_paths(cfg)
    if info.world_size > 1:
        dist.barrier()
    if not info.main:
        paths = dataset_paths(cfg)
    train_set = build_train_dataset(cfg, paths)
    class_map = train_set.class_map
    if cfg.model.roi_heads.num_classes != class_map.num_classes:
        if info.main:
            print(f"model.roi_heads.num_classes set to the dataset's {class_map.num_classes} classes: {class_map.names}")
        cfg.model.roi_heads.num_classes = class_map.num_classes
    if cfg.model.keypoint_on:
        if not train_set.num_keypoints:
            raise ValueError(f"model.keypoint_on is set but {paths['train'][0]} has no keypoints (no category "
                             f"lists 'keypoints')")
        if cfg.model.keypoint_head.num_keypoints != train_set.num_keypoints:
            if info.main:
                print(f"model.keypoint_head.num_keypoints set to the dataset's {train_set.num_keypoints}: "
                      f"{class_map.keypoint_names}")
            cfg.model.keypoint_head.num_keypoints = train_set.num_keypoints
    val_set = build_val_dataset(cfg, paths, class_map)
    if info.main:
        (out_dir / "config.yaml").write_text(cfg.to_yaml())

    torch.manual_seed(derive_seed(cfg.train.seed))
    model = _sync_bn_for(build_model(cfg), info).to(device)
    start_iter = 0
    ckpt = last_checkpoint(out_dir) if resume else None
    if resume and ckpt is None and info.main:
        print(f"no checkpoint to resume from in {out_dir}: starting from scratch")
    if ckpt is None and cfg.train.init_weights:
        load_init_weights(model, cfg.train.init_weights, class_map, cfg.train.init_weights_reset_heads)
    elif ckpt is None and cfg.model.backbone.weights:
        # initialisation is training's business: the checkpoints of this run never need the file again
        load_imagenet_backbone(model, cfg.model.backbone.weights)
    optimizer = torch.optim.SGD(param_groups(model, cfg.solver.weight_decay, cfg.solver.weight_decay_norm),
                                lr=cfg.solver.base_lr, momentum=cfg.solver.momentum)
    amp = cfg.solver.amp
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("solver.amp=fp16 needs a CUDA device; use bf16 on the CPU")
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        if ClassMap.from_dict(state["classes"]) != class_map:
            raise ValueError(f"cannot resume from {ckpt}: it was trained on classes {state['classes']['names']}, "
                             f"the dataset has {class_map.names}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        restore_rng(state)
        start_iter = state["iteration"]
    net: nn.Module = model
    if info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loader = training_loader(train_set, train_set.aspect_wide(), cfg.solver.ims_per_batch, cfg.train.seed,
                             cfg.data.aspect_ratio_grouping, cfg.data.num_workers, info.rank, info.world_size,
                             start_iter)
    log = MetricsLog(out_dir / "metrics.jsonl", start_iter, info.main)

    def checkpoint(it: int, name: str) -> Path:
        return save_checkpoint(out_dir / name, model.state_dict(), cfg.to_dict(), class_map.to_dict(), it,
                               optimizer.state_dict(), scaler.state_dict() if scaler.is_enabled() else None)

    def run_eval(it: int) -> dict:
        if val_set is None:
            return {}
        metrics = evaluate_model(model, val_set, out_dir / "inference", info.rank, info.world_size,
                                 cfg.train.eval_max_images, progress, cfg.model.keypoint_head.oks_sigmas)
        if info.main and metrics:
            log.write({"iteration": it, **_flat_metrics(metrics)})
        return metrics

    last_good = str(ckpt) if ckpt else None
    bar = tqdm(total=cfg.solver.max_iter, initial=start_iter, desc="training", disable=not (progress and info.main),
               dynamic_ncols=True)
    net.train()
    data_iter = iter(loader)
    t_last, smoothed = time.perf_counter(), {}
    for it in range(start_iter, cfg.solver.max_iter):
        t_data = time.perf_counter()
        images, targets = next(data_iter)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = _to_device(targets, device)
        data_time = time.perf_counter() - t_data
        lr = learning_rate(cfg, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, enabled=bool(amp)):
            losses = net(images, targets)
        total = sum(losses.values())
        bad = (~torch.isfinite(total.detach())).float()
        if info.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            names = [f"{k}={v.item()}" for k, v in losses.items() if not torch.isfinite(v)]
            bar.close()
            raise FloatingPointError(
                f"loss is not finite at iteration {it}: {', '.join(names) or 'on another process'}; stopping. "
                f"The last good checkpoint is {last_good or 'none (no checkpoint was written yet)'}. Lower "
                f"solver.base_lr, raise solver.warmup_iters, or set solver.clip_grad_norm.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if cfg.solver.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.solver.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()

        values = {k: v.item() for k, v in losses.items()}
        smoothed = {k: 0.9 * smoothed.get(k, v) + 0.1 * v for k, v in values.items()}
        bar.set_postfix({"loss": f"{sum(smoothed.values()):.3f}", **{k.replace("loss_", ""): f"{v:.3f}"
                                                                       for k, v in smoothed.items()}}, refresh=False)
        bar.update(1)
        done = it + 1
        if done % cfg.train.log_period == 0 or done == cfg.solver.max_iter:
            now = time.perf_counter()
            log.write({"iteration": done, "lr": lr, "total_loss": sum(values.values()), **values,
                       "data_time": data_time, "time": now - t_last})
            t_last = now
        if cfg.train.checkpoint_period and done % cfg.train.checkpoint_period == 0 and done < cfg.solver.max_iter:
            if info.main:
                last_good = str(checkpoint(done, f"model_{done:07d}.pth"))
        if cfg.train.eval_period and done % cfg.train.eval_period == 0 and done < cfg.solver.max_iter:
            run_eval(done)
            net.train()
    bar.close()
    final = None
    if info.main:
        final = checkpoint(cfg.solver.max_iter, "model_final.pth")
    metrics = run_eval(cfg.solver.max_iter)
    result = {"output_dir": str(out_dir), "checkpoint": str(final) if final else None, "metrics": metrics}
    if info.main:
        result["curves"] = str(plot_training(log.records, out_dir / "training_curves.png"))
        if metrics:
            print(format_metrics(metrics))
    if info.world_size > 1:
        dist.barrier()
    return result

