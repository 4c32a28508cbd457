"""Faster R-CNN's 4-step alternating training: which parts each step trains, freezes and shares."""

import json

import pytest
import torch

import maskrcnn
from maskrcnn._seeding import derive_seed
from maskrcnn.config import merge
from maskrcnn.engine.alternating import fit, step_iterations
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.engine.trainer import train
from maskrcnn.modeling.build import build_model
from tiny import tiny_train_overrides


def _part(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix + ".")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _losses(folder) -> set:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {k for r in records for k in r if k.startswith("loss_")}


def test_step_iterations_split_two_one_two_one():
    assert step_iterations(12) == [4, 2, 4, 2]
    assert step_iterations(2000) == [666, 333, 666, 335]
    with pytest.raises(ValueError, match="max_iter >= 4"):
        step_iterations(3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("alternating")
    cfg = maskrcnn.get_config("shapes_R_18_FPN", tiny_train_overrides(
        out, ["solver.max_iter=12", "train.procedure=alternating", "train.tensorboard=never"]))
    result = fit(cfg, progress=False)
    return out / "train", result


def test_each_step_trains_its_part(run):
    root, result = run
    cfg = load_checkpoint(root / "step1" / "model_final.pth")["config"]
    torch.manual_seed(derive_seed(0))  # as the trainer seeds before building: each step's starting weights
    fresh = build_model(merge(maskrcnn.Config(), cfg)).state_dict()
    s = {k: load_checkpoint(root / f"step{k}" / "model_final.pth")["model"] for k in (1, 2, 3, 4)}
    # 1: the RPN alone (and the backbone under it); the RoI heads never see a gradient
    assert _losses(root / "step1") == {"loss_rpn_objectness", "loss_rpn_box"}
    assert _same(_part(s[1], "roi_heads"), _part(fresh, "roi_heads"))
    assert not _same(_part(s[1], "rpn"), _part(fresh, "rpn"))
    # 2: a separate network, initialised as step 1's was, trains backbone and RoI heads on step 1's
    # proposals; its own RPN is untouched
    assert _losses(root / "step2") == {"loss_cls", "loss_box_reg", "loss_mask"}
    assert _same(_part(s[2], "rpn"), _part(fresh, "rpn"))
    assert not _same(_part(s[2], "backbone"), _part(s[1], "backbone"))
    assert not _same(_part(s[2], "backbone"), _part(fresh, "backbone"))
    # 3: step 2's backbone, frozen (weights and batch-norm statistics), under step 1's RPN, fine-tuned
    assert _losses(root / "step3") == {"loss_rpn_objectness", "loss_rpn_box"}
    assert _same(_part(s[3], "backbone"), _part(s[2], "backbone"))
    assert _same(_part(s[3], "roi_heads"), _part(s[2], "roi_heads"))
    assert not _same(_part(s[3], "rpn"), _part(s[1], "rpn"))
    # 4: backbone and RPN frozen, the RoI heads fine-tuned
    assert _losses(root / "step4") == {"loss_cls", "loss_box_reg", "loss_mask"}
    assert _same(_part(s[4], "backbone"), _part(s[3], "backbone")) and _same(_part(s[4], "rpn"), _part(s[3], "rpn"))
    assert not _same(_part(s[4], "roi_heads"), _part(s[3], "roi_heads"))
    # the final model is step 4's, and it was evaluated (the first steps' incomplete models were not)
    assert _same(load_checkpoint(root / "model_final.pth")["model"], s[4])
    assert "bbox" in result["metrics"] and "segm" in result["metrics"]
    assert not any("bbox/AP" in line for line in (root / "step1" / "metrics.jsonl").read_text().splitlines())


def test_a_previous_run_is_refused_before_any_step(run, tmp_path):
    root, _ = run
    cfg = load_checkpoint(root / "model_final.pth")["config"]
    cfg = merge(maskrcnn.Config(), cfg)
    cfg.train.procedure, cfg.train.optimize, cfg.train.freeze = "alternating", "all", ()
    cfg.train.output_dir, cfg.train.init_weights, cfg.train.proposals_from = str(root), "", ""
    cfg.solver.max_iter = 12
    with pytest.raises(ValueError, match="holds a previous alternating run .*--overwrite"):
        fit(cfg, progress=False)
    with pytest.raises(ValueError, match="--overwrite to start over"):
        fit(cfg, resume=True, progress=False)


def test_bad_part_settings_are_refused(tmp_path):
    for extra, match in [(["train.freeze=[head]"], "unknown part 'head'"),
                         (["train.proposals_from=x.pth"], "set it too"),
                         (["train.freeze=[backbone, rpn, roi_heads]"], "nothing to train"),
                         (["train.procedure=alternating", "train.optimize=rpn"], "leave them")]:
        cfg = maskrcnn.get_config("shapes_R_18_FPN", tiny_train_overrides(tmp_path / extra[0][6:12], extra))
        with pytest.raises(ValueError, match=match):
            fit(cfg, progress=False)
    with pytest.raises(ValueError, match="engine.alternating.fit"):  # train() runs one end-to-end run only
        train(maskrcnn.get_config("shapes_R_18_FPN", ["train.procedure=alternating"]), progress=False)
