"""The digits data set and its fixed held-out split (the digits task's data).

Why the split is fixed: the rollout's evaluation gate compares a candidate with the champion,
which is only fair on the same examples. The split is therefore not a training parameter: its
seed and fraction are constants here, recorded in ``SplitDefinition``, which the task hands to
kloop's fingerprint (``trainer.data.fingerprint``: that definition AND the held-out bytes).

``shuffle_labels`` permutes the *training* labels only (a deliberately bad candidate for demos);
the held-out split and its fingerprint stay the same, so the gate can still compare it.

The data is scikit-learn's bundled ``load_digits`` (1,797 8x8 images, 10 classes): no download.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DATASET = "sklearn.datasets.load_digits"
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)  # channels, height, width
SPLIT_SEED = 20_240_611  # fixed: the held-out split must not move between candidates
TEST_FRACTION = 0.25
_PIXEL_MAX = 16.0  # digits pixels are integers 0..16


@dataclasses.dataclass(frozen=True)
class SplitDefinition:
    """What defines the held-out split; hashed into the fingerprint (``trainer.data``)."""

    dataset: str = DATASET
    test_fraction: float = TEST_FRACTION
    split_seed: int = SPLIT_SEED
    stratified: bool = True
    scaling: str = "pixel/16"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class DigitsSplit:
    """Train and test arrays: images float32 [N, 1, 8, 8] in [0, 1], labels int64 [N]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    definition: SplitDefinition
    train_index: np.ndarray  # rows of the original data set in the training split (sorted)
    test_index: np.ndarray  # rows of the original data set in the held-out split (sorted)
    labels_shuffled: bool = False

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_labels.shape[0])


def load_split(
    definition: SplitDefinition = SplitDefinition(),
    *,
    shuffle_labels: bool = False,
    label_seed: int = 0,
) -> DigitsSplit:
    """The held-out split of the digits data set, deterministic for a given ``definition``.

    ``shuffle_labels`` permutes the training labels with ``label_seed``; the test set does not
    change.
    """
    if definition.dataset != DATASET:
        raise ValueError(f"unknown dataset {definition.dataset!r}; this module provides {DATASET!r}")
    if not 0.0 < definition.test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {definition.test_fraction}")
    raw = load_digits()
    images = (raw.images.astype(np.float32) / _PIXEL_MAX).reshape(-1, *IMAGE_SHAPE)
    labels = raw.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(labels.shape[0]),
        test_size=definition.test_fraction,
        random_state=definition.split_seed,
        stratify=labels if definition.stratified else None,
    )
    # Sorted indices: the arrays (and the fingerprint) do not depend on the order sklearn returns.
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    test_images, test_labels = images[idx_test], labels[idx_test]
    train_labels = labels[idx_train]
    if shuffle_labels:
        train_labels = np.random.default_rng(label_seed).permutation(train_labels)
    return DigitsSplit(
        train_images=np.ascontiguousarray(images[idx_train]),
        train_labels=np.ascontiguousarray(train_labels),
        test_images=np.ascontiguousarray(test_images),
        test_labels=np.ascontiguousarray(test_labels),
        definition=definition,
        train_index=idx_train,
        test_index=idx_test,
        labels_shuffled=shuffle_labels,
    )
