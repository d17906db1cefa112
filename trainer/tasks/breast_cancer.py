"""A tabular classifier: scikit-learn's breast-cancer set (569 rows, 30 features, 2 classes).

The served graph standardizes the raw features with the training split's statistics
(``tabular.Standardize``), so a client sends the 30 measurements as they are.
``features`` FP32 [-1, 30] -> ``probabilities`` FP32 [-1, 2], ``label`` INT64 [-1].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from trainer.task import Datasets, Metric, Task
from trainer.tasks.tabular import Standardize, column, split

FEATURES = 30


@dataclasses.dataclass(frozen=True)
class BreastCancerConfig:
    lr: float = 0.01  # Adam's learning rate
    hidden: int = 32  # units of the hidden layer
    shuffle_labels: bool = False  # permute the training labels: a deliberately bad candidate
    label_seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.hidden < 1:
            raise ValueError(f"lr must be > 0 and hidden >= 1, got lr={self.lr}, hidden={self.hidden}")


def correct(served: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return (served["label"] == target).float()


def log_loss(served: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    p = served["probabilities"].gather(1, target.unsqueeze(1)).squeeze(1)
    return -torch.log(p.clamp_min(1e-7))


class BreastCancer(Task[BreastCancerConfig]):
    """Malignant (0) or benign (1) from 30 raw measurements."""

    Config = BreastCancerConfig
    description = "MLP on scikit-learn's breast-cancer set (2 classes, 30 raw features; accuracy)"
    metrics = (
        Metric("accuracy", "higher", correct, threshold=0.8),  # the majority class scores 0.63
        Metric("log_loss", "lower", log_loss),
    )
    primary_metric = "accuracy"

    def setup(self) -> None:
        raw = load_breast_cancer()
        self.split = split("sklearn.datasets.load_breast_cancer", raw.data.astype(np.float32),
                           raw.target.astype(np.int64), stratify=True)

    def datasets(self) -> Datasets:
        s, y_train = self.split, self.split.y_train
        if self.config.shuffle_labels:
            y_train = np.random.default_rng(self.config.label_seed).permutation(y_train)
        return Datasets(
            train=TensorDataset(torch.from_numpy(s.x_train), torch.from_numpy(y_train)),
            held_out=TensorDataset(torch.from_numpy(s.x_test), torch.from_numpy(s.y_test)),
            definition=s.definition)

    def preprocess(self, train: Dataset[Any]) -> nn.Module:
        return Standardize.fit(column(train))

    def model(self) -> nn.Module:
        h = self.config.hidden
        return nn.Sequential(nn.Linear(FEATURES, h), nn.ReLU(), nn.Linear(h, 2))

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, target)

    def serve(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"probabilities": outputs.softmax(dim=1), "label": outputs.argmax(dim=1)}

    def example_input(self) -> dict[str, torch.Tensor]:
        return {"features": torch.zeros(2, FEATURES)}
