"""Publish a finished run to the registry, and load a published version back.

The registry (``kloop.artifact``) owns the layout, hashing and atomic rename; this module owns
what a *trainer* artifact says: its torch.export format, its signature (the contract the server
validates requests against), the held-out metrics and the split fingerprint the evaluation gate
compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kloop import modelfile
from kloop.artifact import ArtifactCorrupt, Manifest, Registry, TensorSpec
from trainer.data import IMAGE_SHAPE, NUM_CLASSES
from trainer.rundir import EXPORT_DIR, METRICS_FILE, MODEL_FILE
from trainer.spec import TrainSpec

FORMAT = "torch.export"
INPUTS = (TensorSpec("image", "FP32", (-1, *IMAGE_SHAPE)),)
OUTPUTS = (
    TensorSpec("logits", "FP32", (-1, NUM_CLASSES)),
    TensorSpec("label", "INT64", (-1,)),
)


def publish(registry: Registry, spec: TrainSpec, run_dir: Path, run_id: str) -> Manifest:
    """Publish ``run_dir/export/`` as the next version of ``spec.model_name``."""
    run_dir = Path(run_dir)
    export_dir = run_dir / EXPORT_DIR
    metrics_path = run_dir / METRICS_FILE
    if not (export_dir / MODEL_FILE).is_file() or not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no finished run ({EXPORT_DIR}/{MODEL_FILE}, {METRICS_FILE})")
    metrics = json.loads(metrics_path.read_text())
    return registry.publish(
        spec.model_name,
        export_dir,
        model_file=MODEL_FILE,
        format=FORMAT,
        torch_version=torch.__version__,
        inputs=INPUTS,
        outputs=OUTPUTS,
        metrics=metrics,
        params=spec.to_dict(),
        data_fingerprint=str(metrics["data_fingerprint"]),
        run_id=run_id,
        labels={"arch": spec.arch},
    )


def load_published(registry: Registry, name: str, version: int | str) -> nn.Module:
    """The served module of ``name`` at ``version`` (a number, "latest" or an alias), after
    verifying every file's sha256 against the manifest (``ArtifactCorrupt`` otherwise)."""
    v = registry.resolve(name, version)
    manifest = registry.verify(name, v)
    if manifest.format != FORMAT:
        raise ArtifactCorrupt(f"{name} v{v} is {manifest.format!r}, this loader reads {FORMAT!r}")
    module: nn.Module = modelfile.load_exported(registry.path(name, v) / manifest.model_file)
    return module
