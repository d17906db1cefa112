"""Manifests for the gate's tests: real ``kloop.artifact.Manifest`` objects, only the fields the
gate reads varied."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kloop.artifact import Manifest, TensorSpec

IMAGE = (TensorSpec("image", "FP32", (-1, 1, 8, 8)),)
LOGITS = (TensorSpec("logits", "FP32", (-1, 10)),)


def manifest(metrics: Mapping[str, Any], *, evaluation: Mapping[str, Any] | None = None,
             fingerprint: str = "fp", inputs: tuple[TensorSpec, ...] = IMAGE,
             version: int = 1) -> Manifest:
    return Manifest(
        name="m", version=version, created=0.0, framework="pytorch", torch_version="2",
        format="torch.export", model_file="model.pt2", inputs=inputs, outputs=LOGITS,
        metrics=dict(metrics), params={}, data_fingerprint=fingerprint, run_id="r",
        files={"model.pt2": "0" * 64}, evaluation=dict(evaluation or {}),
    )


def declared(primary: str, **directions: str | tuple[str, float]) -> dict[str, Any]:
    """An ``evaluation`` declaration: ``declared("rmse", rmse=("lower", 60.0), mae="lower")``."""
    metrics: dict[str, Any] = {}
    for name, d in directions.items():
        direction, threshold = d if isinstance(d, tuple) else (d, None)
        metrics[name] = {"direction": direction, "threshold": threshold}
    return {"primary": primary, "metrics": metrics}
