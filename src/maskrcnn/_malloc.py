"""Keep freed memory in the process for reuse instead of handing it back to the kernel (glibc).

Without a caching allocator on the CPU, every PyTorch op that makes a new tensor mallocs, and glibc
serves large requests (over ~128 KB-32 MB, adaptively) with a fresh ``mmap`` and returns them with
``munmap`` when freed. The next op's output then page-faults in again, one zeroed 4 KB page at a
time, in the kernel: R50-FPN inference on an 800x1066 image took ~294,000 minor page faults per
call (1.2 GB of pages) and 0.6 s of system time beside 2.9 s of user time, on 2 threads ~0.3 s of
its 1.8 s wall clock. With mmap off and the heap never trimmed, the pages are faulted once and
reused: 0 faults per call after the first, 1.8 s -> 1.43 s exact and 1.0 s -> 0.71 s fast (AMD
EPYC, 2 threads, ``benchmarks/infer.py``). Resident memory stays at its high-water mark, as with
PyTorch's CUDA caching allocator.

The command line and ``Predictor`` call :func:`keep_freed_memory`. It leaves malloc alone where
the user has tuned it (``MALLOC_*`` or ``GLIBC_TUNABLES`` with malloc settings), where
``MASKRCNN_MALLOC=system``, and off glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # the largest value mallopt's int takes: free memory at the heap's top stays

_applied = False


def _user_tuned() -> bool:
    return (os.environ.get("MASKRCNN_MALLOC", "").strip().lower() == "system"
            or any(k.startswith("MALLOC_") for k in os.environ)
            or "malloc" in os.environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory() -> bool:
    """Switch glibc's malloc to serve every size from its heap and never trim it; ``True`` if it is
    (now or already) in effect. Idempotent and cheap."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or _user_tuned():
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER))
    return _applied
