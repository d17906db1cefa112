"""Evaluation on the held-out split.

``evaluate`` accepts any module mapping images to logits or to ``(logits, label)``: the eager
model during training, and the exported program's ``.module()`` afterwards, so the metrics that
get published are measured on the artifact that gets served.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trainer.data import NUM_CLASSES, DigitsSplit

EVAL_BATCH = 512  # images per forward pass; bounds memory, not results


@torch.no_grad()
def predict_logits(module: nn.Module | torch.fx.GraphModule, images: np.ndarray) -> torch.Tensor:
    """Logits for ``images`` (float32 [N, 1, 8, 8]), computed in batches on the CPU."""
    if isinstance(module, nn.Module) and not isinstance(module, torch.fx.GraphModule):
        module.eval()
    x = torch.from_numpy(images)
    chunks = []
    for start in range(0, x.shape[0], EVAL_BATCH):
        out = module(x[start : start + EVAL_BATCH])
        chunks.append(out[0] if isinstance(out, tuple | list) else out)
    return torch.cat(chunks).float()


def evaluate(module: nn.Module, split: DigitsSplit) -> dict[str, Any]:
    """accuracy, loss (mean cross-entropy), per_class_accuracy, num_examples, data_fingerprint."""
    logits = predict_logits(module, split.test_images)
    labels = torch.from_numpy(split.test_labels)
    predicted = logits.argmax(dim=1)
    correct = predicted == labels
    per_class = [
        float(correct[labels == c].float().mean()) if bool((labels == c).any()) else float("nan")
        for c in range(NUM_CLASSES)
    ]
    return {
        "accuracy": float(correct.float().mean()),
        "loss": float(F.cross_entropy(logits, labels)),
        "per_class_accuracy": per_class,
        "num_examples": int(labels.shape[0]),
        "data_fingerprint": split.fingerprint,
    }
