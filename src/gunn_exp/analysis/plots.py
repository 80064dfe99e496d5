"""Figures: training curves of one run (or several runs on one axis set)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training runs headless
import matplotlib.pyplot as plt  # noqa: E402

from gunn_exp import rundir  # noqa: E402

Rows = Sequence[Mapping[str, float]]


def plot_curves(
    runs: Mapping[str, Rows], path: str | Path, title: str = "", loss_scale: str = "linear"
) -> Path:
    """Loss and top-1 error per epoch, train (dashed) and val (solid), one colour per run.

    `runs` maps a label to per-epoch rows with keys `epoch`, `train/loss`, `val/loss`,
    `train/err1`, `val/err1` (missing keys are skipped). The file is replaced atomically.
    `loss_scale="log"` shows losses that fall by orders of magnitude (comparisons of runs).
    """
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] * (1 + len(runs) // 10)
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
    rundir.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return Path(path)
