"""The task every run trains, tests and evaluates: cross-entropy classification, errors in percent.

One LightningModule below both `training/` and `inference/`, so eval.py scores a checkpoint with
exactly the steps and metrics its run was trained and tested with; its `state_dict` (the network
under `model.`, the best validation error so far) is what a checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MinMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from gunn_exp.data.crops import CROP_REDUCTIONS, reduce_crops
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
    """Trains `model` with cross-entropy; logs `{train,val,test}/{loss,err1,err5}` per epoch,
    `val/err1_best`, the lowest validation top-1 error so far, and `train/loss_step`, `lr_step`
    every `trainer.log_every_n_steps`; counts the test set's confusion matrix (`confusion`).

    The module tracks its best itself (not a callback), so results, checkpoint selection and a
    sweep's objective are the same whichever callbacks a config lists; it is saved in
    checkpoints, so a resumed run keeps the best of the epochs before the resume.

    `optimizer` and `scheduler` are partials (Hydra `_partial_: true`) so the configs own every
    hyper-parameter; the scheduler steps once per epoch, as in the paper's recipes.

    A 5-D batch (N, crops, C, H, W) is multi-crop evaluation: the crops' logits are combined by
    `ten_crop_reduce` (data.crops: `logits`, the authors' rule, or `softmax`), and the loss
    and errors are those of the combined logits.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
        ten_crop_reduce: str = "logits",
    ) -> None:
        super().__init__()
        if ten_crop_reduce not in CROP_REDUCTIONS:
            raise ValueError(
                f"ten_crop_reduce={ten_crop_reduce!r} is unknown; use one of {CROP_REDUCTIONS}."
            )
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"], logger=False)
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            # Regional, in place: G_i compiled once per stage shape, state_dict keys kept.
            compile_regions(self.model, mode=compile_mode)
        # One metric object per stage (and k): Lightning resets and syncs them at epoch end, and
        # a mid-epoch checkpoint keeps their sums (training.reproducibility.EpochSeeding).
        # nan_strategy="disable": a nan loss shows as nan, as Lightning's own mean would.
        self.losses = nn.ModuleDict(
            {
                f"{stage}_loss": MeanMetric(nan_strategy="disable")
                for stage in ("train", "val", "test")
            }
        )
        self.errors = nn.ModuleDict(
            {
                f"{stage}_err{k}": TopKError(model.num_classes, k)
                for stage in ("train", "val", "test")
                for k in (1, 5)
            }
        )
        # Test counts, rows true and columns predicted: eval.py's matrix and the loggers' plot.
        # Not logged through self.log, so reset by hand at each test; not in the state_dict.
        self.confusion = MulticlassConfusionMatrix(model.num_classes)
        self.val_err1_best = MinMetric()
        self.val_err1_best.persistent(True)
        # The 1-based epoch of val_err1_best (0: none yet); a buffer, so checkpoints keep it.
        self.register_buffer("best_val_epoch", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        """Log the batch's loss and errors under `stage`; (loss, logits)."""
        x, y = batch
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if x.ndim == 5:  # multi-crop evaluation: one forward pass, then combine each image's crops
            logits = reduce_crops(self(x.flatten(0, 1)), x.shape[1], self.hparams.ten_crop_reduce)
        else:
            logits = self(x)
        loss = F.cross_entropy(logits, y)
        show = stage != "test"
        mean_loss = self.losses[f"{stage}_loss"]
        mean_loss.update(loss.detach(), weight=y.numel())  # the epoch's mean over images
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=show)
        for k in (1, 5):
            metric = self.errors[f"{stage}_err{k}"]
            metric.update(logits.detach(), y)
            self.log(
                f"{stage}/err{k}", metric, on_step=False, on_epoch=True, prog_bar=show and k == 1
            )
        return loss, logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")[0]
        # Step-level curves beside the epoch means, so a spike or a warm-up shows where it
        # happened: to the loggers every trainer.log_every_n_steps. This rank's batch, unsynced:
        # an all-reduce every step would cost more than the curve is worth.
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
        self.log("lr_step", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_test_epoch_start(self) -> None:
        self.confusion.reset()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The batch's logits, for callbacks' `on_test_batch_end` (training.mistakes)."""
        logits = self._step(batch, "test")[1]
        self.confusion.update(logits.argmax(1), batch[1])
        return logits

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a check of the code, not an epoch of the run
            return
        err1 = self.errors["val_err1"].compute()  # synced over ranks; Lightning reuses the value
        if err1 < self.val_err1_best.min_value:  # strict: ties keep the earlier epoch
            self.best_val_epoch.fill_(self.current_epoch + 1)
        self.val_err1_best.update(err1)
        self.log("val/err1_best", self.val_err1_best.compute(), prog_bar=True)

    @property
    def best_val_err1(self) -> float | None:
        """The lowest validation top-1 error of the run so far (None before any validation)."""
        return float(self.val_err1_best.min_value) if self.best_val_epoch > 0 else None

    def configure_optimizers(self):  # noqa: ANN201 (Lightning's union return type)
        if self.optimizer_factory is None:
            raise RuntimeError("ClassificationModule(optimizer=None) evaluates only; pass one.")
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
