"""How long idle OpenMP threads spin before they sleep, for the command line.

PyTorch's CPU kernels split work over OpenMP threads and wait for all of them at the end of each
op. GNU OpenMP's default is to spin for ~300,000 iterations before sleeping, which is cheap on an
idle machine and ruinous beside another busy process: the spinning thread holds a core that the
thread it waits for needs. Measured with ``benchmarks/cpu_load.py`` (demo training, 2-core Xeon,
one other process busy): the default slowed 3.7x (beside a busy loop) and 4.6x (beside another
PyTorch job); ``GOMP_SPINCOUNT=2000`` 1.8x and 2.4x, at about 5-10% of the idle speed of this
small model; ``OMP_WAIT_POLICY=PASSIVE`` (no spinning) 1.1-1.4x and 2.2x, but 15-20% slower alone.
"""

from __future__ import annotations

import os
import sys

SPINCOUNT = "2000"


def limit_spin_waiting() -> None:
    """Set ``GOMP_SPINCOUNT`` unless the user set a wait policy; only effective before torch starts."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
