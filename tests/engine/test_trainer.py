"""train(cfg): a tiny run end to end, exact resume, NaN stops, atomic checkpoints, class maps."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maskrcnn
from maskrcnn._seeding import derive_seed
from maskrcnn.engine import checkpoint as ckpt_mod
from maskrcnn.engine import trainer as trainer_mod
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.engine.predictor import Predictor
from maskrcnn.engine.trainer import train
from maskrcnn.modeling.build import build_model
from maskrcnn.structures.boxes import box_iou
from tiny import tiny_train_config, tiny_train_overrides

REPO = Path(__file__).resolve().parents[2]


def _weights(path):
    return load_checkpoint(path)["model"]


def _same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.numerics
def test_tiny_training_run_learns_the_train_images(tmp_path):
    cfg = tiny_train_config(tmp_path, ["solver.max_iter=160", "solver.base_lr=0.02", "train.checkpoint_period=0",
                                       "train.log_period=10", "solver.warmup_iters=20"])
    result = train(cfg, progress=False)
    out = Path(result["output_dir"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:2]) / 2, losses
    assert "bbox" in result["metrics"] and "segm" in result["metrics"]
    assert any("segm/AP" in r for r in records)
    assert (out / "training_curves.png").stat().st_size > 1000 and (out / "config.yaml").is_file()
    # predictions on the training images overlap their objects
    pred = Predictor(result["checkpoint"], "cpu")
    from maskrcnn.data.coco import CocoDataset

    ds = CocoDataset(tmp_path / "shapes/annotations/instances_train.json", tmp_path / "shapes/train")
    # fast mode's bf16 (bf16 layers, float32 geometry) finds the same confident detections as float32;
    # asked for by name, as fast=True keeps float32 on a CPU without bf16 units (which emulates it here)
    fast = Predictor(result["checkpoint"], "cpu", overrides=["model.precision=bf16"])
    hits = total = confident = matched = 0
    for i in range(len(ds)):
        image, target = ds[i]
        out_i = pred(image)
        iou = box_iou(target["boxes"], out_i["boxes"]) if out_i["boxes"].numel() else torch.zeros(len(target["boxes"]), 1)
        hits += int((iou.amax(1) > 0.5).sum())
        total += len(target["boxes"])
        exact, quick = _above(out_i, 0.5), _above(fast(image), 0.3)
        confident += len(exact["boxes"])
        if len(exact["boxes"]) and len(quick["boxes"]):
            pair_iou = box_iou(exact["boxes"], quick["boxes"])
            pair_iou[exact["labels"][:, None] != quick["labels"][None, :]] = 0
            best, j = pair_iou.max(1)
            close = (best >= 0.8) & ((exact["scores"] - quick["scores"][j]).abs() <= 0.15)
            ok = close & ((exact["masks"] != quick["masks"][j]).flatten(1).float().mean(1) <= 0.02)
            matched += int(ok.sum())
    assert hits >= 0.7 * total, f"only {hits} of {total} training objects found"
    assert confident >= 0.5 * total and matched >= 0.9 * confident, (matched, confident)


def _above(out: dict, score: float) -> dict:
    keep = out["scores"] >= score
    return {k: out[k][keep] for k in ("boxes", "labels", "scores", "masks")}


@pytest.mark.numerics
def test_resume_equals_uninterrupted_training(tmp_path, monkeypatch):
    reference = train(tiny_train_config(tmp_path / "a"), progress=False)["checkpoint"]
    real_lr = trainer_mod.learning_rate

    def crash_at_4(cfg, it):
        if it == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_lr(cfg, it)

    cfg = tiny_train_config(tmp_path / "b")
    monkeypatch.setattr(trainer_mod, "learning_rate", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(trainer_mod, "learning_rate", real_lr)
    out = Path(cfg.train.output_dir)
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth" and not (out / "model_final.pth").exists()
    resumed = train(tiny_train_config(tmp_path / "b"), resume=True, progress=False)["checkpoint"]
    _same_weights(_weights(resumed), _weights(reference))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "total_loss" in r] == [1, 2, 3, 4, 5, 6], "resumed logs repeat"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_forward = maskrcnn.modeling.detector.MaskRCNN.forward

    def forward(self, images, targets=None):
        out = real_forward(self, images, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                out["loss_mask"] = out["loss_mask"] * float("nan")
        return out

    monkeypatch.setattr(maskrcnn.modeling.detector.MaskRCNN, "forward", forward)
    cfg = tiny_train_config(tmp_path)
    with pytest.raises(FloatingPointError, match=r"loss is not finite at iteration 4: loss_mask=nan.*model_0000003.pth"):
        train(cfg, progress=False)
    assert load_checkpoint(Path(cfg.train.output_dir) / "model_0000003.pth")["iteration"] == 3


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    ckpt_mod.save_checkpoint(path, {"w": torch.ones(3)}, {}, {"ids": [1], "names": ["a"]}, 1)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_mod.save_checkpoint(path, {"w": torch.zeros(3)}, {}, {"ids": [1], "names": ["a"]}, 2)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model.pth"]
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    torch.save({"a": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a maskrcnn checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_checkpoints_from_other_classes_are_refused(tmp_path):
    first = train(tiny_train_config(tmp_path / "a", ["solver.max_iter=2"]), progress=False)["checkpoint"]
    state = load_checkpoint(first)
    state["classes"] = {"ids": [1, 2, 3, 4], "names": ["w", "x", "y", "z"]}
    other = tmp_path / "other.pth"
    torch.save(state, other)
    cfg = tiny_train_config(tmp_path / "b", ["solver.max_iter=2", f"train.init_weights={other}"])
    with pytest.raises(ValueError, match="trained on other classes .*init_weights_reset_heads"):
        train(cfg, progress=False)
    cfg.train.init_weights_reset_heads = True
    train(cfg, progress=False)  # fine-tuning with new class predictors
    # resuming a run whose checkpoint has another class map
    out = Path(tiny_train_config(tmp_path / "a").train.output_dir)
    torch.save(state, out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(ValueError, match="cannot resume .* trained on classes"):
        train(tiny_train_config(tmp_path / "a", ["solver.max_iter=4"]), resume=True, progress=False)


def test_bf16_autocast_trains_like_float32(tmp_path):
    """solver.amp=bf16: same first-step losses as float32 within bf16's precision, float32 master weights,
    and the weights move by about as much as in float32 (not frozen, not blown up)."""
    extra = ["solver.max_iter=2", "train.checkpoint_period=0", "train.eval_period=0", "data.shapes_val=1"]
    runs = {}
    for amp in ("", "bf16"):
        result = train(tiny_train_config(tmp_path / (amp or "fp32"), extra + ([f"solver.amp={amp}"] if amp else [])),
                       progress=False)
        out = Path(result["output_dir"])
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        runs[amp] = first, torch.load(result["checkpoint"], weights_only=True)["model"]
    (ref, ref_state), (low, low_state) = runs[""], runs["bf16"]
    losses = [k for k in ref if k.startswith("loss_")]
    assert len(losses) == 5 and first["iteration"] == 1
    # before any update only the network's rounding differs; it can change which proposals are sampled,
    # which moved loss_box_reg by 5% (the others by < 1%) when this was written
    for k in losses:
        assert math.isfinite(low[k]) and abs(low[k] - ref[k]) <= 0.15 * abs(ref[k]) + 1e-3, (k, low[k], ref[k])
    torch.manual_seed(derive_seed(tiny_train_config(tmp_path).train.seed))
    init = build_model(tiny_train_config(tmp_path)).state_dict()
    moved = {}
    for name, state in (("fp32", ref_state), ("bf16", low_state)):
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        assert all(v.dtype == torch.float32 for v in floats.values())
        moved[name] = sum(float((v - init[k]).norm()) for k, v in floats.items())
    assert 0.8 < moved["bf16"] / moved["fp32"] < 1.25, moved


@pytest.mark.numerics
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    # group norm (batch statistics would differ), one positive RoI per image and detectron2's
    # per-batch RPN normaliser: every loss is then a mean over images, which DDP's gradient
    # averaging reproduces exactly
    extra = ["model.backbone.norm=GN", "model.roi_heads.batch_size_per_image=8",
             "model.roi_heads.positive_fraction=0.125", "solver.max_iter=3", "train.checkpoint_period=0",
             "data.aspect_ratio_grouping=false"]
    single = train(tiny_train_config(tmp_path / "one", extra), progress=False)["checkpoint"]
    cfg_args = [arg for item in tiny_train_overrides(tmp_path / "two", extra) for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "maskrcnn", "train", "--config", "shapes_R_18_FPN", "--no-progress", *cfg_args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_weights(_weights(tmp_path / "two/train/model_final.pth"), _weights(single), atol=1e-5)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 2_300_000])
def test_any_64_bit_seed_trains(tmp_path, seed):
    # seeds derived by arithmetic on train.seed overflowed torch.manual_seed above ~2.3 million
    result = train(tiny_train_config(tmp_path, [f"train.seed={seed}", "solver.max_iter=2", "train.checkpoint_period=0"]),
                   progress=False)
    assert Path(result["checkpoint"]).is_file()


def test_checkpoints_do_not_need_the_backbone_weights_file(tmp_path, monkeypatch):
    # the trunk file initialises training only: building a model never reads it, so a checkpoint
    # trained from it loads on a machine without it
    trunk = tmp_path / "resnet.pth"
    trunk.write_bytes(b"stands for an ImageNet checkpoint")
    loaded = []
    monkeypatch.setattr(trainer_mod, "load_imagenet_backbone", lambda model, path: loaded.append(path))
    cfg = tiny_train_config(tmp_path, [f"model.backbone.weights={trunk}", "solver.max_iter=2", "train.checkpoint_period=1"])
    result = train(cfg, progress=False)
    assert loaded == [str(trunk)]
    train(tiny_train_config(tmp_path, [f"model.backbone.weights={trunk}", "solver.max_iter=3"]), resume=True, progress=False)
    assert loaded == [str(trunk)], "resuming initialised the trunk again"
    trunk.unlink()
    maskrcnn.build_model(cfg)
    out = Predictor(result["checkpoint"], "cpu")(torch.rand(3, 80, 120))
    assert out["boxes"].shape[1] == 4


@pytest.mark.parametrize("extra, message", [
    (["model.mask_head.loss=softmax", "model.mask_head.class_agnostic=true"], "softmax"),
    (["solver.amp=fp16"], "fp16"),
])
def test_a_refused_config_leaves_no_config_yaml(tmp_path, extra, message):
    # config.yaml says "this folder holds a run of this config": a config refused while the model,
    # its trained parts or the precision are set up must not leave one behind
    cfg = tiny_train_config(tmp_path, extra)
    with pytest.raises(ValueError, match=message):
        train(cfg, progress=False)
    assert not (tmp_path / "train" / "config.yaml").exists()


def test_sync_bn_is_plain_batch_norm_in_one_process_and_refused_across_cpu_processes():
    from maskrcnn.engine.trainer import DistInfo, _sync_bn_for
    from tiny import tiny_config

    def model():
        torch.manual_seed(0)
        return build_model(tiny_config(extra=["model.backbone.norm=SyncBN", "model.fpn.norm=SyncBN"]))

    syncs = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model().modules())
    assert syncs > 20
    # one process: each becomes a BatchNorm2d with the same state (torch's SyncBatchNorm needs a group)
    one = _sync_bn_for(model(), DistInfo(), torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in one.modules())
    assert sum(type(m) is torch.nn.BatchNorm2d for m in one.modules()) == syncs
    assert one.state_dict().keys() == model().state_dict().keys()
    # several processes on the CPU (torchrun with Gloo): torch syncs on GPUs only, and its forward would
    # raise inside the first step; refused at once, with what to use instead
    with pytest.raises(ValueError, match="SyncBN .* GPUs only.* use BN .* or GN"):
        _sync_bn_for(model(), DistInfo(rank=0, world_size=2), torch.device("cpu"))
    # on GPUs it stays synchronised (the device is only compared, nothing is moved)
    kept = _sync_bn_for(model(), DistInfo(rank=0, world_size=2), torch.device("cuda", 0))
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in kept.modules()) == syncs
