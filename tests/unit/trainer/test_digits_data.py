"""The digits task's held-out split: deterministic, disjoint, fingerprinted (by kloop's generic
fingerprint over the task's datasets), untouched by shuffle_labels."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import TensorDataset

from trainer.data import fingerprint
from trainer.tasks.digits import Digits, DigitsConfig
from trainer.tasks.digits_data import NUM_CLASSES, SplitDefinition, load_split


def _fp(definition: SplitDefinition, images: np.ndarray, labels: np.ndarray) -> str:
    return fingerprint(definition.to_dict(), TensorDataset(torch.from_numpy(images), torch.from_numpy(labels)))


def _task_fp(**config: object) -> str:
    data = Digits(DigitsConfig(**config)).datasets()  # type: ignore[arg-type]
    return fingerprint(data.definition, data.held_out)


def test_split_is_deterministic_and_fingerprint_stable() -> None:
    a, b = load_split(), load_split()
    assert _task_fp() == _task_fp()
    assert len(_task_fp()) == 64
    np.testing.assert_array_equal(a.test_images, b.test_images)
    np.testing.assert_array_equal(a.train_labels, b.train_labels)


def test_shapes_dtypes_and_scaling() -> None:
    s = load_split()
    assert s.train_images.shape == (s.num_train, 1, 8, 8) and s.train_images.dtype == np.float32
    assert s.test_labels.dtype == np.int64
    assert s.num_train + s.num_test == 1797
    assert abs(s.num_test - 0.25 * 1797) < 1
    assert 0.0 <= s.train_images.min() and s.train_images.max() <= 1.0


def test_split_is_disjoint_and_stratified() -> None:
    s = load_split()
    assert not set(s.train_index.tolist()) & set(s.test_index.tolist())
    assert sorted([*s.train_index.tolist(), *s.test_index.tolist()]) == list(range(1797))
    counts = np.bincount(s.test_labels, minlength=NUM_CLASSES)
    assert counts.min() >= 40 and counts.max() <= 50  # ~25 % of each class (174..183 per class)


def test_fingerprint_changes_when_test_data_or_definition_changes() -> None:
    s = load_split()
    base = _fp(s.definition, s.test_images, s.test_labels)
    assert base == _task_fp()  # the task hands kloop exactly this split
    images = s.test_images.copy()
    images[0, 0, 0, 0] += 1.0 / 16
    assert _fp(s.definition, images, s.test_labels) != base
    labels = s.test_labels.copy()
    labels[0] = (labels[0] + 1) % NUM_CLASSES
    assert _fp(s.definition, s.test_images, labels) != base
    other = load_split(dataclasses.replace(SplitDefinition(), split_seed=1))
    assert _fp(other.definition, other.test_images, other.test_labels) != base
    assert _fp(dataclasses.replace(s.definition, test_fraction=0.3), s.test_images, s.test_labels) != base


def test_shuffle_labels_changes_training_labels_only() -> None:
    clean, bad = load_split(), load_split(shuffle_labels=True, label_seed=3)
    assert _task_fp(shuffle_labels=True, label_seed=3) == _task_fp()
    np.testing.assert_array_equal(bad.test_labels, clean.test_labels)
    np.testing.assert_array_equal(bad.train_images, clean.train_images)
    assert (bad.train_labels != clean.train_labels).mean() > 0.5
    np.testing.assert_array_equal(np.sort(bad.train_labels), np.sort(clean.train_labels))
