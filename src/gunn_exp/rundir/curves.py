"""`curves.png`: a run's loss and error per epoch (or several runs on one set of axes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
from matplotlib.figure import Figure

from gunn_exp.rundir.files import atomic_write

Rows = Sequence[Mapping[str, float]]


def plot_curves(
    runs: Mapping[str, Rows], path: str | Path, title: str = "", loss_scale: str = "linear"
) -> Path:
    """Loss and top-1 error per epoch, train (dashed) and val (solid), one colour per run.

    `runs` maps a label to per-epoch rows with keys `epoch`, `train/loss`, `val/loss`,
    `train/err1`, `val/err1` (missing keys are skipped). The file is replaced atomically.
    `loss_scale="log"` shows losses that fall by orders of magnitude (comparisons of runs).
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
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale=loss_scale)
    ax_err.set(xlabel="epoch", ylabel="top-1 error (%)", title="top-1 error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return Path(path)
