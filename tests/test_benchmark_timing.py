"""benchmarks/timing.py: the peak memory each benchmark process reports is its own."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the parent's peak leaks into ru_maxrss on Linux")
def test_a_child_process_reports_its_own_peak_not_its_parents():
    # the benchmarks run each library in a child process of a parent that may hold gigabytes (the
    # previous case's outputs); Linux's ru_maxrss carries the parent's peak into the child, which made
    # two different processes report the same 1291 MB
    held = bytearray(400 * 1024 * 1024)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page, so it is resident
    code = (f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); from timing import peak_rss_mb; "
            "block = bytearray(60 * 1024 * 1024); block[::4096] = b'1' * len(block[::4096]); print(peak_rss_mb())")
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 60 <= child < 250, child  # its own 60 MB block and an interpreter, not the parent's 400 MB
    del held
