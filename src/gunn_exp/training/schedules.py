"""Learning-rate schedules of the paper's recipes (docs/SPEC.md §3): the CIFAR step milestones as a
config resolver, and the authors' ImageNet schedule as a `LambdaLR` multiplier.

ImageNet epochs are counted from 1, as in the authors' train.lua: lr = 0.1 x 0.1^d with
d = floor((epoch - 1) / 30), and d += 1 once d >= 3, so the 120 epochs run at 0.1 (1-30),
0.01 (31-60), 0.001 (61-90) and 1e-5 (91-120): the last step skips 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from omegaconf import OmegaConf


def epoch_milestones(max_epochs: int, fractions: Sequence[float]) -> list[int]:
    """0-based MultiStepLR milestones: lr decays from 1-based epoch >= f * max_epochs
    (docs/SPEC.md §3).

    With 300 epochs and (0.5, 0.75): lr drops from 1-based epochs 150 and 225, i.e. after 149 and
    224 scheduler steps.
    """
    return [max(math.ceil(f * max_epochs) - 1, 0) for f in fractions]


def register_resolvers() -> None:
    """`${epoch_milestones:...}` for the configs (scheduler/multistep.yaml, the recipes)."""
    if not OmegaConf.has_resolver("epoch_milestones"):
        OmegaConf.register_new_resolver("epoch_milestones", epoch_milestones)


def imagenet_decay_steps(epoch: int, period: int = 30) -> int:
    """The exponent d of 1-based `epoch`: one step per `period` epochs, one extra from the 4th."""
    if epoch < 1:
        raise ValueError(f"epoch={epoch}: epochs are counted from 1.")
    d = (epoch - 1) // period
    return d + 1 if d >= 3 else d


def imagenet_lr_factor(scheduler_steps: int, period: int = 30, gamma: float = 0.1) -> float:
    """`LambdaLR` multiplier of the base lr after `scheduler_steps` epoch steps.

    The module steps the scheduler once at the end of each epoch, so after s steps the optimizer
    is in 1-based epoch s + 1; the factor is that epoch's gamma^d.
    """
    return gamma ** imagenet_decay_steps(scheduler_steps + 1, period)
