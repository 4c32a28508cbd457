"""The measurement every benchmark process makes: one warm-up call, then the median of ``repeats``
timed calls, and the process's peak resident memory. Imports only the standard library, so the
scripts run in the torchvision reference environment can import it too (by path)."""

from __future__ import annotations

import resource
import statistics
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
    """This process's peak resident set size so far, in MB (Linux reports ``ru_maxrss`` in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
