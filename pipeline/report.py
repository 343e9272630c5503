"""Plots for the stage reports: one way to make, save and close a matplotlib figure headless."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def figure(out: Path, dpi: int = 100, **subplots) -> Iterator[tuple]:
    """(fig, axes) from `plt.subplots(**subplots)`; on leaving, laid out and saved to `out`
    (folders made), and always closed. Agg backend: stages run on nodes with no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
