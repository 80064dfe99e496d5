"""Collect finished runs into markdown tables and one figure, beside the paper's numbers.

A run is the `results.json` a finished `train.py` run writes (see gunn_exp.training.train), plus
its per-epoch `metrics.csv` when present. Runs of the same model, data and length are one group (a
sweep over seeds): the tables give mean ± sample std over the group and its size n. Runs that
differ in a setting beyond the seed (read from their config.yaml: a learning rate of an
`lr_seed_grid` sweep, a drop rate) are groups of their own, labelled with what differs.
"""

from __future__ import annotations

import csv
import glob
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gunn_exp import rundir
from gunn_exp.analysis.tables import markdown_table
from gunn_exp.errors import RunError
from gunn_exp.rundir.configs import read_config

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

# Config keys (and everything under them) that do not change what a run measures, so runs that
# differ only in these are one group: the seeds (a group is over them), where a run lives, is
# resumed from or logged to, and how fast it computes. Any other difference splits a group.
NOT_SETTINGS = (
    "seed", "data.split_seed", "ckpt_path", "init_from", "paths", "hydra", "callbacks", "logger",
    "tags", "task_name", "print_config", "extras", "train", "test", "allow_config_change",
    "optimized_metric", "compile", "compile_mode", "channels_last", "model.impl",
    "data.data_dir", "data.num_workers", "data.pin_memory", "data.download", "data.on_device",
    "data.persistent_workers", "data.prefetch_factor", "data.check_images", "trainer.max_epochs",
    "trainer.default_root_dir", "trainer.devices", "trainer.accelerator", "trainer.strategy",
    "trainer.num_nodes", "trainer.deterministic", "trainer.benchmark",
    "trainer.enable_progress_bar", "trainer.log_every_n_steps",
)  # fmt: skip

# The settings a label shows (the CSV's `settings` column has them all).
LABEL_SETTINGS = 3

# Per-run columns of the CSV summary, in order.
RUN_FIELDS = (
    "model", "data", "settings", "seed", "epochs", "params", "test_err1", "test_err5",
    "best_val_err1", "best_val_err5", "best_val_epoch", "final_val_err1", "final_val_err5",
    "wall_time_s", "run_dir",
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
            if match.is_dir():  # eval.py's results of a run's checkpoints are not runs
                found = [f for f in sorted(match.rglob(rundir.RESULTS)) if not _is_eval(f)]
            elif _is_eval(match):
                raise RunError(
                    f"report: {match} is eval.py's result for one checkpoint, not a training "
                    f"run; pass the run directory {match.parents[2]} instead."
                )
            else:
                found = [match]
            files.update((f.resolve(), None) for f in found if f.name == rundir.RESULTS)
    runs = [_load_run(f) for f in files]
    _label_settings(runs)
    return sorted(runs, key=lambda r: (*group_key(r), _sortable(r.get("seed")), r["run_dir"]))


def _label_settings(runs: Sequence[Run]) -> None:
    """Give each run `settings`: the config values (outside NOT_SETTINGS) in which the runs of
    its model, data and length differ, e.g. `["optimizer.lr=0.05"]`; empty where they agree.
    Runs without a readable config.yaml are left as one group."""
    base: dict[GroupKey, list[Run]] = {}
    for run in runs:
        run["settings"] = []
        if run["config"] is not None:
            base.setdefault(group_key(run), []).append(run)
    for group in base.values():
        keys = sorted({k for run in group for k in run["config"]})
        varying = [k for k in keys if len({repr(r["config"].get(k)) for r in group}) > 1]
        # A component of another class (scheduler=MultiStepLR vs CosineAnnealingLR) is named by
        # its class, not by each of its arguments.
        swapped = [k.removesuffix("._target_") for k in varying if k.endswith("._target_")]
        varying = [k for k in varying if not any(k.startswith(f"{n}.") for n in swapped)]
        for run in group:
            config = run["config"]
            run["settings"] = [
                f"{k}={str(config.get(f'{k}._target_')).rpartition('.')[2]}"
                if k in swapped
                else f"{k}={config.get(k)}"
                for k in sorted(varying + swapped)
            ]


def _flat_settings(run_dir: Path) -> dict[str, Any] | None:
    """The run's config as dotted keys (lists as values), NOT_SETTINGS left out; None without
    a readable config.yaml."""
    try:
        config = OmegaConf.to_container(read_config(run_dir), resolve=False)
    except (RunError, OSError):
        return None
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if prefix and any(prefix == k or prefix.startswith(k + ".") for k in NOT_SETTINGS):
            return
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(config, "")
    return flat


def _is_eval(results_file: Path) -> bool:
    """eval.py writes <run>/eval/<checkpoint>/results.json (one checkpoint's test errors, no
    training record) beside the run's own."""
    if results_file.parent.parent.name != rundir.EVAL:
        return False
    try:
        results = rundir.read_results(results_file)
    except Exception:  # a damaged file: _load_run names it
        return False
    return "checkpoint" in results and "params" not in results


def _load_run(results_file: Path) -> Run:
    run = rundir.read_results(results_file)
    run["run_dir"] = str(results_file.parent)
    run["curve"] = rundir.read_metrics(results_file.parent / rundir.METRICS)
    run["config"] = _flat_settings(results_file.parent)
    # The authors printed top-5 at the best top-1 epoch; results.json keeps only top-1's best.
    best = [r for r in run["curve"] if r.get("epoch") == run.get("best_val_epoch")]
    run["best_val_err5"] = best[0].get("val/err5") if best else None
    return run


def _sortable(value: Any) -> tuple[bool, Any]:
    return (value is None, value if value is not None else 0)


def group_key(run: Mapping[str, Any]) -> GroupKey:
    """Runs that differ only in their seed: same model (gunnify options and other settings),
    data (and training fraction) and number of epochs."""
    return model_label(run), data_label(run), int(run.get("epochs") or 0)


def model_label(run: Mapping[str, Any]) -> str:
    """The model (`architecture`), then the settings its group differs in, e.g.
    `gunn15 [optimizer.lr=0.05]` (the first LABEL_SETTINGS of them)."""
    settings = run.get("settings") or []
    if not settings:
        return architecture(run)
    shown = ", ".join(settings[:LABEL_SETTINGS])
    more = len(settings) - LABEL_SETTINGS
    return f"{architecture(run)} [{shown}{f', +{more} more' if more > 0 else ''}]"


def architecture(run: Mapping[str, Any]) -> str:
    """The model's name, with its gunnify options when it was gunnified (models/gunnify.py)."""
    options = run.get("gunnify")
    if not options:
        return str(run["model"])
    k, update, mode = options.get("segments"), options.get("update"), options.get("mode")
    return f"{run['model']}+gunnify(K={k},{update},{mode})"


def data_label(run: Mapping[str, Any]) -> str:
    """The data's name, with the fraction of its training images when not all were used."""
    fraction = run.get("train_fraction")
    if fraction is None or fraction >= 1:
        return str(run["data"])
    return f"{run['data']} ({fraction:g} of train)"


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
    """`4.21 ± 0.13` (or `4.21` for one run, `—` for none); `(n=k)` follows when only k of the
    group's runs have the value (e.g. a run trained with test=false has no test error)."""
    values = list(values)
    stat = mean_std(values)
    if stat is None:
        return "—"
    mean, std, n = stat
    text = f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if n == len(values) else f"{text} (n={n})"


def results_table(runs: Sequence[Run]) -> str:
    """One row per group: our final- and best-epoch errors (mean ± std, n) beside the paper's."""
    header = (
        "model", "data", "epochs", "n", "params", "top-1 final", "top-1 best", "paper top-1",
        "top-5 final", "top-5 best", "paper top-5",
    )  # fmt: skip
    rows = []
    for (model, data, epochs), group in group_runs(runs).items():
        paper = PAPER.get((architecture(group[0]), data), {})
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
            model_label(r),
            data_label(r),
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
    """The whole report: groups against the paper, convergence, the singularity diagnostics
    when the runs have them, then every run."""
    parts = [f"# {title}", *notes, results_table(runs), TABLE_NOTE]
    if any(r["curve"] for r in runs):
        parts += ["## Convergence", convergence_table(runs)]
    if singularity_sites(runs):
        parts += ["## Singularity diagnostics", singularity_table(runs), SINGULARITY_NOTE]
    parts += ["## Runs", runs_table(runs)]
    return "\n\n".join(parts) + "\n"


def write_csv(runs: Sequence[Run], path: str | Path) -> Path:
    """One line per run with the RUN_FIELDS columns."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
        writer.writeheader()
        # `settings` joined by "; ": a value may hold commas (milestones=[14, 22]).
        writer.writerows(
            {k: "; ".join(r.get(k) or []) if k == "settings" else r.get(k) for k in RUN_FIELDS}
            for r in runs
        )
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


# The statistics of the singularity probe (training/singularity.py, models/diagnostics.py) that
# the table and the figure show, with their titles.
SINGULARITY_PREFIX = "singularity/"
SINGULARITY_STATS = {
    "inc_corr_mean": "increments: mean abs corr",
    "inc_corr_max": "increments: max abs corr",
    "hid_corr_mean": "hidden: mean abs corr",
    "w_cos_max": "weights: max abs cos",
    "erank": "output: effective rank",
    "dead_relu": "dead ReLU fraction",
}
SINGULARITY_NOTE = (
    "Each site's statistic (models/diagnostics.py) averaged over the sites (GUNN layers, residual "
    "blocks) of a run, then mean ± sample std over the runs of the group; the figure shows every "
    "site. inc: |correlation| between channels of different segments' increments G_i(z_i); hid: "
    "between hidden channels of one G_i; w: |cosine| between filters reading the same inputs."
)


def singularity_sites(runs: Sequence[Run]) -> list[str]:
    """The sites (`singularity/<site>/<stat>` columns) in the runs' curves, in first-seen order."""
    sites: dict[str, None] = {}
    for run in runs:
        for row in run["curve"][:1]:
            for key in row:
                if key.startswith(SINGULARITY_PREFIX) and key.count("/") == 2:
                    sites[key.split("/")[1]] = None
    return list(sites)


def _site_mean(row: Mapping[str, float], sites: Sequence[str], stat: str) -> float | None:
    values = [row[k] for s in sites if (k := f"{SINGULARITY_PREFIX}{s}/{stat}") in row]
    values = [v for v in values if v == v]  # NaN: no pair at that site
    return statistics.fmean(values) if values else None


def singularity_table(
    runs: Sequence[Run], fractions: Sequence[float] = (0.0, 0.5, 1.0), digits: int = 3
) -> str:
    """Per group and statistic: the site-averaged value, mean ± std over the group's runs, at
    the first epoch and at fractions of the epochs."""
    sites = singularity_sites(runs)
    header = ("model", "data", "statistic", *(f"{f:.0%} of epochs" if f else "first epoch"
                                              for f in fractions))  # fmt: skip
    rows = []
    for (model, data, epochs), group in group_runs(runs).items():
        for stat, title in SINGULARITY_STATS.items():
            cells = []
            for fraction in fractions:
                epoch = max(1, round(fraction * epochs))
                values = [
                    _site_mean(row, sites, stat)
                    for run in group
                    for row in run["curve"]
                    if row.get("epoch") == epoch
                ]
                cells.append(f"{fmt_stat(values, digits)} (ep {epoch})")
            rows.append((model, data, title, *cells))
    return markdown_table(header, rows)


def plot_singularity(runs: Sequence[Run], path: str | Path, title: str = "") -> Path | None:
    """The singularity statistics per epoch: one panel per statistic (rows) and site (columns),
    one colour per group (e.g. GUNN and SUNN), the mean over its runs with a band of ± one
    sample std. None when the runs have no such columns."""
    sites = singularity_sites(runs)
    if not sites:
        return None
    import matplotlib as mpl  # only when a figure is asked for
    from matplotlib.figure import Figure

    stats = list(SINGULARITY_STATS)
    fig = Figure(figsize=(2.6 * len(sites) + 1, 2.1 * len(stats) + 0.6))
    axes = fig.subplots(len(stats), len(sites), squeeze=False, sharex=True)
    colors = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    for g, ((model, data, _), group) in enumerate(group_runs(runs).items()):
        color = colors[g % len(colors)]
        for row, stat in enumerate(stats):
            for col, site in enumerate(sites):
                key = f"{SINGULARITY_PREFIX}{site}/{stat}"
                by_epoch: dict[float, list[float]] = {}
                for run in group:
                    for r in run["curve"]:
                        if r.get(key) is not None and r[key] == r[key]:
                            by_epoch.setdefault(r["epoch"], []).append(r[key])
                if not by_epoch:
                    continue
                epochs = sorted(by_epoch)
                mean = [statistics.fmean(by_epoch[e]) for e in epochs]
                std = [
                    statistics.stdev(v) if len(v) > 1 else 0.0 for v in map(by_epoch.get, epochs)
                ]
                ax = axes[row][col]
                ax.plot(epochs, mean, color=color, label=f"{model} {data} (n={len(group)})")
                low = [m - d for m, d in zip(mean, std, strict=True)]
                high = [m + d for m, d in zip(mean, std, strict=True)]
                ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
    for row, stat in enumerate(stats):
        axes[row][0].set_ylabel(SINGULARITY_STATS[stat], fontsize=8)
        for col, site in enumerate(sites):
            ax = axes[row][col]
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(axis="y", useOffset=False)
            if row == 0:
                ax.set_title(site, fontsize=9)
            if row == len(stats) - 1:
                ax.set_xlabel("epoch", fontsize=8)
    legend: dict[str, Any] = {}  # label -> handle, over every panel (groups differ in sites)
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    rundir.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return Path(path)


def write_report(
    runs: Sequence[Run],
    prefix: str | Path,
    title: str = "Results",
    plot: bool = True,
    notes: Sequence[str] = (),
) -> list[Path]:
    """`<prefix>.md`, `<prefix>.csv` and (with `plot`) `<prefix>.png`, and
    `<prefix>_singularity.png` when the runs have singularity diagnostics; returns the files
    written."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md = prefix.with_name(prefix.name + ".md")
    md.write_text(markdown_report(runs, title, notes))
    written = [md, write_csv(runs, prefix.with_name(prefix.name + ".csv"))]
    if plot:
        figure = plot_runs(runs, prefix.with_name(prefix.name + ".png"), title)
        written += [figure] if figure else []
        probes = plot_singularity(runs, prefix.with_name(prefix.name + "_singularity.png"), title)
        written += [probes] if probes else []
    return written
