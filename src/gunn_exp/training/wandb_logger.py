"""Lightning's WandbLogger, arranged as the dashboard a researcher would otherwise build by hand:
per-epoch panels against `epoch`, summaries a sweep's table can sort by, and the run's checkpoints
as versions of one artifact.

Metric definitions (`wandb.define_metric`) are made for each key as it is first logged, before
its first value: wandb matches a key against its glob definitions in no fixed order, so a prefix
glob (`singularity/*`) beside Lightning's catch-all `*` would win only some of the time.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import wandb as lightning_wandb
from pytorch_lightning.utilities import rank_zero_only

from gunn_exp.rundir.checkpoint import RunDescription, load_checkpoint

# Logged once per epoch (Lightning's epoch means, speed and memory, the singularity diagnostics):
# plotted against `epoch`. Step-level keys (`*_step`) and anything else keep Lightning's
# `trainer/global_step`.
EPOCH_AXIS_PREFIXES = ("train/", "val/", "test/", "perf/", "singularity/")
EPOCH_AXIS_KEYS = ("lr",)
# What the summary (the runs table, parallel coordinates, a sweep's group) shows: the best
# validation errors rather than the last ones, and the final test errors.
SUMMARIES = {
    "val/err1": "min",
    "val/err5": "min",
    "test/err1": "last",
    "test/err5": "last",
}


class WandbLogger(lightning_wandb.WandbLogger):
    """Lightning's WandbLogger (every argument is its) with epoch x-axes, min-summaries and
    checkpoint artifacts.

    `log_model`: `True` logs the checkpoints the run saved (best.ckpt with alias `best`, last.ckpt
    with `last`) when training ends; `"all"` logs each as it is saved; `False` none. Each is a
    version of the artifact `model-<wandb run id>`, so a resumed run (same wandb id) continues its
    history; its metadata say which epoch and step it holds, the validation top-1 error before it
    was saved, the model and the data. Lightning's own checkpoint logging is replaced: it gives
    the `best` alias to the file of a checkpoint callback without a monitor, i.e. last.ckpt.
    """

    def __init__(self, *args: Any, log_model: bool | Literal["all"] = False, **kwargs: Any) -> None:
        # Not Lightning's: it refuses log_model with offline=True (older wandb could not keep
        # artifacts offline; offline runs now hold them until `wandb sync`).
        super().__init__(*args, log_model=False, **kwargs)
        self.checkpoint_artifacts = log_model
        self._defined: set[str] = set()
        self._val_err1: float | None = None  # the last validation's, for the next checkpoint
        self._saved: dict[str, tuple[str, float | None]] = {}  # path -> (alias, val/err1)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for key, value in metrics.items():
            if key not in self._defined and isinstance(value, numbers.Number):
                self._define(key)
        if "val/err1" in metrics:
            self._val_err1 = float(metrics["val/err1"])
        super().log_metrics(metrics, step)

    def _define(self, key: str) -> None:
        self._defined.add(key)
        per_epoch = key in EPOCH_AXIS_KEYS or key.startswith(EPOCH_AXIS_PREFIXES)
        if per_epoch and not key.endswith("_step"):
            # step_sync: rows logged without `epoch` (a logger's direct calls) get the latest.
            self.experiment.define_metric(
                key, step_metric="epoch", step_sync=True, summary=SUMMARIES.get(key)
            )

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        # Called by ModelCheckpoint on rank 0 right after each file it writes.
        if not self.checkpoint_artifacts:
            return
        path = checkpoint_callback._last_checkpoint_saved  # the file just written (Lightning 2.x)
        last = checkpoint_callback.monitor is None or path == checkpoint_callback.last_model_path
        self._saved[path] = ("last" if last else "best", self._val_err1)
        if self.checkpoint_artifacts == "all":
            self._log_checkpoint(path)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        # On success only, as Lightning's: a failed run logs none; its resumption logs its own.
        if status == "success" and self.checkpoint_artifacts is True:
            for path in list(self._saved):
                self._log_checkpoint(path)

    def _log_checkpoint(self, path: str) -> None:
        import wandb

        alias, val_err1 = self._saved.pop(path)
        if not Path(path).is_file():  # a top-k checkpoint removed since
            return
        ckpt = load_checkpoint(path)
        description = RunDescription.from_checkpoint(ckpt, path)
        metadata = {
            "epoch": ckpt.get("epoch", -1) + 1,  # 1-based (its metrics.csv row, results.json)
            "global_step": ckpt.get("global_step"),
            "val_err1": val_err1,
            "model": description.model if description else None,
            "data": (description.config.get("data") or {}).get("name") if description else None,
            "original_filename": Path(path).name,
        }
        del ckpt
        name = self._checkpoint_name or f"model-{self.experiment.id}"
        artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
        # Copied into wandb's staging area now (the default policy): last.ckpt is rewritten
        # every epoch, possibly before the upload.
        artifact.add_file(path, name="model.ckpt")
        self.experiment.log_artifact(artifact, aliases=[alias])
