"""Feature extraction: `create_model(..., features_only=True)` without timm.

A model that follows timm's API (`gunn_exp.models.gunn.ImageClassifier`) lists its feature taps in
`feature_info` and returns them from `forward_intermediates`. `FeatureExtractor` wraps such a model
so that it maps an image batch to the feature maps of the taps asked for, as timm's
FeatureGetterNet does, and `FeatureInfo` answers timm's questions about those taps (channels,
reduction, module name), so code written against timm's feature extractors runs on it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn


class FeatureInfo:
    """The feature taps an extractor returns: timm's FeatureInfo accessors over the model's
    `feature_info` dicts (num_chs, reduction, module)."""

    def __init__(self, info: list[dict], out_indices: Sequence[int]) -> None:
        self.info = [dict(d, index=i) for i, d in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def get_dicts(self) -> list[dict]:
        return [self.info[i] for i in self.out_indices]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def __len__(self) -> int:
        return len(self.out_indices)


class FeatureExtractor(nn.Module):
    """`features_only=True`: image batch -> list of feature maps at the taps `out_indices` (timm's
    FeatureGetterNet, without timm). Stages after the last tap and the head are dropped."""

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        self.out_indices = model.prune_intermediate_layers(out_indices, prune_norm=True)
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        self.pretrained_cfg = model.pretrained_cfg
        self.model = model

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(
            x, indices=self.out_indices, intermediates_only=True
        )
