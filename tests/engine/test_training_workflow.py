"""The training workflow of issue 14: validation loss, the best checkpoint, early stopping,
gradient accumulation."""

import json
import re

import pytest
import torch

import maskrcnn
from maskrcnn._seeding import derive_seed
from maskrcnn.config import ConfigError
from maskrcnn.data.coco import CocoDataset
from maskrcnn.engine.best import BestMetric, tracked_key
from maskrcnn.engine.checkpoint import last_checkpoint, load_checkpoint
from maskrcnn.engine.trainer import train
from maskrcnn.engine.validation import validation_losses
from maskrcnn.modeling.build import build_model
from maskrcnn.data.build import build_val_dataset, dataset_paths
from tiny import tiny_train_config


def _records(out):
    return [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]


# -- the best metric, by hand -----------------------------------------------------------------------
def test_best_metric_follows_ap_up_and_loss_down_with_patience():
    ap = BestMetric("segm/AP", patience=2, min_delta=0.01)
    seen = [ap.update({"iteration": it, "segm/AP": v}) for it, v in [(1, 0.30), (2, 0.35), (3, 0.355), (4, 0.20)]]
    # 0.355 is better than 0.35 by less than min_delta: not counted; then two stale evaluations stop
    assert seen == [True, True, False, False] and (ap.best, ap.best_iteration) == (0.35, 2) and ap.should_stop
    loss = BestMetric("val/total_loss")
    assert [loss.update({"iteration": i, "val/total_loss": v}) for i, v in [(1, 2.0), (2, 1.5), (3, 1.7)]] == \
        [True, True, False]
    assert loss.best == 1.5 and not loss.should_stop  # patience 0: never stops
    # pycocotools' -1 (no ground truth of that kind) and a missing key are not evaluations of the metric
    kp = BestMetric("keypoints/AP", patience=1)
    assert not kp.update({"iteration": 1, "keypoints/AP": -1.0}) and not kp.update({"iteration": 2, "bbox/AP": 0.5})
    assert kp.best is None and not kp.should_stop


def test_best_metric_state_is_rebuilt_from_the_log_on_resume():
    records = [{"iteration": 10, "lr": 0.1}, {"iteration": 20, "segm/AP": 0.5}, {"iteration": 40, "segm/AP": 0.4}]
    b = BestMetric("segm/AP", patience=2)
    b.replay(records)
    assert (b.best, b.best_iteration, b.stale) == (0.5, 20, 1)


@pytest.mark.parametrize("overrides, key", [
    ([], "segm/AP"), (["model.mask_on=false"], "bbox/AP"), (["train.best_metric=val_loss"], "val/total_loss"),
    (["train.best_metric=bbox/AP"], "bbox/AP"), (["train.best_metric=none"], None),
])
def test_tracked_key(overrides, key):
    assert tracked_key(maskrcnn.get_config("shapes_R_18_FPN", overrides)) == key


@pytest.mark.parametrize("preset, key", [
    ("keypoint_rcnn_R_50_FPN", "keypoints/AP"),      # keypoints without masks: keypoint AP
    ("shapes_keypoint_R_18_FPN", "segm/AP"),         # keypoints and masks: masks first
    ("faster_rcnn_R_50_FPN", "bbox/AP"),
])
def test_tracked_key_of_keypoint_and_box_only_models(preset, key):
    assert tracked_key(maskrcnn.get_config(preset)) == key


@pytest.mark.parametrize("overrides, phrase", [
    (["model.mask_on=false", "train.best_metric=segm/AP"], "model.mask_on is false"),
    (["train.best_metric=keypoints/AP"], "model.keypoint_on is false"),
    (["train.val_loss=false", "train.best_metric=val_loss"], "train.val_loss is false"),
    (["train.early_stop_patience=2", "train.eval_period=0"], "needs train.eval_period > 0"),
    (["train.early_stop_patience=2", "train.best_metric=none"], "needs a train.best_metric"),
    (["solver.ims_per_batch=4", "solver.accumulate_steps=3"], "divisible by solver.accumulate_steps"),
])
def test_inconsistent_workflow_settings_are_refused(overrides, phrase):
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        maskrcnn.get_config("shapes_R_18_FPN", overrides)


# -- a tiny run with evaluations -------------------------------------------------------------------
def test_best_checkpoint_and_validation_loss_of_a_run(tmp_path, capsys):
    cfg = tiny_train_config(tmp_path, ["train.eval_period=2", "train.checkpoint_period=0", "solver.base_lr=0.02"])
    result = train(cfg, progress=False)
    # each periodic evaluation says its AP and validation loss in the log (the last one prints its table)
    printed = capsys.readouterr().out
    assert "eval at iteration 2: segm AP" in printed and "eval at iteration 4: segm AP" in printed
    assert "val loss" in printed and "eval at iteration 6:" not in printed
    evals = [r for r in _records(tmp_path) if "segm/AP" in r]
    assert [r["iteration"] for r in evals] == [2, 4, 6]
    for r in evals:  # every loss of the training step, on the validation images, and their sum
        train_keys = {k for k in _records(tmp_path)[0] if k.startswith("loss_")}
        assert {f"val/{k}" for k in train_keys} | {"val/total_loss"} == {k for k in r if k.startswith("val/")}
        assert r["val/total_loss"] == pytest.approx(sum(r[f"val/{k}"] for k in train_keys))
    # the best segm AP, the first of equals (AP only counts when it is strictly better)
    best_ap = max(r["segm/AP"] for r in evals)
    first_best = next(r["iteration"] for r in evals if r["segm/AP"] == best_ap)
    state = load_checkpoint(tmp_path / "train" / "model_best.pth")
    assert state["iteration"] == first_best and state["best"] == {"metric": "segm/AP", "value": best_ap}
    assert result["best"]["iteration"] == first_best
    # --resume continues from the newest checkpoint, not from the best one
    assert last_checkpoint(tmp_path / "train").name == "model_final.pth"
    assert "optimizer" not in state  # a model to deploy, not to resume
    # the final evaluation's error analysis, as eval --analyze writes it
    assert result["analysis"] == str(tmp_path / "train" / "analysis")
    assert (tmp_path / "train" / "analysis" / "errors_segm.csv").read_text().startswith("error,count,AP50 gained")
    # the same records as TensorBoard events (the tensorboard extra is installed by the test command)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "train"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/total_loss", "train/lr", "train/loss_mask", "segm/AP", "bbox/AP", "val/total_loss"} <= \
        set(tags["scalars"])
    assert [e.step for e in events.Scalars("segm/AP")] == [2, 4, 6]
    assert [e.value for e in events.Scalars("segm/AP")] == pytest.approx([r["segm/AP"] for r in evals])
    assert len(events.Scalars("train/total_loss")) == 6
    assert {"predictions/0", "predictions/1", "predictions/2"} <= set(tags["images"])
    assert [e.step for e in events.Images("predictions/0")] == [2, 4, 6]


def test_tensorboard_always_without_the_package_names_the_pip_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from maskrcnn._extras import MissingExtra

    with pytest.raises(MissingExtra, match=re.escape("pip install 'maskrcnn[tensorboard]'")):
        train(tiny_train_config(tmp_path, ["train.tensorboard=always"]), progress=False)
    train(tiny_train_config(tmp_path, ["train.tensorboard=auto", "solver.max_iter=1"]), progress=False)
    assert not list((tmp_path / "train").glob("events.out.tfevents.*"))  # auto: none, and no error


def test_validation_loss_is_repeatable_and_leaves_the_model_unchanged(tmp_path):
    cfg = tiny_train_config(tmp_path)
    assert cfg.model.backbone.norm == "BN"  # batch norm in training mode: its statistics must not move
    paths = dataset_paths(cfg)
    val = build_val_dataset(cfg, paths, CocoDataset(*paths["train"]).class_map)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ("loss_rpn_objectness", "loss_rpn_box", "loss_cls", "loss_box_reg", "loss_mask")
    a = validation_losses(model, val, names, torch.device("cpu"), seed=3, progress=False)
    b = validation_losses(model, val, names, torch.device("cpu"), seed=3, progress=False)
    assert a == b and set(a) == {*names, "total_loss"} and all(v > 0 for v in a.values())
    assert not model.training  # restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_early_stopping_stops_after_patience_evaluations(tmp_path):
    # no evaluation can beat the first by a whole AP point: the second one is stale, and stops the run
    cfg = tiny_train_config(tmp_path, ["train.eval_period=2", "train.early_stop_patience=1",
                                       "train.early_stop_min_delta=1.0", "solver.max_iter=8",
                                       "train.checkpoint_period=0"])
    result = train(cfg, progress=False)
    assert result["iterations"] == 4
    assert load_checkpoint(tmp_path / "train" / "model_final.pth")["iteration"] == 4
    assert load_checkpoint(tmp_path / "train" / "model_best.pth")["iteration"] == 2
    records = _records(tmp_path)
    assert [r["iteration"] for r in records if "segm/AP" in r] == [2, 4]  # not evaluated again at the stop
    assert records[-1] == {"iteration": 4, "early_stop": True}
    assert max(r["iteration"] for r in records) == 4 and result["metrics"]["segm"]["AP"] == records[-2]["segm/AP"]


def test_accumulation_trains_like_the_larger_batch(tmp_path):
    # frozen batch norm: with batch norm in training mode each pass would normalise by its own images
    common = ["model.backbone.norm=FrozenBN", "solver.ims_per_batch=4", "solver.max_iter=2", "solver.base_lr=0.01",
              "solver.warmup_iters=0", "train.checkpoint_period=0", "data.flip_prob=0.0"]
    weights = {}
    for steps in (1, 2, 4):
        out = tmp_path / f"acc{steps}"
        cfg = tiny_train_config(out, common + [f"solver.accumulate_steps={steps}"])
        train(cfg, progress=False)
        weights[steps] = load_checkpoint(out / "train" / "model_final.pth")["model"]
        losses = [r for r in _records(out) if "total_loss" in r]
        weights[f"loss{steps}"] = torch.tensor([r["total_loss"] for r in losses])
    init_cfg = tiny_train_config(tmp_path / "init", common)
    torch.manual_seed(derive_seed(init_cfg.train.seed))  # the initial weights, as train() builds them
    start = build_model(init_cfg).state_dict()
    for steps in (2, 4):
        moved_full = torch.cat([(weights[1][k] - start[k]).flatten().double() for k in start
                                if start[k].is_floating_point()])
        moved = torch.cat([(weights[steps][k] - start[k]).flatten().double() for k in start
                           if start[k].is_floating_point()])
        cosine = torch.nn.functional.cosine_similarity(moved, moved_full, dim=0)
        assert cosine > 0.99 and abs(moved.norm() / moved_full.norm() - 1) < 0.05, (steps, cosine)
    # the first step's loss is the mean over the same images: equal up to the per-pass normalisations
    torch.testing.assert_close(weights["loss2"][0], weights["loss1"][0], rtol=0.05, atol=0)
