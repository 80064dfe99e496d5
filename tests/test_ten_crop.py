"""Ten-crop evaluation as the authors did it: logits combined over crops, a bicubic resize."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from gunn_exp.config import validate_config
from gunn_exp.data import ImageNetDataModule
from gunn_exp.data.crops import reduce_crops
from gunn_exp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, imagenet_eval_transform
from gunn_exp.errors import ConfigError
from gunn_exp.inference.run import predict_log_probs
from gunn_exp.rundir.preprocessing import Preprocessing
from gunn_exp.task import ClassificationModule

# Two images x two crops x three classes. Image 0 is where the rules disagree: crop 0 is sure of
# class 0, crop 1 leans to class 2; summed logits (10, 3, 12) pick class 2, but the mean softmax
# (~0.45, 0.13, 0.42) picks class 0. Image 1: both crops and both rules say class 0.
CROP_LOGITS = torch.tensor(
    [
        [[10.0, 0.0, 8.0], [0.0, 3.0, 4.0]],
        [[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]],
    ]
)
LABELS = torch.tensor([2, 0])


class LogitsFromPixels(nn.Module):
    """A 'network' whose logits are its 1x1x3 input's pixels, so a test chooses every logit."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(1, 1)  # Lightning wants a parameter to put on a device

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def test_the_hand_built_example_separates_the_rules() -> None:
    """The precondition of the tests below: on image 0 the two rules give different top-1."""
    summed = CROP_LOGITS.sum(1).argmax(1)
    mean_softmax = CROP_LOGITS.softmax(-1).mean(1).argmax(1)
    assert summed.tolist() == [2, 0] and mean_softmax.tolist() == [0, 0]


def test_logits_rule_ranks_as_the_authors_sum() -> None:
    flat = CROP_LOGITS.flatten(0, 1)
    combined = reduce_crops(flat, crops=2, rule="logits")
    torch.testing.assert_close(combined, CROP_LOGITS.sum(1) / 2)
    assert combined.argmax(1).tolist() == [2, 0]
    # Any number of crops and classes: the top-5 is the summed logits' top-5.
    logits = torch.randn(4 * 10, 20, generator=torch.Generator().manual_seed(0))
    top5 = reduce_crops(logits, crops=10).topk(5, dim=1).indices
    assert torch.equal(top5, logits.view(4, 10, 20).sum(1).topk(5, dim=1).indices)


def test_softmax_rule_is_the_mean_softmax() -> None:
    combined = reduce_crops(CROP_LOGITS.flatten(0, 1), crops=2, rule="softmax")
    torch.testing.assert_close(combined.softmax(-1), CROP_LOGITS.softmax(-1).mean(1))
    assert combined.argmax(1).tolist() == [0, 0]


@pytest.mark.parametrize(
    ("rule", "err1"),
    [("logits", 0.0), ("softmax", 50.0)],
)
def test_module_scores_five_d_batches_by_its_rule(rule: str, err1: float) -> None:
    images = CROP_LOGITS.view(2, 2, 1, 1, 3).permute(0, 1, 4, 2, 3)  # (N, crops, C=3, 1, 1)
    loader = DataLoader(TensorDataset(images, LABELS), batch_size=2)
    module = ClassificationModule(LogitsFromPixels(), ten_crop_reduce=rule)
    trainer = quiet_trainer(enable_checkpointing=False)
    (metrics,) = trainer.validate(module, dataloaders=loader, verbose=False)
    assert metrics["val/err1"] == pytest.approx(err1)
    # The reported loss is the cross-entropy of the combined logits.
    combined = reduce_crops(CROP_LOGITS.flatten(0, 1), crops=2, rule=rule)
    assert metrics["val/loss"] == pytest.approx(float(F.cross_entropy(combined, LABELS)))


def test_predict_scores_crops_by_the_authors_rule() -> None:
    images = CROP_LOGITS.view(2, 2, 1, 1, 3).permute(0, 1, 4, 2, 3)
    log_probs = predict_log_probs(LogitsFromPixels(), images)
    torch.testing.assert_close(log_probs, (CROP_LOGITS.sum(1) / 2).log_softmax(-1))


def test_an_unknown_rule_is_refused_early() -> None:
    with pytest.raises(ValueError, match="ten_crop_reduce='sum'"):
        ClassificationModule(LogitsFromPixels(), ten_crop_reduce="sum")
    with pytest.raises(ConfigError, match="ten_crop_reduce='sum' is invalid"):
        validate_config(OmegaConf.create({"ten_crop_reduce": "sum"}), registry=False)


def random_image(width: int, height: int) -> Image.Image:
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_imagenet_evaluation_resizes_bicubic() -> None:
    img = random_image(50, 41)  # shorter side 41 -> round(32 * 256 / 224) = 37

    def expected(mode: T.InterpolationMode) -> Tensor:
        resized = TF.center_crop(TF.resize(img, 37, interpolation=mode), 32)
        return TF.normalize(TF.to_tensor(resized), IMAGENET_MEAN, IMAGENET_STD)

    single = imagenet_eval_transform(32)(img)
    assert torch.equal(single, expected(T.InterpolationMode.BICUBIC))
    assert not torch.equal(single, expected(T.InterpolationMode.BILINEAR))  # the test can fail
    crops = imagenet_eval_transform(32, ten_crop=True)(img)
    assert torch.equal(crops[4], single)  # TenCrop's fifth crop is the centre one


def test_inference_preprocessing_replays_the_bicubic_resize(tmp_path: Path) -> None:
    dm = ImageNetDataModule(data_dir=str(tmp_path), num_classes=2, image_size=32)
    preprocessing = Preprocessing.from_datamodule(dm)
    assert preprocessing.interpolation == "bicubic"
    img = random_image(50, 41)
    assert torch.equal(preprocessing(img), imagenet_eval_transform(32)(img))
    preprocessing.save(tmp_path)
    assert Preprocessing.read(tmp_path) == preprocessing
