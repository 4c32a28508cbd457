"""``maskrcnn ablate``: train every variant of the paper's ablations on the same synthetic shapes,
with the same seed and budget, evaluate them, and print each table with the paper's numbers beside
ours and whether the effect goes the same way.

Runs are shared between tables (the baseline appears in most) and kept in ``output/runs/<name>``:
a run whose folder holds a result for the same config is not trained again, so tables can be
added later, or a run re-done by deleting its folder.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from maskrcnn.config import Config, get_config
from maskrcnn.experiments.ablations import ABLATIONS, BY_KEY, C4, Ablation

# the runs' common settings: a CPU-sized model on the demo's shapes, or a GPU-sized one
SETTINGS = {
    "cpu": ("shapes_R_18_FPN", ["data.shapes_val=200"], {}),
    "gpu": ("shapes_R_18_FPN", [
        "model.backbone.depth=50", "model.backbone.stem_channels=64", "model.backbone.res2_channels=256",
        "model.fpn.out_channels=256", "model.box_head.fc_dim=1024", "model.mask_head.conv_dim=256",
        "model.roi_heads.batch_size_per_image=512", "data.shapes_size=512", "data.shapes_train=10000",
        "data.shapes_val=500", "model.input.min_size_train=[512]", "model.input.max_size_train=853",
        "model.input.min_size_test=512", "model.input.max_size_test=853", "solver.ims_per_batch=16",
        "solver.warmup_iters=500", "data.num_workers=8"],
        {"model.mask_head.mlp_dims=[256, 256]": "model.mask_head.mlp_dims=[1024, 1024]"}),
}
DEFAULT_BUDGET = {"cpu": 600, "gpu": 20000}
C4_TABLES = ("roi_pooling", "mask_loss", "mask_class")  # the paper ran these on ResNet-50-C4
MIN_ITERATIONS = 10  # warm-up, decay steps and the four alternating steps need a few


@dataclass
class Run:
    name: str
    overrides: tuple[str, ...]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "baseline"


def plan(keys: list[str], arch: str = "fpn") -> tuple[list[Ablation], dict[tuple[str, str], Run]]:
    """The tables and, per (table, variant), the run that gives its numbers (shared across tables)."""
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        raise ValueError(f"unknown ablation {unknown[0]!r}; choose from {', '.join(BY_KEY)}")
    tables = [BY_KEY[k] for k in keys] if keys else list(ABLATIONS)
    runs: dict[tuple[str, ...], Run] = {}
    chosen: dict[tuple[str, str], Run] = {}
    for table in tables:
        base = C4 if arch == "c4" and table.key in C4_TABLES else ()
        for v in table.variants:
            overrides = tuple(base) + tuple(v.overrides)
            if overrides not in runs:
                parts = (["C4"] if base and v.overrides != C4 else []) + ([v.name] if v.overrides else [])
                runs[overrides] = Run(_slug("-".join(parts)) if parts else "baseline", overrides)
            chosen[(table.key, v.name)] = runs[overrides]
    return tables, chosen


def run_config(run: Run, out: Path, setting: str, iterations: int, seed: int, device: str,
               extra: list[str] = ()) -> Config:
    preset, common, scale = SETTINGS[setting]
    overrides = list(extra) + [scale.get(o, o) for o in run.overrides]
    steps = sorted({max(1, int(iterations * 0.75)), max(2, int(iterations * 0.92))})  # increasing, as validated
    return get_config(preset, common + [
        f"data.shapes_dir={out / 'shapes'}", f"train.output_dir={out / 'runs' / f'{run.name}-seed{seed}'}",
        f"solver.max_iter={iterations}", f"solver.steps={steps}", f"train.seed={seed}", f"train.device={device}",
        "train.checkpoint_period=0", "train.eval_period=0", "train.tensorboard=never", "train.analyze_at_end=false",
        "train.val_loss=false", "train.best_metric=none", f"train.log_period={max(1, min(50, iterations // 20))}",
    ] + overrides)


def _numbers(metrics: dict) -> dict:
    return {f"{t}/{k}": 100 * metrics[t][k] for t in ("bbox", "segm") if t in metrics
            for k in ("AP", "AP50", "AP75") if k in metrics[t]}


def train_run(cfg: Config, progress: bool) -> dict:
    """The run's numbers, from its folder when it was trained before with this config."""
    from maskrcnn.engine.alternating import fit

    folder = Path(cfg.train.output_dir)
    done = folder / "ablation_result.json"
    if done.is_file():
        kept = json.loads(done.read_text())
        if kept.get("config") == cfg.to_yaml():
            return {**kept, "reused": True}
    start = time.perf_counter()
    result = fit(cfg, progress=progress, overwrite=True)
    kept = {"config": cfg.to_yaml(), "numbers": _numbers(result["metrics"]), "seconds": time.perf_counter() - start,
            "iterations": cfg.solver.max_iter}
    done.write_text(json.dumps(kept))
    return kept


def _iterations_for(minutes: float, n_runs: int, out: Path, setting: str, device: str, extra: list[str]) -> int:
    """Iterations per run that fit ``minutes`` for ``n_runs`` runs: a 20-iteration probe of the baseline
    times one step; 15% is kept for evaluations."""
    from maskrcnn.engine.trainer import train

    cfg = run_config(Run("probe", ()), out, setting, 20, 0, device, extra)
    start = time.perf_counter()
    train(cfg, progress=False, overwrite=True)
    probe = time.perf_counter() - start
    left = max(minutes * 60 - probe, 0.0)  # the probe is part of the budget
    return max(MIN_ITERATIONS, int(0.85 * left / n_runs / (probe / 20)))


def parse_budget(text: str) -> tuple[int | None, float | None]:
    """``"600"`` (iterations per run) or ``"30m"`` (minutes for everything)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(m|min|minutes)?\s*", text)
    usage = f"--budget must be whole iterations per run, at least {MIN_ITERATIONS} (e.g. 600), or minutes in all " \
            f"(e.g. 30m), got {text!r}"
    if not m or float(m.group(1)) <= 0:
        raise ValueError(usage)
    if m.group(2):
        return None, float(m.group(1))
    if "." in m.group(1) or int(m.group(1)) < MIN_ITERATIONS:
        raise ValueError(usage)
    return int(m.group(1)), None


def _direction(ours_ref: float, ours: float, paper_ref: float | None, paper: float | None, noise: float = 0.0) -> str:
    """Whether our change against the reference goes the paper's way (a change no larger than the
    seeds' spread, ``noise``, is said to be within it)."""
    if paper_ref is None or paper is None:
        return "paper: no number"
    d_paper, d_ours = paper - paper_ref, ours - ours_ref
    numbers = f"(paper {d_paper:+.1f}, ours {d_ours:+.1f})"
    if abs(d_ours) < 0.05:
        return f"no difference {numbers}"
    verdict = "agrees" if (d_paper > 0) == (d_ours > 0) else "opposite"
    return f"{verdict} {numbers}" + (", within the seeds' spread" if abs(d_ours) <= noise else "")


def table_rows(table: Ablation, results: dict[str, list[dict]]) -> list[dict]:
    """Per variant: our mean (and spread over seeds) of AP/AP50/AP75 in the table's metric, the other
    metric's AP, the paper's numbers, and the direction against the reference variant."""
    other = "bbox" if table.metric == "segm" else "segm"
    rows = []
    for v in table.variants:
        runs = results[v.name]
        row = {"variant": v.name, "paper": v.paper, "seconds": sum(r["seconds"] for r in runs) / len(runs)}
        for k in ("AP", "AP50", "AP75"):
            values = [r["numbers"].get(f"{table.metric}/{k}") for r in runs]
            values = [x for x in values if x is not None]
            row[k] = sum(values) / len(values) if values else None
            row[k + "_spread"] = (max(values) - min(values)) / 2 if len(values) > 1 else None
        others = [r["numbers"].get(f"{other}/AP") for r in runs if r["numbers"].get(f"{other}/AP") is not None]
        row["other_AP"] = sum(others) / len(others) if others else None
        rows.append(row)
    ref = next(r for r in rows if r["variant"] == table.reference)
    for row in rows:
        if row is ref:
            row["direction"] = "reference"
            continue
        p, pr = row["paper"], ref["paper"]
        row["direction"] = _direction(ref["AP"], row["AP"], pr[0] if pr else None, p[0] if p else None,
                                      (ref["AP_spread"] or 0) + (row["AP_spread"] or 0))
        if p and pr and p[2] is not None and pr[2] is not None and row["AP75"] is not None:
            row["direction_AP75"] = _direction(ref["AP75"], row["AP75"], pr[2], p[2],
                                               (ref["AP75_spread"] or 0) + (row["AP75_spread"] or 0))
    return rows


def format_table(table: Ablation, rows: list[dict], arch: str, iterations: int, seeds: int) -> str:
    metric = "mask" if table.metric == "segm" else "box"
    other = "box" if table.metric == "segm" else "mask"
    base = "ResNet-18-C4" if arch == "c4" and table.key in C4_TABLES else "ResNet-18-FPN"
    lines = [f"### {table.title}", "",
             f"Paper: {table.source}. Ours: {base} (half width) on synthetic shapes, {iterations} iterations, "
             f"{seeds} seed{'s' if seeds > 1 else ''}; {metric} AP on the validation images.", "",
             f"| variant | AP | AP50 | AP75 | {other} AP | paper AP | AP50 | AP75 | direction vs {table.reference} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(x, spread=None):
        if x is None:
            return "-"
        return f"{x:.1f}" + (f" ±{spread:.1f}" if spread else "")

    for r in rows:
        paper = r["paper"] or (None, None, None)
        direction = r["direction"] + (f"; AP75 {r['direction_AP75']}" if r.get("direction_AP75") else "")
        lines.append(f"| {r['variant']} | {fmt(r['AP'], r['AP_spread'])} | {fmt(r['AP50'])} | "
                     f"{fmt(r['AP75'], r['AP75_spread'])} | {fmt(r['other_AP'])} | {fmt(paper[0])} | {fmt(paper[1])} | "
                     f"{fmt(paper[2])} | {direction} |")
    if seeds == 1:
        lines += ["", "One seed: no estimate of run-to-run noise, so a difference of about an AP point may be "
                      "chance (--seeds 2 or more reports the spread)."]
    if table.note:
        lines += ["", f"Expect: {table.note}."]
    return "\n".join(lines)


def _loss_curve(folder: Path) -> tuple[list[int], list[float]]:
    """(iterations, total loss) from a run's metrics.jsonl; alternating runs' four steps end to end."""
    steps = sorted(folder.glob("step[1-4]")) or [folder]
    xs, ys, offset = [], [], 0
    for step in steps:
        path = step / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines()]
        records = [r for r in records if "total_loss" in r]
        xs += [offset + r["iteration"] for r in records]
        ys += [r["total_loss"] for r in records]
        offset += records[-1]["iteration"] if records else 0
    return xs, ys


def plot_table(table: Ablation, rows: list[dict], folders: dict[str, Path], path: Path) -> Path:
    from maskrcnn._pyplot import pyplot

    plt = pyplot()
    from matplotlib import ticker

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["variant"] for r in rows]
    width = 0.38
    for k, key in enumerate(("AP", "AP75")):
        ours = [r[key] or 0 for r in rows]
        paper = [(r["paper"][0 if key == "AP" else 2] or 0) if r["paper"] else 0 for r in rows]
        xs = [i + (k - 0.5) * width for i in range(len(rows))]
        bars.bar(xs, ours, width * 0.48, label=f"ours {key}", color=f"C{k}")
        bars.bar([x + width * 0.5 for x in xs], paper, width * 0.48, label=f"paper {key}", color=f"C{k}", alpha=0.35)
    bars.set_xticks(range(len(rows)), names)
    bars.set_ylabel(f"{'mask' if table.metric == 'segm' else 'box'} AP")
    bars.set_title(table.title, fontsize=10)
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, frameon=False)
    for name in names:
        xs, ys = _loss_curve(folders[name])
        if xs:
            curves.plot(xs, ys, label=name)
    curves.set_xlabel("iteration")
    curves.set_ylabel("training loss (total)")
    curves.set_yscale("log")
    curves.yaxis.set_major_formatter(ticker.ScalarFormatter())  # 2, 1, 0.5 rather than 2x10^0
    curves.yaxis.set_minor_formatter(ticker.NullFormatter())
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_ablations(keys: list[str], out: Path, budget: str | None = None, seeds: int = 1, arch: str = "fpn",
                  setting: str = "cpu", device: str = "auto", progress: bool = True, extra: list[str] = ()) -> dict:
    """Train what ``keys`` (all tables if empty) need, print and write the tables; returns them.
    ``extra``: config overrides for every run (e.g. a smaller dataset)."""
    if setting not in SETTINGS or arch not in ("fpn", "c4") or seeds < 1:
        raise ValueError(f"setting must be cpu or gpu, arch fpn or c4, seeds >= 1; got {setting}, {arch}, {seeds}")
    keys = list(dict.fromkeys(keys))  # each table once
    tables, chosen = plan(keys, arch)
    unique = list({run.name: run for run in chosen.values()}.values())
    varied = {o.split("=", 1)[0] for run in unique for o in run.overrides}
    clash = [o for o in extra if o.split("=", 1)[0].strip() in varied]
    if clash:
        raise ValueError(f"--set {clash[0]} sets a key the tables vary (their variants would all be the same): "
                         "leave it to the tables")
    if setting == "gpu" and device in ("auto", "cuda") and not __import__("torch").cuda.is_available():
        print("warning: --setting gpu without a GPU: ResNet-50 at 512 px and batch 16 will run on the CPU", flush=True)
    iterations, minutes = parse_budget(budget or str(DEFAULT_BUDGET[setting]))
    out.mkdir(parents=True, exist_ok=True)
    if iterations is None:
        iterations = _iterations_for(minutes, len(unique) * seeds, out, setting, device, list(extra))
    print(f"{len(tables)} tables, {len(unique)} runs x {seeds} seed{'s' if seeds > 1 else ''}, {iterations} "
          f"iterations each: {', '.join(r.name for r in unique)}", flush=True)
    from maskrcnn.modeling.build import build_model

    for run in unique:  # every variant's config and model checked before anything trains
        build_model(run_config(run, out, setting, iterations, 0, device, list(extra)))
    results: dict[str, list[dict]] = {}
    for run in unique:
        for seed in range(seeds):
            cfg = run_config(run, out, setting, iterations, seed, device, list(extra))
            print(f"== {run.name} (seed {seed}) -> {cfg.train.output_dir}", flush=True)
            r = train_run(cfg, progress)
            r["folder"] = cfg.train.output_dir
            results.setdefault(run.name, []).append(r)
            shown = ", ".join(f"{k} {v:.1f}" for k, v in r["numbers"].items() if k.endswith("/AP"))
            print(f"   {shown} ({r['seconds'] / 60:.1f} min{', reused' if r.get('reused') else ''})", flush=True)
    report, data = [], {}
    for table in tables:
        per_variant = {v.name: results[chosen[(table.key, v.name)].name] for v in table.variants}
        rows = table_rows(table, per_variant)
        text = format_table(table, rows, arch, iterations, seeds)
        folders = {name: Path(runs[0]["folder"]) for name, runs in per_variant.items()}
        picture = plot_table(table, rows, folders, out / f"{table.key}.png")
        report.append(text + f"\n\n![{table.key}]({picture.name})")
        data[table.key] = rows
        print("\n" + text + "\n", flush=True)
    # a chart of a table that this run left out belongs to an earlier run, not to the report below
    for other in ABLATIONS:
        if other not in tables:
            (out / f"{other.key}.png").unlink(missing_ok=True)
    (out / "ablations.md").write_text("\n\n".join(report) + "\n")
    (out / "ablations.json").write_text(json.dumps({"iterations": iterations, "seeds": seeds, "arch": arch,
                                                    "setting": setting, "tables": data}, indent=1))
    print(f"wrote {out / 'ablations.md'}, {out / 'ablations.json'} and a chart per table in {out}")
    return data
