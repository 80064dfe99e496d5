"""The paper's figures for its models: where each is evaluated and how big it is (docs/SPEC.md §2,
§4), beside which the complexity tables print ours."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperModel:
    """Where and how big the paper says a model is; None where it gives nothing."""

    data: str
    num_classes: int
    image_size: int
    params: str
    macs: str | None
    reconstructed: bool  # ours is a reconstruction: the paper gives only depth and size


PAPER = {
    "gunn15": PaperModel("cifar10", 10, 32, "1.6M", "0.556G", False),
    "gunn24": PaperModel("cifar10", 10, 32, "29.6M", None, True),
    "gunn18": PaperModel("imagenet", 1000, 224, "28.9M", "7.75G", False),
    "wide_gunn18": PaperModel("imagenet", 1000, 224, "45.6M", None, True),
}


def paper_reference(name: str) -> PaperModel | None:
    """The paper's figures for a registered model; a SUNN twin shares its GUNN's."""
    return PAPER.get(name.replace("sunn", "gunn"))
