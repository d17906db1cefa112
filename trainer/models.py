"""Architectures by name, and the serving wrapper.

Why a registry of names: a ``TrainSpec`` names its architecture (``"digits_cnn"``) as plain data,
so the same spec builds the same network on a laptop and in a pod without pickling classes.

The CNN has no dropout and no batch norm on purpose: both make each process's computation
depend on its own shard (per-process random masks, per-shard batch statistics), which would
break the 1-process / N-process parity that DDP otherwise guarantees for a fixed global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trainer.data import IMAGE_SHAPE, NUM_CLASSES


class DigitsCNN(nn.Module):
    """1x8x8 image -> 10 logits. About 40k parameters: trains in seconds on a CPU."""

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


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "digits_cnn": DigitsCNN,
}


def build_model(arch: str) -> nn.Module:
    """A fresh model for ``arch``; initialise the RNG first for reproducible weights."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}") from None
    return factory()


class ServingWrapper(nn.Module):
    """What is exported for serving: ``image -> (logits, label)``, matching the published
    signature (``logits`` FP32 [-1, 10], ``label`` INT64 [-1])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, logits.argmax(dim=1)
