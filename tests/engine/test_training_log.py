"""What a training run reports while it runs: log lines where no one watches a bar, losses kept on
the device between log periods, non-finite losses caught before anything is written from them."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import maskrcnn
from maskrcnn.engine import trainer as trainer_mod
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.engine.trainer import train
from tiny import tiny_train_config

LINE = re.compile(r"^iter: (\d+)/(\d+)  total_loss: (\S+)  (.*)  lr: (\S+)  time: (\S+) s/it  data_time: (\S+) s  "
                  r"eta: (\d+):(\d\d):(\d\d)$")


def _lines(stdout: str) -> list[dict]:
    out = []
    for text in stdout.splitlines():
        m = LINE.match(text)
        if m:
            losses = dict(item.split(": ") for item in m[4].split("  "))
            out.append({"iteration": int(m[1]), "max_iter": int(m[2]), "total": float(m[3]),
                        "losses": {k: float(v) for k, v in losses.items()}, "lr": float(m[5]),
                        "sec_per_iter": float(m[6]), "data_time": float(m[7]),
                        "eta": int(m[8]) * 3600 + int(m[9]) * 60 + int(m[10])})
    return out


def _recording_forward(monkeypatch, per_step: list[dict], nan_at_call: int | None = None,
                       raise_at_call: int | None = None):
    real_forward = maskrcnn.modeling.detector.MaskRCNN.forward

    def forward(self, images, targets=None):
        out = real_forward(self, images, targets)
        if self.training:
            if len(per_step) + 1 == raise_at_call:
                raise RuntimeError("an index out of range deep inside the model")
            if len(per_step) + 1 == nan_at_call:
                out["loss_mask"] = out["loss_mask"] * float("nan")
            per_step.append({k: float(v.detach()) for k, v in out.items()})
        return out

    monkeypatch.setattr(maskrcnn.modeling.detector.MaskRCNN, "forward", forward)


@pytest.mark.parametrize("progress", [False, True])
def test_without_a_terminal_training_prints_log_lines(tmp_path, monkeypatch, capsys, progress):
    # under pytest stderr is not a terminal: a CI log or a batch job's, where a bar is useless
    per_step: list[dict] = []
    _recording_forward(monkeypatch, per_step)
    cfg = tiny_train_config(tmp_path, ["solver.max_iter=4", "train.log_period=3", "train.checkpoint_period=0"])
    train(cfg, progress=progress)
    lines = _lines(capsys.readouterr().out)
    assert [line["iteration"] for line in lines] == [3, 4] and all(line["max_iter"] == 4 for line in lines)
    names = list(per_step[0])
    for line in lines:
        done = line["iteration"]
        assert list(line["losses"]) == names
        # each loss is the moving average the bar shows: 0.9 * previous + 0.1 * this step's
        for k in names:
            ema = per_step[0][k]
            for step in per_step[1:done]:
                ema = 0.9 * ema + 0.1 * step[k]
            assert line["losses"][k] == pytest.approx(ema, abs=1e-4), k
        assert line["total"] == pytest.approx(sum(line["losses"].values()), abs=1e-3)
        # cosine schedule after the 2 warm-up iterations, at the last iteration of the window
        assert line["lr"] == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * (done - 1) / 4)), rel=1e-4)
        assert line["sec_per_iter"] > 0 and 0 <= line["data_time"] <= line["sec_per_iter"]
        assert abs(line["eta"] - line["sec_per_iter"] * (4 - done)) <= 1
    assert lines[-1]["eta"] == 0
    # metrics.jsonl keeps its records; losses are the means of the steps since the previous record
    records = [json.loads(s) for s in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in records] == [3, 4]
    for r, window in zip(records, (per_step[0:3], per_step[3:4])):
        for k in names:
            assert r[k] == pytest.approx(sum(s[k] for s in window) / len(window), rel=1e-5, abs=1e-7), k
        assert r["total_loss"] == pytest.approx(sum(r[k] for k in names), rel=1e-5)
        assert {"lr", "data_time", "time"} <= r.keys()


def test_on_a_terminal_the_bar_replaces_the_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    train(tiny_train_config(tmp_path, ["solver.max_iter=2", "train.checkpoint_period=0"]), progress=True)
    captured = capsys.readouterr()
    assert _lines(captured.out) == [] and "training" in captured.err and "loss=" in captured.err


def test_with_stdout_in_a_file_the_lines_go_there(tmp_path, monkeypatch, capsys):
    """`maskrcnn train > log` on a terminal: the log gets the lines, not the bar."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(tiny_train_config(tmp_path, ["solver.max_iter=2", "train.checkpoint_period=0"]), progress=True)
    assert [(line["iteration"], line["max_iter"]) for line in _lines(capsys.readouterr().out)] == [(1, 2), (2, 2)]


def test_training_steps_do_not_wait_for_the_device(tmp_path, monkeypatch):
    # every read of a tensor's value by the host (item, tolist, bool, ...) made by the trainer itself:
    # on a GPU each one stalls the loop until the device catches up
    syncs: list[str] = []
    trainer_file = trainer_mod.__file__

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == trainer_file:
                syncs.append(f"{name} at line {sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    train(tiny_train_config(tmp_path, ["solver.max_iter=4", "train.log_period=2", "train.checkpoint_period=0"]),
          progress=False)
    # per log period: one finiteness check and one fetch of the losses; one more check at the end
    assert len(syncs) <= 2 * 2 + 1, syncs


def test_a_non_finite_loss_between_log_lines_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    _recording_forward(monkeypatch, [], nan_at_call=2)  # iteration 1, before the checkpoint at 3
    cfg = tiny_train_config(tmp_path, ["solver.max_iter=4", "train.log_period=100"])
    with pytest.raises(FloatingPointError, match=r"at iteration 1: loss_mask=nan;.*none \(no checkpoint"):
        train(cfg, progress=False)
    assert not list(Path(cfg.train.output_dir).glob("*.pth"))


def test_a_non_finite_loss_in_the_last_window_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _recording_forward(monkeypatch, [], nan_at_call=5)  # iteration 4, after the checkpoint at 3
    cfg = tiny_train_config(tmp_path, ["solver.max_iter=5", "train.log_period=100"])
    with pytest.raises(FloatingPointError, match=r"at iteration 4: loss_mask=nan;.*model_0000003.pth"):
        train(cfg, progress=False)
    out = Path(cfg.train.output_dir)
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000003.pth"]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(out / "model_0000003.pth")["model"].values()
               if v.is_floating_point())


def test_a_crash_after_a_non_finite_loss_names_the_loss(tmp_path, monkeypatch):
    # NaN weights break later steps anywhere; the report is about the loss that started it
    _recording_forward(monkeypatch, [], nan_at_call=2, raise_at_call=3)
    with pytest.raises(FloatingPointError, match=r"at iteration 1: loss_mask=nan") as info:
        train(tiny_train_config(tmp_path, ["solver.max_iter=4", "train.log_period=100"]), progress=False)
    assert "index out of range" in str(info.value.__context__)
