"""maskrcnn ablate: the tables' plan, the direction verdicts, and a whole (tiny) run from the CLI."""

import json

import pytest

from maskrcnn.cli import main
from maskrcnn.experiments.ablations import ABLATIONS
from maskrcnn.experiments.runner import _direction, parse_budget, plan, table_rows

TINY = ["data.shapes_train=8", "data.shapes_val=4", "data.shapes_size=96", "model.input.min_size_train=[96]",
        "model.input.min_size_test=96", "data.num_workers=0", "solver.warmup_iters=2"]


def test_every_table_has_its_reference_and_runs_are_shared():
    tables, chosen = plan([])
    assert [t.key for t in tables] == [a.key for a in ABLATIONS]
    for t in tables:
        assert t.reference in [v.name for v in t.variants]
    # the baseline (no overrides) is one run, shared by every table that has it
    baselines = {run.name for (key, name), run in chosen.items() if not run.overrides}
    assert baselines == {"baseline"}
    _, c4 = plan(["roi_pooling", "backbone"], arch="c4")
    assert c4[("roi_pooling", "RoIAlign")].name == "C4" and c4[("backbone", "C4")].name == "C4"
    assert c4[("roi_pooling", "RoIWarp")].name == "C4-RoIWarp" and c4[("backbone", "FPN")].name == "baseline"
    with pytest.raises(ValueError, match="unknown ablation 'roialign'"):
        plan(["roialign"])


def test_budget_and_direction():
    assert parse_budget("600") == (600, None) and parse_budget("30m") == (None, 30.0)
    for bad in ("ten", "3", "10.7", "0m"):
        with pytest.raises(ValueError, match="--budget must be whole iterations per run, at least 10"):
            parse_budget(bad)
    assert _direction(30.0, 27.0, 30.3, 26.9).startswith("agrees (paper -3.4, ours -3.0)")
    assert _direction(30.0, 31.0, 30.3, 26.9).startswith("opposite")
    assert _direction(30.0, 30.0, 30.3, 26.9).startswith("no difference")
    assert _direction(30.0, 30.5, 30.3, 30.9, noise=1.0).endswith("within the seeds' spread")
    assert _direction(30.0, 31.0, None, None) == "paper: no number"


def test_rows_average_seeds():
    table = next(a for a in ABLATIONS if a.key == "mask_loss")
    runs = {"sigmoid": [{"numbers": {"segm/AP": 40.0, "segm/AP50": 60.0, "segm/AP75": 42.0, "bbox/AP": 35.0},
                         "seconds": 10}, {"numbers": {"segm/AP": 42.0, "segm/AP50": 62.0, "segm/AP75": 44.0,
                                                      "bbox/AP": 37.0}, "seconds": 12}],
            "softmax": [{"numbers": {"segm/AP": 35.0, "segm/AP50": 58.0, "segm/AP75": 36.0, "bbox/AP": 36.0},
                         "seconds": 10}, {"numbers": {"segm/AP": 37.0, "segm/AP50": 58.0, "segm/AP75": 38.0,
                                                      "bbox/AP": 36.0}, "seconds": 10}]}
    ref, soft = table_rows(table, runs)
    assert (ref["AP"], ref["AP_spread"], ref["other_AP"], ref["seconds"]) == (41.0, 1.0, 36.0, 11.0)
    assert soft["direction"].startswith("agrees (paper -5.5, ours -5.0)")


def test_a_set_on_a_varied_key_is_refused(tmp_path, capsys):
    code = main(["ablate", "--only", "mask_loss", "--budget", "10", "--output", str(tmp_path / "a"), "--set",
                 "model.mask_head.loss=softmax"])
    err = capsys.readouterr().err
    assert code != 0 and "sets a key the tables vary" in err and not (tmp_path / "a" / "runs").exists()


def test_ablate_command_trains_evaluates_and_reuses(tmp_path, capsys):
    out = tmp_path / "abl"
    argv = ["ablate", "--only", "mask_class", "multitask", "mask_class", "--budget", "10", "--output", str(out),
            "--no-progress"]
    for o in TINY:
        argv += ["--set", o]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 tables, 3 runs x 1 seed, 10 iterations each: baseline, class-agnostic, boxes-only" in printed
    assert "| class-agnostic |" in printed and "| boxes only |" in printed and "paper" in printed
    data = json.loads((out / "ablations.json").read_text())
    assert set(data["tables"]) == {"mask_class", "multitask"} and data["iterations"] == 10
    assert (out / "mask_class.png").is_file() and (out / "multitask.png").is_file()
    assert "### Masks: class-specific vs class-agnostic" in (out / "ablations.md").read_text()
    # the boxes-only run has no mask AP; its box AP is the table's metric
    multitask = {r["variant"]: r for r in data["tables"]["multitask"]}
    assert multitask["boxes only"]["AP"] is not None and multitask["boxes only"]["other_AP"] is None
    # run again: the finished runs are reused, not trained again
    stamp = (out / "runs" / "baseline-seed0" / "model_final.pth").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "runs" / "baseline-seed0" / "model_final.pth").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out.count(", reused)") == 3
    # a later run of fewer tables (reusing the runs) drops the charts of the tables it left out
    argv_one = [a for a in argv if a != "multitask"]
    assert main(argv_one) == 0
    assert (out / "mask_class.png").is_file() and not (out / "multitask.png").exists()
    assert set(json.loads((out / "ablations.json").read_text())["tables"]) == {"mask_class"}
