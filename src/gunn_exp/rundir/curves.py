"""`curves.png`: a run's loss and error per epoch (or several runs on one set of axes)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gunn_exp.rundir.files import atomic_write

Rows = Sequence[Mapping[str, float]]

# A panel whose positive values span at least this ratio gets a log axis: the first epoch's loss
# (28 on the demo) would otherwise flatten every later epoch into a line at 0. Papers plot error
# curves so too.
DECADE = 10.0


def curves_figure(runs: Mapping[str, Rows], title: str = "") -> Figure:
    """Loss and top-1 error per epoch, train (dashed) and val (solid), one colour per run.

    `runs` maps a label to per-epoch rows with keys `epoch`, `train/loss`, `val/loss`,
    `train/err1`, `val/err1` (missing keys are skipped). Epochs are whole numbers on the axis;
    each panel is on a log scale when its values span a decade or more (`axis_scale`).
    """
    # A bare Figure, not pyplot's: no global backend to switch, nothing to close, safe in threads.
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_err = fig.subplots(1, 2)
    colors = mpl.rcParams["axes.prop_cycle"].by_key()["color"] * (1 + len(runs) // 10)
    for color, (label, rows) in zip(colors, runs.items(), strict=False):
        for ax, key in ((ax_loss, "loss"), (ax_err, "err1")):
            for split, style in (("train", "--"), ("val", "-")):
                pts = [
                    (r["epoch"], r[f"{split}/{key}"])
                    for r in rows
                    if r.get(f"{split}/{key}") is not None
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, style, color=color, label=f"{label} {split}".strip())
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_err.set(xlabel="epoch", ylabel="top-1 error (%)", title="top-1 error")
    for ax in (ax_loss, ax_err):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epoch 3, 4: not 3.2, 3.4
        _set_scale(ax, [y for line in ax.lines for y in line.get_ydata()])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def axis_scale(values: Iterable[float]) -> str:
    """`log` when the positive values span a decade or more (`symlog` if some are 0, e.g. a
    training error that reached 0%), else `linear`."""
    values = list(values)
    positive = [v for v in values if v > 0]
    if len(positive) < 2 or max(positive) < DECADE * min(positive):
        return "linear"
    return "log" if len(positive) == len(values) else "symlog"


def _set_scale(ax: Axes, values: list[float]) -> None:
    scale = axis_scale(values)
    if scale == "symlog":  # linear below the smallest positive value, so 0 has a place
        ax.set_yscale(scale, linthresh=min(v for v in values if v > 0))
    else:
        ax.set_yscale(scale)


def plot_curves(runs: Mapping[str, Rows], path: str | Path, title: str = "") -> Path:
    """`curves_figure(runs, title)` written to `path` as PNG (the title also in its metadata, for
    image viewers and tools); the file is replaced atomically."""
    fig = curves_figure(runs, title)
    metadata = {"Title": title} if title else {}
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, metadata=metadata))
    return Path(path)
