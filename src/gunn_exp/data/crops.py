"""Combining the logits of several crops of one image (ten-crop evaluation) into one score."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py reads CROP_REDUCTIONS before torch is loaded
    from torch import Tensor

# logits: the authors' rule (fb.resnet.torch train.lua, computeScore, sums the crops' logits).
# softmax: the mean of the crops' softmax, the common alternative (e.g. torchvision's references).
CROP_REDUCTIONS = ("logits", "softmax")


def reduce_crops(logits: Tensor, crops: int, rule: str = "logits") -> Tensor:
    """(N * crops, C) logits, image-major -> (N, C) logits of the N images under `rule`.

    `logits`: the mean of the crops' logits. The authors sum them; the mean ranks the classes
    identically (top-1, top-5) and keeps one crop's scale, so the cross-entropy of the result is
    comparable to a single crop's loss. `softmax`: the log of the mean softmax, whose softmax is
    that mean, so cross-entropy of the result is the NLL of the averaged probabilities.
    """
    if rule not in CROP_REDUCTIONS:
        raise ValueError(f"ten_crop_reduce={rule!r} is unknown; use one of {CROP_REDUCTIONS}.")
    per_image = logits.view(-1, crops, logits.shape[-1])
    if rule == "logits":
        return per_image.mean(1)
    # log(mean softmax) in log space: small probabilities do not underflow to equal zeros.
    return per_image.log_softmax(-1).logsumexp(1) - math.log(crops)
