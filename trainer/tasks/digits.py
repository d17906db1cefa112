"""The digits CNN as a task: scikit-learn's 8x8 digits, 10 classes, accuracy.

The CNN has no dropout and no batch norm on purpose: both make each process's computation
depend on its own shard (per-process random masks, per-shard batch statistics), which would
break the 1-process / N-process parity that DDP otherwise guarantees for a fixed global batch.
Images are served as they are trained on: pixels scaled to [0, 1] (``digits_data``).

``shuffle_labels`` permutes the *training* labels (a deliberately bad candidate for demos);
the held-out split and its fingerprint stay the same, so the gate can still compare it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from trainer.task import Datasets, Metric, Task
from trainer.tasks.digits_data import IMAGE_SHAPE, NUM_CLASSES, load_split


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    lr: float = 0.05  # SGD learning rate; tuned for the default global batch of 64
    momentum: float = 0.9  # SGD momentum
    shuffle_labels: bool = False  # permute the training labels: a deliberately bad candidate
    label_seed: int = 0  # the permutation's seed (with shuffle_labels)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


class DigitsCNN(nn.Module):
    """1x8x8 image in [0, 1] -> 10 logits. About 40k parameters: trains in seconds on a CPU."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(IMAGE_SHAPE[0], 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def correct(served: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return (served["label"] == target).float()


def cross_entropy(served: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(served["logits"].float(), target, reduction="none")


class Digits(Task[DigitsConfig]):
    """8x8 digits, 10 classes: ``image`` FP32 [-1, 1, 8, 8] -> ``logits``, ``label``."""

    Config = DigitsConfig
    description = "CNN on scikit-learn's 8x8 digits (10 classes; accuracy)"
    metrics = (
        Metric("accuracy", "higher", correct, threshold=0.5),  # a shuffled-label model scores ~0.1
        Metric("loss", "lower", cross_entropy),
    )
    primary_metric = "accuracy"

    def datasets(self) -> Datasets:
        split = load_split(shuffle_labels=self.config.shuffle_labels,
                           label_seed=self.config.label_seed)
        return Datasets(
            train=_dataset(split.train_images, split.train_labels),
            held_out=_dataset(split.test_images, split.test_labels),
            definition=split.definition.to_dict(),
        )

    def model(self) -> nn.Module:
        return DigitsCNN()

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, target)

    def serve(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": outputs, "label": outputs.argmax(dim=1)}

    def example_input(self) -> dict[str, torch.Tensor]:
        return {"image": torch.zeros(2, *IMAGE_SHAPE, dtype=torch.float32)}

    def optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(parameters, lr=self.config.lr, momentum=self.config.momentum)


def _dataset(images: Any, labels: Any) -> TensorDataset:
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
