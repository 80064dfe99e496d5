"""A Hydra callback that closes every multirun with one summary of its jobs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """After a multirun: `summary.md` and `summary.csv` in the sweep directory, built from the
    jobs' results.json by `gunn_exp.analysis.report` (groups over seeds, paper numbers, every job).

    Jobs that left no results.json (failed, killed) are listed in summary.md so that a summary
    of 5 runs out of 6 says so.
    """

    def __init__(self, plot: bool = False) -> None:
        self.plot = plot

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Imported here: Hydra builds its callbacks for every run, single runs need none of this.
        from gunn_exp.analysis.report import load_runs, write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        runs = load_runs([sweep_dir])
        finished = {Path(r["run_dir"]) for r in runs}
        # Every job has its directory, finished or not (a refused job's is left empty: .hydra/ is
        # written once a run is accepted); the sweep's own files sit beside them.
        jobs = sorted(p.resolve() for p in sweep_dir.iterdir() if p.is_dir())
        missing = [j.name for j in jobs if j not in finished]
        notes = [f"{len(runs)} of {len(jobs)} jobs finished."]
        if missing:
            notes.append(f"No results.json (failed or unfinished): {', '.join(missing)}.")
        if not runs:
            log.warning(f"sweep {sweep_dir}: no job wrote results.json; no summary written.")
            return
        files = write_report(
            runs, sweep_dir / "summary", f"Sweep {sweep_dir.name}", self.plot, notes
        )
        log.info(f"sweep summary: {', '.join(str(f) for f in files)}")
