"""A task as a user writes it: one file, no kloop code besides the contract.

scikit-learn's wine set (178 wines, 13 chemical measurements, 3 cultivars). The served graph
standardizes the raw measurements with the training split's statistics, so a client sends them
as measured. Train it from this directory::

    kloop tasks wine_task:Wine                       # check it; prints its signature
    kloop train --task wine_task:Wine --epochs 40    # 2 DDP processes under torchrun

See the README's "Bring your own model" for the whole loop.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from trainer.task import Datasets, Metric, Task


@dataclasses.dataclass(frozen=True)
class WineConfig:
    lr: float = 0.01  # Adam's learning rate
    hidden: int = 16  # hidden units


class Standardize(nn.Module):
    """The training split's mean and std, as buffers: exported with the model."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def correct(served: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return (served["cultivar"] == target).float()


class Wine(Task[WineConfig]):
    Config = WineConfig
    description = "MLP on scikit-learn's wine set (3 cultivars, 13 raw measurements)"
    metrics = (Metric("accuracy", "higher", correct, threshold=0.8),)
    primary_metric = "accuracy"

    def setup(self) -> None:
        wine = load_wine()
        x, y = wine.data.astype(np.float32), wine.target.astype(np.int64)
        train, test = train_test_split(np.arange(len(y)), test_size=0.3, random_state=7, stratify=y)
        train, test = np.sort(train), np.sort(test)
        self.train = TensorDataset(torch.from_numpy(x[train]), torch.from_numpy(y[train]))
        self.test = TensorDataset(torch.from_numpy(x[test]), torch.from_numpy(y[test]))

    def datasets(self) -> Datasets:
        return Datasets(self.train, self.test, definition={
            "dataset": "sklearn.datasets.load_wine", "test_size": 0.3, "random_state": 7})

    def preprocess(self, train: Dataset[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
        return Standardize(torch.stack([train[i][0] for i in range(len(self.train))]))

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(13, self.config.hidden), nn.ReLU(), nn.Linear(self.config.hidden, 3))

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, target)

    def serve(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"probabilities": outputs.softmax(1), "cultivar": outputs.argmax(1)}

    def example_input(self) -> dict[str, torch.Tensor]:
        return {"measurements": torch.zeros(2, 13)}
