"""What the model gets wrong on the test set, for the experiment loggers: the confusion matrix
(wandb's interactive plot; an image for TensorBoard and MLflow) and a small table of misclassified
test images with their true and predicted class and the prediction's confidence (wandb)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_lightning.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torch import Tensor

from gunn_exp.rundir.confusion import confusion_figure
from gunn_exp.task import ClassificationModule

# torchvision's TenCrop yields the four corners, then the centre (then their mirror images).
CENTRE_CROP = 4
# wandb's plot holds one table row per (true, predicted) pair: 100 classes make 10,000 rows,
# wandb.Table's limit for a logged table. Beyond that wandb gets the image, as TensorBoard does.
WANDB_PLOT_MAX_CLASSES = 100


class Mistake(NamedTuple):
    pixels: np.ndarray  # H x W x 3 (or H x W) uint8, the image as the model saw it
    true: int
    predicted: int
    confidence: float  # the predicted class's softmax probability


class Mistakes(pl.Callback):
    """After the test: the confusion matrix the module counted (`ClassificationModule.confusion`,
    synced over DDP ranks) and the first `examples` misclassified images of rank 0's test batches,
    to every logger of the run (rank 0 logs). Nothing is done without a logger."""

    def __init__(self, examples: int = 32) -> None:
        self.examples = examples
        self.mistakes: list[Mistake] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mistakes = []

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        room = self.examples - len(self.mistakes)
        if room <= 0 or not trainer.loggers or not trainer.is_global_zero:
            return
        x, y = batch
        confidence, predicted = outputs.detach().softmax(1).max(1)  # outputs: the test logits
        data = trainer.datamodule
        for i in (predicted != y).nonzero().flatten()[:room].tolist():
            image = x[i, CENTRE_CROP] if x.ndim == 5 else x[i]
            pixels = to_pixels(image, data.mean, data.std)
            self.mistakes.append(
                Mistake(pixels, int(y[i]), int(predicted[i]), float(confidence[i]))
            )

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: ClassificationModule) -> None:
        if not trainer.loggers:
            return
        confusion = pl_module.confusion.compute().cpu()  # on every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        classes = [str(c) for c in data.classes]
        # Drawn once, only if a logger wants the picture.
        figure = cache(lambda: confusion_figure(confusion, classes, f"test, {data.name}"))
        for logger in trainer.loggers:
            log_mistakes(logger, confusion, classes, figure, self.mistakes, trainer.global_step)


def log_mistakes(
    logger: Logger,
    confusion: Tensor,
    classes: list[str],
    figure: Callable[[], Figure],
    mistakes: Sequence[Mistake],
    step: int,
) -> None:
    """Each library's own form: wandb a plot and a table, TensorBoard an image, MLflow a file."""
    if isinstance(logger, WandbLogger):
        import wandb  # imported only with logger=wandb

        if len(classes) <= WANDB_PLOT_MAX_CLASSES:
            # wandb's plot counts (true, predicted) pairs itself: hand it the counted pairs.
            true, predicted = confusion.nonzero(as_tuple=True)
            counts = confusion[true, predicted].numpy()
            plot = wandb.plot.confusion_matrix(
                y_true=np.repeat(true.numpy(), counts).tolist(),
                preds=np.repeat(predicted.numpy(), counts).tolist(),
                class_names=classes,
                title="test confusion matrix",
            )
        else:
            plot = wandb.Image(figure_pixels(figure()))
        logged: dict[str, Any] = {"test/confusion_matrix": plot}
        if mistakes:
            rows = [
                [wandb.Image(m.pixels), classes[m.true], classes[m.predicted], m.confidence]
                for m in mistakes
            ]
            columns = ["image", "true", "predicted", "confidence"]
            logged["test/misclassified"] = wandb.Table(columns=columns, data=rows)
        logger.log_metrics(logged, step=step)
    elif isinstance(logger, TensorBoardLogger):
        pixels = figure_pixels(figure())
        logger.experiment.add_image("test/confusion_matrix", pixels, step, dataformats="HWC")
        logger.experiment.flush()
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_figure(logger.run_id, figure(), "test_confusion_matrix.png")


def to_pixels(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised C x H x W image back to uint8 pixels, H x W x C (H x W for one channel)."""
    channels = image.shape[0]
    std_t = torch.tensor(std[:channels], dtype=torch.float32).view(-1, 1, 1)
    mean_t = torch.tensor(mean[:channels], dtype=torch.float32).view(-1, 1, 1)
    pixels = (image.detach().float().cpu() * std_t + mean_t).clamp(0, 1).mul(255).round()
    pixels = pixels.to(torch.uint8).permute(1, 2, 0).numpy()
    return pixels[..., 0] if channels == 1 else pixels


def figure_pixels(figure: Figure) -> np.ndarray:
    """A matplotlib figure rendered to H x W x 3 uint8 pixels (no pyplot involved)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
