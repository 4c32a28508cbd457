"""Training speed of the demo when another process keeps one core busy (issue 11, defect 12).

Runs ``maskrcnn demo``'s training (preset ``shapes_R_18_FPN``, its defaults: data workers, threads)
for a few iterations in a fresh process, once alone and once beside a busy-loop process, and prints
seconds per iteration and the slowdown. Each setting runs in its own process so that environment
variables read when torch starts (``OMP_WAIT_POLICY``, ``OMP_NUM_THREADS``) take effect.

    python benchmarks/cpu_load.py                         # the defaults
    python benchmarks/cpu_load.py --env OMP_NUM_THREADS=1 --set data.num_workers=0

Run it alone on the machine: anything else running makes both numbers meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
from maskrcnn._openmp import limit_spin_waiting
limit_spin_waiting()  # what the command line does
import maskrcnn
from maskrcnn.engine.trainer import train
out, iters, overrides = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
cfg = maskrcnn.get_config("shapes_R_18_FPN", [f"train.output_dir={out}/train", f"data.shapes_dir={out}/shapes",
      f"solver.max_iter={iters}", "train.eval_period=0", "train.checkpoint_period=0", "train.log_period=1",
      "data.shapes_val=2"] + overrides)
train(cfg, progress=False)
times = [json.loads(l)["time"] for l in (out / "train" / "metrics.jsonl").read_text().splitlines() if '"time"' in l]
print("TIMES", json.dumps(times))
"""


BUSY = {
    "loop": "while True: pass",  # one core taken
    # another PyTorch job on all cores (its OpenMP threads compete with ours): tests, a second training
    "torch": "import torch\na = torch.randn(384, 384)\nwhile True:\n    a @ a",
}


def _busy(kind: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUSY[kind]])


def measure(iters: int, overrides: list[str], env: dict[str, str], busy_kind: str | None, workdir: Path) -> float:
    """Median seconds per iteration after the first 3 (start-up, first batches)."""
    busy = _busy(busy_kind) if busy_kind else None
    try:
        time.sleep(0.5 if busy_kind else 0)
        res = subprocess.run([sys.executable, "-c", CHILD, str(workdir), str(iters), json.dumps(overrides)],
                             env={**os.environ, **env}, capture_output=True, text=True, check=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    times = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("TIMES"))[6:])
    steady = sorted(times[3:])
    return steady[len(steady) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--busy", choices=list(BUSY), default="loop", help="what the other process runs")
    args = ap.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        alone = measure(args.iters, args.overrides, env, None, Path(tmp))
        loaded = measure(args.iters, args.overrides, env, args.busy, Path(tmp))
    label = " ".join(args.env + args.overrides) or "defaults"
    print(f"{label}: alone {alone:.3f} s/it, beside a busy '{args.busy}' process {loaded:.3f} s/it, slowdown "
          f"{loaded / alone:.1f}x ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
