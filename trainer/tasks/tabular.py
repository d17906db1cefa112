"""What the tabular example tasks share: a fixed, fingerprintable split of a scikit-learn set,
and a standardizer that is fitted on the training split and exported in the served graph.

The standardizer is the point of these examples: a client sends the raw feature values, as the
data set has them, and the served graph applies the training split's mean and standard
deviation, exactly what training applied. No copy of the scaling lives in client code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset

SPLIT_SEED = 20_240_611  # fixed: the held-out split must not move between candidates
TEST_FRACTION = 0.25


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    definition: dict[str, Any]


def split(source: str, x: np.ndarray, y: np.ndarray, *, stratify: bool) -> Split:
    """Sorted, seeded train/held-out rows of ``x``/``y`` and the split's definition."""
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=TEST_FRACTION, random_state=SPLIT_SEED,
        stratify=y if stratify else None)
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    return Split(x[idx_train], y[idx_train], x[idx_test], y[idx_test], {
        "dataset": source, "test_fraction": TEST_FRACTION, "split_seed": SPLIT_SEED,
        "stratified": stratify, "features": "raw"})


class Standardize(nn.Module):
    """(x - mean) / std per feature, with the training split's statistics as buffers."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone().float())
        self.register_buffer("std", torch.where(std > 0, std, torch.ones_like(std)).float())

    @classmethod
    def fit(cls, x: torch.Tensor) -> Standardize:
        return cls(x.mean(dim=0), x.std(dim=0))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def column(ds: Dataset[Any], key: str | None = None) -> torch.Tensor:
    """The stacked input ``key`` (or the single input) of every item of ``ds``."""
    n = len(ds)  # type: ignore[arg-type]  # map-style datasets define __len__
    rows = [ds[i][0] for i in range(n)]
    return torch.stack([r[key] if key is not None else r for r in rows])
