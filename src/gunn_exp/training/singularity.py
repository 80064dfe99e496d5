"""The singularity probe: GUNN's claim measured during training (`callbacks=[default,singularity]`).

Every `every_n_epochs` epochs, after the epoch's training and validation, the statistics of
`gunn_exp.models.diagnostics` (overlap of weights, increments and hidden channels; effective rank;
dead units; optionally the loss Hessian's spectrum) are taken on a fixed probe set: unaugmented
training images, the same choice in every run. They are logged as `singularity/<site>/<stat>` to
every active logger (wandb, TensorBoard, MLflow through `pl_module.log`) and added to the epoch's
row of `metrics.csv` (EpochSummary asks this callback: `EpochMetrics`).

The probe does not change training: the model's buffers, modes and the RNG states are restored
(models.diagnostics.preserved, plus Python's and numpy's RNGs here), no gradient is computed into
the parameters, and a run ends with bitwise the same weights, buffers and RNG state with or without
it (tests/test_singularity.py).
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from torch import Tensor

from gunn_exp.errors import ConfigError
from gunn_exp.models.diagnostics import hessian_spectrum, probe_statistics
from gunn_exp.training.reproducibility import rng_states, set_rng_states

PREFIX = "singularity"


class SingularityProbe(pl.Callback):
    """Overlap-singularity diagnostics of the model every `every_n_epochs` epochs.

    Args:
        every_n_epochs: probe after epochs n, 2n, ... (1-based).
        probe_size: number of unaugmented training images in the probe set (one batch, with
            BatchNorm in training mode on it).
        seed: seed of the probe set's choice (its own generator).
        max_samples: images x positions per channel used for the correlations.
        gamma_eps: a BatchNorm gamma with |gamma| below this counts as eliminated.
        hessian: also estimate the loss Hessian's extreme eigenvalues and near-zero mass
            (Lanczos, `hessian_steps` Hessian-vector products per start vector).
        hessian_size: images of the probe set used for the Hessian's loss.
        hessian_steps: Lanczos iterations per start vector.
        hessian_vectors: random start vectors (their near-zero masses are averaged).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        probe_size: int = 128,
        seed: int = 0,
        max_samples: int = 4096,
        gamma_eps: float = 1e-2,
        hessian: bool = False,
        hessian_size: int = 64,
        hessian_steps: int = 20,
        hessian_vectors: int = 1,
    ) -> None:
        self.every_n_epochs = every_n_epochs
        # The probe set, and the statistics taken on it.
        self.probe_size, self.seed = probe_size, seed
        self.max_samples, self.gamma_eps = max_samples, gamma_eps
        # The optional Hessian spectrum.
        self.hessian, self.hessian_size = hessian, hessian_size
        self.hessian_steps, self.hessian_vectors = hessian_steps, hessian_vectors
        # State: the probe set (chosen once), the epoch last measured and its statistics.
        self._batch: tuple[Tensor, Tensor] | None = None
        self._epoch = -1
        self._metrics: dict[str, float] = {}

    def epoch_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """This epoch's statistics (measured on the first call of the epoch, then cached);
        {} in epochs that are not probed."""
        epoch = trainer.current_epoch
        if epoch != self._epoch:
            self._epoch = epoch
            probed = (epoch + 1) % self.every_n_epochs == 0
            self._metrics = self._measure(trainer, pl_module) if probed else {}
        return self._metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in self.epoch_metrics(trainer, pl_module).items():
            pl_module.log(key, value, on_step=False, on_epoch=True, rank_zero_only=True)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        # Every rank measures (the same numbers): a SyncBatchNorm in the probe's forward pass
        # is a collective, so one rank alone would wait for the others forever.
        start = time.perf_counter()
        model = pl_module.model
        states = rng_states()  # models.diagnostics restores torch's; this adds Python's, numpy's
        try:
            images, labels = self._probe_batch(trainer, pl_module.device)
            stats = probe_statistics(model, images, self.gamma_eps, self.max_samples)
            if self.hessian:
                n = self.hessian_size
                stats |= hessian_spectrum(
                    model,
                    images[:n],
                    labels[:n],
                    steps=self.hessian_steps,
                    vectors=self.hessian_vectors,
                    seed=self.seed,
                )
        finally:
            set_rng_states(states)
        stats["probe_time_s"] = time.perf_counter() - start
        return {f"{PREFIX}/{key}": value for key, value in stats.items()}

    def _probe_batch(self, trainer: pl.Trainer, device: torch.device) -> tuple[Tensor, Tensor]:
        """The probe set: `probe_size` unaugmented training images chosen by `seed`, one batch."""
        if self._batch is None:
            datamodule = trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "unaugmented_train_set"):
                raise ConfigError(
                    "callbacks.singularity needs one of gunn_exp's data modules (their "
                    "unaugmented training images are the probe set)."
                )
            dataset = datamodule.unaugmented_train_set()
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(len(dataset), generator=generator)[: self.probe_size]
            samples = [dataset[i] for i in sorted(chosen.tolist())]
            self._batch = (
                torch.stack([image for image, _ in samples]),
                torch.tensor([int(label) for _, label in samples]),
            )
        images, labels = self._batch
        return images.to(device), labels.to(device)
