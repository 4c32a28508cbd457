"""The measurement every benchmark process makes: one warm-up call, then the median of ``repeats``
timed calls, and the process's peak resident memory. Imports only the standard library, so the
scripts run in the torchvision reference environment can import it too (by path)."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any, Callable


def median_seconds(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall seconds of ``call()`` over ``repeats`` runs after one untimed warm-up, and the
    last run's result."""
    times, out = [], None
    for _ in range(repeats + 1):
        t = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), out


def peak_rss_mb() -> float:
    """This process's own peak resident set size so far, in MB.

    On Linux from ``VmHWM`` (the high-water mark of this process's memory map): ``ru_maxrss`` is not
    this process's own peak there, since the kernel carries the parent's peak across fork and exec,
    so a benchmark child spawned by a parent holding 800 MB reported 810 MB though it used 9.
    Elsewhere ``ru_maxrss`` (KB, but bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024
