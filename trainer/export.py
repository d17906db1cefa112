"""Export the trained model for serving with ``torch.export``.

Why ``torch.export``: the artifact is a graph plus weights that loads without unpickling
arbitrary objects and without this package's classes, so the server needs no trainer code.
The batch dimension is dynamic (1 or more, no upper bound, as the published signature's -1
says), so the server's dynamic batcher can send any batch size through one program. Loading
goes through ``kloop.modelfile``, which refuses archive entries that torch would unpickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kloop import modelfile
from kloop.fsutil import atomic_path
from trainer.data import IMAGE_SHAPE
from trainer.models import ServingWrapper
from trainer.rundir import EXPORT_DIR, MODEL_FILE


def export_model(model: nn.Module, run_dir: Path) -> Path:
    """Export ``model`` wrapped as ``image -> (logits, label)`` to ``run_dir/export/model.pt2``."""
    wrapper = ServingWrapper(model).eval().cpu()
    example = torch.zeros(2, *IMAGE_SHAPE, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(wrapper, (example,), dynamic_shapes=({0: batch},))
    out = run_dir / EXPORT_DIR / MODEL_FILE
    with atomic_path(out, suffix=".pt2") as tmp:
        torch.export.save(program, tmp)
    return out


def load_exported(path: Path) -> nn.Module:
    """The callable module of an exported program (no trainer classes needed)."""
    module: nn.Module = modelfile.load_exported(path)
    return module
