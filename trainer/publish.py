"""Publish a finished run to the registry, and load a published version back.

The registry (``kloop.artifact``) owns the layout, hashing and atomic rename; this module owns
what a *trainer* artifact says: its torch.export format, its signature (the contract the server
validates requests against, found from the task's example input and served outputs), the
held-out metrics with how the task judges them, the split fingerprint the gate compares, and
its lineage: the task, its code (digest, or the image it ran in), the config, the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kloop import modelfile
from kloop.artifact import ArtifactCorrupt, Manifest, Registry, TensorSpec
from trainer.rundir import EXPORT_DIR, METRICS_FILE, MODEL_FILE, RESULT_FILE
from trainer.spec import TrainSpec

FORMAT = "torch.export"


def publish(registry: Registry, spec: TrainSpec, run_dir: Path, run_id: str, *,
            image: str | None = None) -> Manifest:
    """Publish ``run_dir/export/`` as the next version of ``spec.model_name``. ``image``: the
    container image the run trained in (a cluster run), recorded in the lineage."""
    run_dir = Path(run_dir)
    export_dir = run_dir / EXPORT_DIR
    metrics_path = run_dir / METRICS_FILE
    result_path = run_dir / RESULT_FILE
    if not (export_dir / MODEL_FILE).is_file() or not metrics_path.is_file() or not result_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no finished run ({EXPORT_DIR}/{MODEL_FILE}, "
                                f"{METRICS_FILE}, {RESULT_FILE})")
    metrics = json.loads(metrics_path.read_text())
    result = json.loads(result_path.read_text())
    task = result["task"]
    signature = result["signature"]
    return registry.publish(
        spec.model_name,
        export_dir,
        model_file=MODEL_FILE,
        format=FORMAT,
        torch_version=torch.__version__,
        inputs=tuple(TensorSpec.from_dict(t) for t in signature["inputs"]),
        outputs=tuple(TensorSpec.from_dict(t) for t in signature["outputs"]),
        metrics=metrics,
        params=spec.to_dict(),
        data_fingerprint=str(metrics["data_fingerprint"]),
        run_id=run_id,
        labels={"task": task["ref"]},
        evaluation=result["evaluation"],
        lineage=lineage(spec, task, metrics, run_id, image),
    )


def lineage(spec: TrainSpec, task: dict[str, Any], metrics: dict[str, Any], run_id: str,
            image: str | None) -> dict[str, Any]:
    code: dict[str, Any]
    if spec.code is not None:
        code = {"kind": "directory", "sha256": spec.code.sha256, "path": spec.code.path}
    elif image is not None:
        code = {"kind": "image", "image": image}
    else:
        code = {"kind": "source file", "sha256": task.get("source_sha256")}
    return {"task": task["target"], "task_ref": task["ref"], "code": code,
            "config": task["config"], "data_fingerprint": metrics["data_fingerprint"],
            "run_id": run_id}


def load_published(registry: Registry, name: str, version: int | str) -> nn.Module:
    """The served module of ``name`` at ``version`` (a number, "latest" or an alias), after
    verifying every file's sha256 against the manifest (``ArtifactCorrupt`` otherwise)."""
    v = registry.resolve(name, version)
    manifest = registry.verify(name, v)
    if manifest.format != FORMAT:
        raise ArtifactCorrupt(f"{name} v{v} is {manifest.format!r}, this loader reads {FORMAT!r}")
    module: nn.Module = modelfile.load_exported(registry.path(name, v) / manifest.model_file)
    return module
