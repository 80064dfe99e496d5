"""The paper recipes (docs/SPEC.md §3): hyper-parameters, lr at every epoch, global batch, sync BN,
and the statistics of the augmentation on generated images."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose_train, quiet_trainer
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from pytorch_lightning.plugins import TorchSyncBatchNorm
from scipy import stats
from torch import nn
from torchvision import transforms as T

from gunn_exp.config import validate_config
from gunn_exp.data import ImageNetDataModule
from gunn_exp.data.transforms import (
    CIFAR_STATS,
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Jigsaw,
    Lighting,
    RandomSizedCrop,
    cifar_stats,
    cifar_train_transform,
    imagenet_train_transform,
)
from gunn_exp.task import ClassificationModule
from gunn_exp.training.schedules import imagenet_decay_steps, register_resolvers

register_resolvers()

# experiment -> (model, data)
CIFAR_RECIPES = {
    "gunn15_cifar10": ("gunn15", "cifar10"),
    "gunn15_cifar100": ("gunn15", "cifar100"),
    "gunn24_cifar10": ("gunn24", "cifar10"),
    "gunn24_cifar100": ("gunn24", "cifar100"),
}
IMAGENET_RECIPES = {"gunn18_imagenet": "gunn18", "wide_gunn18_imagenet": "wide_gunn18"}


def compose_experiment(name: str, *overrides: str) -> DictConfig:
    """The composed config of a recipe (nothing here writes to its run directory)."""
    return compose_train(f"experiment={name}", *overrides)


class TinyNet(nn.Module):
    """A stand-in classifier: the recipes' optimizer and scheduler need parameters, not GUNN."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)
        self.crops_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.crops_seen.append(x.shape[0])
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def recipe_optimization(cfg: DictConfig) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """The optimizer and scheduler exactly as train(cfg) wires them through the module."""
    model = TinyNet()
    module = ClassificationModule(model, instantiate(cfg.optimizer), instantiate(cfg.scheduler))
    conf = module.configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "epoch"
    return model, conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def lrs_per_epoch(cfg: DictConfig) -> list[float]:
    """The lr during each 1-based epoch 1..max_epochs: read, then one scheduler step per epoch."""
    _, optimizer, scheduler = recipe_optimization(cfg)
    lrs = []
    for _ in range(cfg.trainer.max_epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def spec_cifar_lr(epoch: int, epochs: int = 300) -> float:
    """docs/SPEC.md §3: x0.1 from 50% and 75% of the epochs, counted from 1 (150, 225 of 300)."""
    return 0.1 if epoch < 0.5 * epochs else 0.01 if epoch < 0.75 * epochs else 0.001


def spec_imagenet_lr(epoch: int) -> float:
    """docs/SPEC.md §3's table: 0.1 (1-30), 0.01 (31-60), 0.001 (61-90), 1e-5 (91-120)."""
    return [0.1, 0.01, 0.001, 1e-5][(epoch - 1) // 30]


# --- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", sorted(CIFAR_RECIPES))
def test_cifar_lr_at_every_epoch(experiment: str) -> None:
    lrs = lrs_per_epoch(compose_experiment(experiment))
    assert len(lrs) == 300
    for epoch, lr in enumerate(lrs, start=1):
        assert lr == pytest.approx(spec_cifar_lr(epoch), rel=1e-9), f"epoch {epoch}"


@pytest.mark.parametrize("experiment", sorted(IMAGENET_RECIPES))
def test_imagenet_lr_at_every_epoch(experiment: str) -> None:
    lrs = lrs_per_epoch(compose_experiment(experiment))
    assert len(lrs) == 120
    for epoch, lr in enumerate(lrs, start=1):
        assert lr == pytest.approx(spec_imagenet_lr(epoch), rel=1e-9), f"epoch {epoch}"


def test_imagenet_decay_steps_follow_the_authors_formula() -> None:
    expected = {1: 0, 30: 0, 31: 1, 60: 1, 61: 2, 90: 2, 91: 4, 120: 4}  # 3 is skipped
    assert {epoch: imagenet_decay_steps(epoch) for epoch in expected} == expected
    with pytest.raises(ValueError, match="counted from 1"):
        imagenet_decay_steps(0)


def test_imagenet_schedule_resumes_from_a_checkpoint() -> None:
    """A run resumed at epoch 46 continues at 0.01, then 0.001 from epoch 61."""
    cfg = compose_experiment("gunn18_imagenet")
    _, optimizer, scheduler = recipe_optimization(cfg)
    for _ in range(45):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    _, optimizer, scheduler = recipe_optimization(cfg)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    lrs = []
    for _ in range(46, 121):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([spec_imagenet_lr(epoch) for epoch in range(46, 121)])


# --- hyper-parameters ------------------------------------------------------------------------


def check_optimizer(cfg: DictConfig) -> None:
    model, optimizer, _ = recipe_optimization(cfg)
    assert isinstance(optimizer, torch.optim.SGD)
    (group,) = optimizer.param_groups  # one group: weight decay on every parameter, BN included
    assert len(group["params"]) == len(list(model.parameters()))
    assert group["lr"] == 0.1 and group["momentum"] == 0.9 and group["nesterov"] is True
    assert group["weight_decay"] == 1e-4 and group["dampening"] == 0


@pytest.mark.parametrize("experiment", sorted(CIFAR_RECIPES))
def test_cifar_recipes_set_spec_values(experiment: str) -> None:
    cfg = compose_experiment(experiment)
    validate_config(cfg)
    model, data = CIFAR_RECIPES[experiment]
    assert (cfg.model.name, cfg.data.name, cfg.task_name) == (model, data, experiment)
    assert cfg.model.num_classes == cfg.data.num_classes == (10 if data == "cifar10" else 100)
    assert cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 300
    assert cfg.data.jigsaw is True and cfg.data.val_size == 0
    assert cfg.trainer.sync_batchnorm is False and cfg.trainer.precision == "32-true"
    check_optimizer(cfg)


@pytest.mark.parametrize("experiment", sorted(IMAGENET_RECIPES))
def test_imagenet_recipes_set_spec_values(experiment: str) -> None:
    cfg = compose_experiment(experiment)
    validate_config(cfg)
    assert (cfg.model.name, cfg.data.name) == (IMAGENET_RECIPES[experiment], "imagenet")
    assert cfg.model.num_classes == cfg.data.num_classes == 1000
    assert cfg.data.batch_size == 256 and cfg.trainer.max_epochs == 120
    assert cfg.data.image_size == 224 and cfg.data.ten_crop is False
    assert cfg.ten_crop_reduce == "logits"  # the authors' rule, should ten crops be turned on
    assert cfg.trainer.sync_batchnorm is False and cfg.trainer.precision == "32-true"
    check_optimizer(cfg)


def test_ablation_is_the_cifar_recipe_on_the_twins() -> None:
    cfg = compose_train("experiment=ablation", keep_hydra=True)
    assert dict(cfg.hydra.sweeper.params) == {"model": "gunn_mini,sunn_mini", "seed": "0,1,2"}
    assert (cfg.data.name, cfg.model.name, cfg.data.batch_size) == ("digits", "gunn_mini", 64)
    check_optimizer(cfg)
    epochs = cfg.trainer.max_epochs
    assert lrs_per_epoch(cfg) == pytest.approx(
        [spec_cifar_lr(e, epochs) for e in range(1, epochs + 1)]
    )
    # GPU users swap the data on the same command line; the command line wins over the experiment.
    cifar = compose_experiment("ablation", "data=cifar10", "model=gunn15")
    assert (cifar.data.name, cifar.model.name, cifar.model.num_classes) == ("cifar10", "gunn15", 10)


@pytest.mark.parametrize(
    ("experiment", "devices", "per_device"),
    [("gunn15_cifar10", 4, 16), ("gunn15_cifar10", 1, 64), ("gunn18_imagenet", 4, 64)],
)
def test_global_batch_is_split_over_devices(experiment: str, devices: int, per_device: int) -> None:
    datamodule = instantiate(compose_experiment(experiment).data)
    datamodule.trainer = SimpleNamespace(world_size=devices)
    assert datamodule.per_device_batch_size == per_device


def test_sync_batchnorm_option_reaches_the_trainer() -> None:
    cfg = compose_experiment(
        "gunn15_cifar10", "trainer.sync_batchnorm=true", "trainer.accelerator=cpu"
    )
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer._accelerator_connector._layer_sync, TorchSyncBatchNorm)
    # What Lightning does to the model under DDP: every BatchNorm becomes a SyncBatchNorm.
    synced = TorchSyncBatchNorm().apply(TinyNet())
    assert isinstance(synced.bn, nn.SyncBatchNorm)


# --- CIFAR augmentation ----------------------------------------------------------------------

# A 32x32 image whose red/green values encode each pixel's row/column (8 * index + 4) and whose
# blue is never the mean: after normalisation only padding pixels are exactly 0 in blue.
ROWS, COLS = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
CODED = Image.fromarray(
    torch.stack([8 * ROWS + 4, 8 * COLS + 4, torch.full_like(ROWS, 200)], -1)
    .to(torch.uint8)
    .numpy()
)


def decode_flip_crop(out: torch.Tensor, name: str = "cifar10") -> tuple[bool, int, int]:
    """(flipped, top, left) of one output of the pipeline without Jigsaw; checks every pixel."""
    mean, std = cifar_stats(name)
    pixel = (out * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) * 255
    real = out[2] != 0
    row = ((pixel[0] - 4) / 8).round().long()
    col = ((pixel[1] - 4) / 8).round().long()
    i, j = torch.nonzero(real, as_tuple=True)
    top = int(row[i[0], j[0]] - i[0] + 4)
    flipped = bool(col[i[0], j[0] + 1] < col[i[0], j[0]])
    left = int(35 - col[i[0], j[0]] - j[0]) if flipped else int(col[i[0], j[0]] - j[0] + 4)
    # Every real pixel comes from where (flipped, top, left) says; the rest is zero padding.
    assert torch.equal(row[real], (i + top - 4))
    assert torch.equal(col[real], (35 - left - j) if flipped else (j + left - 4))
    assert int(real.sum()) == (32 - abs(top - 4)) * (32 - abs(left - 4))
    assert torch.all(out[:, ~real] == 0)
    return flipped, top, left


def test_cifar_pipeline_order() -> None:
    steps = cifar_train_transform("cifar100").transforms
    assert [type(s) for s in steps] == [
        T.ToTensor,
        T.Normalize,
        T.RandomHorizontalFlip,
        T.RandomCrop,
        Jigsaw,
    ]
    normalize, flip, crop = steps[1], steps[2], steps[3]
    assert normalize.mean == cifar_stats("cifar100")[0] and flip.p == 0.5
    assert (crop.size, crop.padding, crop.fill, crop.padding_mode) == ((32, 32), 4, 0, "constant")
    assert [type(s) for s in cifar_train_transform("cifar10", jigsaw=False).transforms][
        -1
    ] is T.RandomCrop
    assert CIFAR_STATS["cifar10"] == ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))


def test_cifar_flip_and_crop_statistics() -> None:
    torch.manual_seed(0)
    transform = cifar_train_transform("cifar10", jigsaw=False)
    n = 2000
    samples = [decode_flip_crop(transform(CODED)) for _ in range(n)]
    flips = sum(f for f, _, _ in samples)
    assert abs(flips / n - 0.5) < 4 * (0.25 / n) ** 0.5
    for offsets in ([t for _, t, _ in samples], [left for _, _, left in samples]):
        counts = torch.bincount(torch.tensor(offsets), minlength=9)
        assert len(counts) == 9  # offsets 0..8 only
        assert stats.chisquare(counts.numpy()).pvalue > 1e-3, counts


# The row and column index of each pixel, as two channels.
COORDS = torch.stack([ROWS, COLS]).float()


def decode_jigsaw(out: torch.Tensor) -> tuple[str, int]:
    """('none', 0), ('width', d) or ('height', d) of a Jigsaw output of the coordinate image."""
    if torch.equal(out, COORDS):
        return "none", 0
    if torch.equal(out[0], COORDS[0]):  # rows untouched: rolled along the width
        d = 32 - int(out[1, 0, 0])
        assert torch.equal(out, torch.roll(COORDS, d, dims=-1))
        return "width", d
    d = 32 - int(out[0, 0, 0])
    assert torch.equal(out, torch.roll(COORDS, d, dims=-2))
    return "height", d


def test_jigsaw_statistics() -> None:
    """1/3 nothing, else an axis (1/2 each) and d ~ U{1..32}; d = 32 is a full turn, so the
    observed 'none' has probability 1/3 + 2/3 * 1/32 and each (axis, d < 32) 1/96."""
    torch.manual_seed(0)
    jigsaw, n = Jigsaw(), 6000
    outcomes = [decode_jigsaw(jigsaw(COORDS)) for _ in range(n)]
    categories = [("none", 0)] + [(axis, d) for axis in ("width", "height") for d in range(1, 32)]
    observed = [outcomes.count(c) for c in categories]
    assert sum(observed) == n  # nothing outside the categories (no d = 0, no d > 32)
    expected = [n * (1 / 3 + 2 / 3 / 32)] + [n / 96] * 62
    assert stats.chisquare(observed, expected).pvalue > 1e-3


# --- ImageNet augmentation -------------------------------------------------------------------


def test_lighting_noise_std() -> None:
    """The PCA noise is constant over the image, zero-mean, with the per-channel std
    alphastd * ||eigvec[c] * eigval||."""
    torch.manual_seed(0)
    lighting, n = Lighting(0.1), 4000
    noise = torch.stack([lighting(torch.zeros(3, 2, 2)) for _ in range(n)])
    assert torch.equal(noise, noise[..., :1, :1].expand_as(noise))
    noise = noise[:, :, 0, 0]
    expected_std = 0.1 * (torch.tensor(IMAGENET_EIGVEC) * torch.tensor(IMAGENET_EIGVAL)).norm(dim=1)
    assert torch.allclose(noise.std(0), expected_std, rtol=0.05)
    assert torch.all(noise.mean(0).abs() < 4 * expected_std / n**0.5)


def aspect_cdf(x: np.ndarray) -> np.ndarray:
    """CDF of w/h when it is U(3/4, 4/3) or its reciprocal, 1/2 each."""

    def uniform(v: np.ndarray) -> np.ndarray:
        return ((v - 3 / 4) / (4 / 3 - 3 / 4)).clip(0, 1)

    return (uniform(x) + 1 - uniform(1 / x)) / 2


def test_random_sized_crop_area_and_aspect() -> None:
    """Area U(0.08, 1) of the image, aspect U(3/4, 4/3) then w/h swapped half the time. On a
    square image every crop of area <= 3/4 fits, so below that no draw is rejected and both
    distributions are seen undistorted."""
    torch.manual_seed(0)
    crop, side, n = RandomSizedCrop(32), 1024, 5000  # large: rounding w, h barely moves w/h
    params = [crop.get_params(side, side) for _ in range(n)]
    assert all(p is not None for p in params)
    area = torch.tensor([h * w / side**2 for _, _, h, w in params])
    aspect = torch.tensor([w / h for _, _, h, w in params])
    assert area.min() >= 0.075 and area.max() <= 1.0
    assert aspect.min() >= 0.74 and aspect.max() <= 1.35
    fits = area < 0.7
    assert stats.kstest(aspect[fits].numpy(), aspect_cdf).pvalue > 1e-3
    assert stats.kstest(area[fits].numpy(), "uniform", args=(0.08, 0.62)).pvalue > 1e-3
    for top, left, h, w in params[:200]:
        assert 0 <= top <= side - h and 0 <= left <= side - w


def test_random_sized_crop_falls_back_to_resize_and_centre_crop() -> None:
    torch.manual_seed(0)
    thin = Image.new("RGB", (2000, 20))  # no crop of >= 8% of the area fits in 20 rows
    assert RandomSizedCrop(32).get_params(20, 2000) is None
    assert RandomSizedCrop(32)(thin).size == (32, 32)


def test_imagenet_train_pipeline() -> None:
    transform = imagenet_train_transform(32)
    steps = transform.transforms
    assert [type(s) for s in steps] == [
        RandomSizedCrop,
        T.ColorJitter,
        T.ToTensor,
        Lighting,
        T.Normalize,
        T.RandomHorizontalFlip,
    ]
    jitter = steps[1]
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4)
    assert jitter.hue is None and steps[3].alphastd == 0.1
    assert (steps[4].mean, steps[4].std) == (IMAGENET_MEAN, IMAGENET_STD)
    image = Image.fromarray(torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy())
    assert transform(image).shape == (3, 32, 32)


# --- evaluation ------------------------------------------------------------------------------


def write_image_folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    """A generated ImageNet-style tree: root/{train,val}/<class>/*.png of varied sizes."""
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                h, w = 40 + 7 * k, 50 + 5 * c
                pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{k}.png")
    return root


def test_ten_crop_evaluation_gives_5d_batches_the_module_combines(tmp_path: Path) -> None:
    datamodule = ImageNetDataModule(
        data_dir=str(write_image_folder(tmp_path)),
        ten_crop=True,
        num_classes=2,
        image_size=32,
        batch_size=6,
    )
    datamodule.prepare_data()
    datamodule.setup()
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape == (6, 10, 3, 32, 32) and labels.shape == (6,)

    torch.manual_seed(0)
    model = TinyNet(num_classes=2)
    module = ClassificationModule(model, partial(torch.optim.SGD, lr=0.1))
    trainer = quiet_trainer(enable_checkpointing=False)
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    assert model.crops_seen == [60]  # 6 images x 10 crops in one forward pass
    # By default the module scores the mean logits over the 10 crops of each image (the authors'
    # rule, tests/test_ten_crop.py), and its loss is their cross-entropy.
    model.eval()
    with torch.no_grad():
        logits = model(images.flatten(0, 1)).view(6, 10, 2).mean(1)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    assert metrics["val/loss"] == pytest.approx(float(loss), rel=1e-4)
    err1 = 100 * float((logits.argmax(1) != labels).float().mean())
    assert metrics["val/err1"] == pytest.approx(err1, abs=1e-3)
