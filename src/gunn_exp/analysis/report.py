"""Collect finished runs into markdown tables and one figure, beside the paper's numbers.

A run is the `results.json` a finished `train.py` run writes (see gunn_exp.training.train), plus
its per-epoch `metrics.csv` when present. Runs of the same model, data and length are one group (a
sweep over seeds): the tables give mean ± sample std over the group and its size n.
"""

from __future__ import annotations

import csv
import glob
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gunn_exp import rundir
from gunn_exp.analysis.tables import markdown_table

Run = dict[str, Any]
GroupKey = tuple[str, str, int]

# docs/SPEC.md §4: the paper's error in percent, by (model, data). CIFAR rows give top-1 only.
PAPER: dict[tuple[str, str], dict[str, float]] = {
    ("gunn15", "cifar10"): {"err1": 4.15},
    ("gunn15", "cifar100"): {"err1": 20.45},
    ("gunn24", "cifar10"): {"err1": 3.21},
    ("gunn24", "cifar100"): {"err1": 16.69},
    ("gunn18", "imagenet"): {"err1": 21.65, "err5": 5.87},
    ("wide_gunn18", "imagenet"): {"err1": 20.59, "err5": 5.52},
}

# Per-run columns of the CSV summary, in order.
RUN_FIELDS = (
    "model", "data", "seed", "epochs", "params", "test_err1", "test_err5", "best_val_err1",
    "best_val_err5", "best_val_epoch", "final_val_err1", "final_val_err5", "wall_time_s", "run_dir",
)  # fmt: skip

TABLE_NOTE = (
    "final: the last epoch's weights on the test split. best: the lowest validation top-1 error "
    "over the epochs (top-5 at that epoch), what the authors' code printed; on CIFAR and ImageNet "
    "the validation set is the test set, as in the paper, so best is optimistic by selection. "
    "Cells: mean ± sample std over the n runs (seeds)."
)


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Finished runs under `paths`: results.json files, directories searched recursively (a run
    directory, a sweep, all of logs/), or glob patterns of either. Each run is its results.json
    with `run_dir` (where the file is now) and `curve` (metrics.csv rows, [] if absent) added.

    Directories without results.json (unfinished or failed runs) are skipped; a path that matches
    nothing at all raises FileNotFoundError so a typo is not an empty report.
    """
    files: dict[Path, None] = {}  # ordered set: a run reached through two paths is loaded once
    for path in paths:
        exact = Path(path)
        matches = (
            [exact]
            if exact.exists()
            else [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        )
        if not matches:
            raise FileNotFoundError(f"report: {path} matches no file or directory.")
        for match in matches:
            found = sorted(match.rglob(rundir.RESULTS)) if match.is_dir() else [match]
            files.update((f.resolve(), None) for f in found if f.name == rundir.RESULTS)
    runs = [_load_run(f) for f in files]
    return sorted(runs, key=lambda r: (*group_key(r), _sortable(r.get("seed")), r["run_dir"]))


def _load_run(results_file: Path) -> Run:
    run = rundir.read_results(results_file)
    run["run_dir"] = str(results_file.parent)
    run["curve"] = rundir.read_metrics(results_file.parent / rundir.METRICS)
    # The authors printed top-5 at the best top-1 epoch; results.json keeps only top-1's best.
    best = [r for r in run["curve"] if r.get("epoch") == run.get("best_val_epoch")]
    run["best_val_err5"] = best[0].get("val/err5") if best else None
    return run


def _sortable(value: Any) -> tuple[bool, Any]:
    return (value is None, value if value is not None else 0)


def group_key(run: Mapping[str, Any]) -> GroupKey:
    """Runs that differ only in their seed: same model, data and number of epochs."""
    return str(run["model"]), str(run["data"]), int(run.get("epochs") or 0)


def group_runs(runs: Iterable[Run]) -> dict[GroupKey, list[Run]]:
    groups: dict[GroupKey, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    return groups


def mean_std(values: Iterable[float | None]) -> tuple[float, float | None, int] | None:
    """(mean, sample std or None for one value, n) of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs)


def fmt_stat(values: Iterable[float | None], digits: int = 2) -> str:
    """`4.21 ± 0.13` (or `4.21` for one run, `—` for none)."""
    stat = mean_std(values)
    if stat is None:
        return "—"
    mean, std, _ = stat
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(runs: Sequence[Run]) -> str:
    """One row per group: our final- and best-epoch errors (mean ± std, n) beside the paper's."""
    header = (
        "model", "data", "epochs", "n", "params", "top-1 final", "top-1 best", "paper top-1",
        "top-5 final", "top-5 best", "paper top-5",
    )  # fmt: skip
    rows = []
    for (model, data, epochs), group in group_runs(runs).items():
        paper = PAPER.get((model, data), {})
        rows.append(
            (
                model,
                data,
                str(epochs),
                str(len(group)),
                f"{group[0]['params'] / 1e6:.2f}M",
                fmt_stat(r.get("test_err1") for r in group),
                fmt_stat(r.get("best_val_err1") for r in group),
                _paper(paper, "err1"),
                fmt_stat(r.get("test_err5") for r in group),
                fmt_stat(r.get("best_val_err5") for r in group),
                _paper(paper, "err5"),
            )
        )
    return markdown_table(header, rows)


def _paper(paper: Mapping[str, float], key: str) -> str:
    return f"{paper[key]:.2f}" if key in paper else "—"


def convergence_table(
    runs: Sequence[Run], fractions: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 1.0)
) -> str:
    """Mean ± std of training loss and validation top-1 error at fractions of each group's epochs
    (0: the first epoch): how fast each group learns, not only where it ends (the paper's
    GUNN-vs-SUNN argument)."""
    header = (
        "model",
        "data",
        "metric",
        *(f"{f:.0%} of epochs" if f else "first epoch" for f in fractions),
    )
    rows = []
    for (model, data, epochs), group in group_runs(runs).items():
        for key, name in (("train/loss", "train loss"), ("val/err1", "val top-1 (%)")):
            cells = []
            for fraction in fractions:
                epoch = max(1, round(fraction * epochs))
                values = [_at_epoch(r["curve"], epoch, key) for r in group]
                digits = 3 if key.endswith("loss") else 2
                cells.append(f"{fmt_stat(values, digits)} (ep {epoch})")
            rows.append((model, data, name, *cells))
    return markdown_table(header, rows)


def _at_epoch(curve: Sequence[Mapping[str, float]], epoch: int, key: str) -> float | None:
    return next((r.get(key) for r in curve if r.get("epoch") == epoch), None)


def runs_table(runs: Sequence[Run]) -> str:
    """Every run on its own line, with where it lives."""
    header = (
        "model", "data", "seed", "epochs", "top-1 final", "top-5 final", "top-1 best (epoch)",
        "wall time", "run",
    )  # fmt: skip

    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    rows = (
        (
            r["model"],
            r["data"],
            str(r.get("seed")),
            str(r.get("epochs")),
            pct(r.get("test_err1")),
            pct(r.get("test_err5")),
            f"{pct(r.get('best_val_err1'))} ({r.get('best_val_epoch')})",
            f"{r.get('wall_time_s', 0):.0f}s",
            f"`{r['run_dir']}`",
        )
        for r in runs
    )
    return markdown_table(header, rows)


def markdown_report(runs: Sequence[Run], title: str = "Results", notes: Sequence[str] = ()) -> str:
    """The whole report: groups against the paper, convergence, then every run."""
    parts = [f"# {title}", *notes, results_table(runs), TABLE_NOTE]
    if any(r["curve"] for r in runs):
        parts += ["## Convergence", convergence_table(runs)]
    parts += ["## Runs", runs_table(runs)]
    return "\n\n".join(parts) + "\n"


def write_csv(runs: Sequence[Run], path: str | Path) -> Path:
    """One line per run with the RUN_FIELDS columns."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in RUN_FIELDS} for r in runs)
    return path


def mean_curves(runs: Sequence[Run]) -> dict[str, list[dict[str, float]]]:
    """Per group, the per-epoch mean over its runs of every metrics.csv column."""
    curves = {}
    for (model, data, _), group in group_runs(runs).items():
        by_epoch: dict[float, list[Mapping[str, float]]] = {}
        for run in group:
            for row in run["curve"]:
                by_epoch.setdefault(row["epoch"], []).append(row)
        rows = []
        for epoch in sorted(by_epoch):
            keys = {k for row in by_epoch[epoch] for k in row}
            rows.append(
                {k: statistics.fmean(r[k] for r in by_epoch[epoch] if k in r) for k in keys}
            )
        if rows:
            curves[f"{model} {data} (n={len(group)})"] = rows
    return curves


def plot_runs(runs: Sequence[Run], path: str | Path, title: str = "") -> Path | None:
    """Loss and top-1 error per epoch of every group (mean over its seeds) on one figure, titled
    with `title` and what it shows: the models, the data and the seeds."""
    from gunn_exp.rundir.curves import plot_curves  # matplotlib: only when a figure is asked for

    curves = mean_curves(runs)
    if not curves:
        return None
    return plot_curves(curves, path, title=f"{title}: {runs_described(runs)}" if title else "")


def runs_described(runs: Sequence[Run]) -> str:
    """`gunn_mini, sunn_mini on digits, seeds 0, 1, 2`: what a set of runs covers."""

    def listed(key: str) -> str:
        values = sorted({r.get(key) for r in runs}, key=_sortable)
        return ", ".join(str(v) for v in values)

    plural = "s" if len({r.get("seed") for r in runs}) > 1 else ""
    return f"{listed('model')} on {listed('data')}, seed{plural} {listed('seed')}"


def write_report(
    runs: Sequence[Run],
    prefix: str | Path,
    title: str = "Results",
    plot: bool = True,
    notes: Sequence[str] = (),
) -> list[Path]:
    """`<prefix>.md`, `<prefix>.csv` and (with `plot`) `<prefix>.png`; returns the files written."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md = prefix.with_name(prefix.name + ".md")
    md.write_text(markdown_report(runs, title, notes))
    written = [md, write_csv(runs, prefix.with_name(prefix.name + ".csv"))]
    if plot:
        figure = plot_runs(runs, prefix.with_name(prefix.name + ".png"), title)
        written += [figure] if figure else []
    return written
