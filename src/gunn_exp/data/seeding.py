"""The one function every seed of a run comes from (training/reproducibility.py: the scheme)."""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 32-bit seed for one (run seed, epoch, rank, stream, ...) combination: the
    same in every process and every Python (unlike `hash`), independent for different keys."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])
