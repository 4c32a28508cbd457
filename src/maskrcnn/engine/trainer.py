"""``train(cfg)``: the training loop behind ``maskrcnn train`` and ``maskrcnn demo``.

One process or many (``torchrun --nproc_per_node=N maskrcnn train ...``: DistributedDataParallel,
NCCL on GPUs, Gloo on CPUs; several machines through torchrun's ``--nnodes/--node_rank/
--rdzv_endpoint``). ``solver.ims_per_batch`` is the global batch: each process takes its slice.

Every ``train.checkpoint_period`` iterations a checkpoint is written atomically to
``train.output_dir``; ``resume=True`` continues from the newest one and replays exactly what an
uninterrupted run would have done (data order, augmentation and sampling are functions of the
seed and the iteration; RNG states are restored). A NaN or infinite loss stops the run with the
name of the loss and the iteration; the last checkpoint written before it is kept. Losses stay on
the device between log periods, so a normal step never waits for the GPU: non-finite losses are
found at the next log line, checkpoint or evaluation, whichever comes first, and no checkpoint is
written after one. Metrics go to ``metrics.jsonl``; at the end ``training_curves.png`` plots
losses, learning rate and AP. On a terminal a progress bar shows the losses; otherwise (logs of
batch jobs and CI, or ``progress=False``) a line every ``train.log_period`` iterations does.

Each evaluation (every ``train.eval_period`` iterations and at the end) logs the COCO AP and the
validation loss (``engine.validation``), and keeps ``model_best.pth`` when ``train.best_metric``
improved; ``train.early_stop_patience`` evaluations without improvement end the run there
(``engine.best``). ``solver.accumulate_steps`` runs each step's batch in that many passes, summing
their gradients: the training of ``ims_per_batch`` images per step with the memory of fewer.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from maskrcnn._malloc import keep_freed_memory
from maskrcnn._seeding import derive_seed
from maskrcnn.config import Config, merge
from maskrcnn.data.build import build_train_dataset, build_val_dataset, dataset_paths
from maskrcnn.data.coco import ClassMap, write_skipped
from maskrcnn.data.loader import training_loader
from maskrcnn.data.repeat_factors import repeat_factors
from maskrcnn.engine.best import BestMetric, tracked_key
from maskrcnn.engine.checkpoint import last_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from maskrcnn.engine.device import resolve_device
from maskrcnn.evaluation.evaluate import evaluate_model
from maskrcnn.engine.plot import plot_training
from maskrcnn.engine.tensorboard_log import TensorBoardLog
from maskrcnn.engine.validation import validation_losses
from maskrcnn.evaluation.coco_eval import format_metrics
from maskrcnn.evaluation.report import write_analysis
from maskrcnn.interop.torchvision import load_imagenet_backbone
from maskrcnn.modeling.build import build_model
from maskrcnn.modeling.norm import FrozenBatchNorm2d
from maskrcnn.structures.precision import network_precision


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
    device = resolve_device(name)
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


def apply_training_parts(model: nn.Module, cfg: Config, device: torch.device) -> list[nn.Module]:
    """``train.optimize``, ``train.freeze`` and ``train.proposals_from`` applied to ``model``; returns
    the frozen modules (kept in eval mode while training)."""
    from maskrcnn.config.choices import FREEZABLE

    t = cfg.train
    unknown = [name for name in t.freeze if name not in FREEZABLE]
    if unknown:
        raise ValueError(f"train.freeze: unknown part {unknown[0]!r}; choose from {', '.join(FREEZABLE)}")
    if t.proposals_from and t.optimize != "detector":
        raise ValueError("train.proposals_from gives the proposals of train.optimize=detector; set it too")
    model.train_parts = t.optimize
    frozen = [getattr(model, name) for name in t.freeze]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"train.freeze={list(t.freeze)} leaves nothing to train")
    if t.proposals_from:
        state = load_checkpoint(t.proposals_from)
        source = build_model(merge(Config(), state["config"]))
        source.load_state_dict(state["model"])
        for p in source.parameters():
            p.requires_grad_(False)
        model.set_proposal_source(source.to(device))
    return frozen


def _sync_bn_for(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """SyncBatchNorm needs a process group; with one process it is plain batch norm. Across processes
    torch synchronises it on GPUs only (on CPUs its forward raises deep in the first step)."""
    if info.world_size > 1:
        if device.type == "cpu" and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            raise ValueError("norm=SyncBN synchronises batch statistics across processes on GPUs only (torch's "
                             "SyncBatchNorm), and these processes run on the CPU: use BN (statistics per process) "
                             "or GN in model.*.norm")
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            _sync_bn_for(child, info, device)
    return model


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device) if hasattr(v, "to") else v) for k, v in t.items()} for t in targets]


# layers whose outputs are one per class (box scores and deltas, mask logits) or per keypoint, at any
# cascade stage; only these may change shape when fine-tuning to other classes
_PREDICTOR = re.compile(r"roi_heads\.(box_predictor(\.\d+)?\.(cls_score|bbox_pred)|mask_head(\.\d+)?\.predictor"
                        r"|keypoint_head(\.\d+)?\.score_lowres)\.")


def _predicts_changed(key: str, value: Tensor, classes_changed: bool, keypoints_changed: bool) -> bool:
    """Whether a predictor tensor of unchanged shape now means something else (same count, other
    classes or keypoints); class-agnostic box (4) and mask (1) outputs carry no class."""
    if "keypoint_head" in key:
        return keypoints_changed
    agnostic = value.shape[0] == (4 if "bbox_pred" in key else 1)
    return classes_changed and not agnostic


def load_init_weights(model: nn.Module, path: str, class_map: ClassMap, reset_heads: bool,
                      verbose: bool = True) -> None:
    """Start from a checkpoint of ours; with another class map only if ``reset_heads`` (fine-tuning):
    then every predictor for classes or keypoints that differ keeps the model's fresh initialisation."""
    state = load_checkpoint(path)
    theirs = ClassMap.from_dict(state["classes"])
    if theirs != class_map and not reset_heads:
        raise ValueError(f"{path} was trained on other classes ({theirs}) than this dataset's ({class_map}); "
                         f"set train.init_weights_reset_heads=true to fine-tune with new class predictors")
    classes_changed = (theirs.ids, theirs.names) != (class_map.ids, class_map.names)
    keypoints_changed = theirs.keypoint_names != class_map.keypoint_names
    ours = model.state_dict()
    weights = dict(state["model"])
    reset: dict[str, str] = {}
    wrong = []
    for key, value in weights.items():
        if key not in ours:
            continue
        shape, new = tuple(value.shape), tuple(ours[key].shape)
        predictor = _PREDICTOR.match(key) is not None
        if reset_heads and predictor and (shape != new or _predicts_changed(key, value, classes_changed,
                                                                            keypoints_changed)):
            weights[key] = ours[key]
            reset.setdefault(key.rsplit(".", 1)[0], f"{shape} -> {new}")
        elif shape != new:
            wrong.append(f"{key}: checkpoint {shape}, model {new}")
    if wrong:
        hint = ("set train.init_weights_reset_heads=true to fine-tune with new predictors" if not reset_heads
                and all(_PREDICTOR.match(w) for w in wrong) else "the checkpoint was built with another model config")
        raise ValueError(f"{path} does not fit the model ({hint}): {'; '.join(wrong[:5])}"
                         + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or (missing and not reset_heads):
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if verbose and reset:
        print(f"fine-tuning from {path}: new predictors (freshly initialised): "
              + ", ".join(f"{k} {v}" for k, v in reset.items()))
    if verbose and missing:
        print(f"fine-tuning from {path}: not in the checkpoint, left as initialised: {', '.join(missing)}")


class MetricsLog:
    """Append-only JSONL of metrics; on resume, records after the resumed iteration are dropped.
    Each record also goes to ``tensorboard`` when one is given."""

    def __init__(self, path: Path, start_iter: int, enabled: bool, tensorboard: TensorBoardLog | None = None) -> None:
        self.path, self.enabled, self.tensorboard = path, enabled, tensorboard
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
        if self.tensorboard is not None:
            self.tensorboard.write(record)


def _flat_metrics(metrics: dict[str, dict]) -> dict[str, float]:
    return {f"{t}/{k}": v for t, m in metrics.items() for k, v in m.items() if k != "per_class"}


class LossMonitor:
    """The losses of the steps since the last log, kept on the device so that a step never waits
    for it: their sum (metrics.jsonl), an exponential moving average (bar and log lines), and the
    first iteration at which any loss was not finite, with that iteration's losses."""

    NONE = 2**62  # "no bad iteration yet"; larger than any iteration, so MIN across processes works

    def __init__(self, device: torch.device) -> None:
        self.names: tuple[str, ...] = ()
        self.sum: Tensor | None = None
        self.ema: Tensor | None = None
        self.bad_values: Tensor | None = None
        self.count = 0
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def add(self, iteration: int, losses: dict[str, Tensor]) -> None:
        names = tuple(losses)
        vec = torch.stack([v.detach().float() for v in losses.values()])
        if self.ema is None:
            self.names, self.ema, self.bad_values = names, vec, torch.zeros_like(vec)
        elif names != self.names:
            raise RuntimeError(f"the model's losses changed from {self.names} to {names} at iteration {iteration}")
        else:
            self.ema = 0.9 * self.ema + 0.1 * vec
        new_bad = ~torch.isfinite(vec).all() & (self.first_bad == self.NONE)
        self.first_bad = torch.where(new_bad, iteration, self.first_bad)
        self.bad_values = torch.where(new_bad, vec, self.bad_values)
        self.sum = vec if self.sum is None else self.sum + vec
        self.count += 1

    def smoothed(self) -> dict[str, float]:
        """The moving averages (one host sync)."""
        return dict(zip(self.names, self.ema.tolist())) if self.ema is not None else {}

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        """Means since the last call and moving averages (one host sync); starts a new window."""
        if self.sum is None:
            return {}, {}
        means, ema = torch.stack([self.sum / self.count, self.ema]).tolist()
        self.sum, self.count = None, 0
        return dict(zip(self.names, means)), dict(zip(self.names, ema))

    def first_bad_iteration(self, world_size: int = 1) -> int | None:
        """The first iteration with a non-finite loss on any process (one sync; collective when
        ``world_size > 1``, so every process must call it at the same iterations), or None."""
        first = self.first_bad.clone()
        if world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        it = int(first.item())
        return None if it == self.NONE else it

    def describe_bad(self, iteration: int) -> str:
        """``loss_mask=nan, ...`` for ``iteration`` if it was this process's first bad one."""
        if self.bad_values is None or int(self.first_bad.item()) != iteration:
            return "on another process"
        return ", ".join(f"{k}={v}" for k, v in zip(self.names, self.bad_values.tolist()) if not math.isfinite(v))


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _log_line(done: int, max_iter: int, smoothed: dict[str, float], lr: float, sec_per_iter: float,
              data_time: float, device: torch.device) -> str:
    """``iter: 20/100  total_loss: 1.234  loss_cls: 0.321 ...  lr: 0.02  time: 0.51 s/it  data_time:
    0.01 s  eta: 0:00:41  max_mem: 812 MiB`` (memory on CUDA only); losses are moving averages."""
    parts = [f"iter: {done}/{max_iter}", f"total_loss: {sum(smoothed.values()):.4f}",
             *(f"{k}: {v:.4f}" for k, v in smoothed.items()), f"lr: {lr:.6g}", f"time: {sec_per_iter:.4f} s/it",
             f"data_time: {data_time:.4f} s", f"eta: {_hms(sec_per_iter * (max_iter - done))}"]
    if device.type == "cuda":
        parts.append(f"max_mem: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    return "  ".join(parts)


# what a run writes in its output folder: a new run in an old folder removes these first (overwrite)
RUN_FILES = ("model_*.pth", "last_checkpoint", "metrics.jsonl", "events.out.tfevents.*", "training_curves.png",
             "config.yaml", "skipped_samples.txt")
RUN_FOLDERS = ("analysis", "inference")


def _previous_run(out_dir: Path) -> list[Path]:
    return sorted(p for pattern in RUN_FILES for p in out_dir.glob(pattern)) + \
        [out_dir / d for d in RUN_FOLDERS if (out_dir / d).is_dir()]


def train(cfg: Config, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Train ``cfg``; returns the final evaluation metrics (on the main process) and where things are.

    A folder that holds another run's checkpoints is refused unless ``resume`` (continue it) or
    ``overwrite`` (its checkpoints, metrics, events and analysis removed first): a new run beside an
    old ``model_best.pth`` would leave the old run's best model looking like this one's."""
    if cfg.train.procedure == "alternating":  # four runs of this function: engine/alternating.py runs them
        raise ValueError("train.procedure=alternating is four training runs: use maskrcnn.engine.alternating."
                         "fit(cfg) (what `maskrcnn train` calls), not trainer.train")
    keep_freed_memory()  # no page faults for each new tensor (maskrcnn/_malloc.py)
    device = select_device(cfg.train.device, DistInfo(local_rank=int(os.environ.get("LOCAL_RANK", "0"))))
    info = init_distributed(device.type)
    out_dir = Path(cfg.train.output_dir)
    old = _previous_run(out_dir) if out_dir.is_dir() and not resume else []
    if any(p.suffix == ".pth" for p in old) and not overwrite:
        raise ValueError(f"{out_dir} holds another run ({', '.join(p.name for p in old if p.suffix == '.pth')}): "
                         "--resume to continue it, --overwrite to start over there (its checkpoints, metrics and "
                         "analysis are removed), or another --output")
    if info.main:
        if overwrite:
            import shutil

            for path in old:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
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

    torch.manual_seed(derive_seed(cfg.train.seed))
    model = _sync_bn_for(build_model(cfg), info, device).to(device)
    start_iter = 0
    ckpt = last_checkpoint(out_dir) if resume else None
    if resume and ckpt is None and info.main:
        print(f"no checkpoint to resume from in {out_dir}: starting from scratch")
    if ckpt is None and cfg.train.init_weights:
        load_init_weights(model, cfg.train.init_weights, class_map, cfg.train.init_weights_reset_heads, info.main)
    elif ckpt is None and cfg.model.backbone.weights:
        # initialisation is training's business: the checkpoints of this run never need the file again
        load_imagenet_backbone(model, cfg.model.backbone.weights)
    frozen = apply_training_parts(model, cfg, device)
    optimizer = torch.optim.SGD(param_groups(model, cfg.solver.weight_decay, cfg.solver.weight_decay_norm),
                                lr=cfg.solver.base_lr, momentum=cfg.solver.momentum)
    amp = cfg.solver.amp
    network_precision(device, amp, "solver.amp")  # fp16 on the CPU fails here, before any work
    if info.main:  # after every check of the config above: a refused run leaves no config.yaml behind
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
        write_skipped([train_set, val_set], out_dir)
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
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=cfg.train.optimize != "all")

    accumulate = cfg.solver.accumulate_steps
    if cfg.solver.ims_per_batch % (info.world_size * accumulate):
        raise ValueError(f"solver.ims_per_batch ({cfg.solver.ims_per_batch}) must be divisible by the number of "
                         f"processes times solver.accumulate_steps ({info.world_size} x {accumulate})")
    repeat = repeat_factors([r.labels for r in train_set.records], cfg.data.repeat_factor_threshold)
    if info.main and cfg.data.repeat_factor_threshold > 0:
        print(f"repeat-factor sampling (data.repeat_factor_threshold={cfg.data.repeat_factor_threshold:g}): "
              f"{sum(r > 1 for r in repeat)} of {len(repeat)} images repeated, {sum(repeat):.0f} images per epoch "
              f"on average")
    loader = training_loader(train_set, train_set.aspect_wide(), cfg.solver.ims_per_batch, cfg.train.seed,
                             cfg.data.aspect_ratio_grouping, cfg.data.num_workers, info.rank, info.world_size,
                             start_iter, repeat, pin_memory=device.type == "cuda")
    # a resumed run's events after its checkpoint are dropped, as its metrics.jsonl records are
    board = TensorBoardLog(out_dir, cfg.train.tensorboard, info.main, purge_step=start_iter + 1 if start_iter else None)
    log = MetricsLog(out_dir / "metrics.jsonl", start_iter, info.main, board)
    key = tracked_key(cfg)
    if cfg.train.early_stop_patience and val_set is None:
        raise ValueError("train.early_stop_patience needs a validation set (data.val_json) to evaluate on")
    best = BestMetric(key, cfg.train.early_stop_patience, cfg.train.early_stop_min_delta) if key else None
    if best is not None:
        best.replay(log.records)  # a resumed run stops where an uninterrupted one would
    monitor = LossMonitor(device)

    def checkpoint(it: int, name: str) -> Path:
        return save_checkpoint(out_dir / name, model.state_dict(), cfg.to_dict(), class_map.to_dict(), it,
                               optimizer.state_dict(), scaler.state_dict() if scaler.is_enabled() else None)

    def run_eval(it: int) -> dict:
        """Evaluate (AP, and the validation loss), log, keep the best checkpoint; every process calls it."""
        if val_set is None:
            return {}
        metrics = evaluate_model(model, val_set, out_dir / "inference", info.rank, info.world_size,
                                 cfg.train.eval_max_images, progress, cfg.model.keypoint_head.oks_sigmas)
        val = {}
        if cfg.train.val_loss and monitor.names:
            val = validation_losses(model, val_set, monitor.names, device, cfg.train.seed,
                                    lambda: network_precision(device, amp, "solver.amp"), info.rank, info.world_size,
                                    cfg.train.eval_max_images, progress)
        if info.main and metrics:
            record = {"iteration": it, **_flat_metrics(metrics), **{f"val/{k}": v for k, v in val.items()}}
            log.write(record)
            board.overlays(model, val_set, it, cfg.train.tensorboard_images)
            improved = best is not None and best.update(record)
            if improved:
                save_checkpoint(out_dir / "model_best.pth", model.state_dict(), cfg.to_dict(), class_map.to_dict(),
                                it, extra={"best": {"metric": best.key, "value": best.best}}, resumable=False)
            if it < cfg.solver.max_iter:  # the final evaluation prints its whole table
                shown = [f"{k.split('/')[0]} AP {100 * record[k]:.1f}" for k in ("segm/AP", "keypoints/AP", "bbox/AP")
                         if k in record]
                if "val/total_loss" in record:
                    shown.append(f"val loss {record['val/total_loss']:.4f}")
                if best is not None:
                    shown.append("the best so far: model_best.pth" if improved else f"best {best.describe()}")
                line = f"eval at iteration {it}: " + ", ".join(shown)
                tqdm.write(line) if use_bar else print(line, flush=True)
        return metrics

    def early_stop() -> bool:
        """Whether the best metric has gone stale (decided on the main process, told to all)."""
        stop = torch.tensor(int(best is not None and best.should_stop and info.main), device=device)
        if info.world_size > 1:
            dist.broadcast(stop, 0)
        return bool(stop.item())

    last_good = str(ckpt) if ckpt else None
    # a bar only where someone watches it (in a file it is one line rewritten in place), and only when
    # both streams are a terminal: `train > log` must still get the log lines
    use_bar = progress and sys.stderr.isatty() and sys.stdout.isatty()
    bar = tqdm(total=cfg.solver.max_iter, initial=start_iter, desc="training", disable=not (use_bar and info.main),
               dynamic_ncols=True)
    print_lines = info.main and not use_bar

    def stop_if_not_finite(collective: bool = True) -> None:
        bad = monitor.first_bad_iteration(info.world_size if collective else 1)
        if bad is not None:
            bar.close()
            raise FloatingPointError(
                f"loss is not finite at iteration {bad}: {monitor.describe_bad(bad)}; stopping. "
                f"The last good checkpoint is {last_good or 'none (no checkpoint was written yet)'}. Lower "
                f"solver.base_lr, raise solver.warmup_iters, or set solver.clip_grad_norm.")

    def set_training() -> None:
        net.train()
        for module in frozen:  # fixed weights keep fixed batch-norm statistics too
            module.eval()

    set_training()
    data_iter = iter(loader)
    t_last, data_times = time.perf_counter(), []
    for it in range(start_iter, cfg.solver.max_iter):
        try:
            t_data = time.perf_counter()
            images, targets = next(data_iter)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = _to_device(targets, device)
            data_times.append(time.perf_counter() - t_data)
            lr = learning_rate(cfg, it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            losses: dict[str, Tensor] = {}
            share = len(images) // accumulate
            for k in range(accumulate):  # gradients of the step's images summed over the passes
                part = slice(k * share, (k + 1) * share)
                # the processes' gradients are averaged once per step, after its last pass
                quiet = net.no_sync() if info.world_size > 1 and k < accumulate - 1 else nullcontext()
                with quiet:
                    with network_precision(device, amp, "solver.amp"):
                        part_losses = net(images[part], targets[part])
                    scaler.scale(sum(part_losses.values()) / accumulate).backward()
                for name, value in part_losses.items():
                    losses[name] = losses.get(name, 0) + value.detach() / accumulate
            monitor.add(it, losses)
            if cfg.solver.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.solver.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        except Exception:
            # weights gone non-finite since the last check can break later steps in odd places:
            # report the loss that started it (locally: the other processes are not at a check)
            stop_if_not_finite(collective=False)
            raise

        if use_bar and info.main:
            smoothed = monitor.smoothed()  # one sync per step, only while someone watches the bar
            bar.set_postfix({"loss": f"{sum(smoothed.values()):.3f}",
                             **{k.replace("loss_", ""): f"{v:.3f}" for k, v in smoothed.items()}}, refresh=False)
        bar.update(1)
        done = it + 1
        log_now = done % cfg.train.log_period == 0 or done == cfg.solver.max_iter
        ckpt_now = bool(cfg.train.checkpoint_period) and done % cfg.train.checkpoint_period == 0 \
            and done < cfg.solver.max_iter
        eval_now = bool(cfg.train.eval_period) and done % cfg.train.eval_period == 0 and done < cfg.solver.max_iter
        if log_now or ckpt_now or eval_now:
            stop_if_not_finite()  # never log, save or evaluate non-finite weights
        if log_now:
            now = time.perf_counter()
            sec_per_iter, data_time = (now - t_last) / len(data_times), sum(data_times) / len(data_times)
            if info.main:
                means, smoothed = monitor.take()
                # losses and data_time are means over the iterations since the previous record
                # (fetched from the device once per log period); time is that window's seconds of
                # training steps (checkpoints and evaluations left out)
                log.write({"iteration": done, "lr": lr, "total_loss": sum(means.values()), **means,
                           "data_time": data_time, "time": now - t_last})
                if print_lines:
                    print(_log_line(done, cfg.solver.max_iter, smoothed, lr, sec_per_iter, data_time, device),
                          flush=True)
            t_last, data_times = now, []
        t_pause = time.perf_counter()
        if ckpt_now and info.main:
            last_good = str(checkpoint(done, f"model_{done:07d}.pth"))
        metrics = None
        if eval_now:
            metrics = run_eval(done)
            set_training()
        t_last += time.perf_counter() - t_pause  # s/it and the ETA count training steps only
        if eval_now and early_stop():
            if info.main:
                print(f"early stopping at iteration {done}: {best.key} has not improved for {best.stale} "
                      f"evaluations (train.early_stop_patience); best {best.describe()}, in model_best.pth",
                      flush=True)
                log.write({"iteration": done, "early_stop": True})
            break
    else:
        done, metrics = cfg.solver.max_iter, None
    stop_if_not_finite()
    bar.close()
    final = None
    if info.main:
        final = checkpoint(done, "model_final.pth")
    # a model whose detector has not trained yet (the first steps of alternating training) is not evaluated
    incomplete = cfg.train.optimize == "rpn" or bool(cfg.train.proposals_from)
    if metrics is None and not incomplete:  # not evaluated at this iteration yet
        metrics = run_eval(done)
    elif incomplete and info.main:
        print("not evaluated: the RoI heads have not trained on this model's own proposals yet (train.optimize=rpn "
              "or train.proposals_from)", flush=True)
    result = {"output_dir": str(out_dir), "checkpoint": str(final) if final else None, "metrics": metrics,
              "iterations": done, "best": ({"metric": best.key, "value": best.best, "iteration": best.best_iteration,
                                            "checkpoint": str(out_dir / "model_best.pth")}
                                           if best is not None and best.best is not None else None)}
    board.close()
    if info.main:
        result["curves"] = str(plot_training(log.records, out_dir / "training_curves.png"))
        if metrics:
            print(format_metrics(metrics))
            if cfg.train.analyze_at_end:
                result["analysis"] = str(write_analysis(val_set.evaluation_ground_truth(), out_dir / "inference",
                                                        class_map, metrics, out_dir / "analysis"))
    if info.world_size > 1:
        dist.barrier()
    return result

