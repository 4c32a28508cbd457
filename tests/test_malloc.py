"""keep_freed_memory (maskrcnn/_malloc.py): after it, a large tensor freed and made again is served
from memory the process already has (no page faults), and it leaves a user's own malloc tuning
alone. Each case runs in a fresh interpreter: the setting is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")

SCRIPT = """
import json, resource, torch
from maskrcnn._malloc import keep_freed_memory
applied = keep_freed_memory()
def faults_of_new_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20)  # 64 MB, over glibc's largest mmap threshold (32 MB)
    t.fill_(1.0)                 # touch every page
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(10):  # glibc coalesces the aligned chunks that torch frees after a few rounds
    faults_of_new_tensor()
print(json.dumps({"applied": applied, "faults": [faults_of_new_tensor() for _ in range(3)]}))
"""


def run(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "MASKRCNN_MALLOC")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**env, **env_extra})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    got = run({})
    assert got["applied"] is True
    # 64 MB is 16,384 pages of 4 KB: glibc's default maps and unmaps them for every tensor
    assert max(got["faults"]) < 100, got


def test_default_malloc_faults_for_every_new_large_tensor():
    # the control: without the setting each 64 MB tensor page-faults its pages in again, which is
    # what the setting saves (this is what makes the check above able to fail)
    got = run({"MASKRCNN_MALLOC": "system"})
    assert got["applied"] is False
    assert min(got["faults"]) > 8000, got


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_user_malloc_tuning_is_left_alone(env):
    assert run(env)["applied"] is False
