"""Plots for the stage reports: one way to make, save and close a matplotlib figure headless."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


EMPTY_SUFFIX = ".empty.txt"  # beside a plot that shows no data: one sentence saying why


def why_empty(png: Path) -> str | None:
    """The sentence a stage left for a plot that came out empty, else None."""
    note = Path(png).with_suffix(EMPTY_SUFFIX)
    return note.read_text(encoding="utf-8").strip() if note.is_file() else None


def _shows_data(ax, np) -> bool:
    # has_data() is true for a line with no points too; the data limits are finite only with some
    return bool(ax.images) or (ax.has_data() and bool(np.isfinite(ax.dataLim.get_points()).all()))


@contextmanager
def figure(out: Path, dpi: int = 100, empty_reason: str | None = None, **subplots) -> Iterator[tuple]:
    """(fig, axes) from `plt.subplots(**subplots)`; on leaving, laid out and saved to `out`
    (folders made), and always closed. Agg backend: stages run on nodes with no display.

    When no axes got any data, `<out>.empty.txt` says why (`empty_reason`, or that the stage
    logged nothing to draw), so the run report can explain a blank plot; a plot with data removes
    a stale note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
        note = Path(out).with_suffix(EMPTY_SUFFIX)
        if any(_shows_data(ax, np) for ax in np.ravel(axes)):
            note.unlink(missing_ok=True)
        else:
            note.write_text((empty_reason or "The stage logged no values for this plot.") + "\n", encoding="utf-8")
    finally:
        plt.close(fig)
