"""The confusion matrix as a picture: eval.py's confusion_matrix.png, the loggers' test plot."""

from __future__ import annotations

from matplotlib.figure import Figure
from torch import Tensor

MAX_LABELLED_CLASSES = 30  # beyond this the plot has no tick labels


def confusion_figure(confusion: Tensor, classes: list[str], title: str) -> Figure:
    """Row-normalised confusion matrix (each true class sums to 1), so rare classes show too.

    `confusion`: counts, rows true class, columns predicted (torchmetrics' layout).
    """
    rates = confusion.float() / confusion.sum(1, keepdim=True).clamp_min(1)
    n = len(classes)
    fig = Figure(figsize=(7, 6))  # no pyplot: no global backend or figure registry involved
    ax = fig.subplots()
    image = ax.imshow(rates.cpu().numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    if n <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig
