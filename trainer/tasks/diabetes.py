"""A regression with two named inputs: scikit-learn's diabetes set (442 patients; disease
progression a year on, 25..346). Judged by RMSE: lower is better.

``demographics`` FP32 [-1, 4] (age, sex, bmi, blood pressure) and ``serum`` FP32 [-1, 6]
(six blood serum measurements), raw as the data set has them (``scaled=False``), each
standardized in the served graph -> ``progression`` FP32 [-1], in the target's own units.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import Dataset

from trainer.task import Datasets, Metric, Task
from trainer.tasks.tabular import Standardize, column, split

DEMOGRAPHICS, SERUM = 4, 6


@dataclasses.dataclass(frozen=True)
class DiabetesConfig:
    lr: float = 0.01  # Adam's learning rate
    hidden: int = 16  # units of the hidden layer (0: a linear model)
    shuffle_targets: bool = False  # permute the training targets: a deliberately bad candidate
    target_seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.hidden < 0:
            raise ValueError(f"lr must be > 0 and hidden >= 0, got lr={self.lr}, hidden={self.hidden}")


class Patients(Dataset[tuple[dict[str, torch.Tensor], torch.Tensor]]):
    """Items ``({"demographics": [4], "serum": [6]}, progression)``."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.demographics = torch.from_numpy(np.ascontiguousarray(x[:, :DEMOGRAPHICS]))
        self.serum = torch.from_numpy(np.ascontiguousarray(x[:, DEMOGRAPHICS:]))
        self.y = torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"demographics": self.demographics[i], "serum": self.serum[i]}, self.y[i]


class StandardizeBoth(nn.Module):
    def __init__(self, demographics: Standardize, serum: Standardize) -> None:
        super().__init__()
        self.demographics, self.serum = demographics, serum

    def forward(self, demographics: torch.Tensor, serum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.demographics(demographics), self.serum(serum)


class Regressor(nn.Module):
    y_mean: torch.Tensor
    y_std: torch.Tensor

    """Both standardized inputs -> progression, in the target's units: the network predicts
    the standardized target and the last step (buffers from the training split) undoes it."""

    def __init__(self, hidden: int, y_mean: float, y_std: float) -> None:
        super().__init__()
        n = DEMOGRAPHICS + SERUM
        self.net = (nn.Linear(n, 1) if hidden == 0 else
                    nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, 1)))
        self.register_buffer("y_mean", torch.tensor(y_mean, dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor(y_std, dtype=torch.float32))

    def forward(self, demographics: torch.Tensor, serum: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.net(torch.cat([demographics, serum], dim=1)).squeeze(1)
        return z * self.y_std + self.y_mean


def squared_error(served: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return (served["progression"] - target) ** 2


def absolute_error(served: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return (served["progression"] - target).abs()


class Diabetes(Task[DiabetesConfig]):
    """Disease progression from demographics and serum measurements."""

    Config = DiabetesConfig
    description = "regression on scikit-learn's diabetes set, two named inputs (RMSE, lower is better)"
    metrics = (
        # RMSE: the mean of squared errors, then its root. Predicting the mean scores ~77;
        # a fitted linear model ~54.
        Metric("rmse", "lower", squared_error, finalize=math.sqrt, threshold=70.0),
        Metric("mae", "lower", absolute_error),
    )
    primary_metric = "rmse"

    def setup(self) -> None:
        raw = load_diabetes(scaled=False)
        self.split = split("sklearn.datasets.load_diabetes(scaled=False)",
                           raw.data.astype(np.float32), raw.target.astype(np.float32),
                           stratify=False)
        self.y_mean = float(self.split.y_train.mean())
        self.y_std = float(self.split.y_train.std())

    def datasets(self) -> Datasets:
        s, y_train = self.split, self.split.y_train
        if self.config.shuffle_targets:
            y_train = np.random.default_rng(self.config.target_seed).permutation(y_train)
        return Datasets(train=Patients(s.x_train, y_train), held_out=Patients(s.x_test, s.y_test),
                        definition=s.definition)

    def preprocess(self, train: Dataset[Any]) -> nn.Module:
        return StandardizeBoth(Standardize.fit(column(train, "demographics")),
                               Standardize.fit(column(train, "serum")))

    def model(self) -> nn.Module:
        return Regressor(self.config.hidden, self.y_mean, self.y_std)

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (((outputs - target) / self.y_std) ** 2).mean()  # MSE in standard deviations

    def serve(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"progression": outputs}

    def example_input(self) -> dict[str, torch.Tensor]:
        return {"demographics": torch.zeros(2, DEMOGRAPHICS), "serum": torch.zeros(2, SERUM)}
