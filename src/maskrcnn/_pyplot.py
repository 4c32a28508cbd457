"""matplotlib for writing chart files: the Agg backend, so that no display is needed (servers, CI)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: a model run never pays for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
