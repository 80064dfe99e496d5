"""A stand-in for the singularity diagnostics callback: logs one `singularity/` value per epoch
through `pl_module.log`, as that callback does (train.py command line:
`+callbacks.probe._target_=singularity_probe.SingularityProbe`)."""

from __future__ import annotations

import pytorch_lightning as pl


class SingularityProbe(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("singularity/stage1/probe", float(trainer.current_epoch))
