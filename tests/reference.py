"""Run code in the reference environment (torch 2.14.1 + torchvision 0.29.1, its own interpreter).

torchvision's wheels do not load against the CPU-only torch this package is tested with, so the
parity tests hand their inputs to a subprocess: ``run_reference(script, inputs)`` saves ``inputs``
(a dict of tensors and plain values) with ``torch.save``, runs ``script`` in the reference
interpreter with ``inputs`` bound to that dict, and returns the dict the script stores in
``outputs``; ``randomize_norms(model, seed)`` and ``record_samplers(model)`` are predefined there. Create the environment with
``bash scripts/make_reference_env.sh``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

_PRELUDE = """
import sys, torch
torch.set_num_threads(int(sys.argv[3]))
inputs = torch.load(sys.argv[1], weights_only=False)
outputs = {}

def randomize_norms(model, seed):
    # freshly built norms are identities (mean 0, var 1, weight 1, bias 0), which would hide a
    # wrongly mapped statistic: give every one of them seeded random values
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean") or name.endswith(".bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var") or name.endswith(".weight"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 + 0.75)
    return g

def record_samplers(model):
    # wrap torchvision's RPN and RoI samplers so that the samples they draw can be replayed in ours
    record = {}
    def recording(name, sampler):
        def call(labels):
            pos, neg = sampler(labels)
            record[name] = [(torch.nonzero(p)[:, 0], torch.nonzero(n)[:, 0]) for p, n in zip(pos, neg)]
            return pos, neg
        return call
    model.rpn.fg_bg_sampler = recording("rpn", model.rpn.fg_bg_sampler)
    model.roi_heads.fg_bg_sampler = recording("roi", model.roi_heads.fg_bg_sampler)
    return record
"""
_EPILOGUE = """
torch.save(outputs, sys.argv[2])
"""


def reference_python() -> Path | None:
    """The reference interpreter, or None if the environment was not created."""
    env = Path(os.environ.get("MASKRCNN_REFENV", REPO / ".refenv"))
    py = env / "bin" / "python"
    return py if py.exists() else None


def run_reference(script: str, inputs: dict, *, timeout: float = 900, threads: int = 2,
                  env: dict | None = None) -> dict:
    """Run ``script`` in the reference environment with ``inputs``; its ``outputs`` dict comes back.
    ``env``: extra environment variables for that process."""
    py = reference_python()
    if py is None:
        raise RuntimeError("reference environment not found; run `bash scripts/make_reference_env.sh`")
    with tempfile.TemporaryDirectory(prefix="maskrcnn-ref-") as tmp:
        src, inp, out = Path(tmp, "script.py"), Path(tmp, "in.pt"), Path(tmp, "out.pt")
        src.write_text(_PRELUDE + textwrap.dedent(script) + _EPILOGUE)
        torch.save(inputs, inp)
        proc = subprocess.run([str(py), str(src), str(inp), str(out), str(threads)], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **(env or {}), "PYTHONPATH": ""})
        if proc.returncode != 0:
            raise RuntimeError(f"reference script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return torch.load(out, weights_only=False)


if __name__ == "__main__":  # a quick check that the environment works
    print(run_reference("import torchvision; outputs['v'] = torchvision.__version__", {}), file=sys.stderr)
