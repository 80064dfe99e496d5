"""A Hydra callback that keeps one summary of a multirun's jobs in its sweep directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """After each job of a multirun and after the multirun: `summary.md` and `summary.csv` in
    the sweep directory, built from the jobs' results.json by `gunn_exp.analysis.report` (groups
    over seeds, paper numbers, every job).

    Written after every job too, because a sweep that had a failed job never reaches its end
    (Hydra's sweeper raises the failure after the batch) and a stopped one neither; jobs that
    left no results.json (failed, killed) are listed, so a summary of 5 runs out of 6 says so.
    """

    def __init__(self, plot: bool = False) -> None:
        self.plot = plot

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self.write(Path(config.hydra.sweep.dir), final=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write(Path(config.hydra.sweep.dir), final=True)

    def write(self, sweep_dir: Path, final: bool) -> None:
        # Imported here: Hydra builds its callbacks for every run, single runs need none of this.
        from gunn_exp.analysis.report import load_runs, write_report

        if not sweep_dir.is_dir():
            return
        runs = load_runs([sweep_dir])
        finished = {Path(r["run_dir"]) for r in runs}
        # Every job has its directory, finished or not (a refused job's is left empty: .hydra/ is
        # written once a run is accepted); the sweep's own files sit beside them.
        jobs = sorted(p.resolve() for p in sweep_dir.iterdir() if p.is_dir())
        missing = [j.name for j in jobs if j not in finished]
        notes = [f"{len(runs)} of {len(jobs)} jobs finished{'' if final else ' so far'}."]
        if missing:
            notes.append(f"No results.json (failed or unfinished): {', '.join(missing)}.")
        if not runs:
            if final:
                log.warning(f"sweep {sweep_dir}: no job wrote results.json; no summary written.")
            return
        files = write_report(
            runs, sweep_dir / "summary", f"Sweep {sweep_dir.name}", self.plot, notes
        )
        if final:
            log.info(f"sweep summary: {', '.join(str(f) for f in files)}")
