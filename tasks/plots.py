"""Figures that stages log to MLflow: headless (Agg), laid out tight, and closed once drawn so pyplot does not
accumulate them over a long process. Legends name their corner (`loc=`): the default "best" searches the plotted
data and, on a loaded machine, warns that it is slow."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt


def new_figure(ncols: int, figsize: tuple[float, float]):
    """(figure, axes) of one row of ``ncols`` panels on the headless backend; ``axes`` is a list."""

    matplotlib.use("Agg")

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    return fig, list(axes[0])


def finish(fig):
    """Lay out and close ``fig`` (it can still be saved or logged)."""

    fig.tight_layout()
    plt.close(fig)
    return fig
