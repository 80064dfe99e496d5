"""Classify images and extract their features with a trained run (classify.py, features.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gunn_exp.inference.run import Run, Skipped, image_batches, pooled_features, predict_log_probs

BATCH_SIZE = 64


@dataclass
class Prediction:
    name: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first


def classify_images(
    run: Run, images: Sequence[tuple[Path, str]], top_k: int = 5
) -> tuple[list[Prediction], list[Skipped]]:
    """The `top_k` classes of every readable image, with their softmax probabilities."""
    classes = run.classes
    k = min(top_k, len(classes))
    predictions: list[Prediction] = []
    skipped: list[Skipped] = []
    for names, x in image_batches(images, run.preprocessing, BATCH_SIZE, skipped):
        scores, idx = predict_log_probs(run.model, x.to(run.device)).topk(k, dim=1)
        for name, p, i in zip(names, scores.exp().tolist(), idx.tolist(), strict=True):
            top = [(classes[c], q) for c, q in zip(i, p, strict=True)]
            predictions.append(Prediction(name, top))
    return predictions, skipped


def extract_features(
    run: Run, images: Sequence[tuple[Path, str]]
) -> tuple[list[str], torch.Tensor, list[Skipped]]:
    """(names, N x num_features float32 tensor, skipped) of the pooled penultimate features."""
    names: list[str] = []
    chunks: list[torch.Tensor] = []
    skipped: list[Skipped] = []
    for batch_names, x in image_batches(images, run.preprocessing, BATCH_SIZE, skipped):
        names += batch_names
        chunks.append(pooled_features(run.model, x.to(run.device)).float().cpu())
    width = getattr(run.model, "num_features", 0)
    features = torch.cat(chunks) if chunks else torch.empty(0, width)
    return names, features, skipped


def save_features(
    path: str | Path, names: list[str], features: torch.Tensor, run: Run
) -> list[Path]:
    """Write features with their file names; returns the files written.

    `.pt`: one dict {features, names, model, checkpoint}. `.npy`: the N x D array, plus the names
    one per line in `<stem>.names.txt` (row i is the i-th name), since a .npy holds one array.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":
        torch.save(
            {
                "features": features,
                "names": names,
                "model": run.model_name,
                "checkpoint": str(run.checkpoint),
            },
            path,
        )
        return [path]
    if path.suffix == ".npy":
        np.save(path, features.numpy())
        names_path = path.with_suffix(".names.txt")
        names_path.write_text("".join(f"{n}\n" for n in names))
        return [path, names_path]
    raise ValueError(f"{path}: the output must end in .npy or .pt.")
