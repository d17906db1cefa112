"""Registry versions for end-to-end tests that need a model but not a training run: the real
digits CNN (seeded, untrained) exported exactly as the trainer exports it."""

from __future__ import annotations

from pathlib import Path

import torch

from kloop.artifact import Manifest, Registry
from trainer.export import export_model
from trainer.models import build_model
from trainer.publish import FORMAT, INPUTS, OUTPUTS


def publish_exported(root: Path, name: str, seed: int, accuracy: float, tmp: Path) -> Manifest:
    torch.manual_seed(seed)
    model_path = export_model(build_model("digits_cnn"), tmp / f"run-{seed}")
    return Registry(root).publish(
        name, model_path.parent, model_file=model_path.name, format=FORMAT, torch_version=torch.__version__,
        inputs=INPUTS, outputs=OUTPUTS, metrics={"accuracy": accuracy, "loss": 1.0},
        params={"seed": seed}, data_fingerprint="e2e-fixture", run_id=f"fixture-{seed}",
    )


def publish_dummy(root: Path, name: str, count: int) -> list[Manifest]:
    """Versions whose model file is not a model: for commands that only read manifests."""
    src = root.parent / "dummy-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "model.pt2").write_bytes(b"not a model")
    return [Registry(root).publish(name, src, model_file="model.pt2", format=FORMAT,
                                   torch_version=torch.__version__, inputs=INPUTS, outputs=OUTPUTS,
                                   metrics={"accuracy": 0.9}, params={}, data_fingerprint="x",
                                   run_id=f"dummy-{i}") for i in range(count)]
