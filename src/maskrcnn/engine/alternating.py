"""Faster R-CNN's 4-step alternating training (Ren et al. 2015, section 3.2; seed 002), for any
model of this library (with masks and keypoints, the "detector" is all the RoI heads):

1. the RPN alone, with the backbone (``train.optimize=rpn``);
2. a second network, initialised as the first was, trains its backbone and RoI heads on the
   proposals of step 1's frozen network: no layers are shared yet (``optimize=detector``,
   ``proposals_from``);
3. the RPN initialised from step 2's network (its backbone) and step 1's (its RPN), the backbone
   now shared and frozen, fine-tunes the RPN alone (``freeze=[backbone]``, ``optimize=rpn``);
4. with backbone and RPN frozen, the RoI heads fine-tune on the RPN's proposals
   (``freeze=[backbone, rpn]``, ``optimize=detector``).

``solver.max_iter`` is the total over the four steps, split 2:1:2:1 as the paper's 80k/40k/80k/40k
iterations (each step with its own warm-up and decay). Proposals of a frozen RPN are those it gives
at test time (``rpn.post_nms_topk_test``). The paper found this "close" to end-to-end training
(the approximate joint training, everyone's default since) at 25-50% more training time; ``maskrcnn
ablate --only alternating`` compares them here.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from maskrcnn.config import Config
from maskrcnn.engine import trainer
from maskrcnn.engine.checkpoint import load_checkpoint, save_checkpoint

SHARES = (2, 1, 2, 1)  # the paper's 80k / 40k / 80k / 40k


def step_iterations(total: int) -> list[int]:
    """``total`` iterations split 2:1:2:1 (each step at least 1)."""
    if total < 4:
        raise ValueError(f"alternating training needs solver.max_iter >= 4 (four steps), got {total}")
    sizes = [max(1, total * share // sum(SHARES)) for share in SHARES]
    sizes[-1] += total - sum(sizes)
    return sizes


def _step_config(cfg: Config, k: int, iterations: int, out: Path, **train) -> Config:
    step = copy.deepcopy(cfg)
    s = step.solver
    scale = iterations / cfg.solver.max_iter
    s.max_iter = iterations
    s.steps = tuple(sorted({max(1, int(v * scale)) for v in cfg.solver.steps}))  # increasing, as validated
    s.warmup_iters = min(cfg.solver.warmup_iters, max(iterations // 4, 1))
    t = step.train
    t.procedure = "end_to_end"
    t.output_dir = str(out / f"step{k}")
    last = k == 4
    t.eval_period = cfg.train.eval_period if last else 0
    t.val_loss = cfg.train.val_loss and last
    t.analyze_at_end = cfg.train.analyze_at_end and last
    t.best_metric = cfg.train.best_metric if last else "none"
    t.early_stop_patience = cfg.train.early_stop_patience if last else 0
    for key, value in train.items():
        setattr(t, key, value)
    return step


def train_alternating(cfg: Config, progress: bool = True, overwrite: bool = False) -> dict:
    """The four steps, each a training run in ``train.output_dir/step1..4``; the final model is
    ``step4/model_final.pth`` (copied to ``train.output_dir/model_final.pth``), evaluated there.
    Returns step 4's result (as :func:`maskrcnn.engine.trainer.train`)."""
    if cfg.train.freeze or cfg.train.optimize != "all" or cfg.train.proposals_from:
        raise ValueError("train.procedure=alternating sets train.optimize, freeze and proposals_from for each step; "
                         "leave them at their defaults")
    out = Path(cfg.train.output_dir)
    iters = step_iterations(cfg.solver.max_iter)
    # the whole layout is checked (and with overwrite, cleared) before step 1: a stale step 2-4 or final
    # model beside a new step 1 would look like one run
    layout = [out / f"step{k}" for k in (1, 2, 3, 4)] + [out / "step3_init.pth", out / "model_final.pth"]
    old = [p for p in layout if p.is_file() or (p.is_dir() and any(p.glob("*.pth")))]
    if old and not overwrite:
        raise ValueError(f"{out} holds a previous alternating run ({', '.join(p.name for p in old)}): --overwrite to "
                         "start over there, or another --output")
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    init = cfg.train.init_weights
    print(f"alternating training, 4 steps of {'/'.join(map(str, iters))} iterations: RPN; detector on its proposals; "
          "RPN with the shared backbone frozen; detector heads with backbone and RPN frozen", flush=True)

    def run(k: int, **train_settings) -> dict:
        print(f"-- step {k} of 4 --", flush=True)
        return trainer.train(_step_config(cfg, k, iters[k - 1], out, **train_settings), progress=progress)

    run(1, optimize="rpn", init_weights=init)
    step1 = out / "step1" / "model_final.pth"
    run(2, optimize="detector", proposals_from=str(step1), init_weights=init)
    # step 3 starts from step 2's network with step 1's RPN: the backbone is shared from here on
    merged = load_checkpoint(out / "step2" / "model_final.pth")
    rpn = {k: v for k, v in load_checkpoint(step1)["model"].items() if k.startswith("rpn.")}
    merged["model"].update(rpn)
    start3 = save_checkpoint(out / "step3_init.pth", merged["model"], merged["config"], merged["classes"], 0,
                             resumable=False)
    run(3, optimize="rpn", freeze=("backbone",), init_weights=str(start3))
    result = run(4, optimize="detector", freeze=("backbone", "rpn"),
                 init_weights=str(out / "step3" / "model_final.pth"))
    final = load_checkpoint(out / "step4" / "model_final.pth")
    save_checkpoint(out / "model_final.pth", final["model"], final["config"], final["classes"], cfg.solver.max_iter,
                    resumable=False)
    return result


def fit(cfg: Config, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Train ``cfg`` by its ``train.procedure``: one end-to-end run (:func:`~maskrcnn.engine.trainer.train`)
    or the four alternating steps."""
    if cfg.train.procedure != "alternating":  # looked up at call time: tests replace trainer.train
        return trainer.train(cfg, resume=resume, progress=progress, overwrite=overwrite)
    if resume:
        raise ValueError("train.procedure=alternating cannot --resume (four runs in step1..step4): --overwrite to start "
                         "over, or another --output")
    return train_alternating(cfg, progress, overwrite)
