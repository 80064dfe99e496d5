"""The LightningModule: cross-entropy training of any image classifier, errors in percent."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from gunn_exp.models.compile import compile_regions

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class TopKError(MulticlassAccuracy):
    """Top-k error in percent over the epoch (micro-averaged): 100 * (1 - top-k accuracy)."""

    def __init__(self, num_classes: int, top_k: int) -> None:
        super().__init__(num_classes, top_k=min(top_k, num_classes), average="micro")

    def compute(self) -> Tensor:
        return 100.0 * (1.0 - super().compute())


class ClassificationModule(pl.LightningModule):
    """Trains `model` with cross-entropy; logs `{train,val,test}/{loss,err1,err5}` per epoch.

    `optimizer` and `scheduler` are partials (Hydra `_partial_: true`) so the configs own every
    hyper-parameter; the scheduler steps once per epoch, as in the paper's recipes.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"], logger=False)
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            # Regional, in place: GUNN units/layers compiled once per shape, state_dict keys kept.
            compile_regions(self.model, mode=compile_mode)
        # One metric object per stage and k: Lightning resets and syncs them at epoch end.
        self.errors = nn.ModuleDict(
            {
                f"{stage}_err{k}": TopKError(model.num_classes, k)
                for stage in ("train", "val", "test")
                for k in (1, 5)
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if x.ndim == 5:  # multi-crop evaluation: average the softmax over the crops
            n, crops = x.shape[:2]
            probs = self(x.flatten(0, 1)).softmax(-1).view(n, crops, -1).mean(1)
            logits = probs.clamp_min(1e-12).log()
        else:
            logits = self(x)
        loss = F.cross_entropy(logits, y)
        show = stage != "test"
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=show, sync_dist=True)
        for k in (1, 5):
            metric = self.errors[f"{stage}_err{k}"]
            metric.update(logits.detach(), y)
            self.log(
                f"{stage}/err{k}", metric, on_step=False, on_epoch=True, prog_bar=show and k == 1
            )
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):  # noqa: ANN201 (Lightning's union return type)
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
