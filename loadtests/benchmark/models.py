"""The benchmark's models as kloop registry versions: the harness's ``tiny`` MLP and ``cnn``
(ResNet-18-style), same definitions and seed as the peers' TorchScript files, exported with a
dynamic batch dimension and published like any trained model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from kloop.artifact import Registry, TensorSpec
from loadtests.benchmark.harness import peer_models

# The harness's request signature: one FP32 input "input-0" (make_payloads.py, grpc_load.py).
INPUT_NAME = "input-0"
OUTPUT_NAME = "output-0"
MODELS = ("tiny", "cnn")


def publish(root: Path, names: tuple[str, ...] = MODELS) -> Registry:
    """Publish each model once (a registry that has it already is left alone)."""
    pm = peer_models()
    registry = Registry(root)
    for name in names:
        if not registry.versions(name):
            publish_module(registry, name, pm.build(name), tuple(pm.SHAPES[name]),
                           params={"seed": 0, "source": "shared/bench/peers/models.py"})
    return registry


def publish_module(registry: Registry, name: str, model: torch.nn.Module,
                   input_shape: tuple[int, ...], *, params: dict[str, object]) -> None:
    """``model`` (one FP32 input of ``input_shape`` per row, one FP32 output) exported with a
    dynamic batch dimension and published as the next version of ``name``, with the
    harness's request signature."""
    example = torch.zeros(2, *input_shape)
    program = torch.export.export(
        model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    with tempfile.TemporaryDirectory() as tmp:
        torch.export.save(program, Path(tmp) / "model.pt2")
        with torch.no_grad():
            classes = model(example).shape[1]
        registry.publish(
            name, tmp, model_file="model.pt2", format="torch.export",
            torch_version=torch.__version__,
            inputs=(TensorSpec(INPUT_NAME, "FP32", (-1, *input_shape)),),
            outputs=(TensorSpec(OUTPUT_NAME, "FP32", (-1, classes)),),
            metrics={}, params=params, data_fingerprint="random-weights",
            run_id=f"bench-{name}",
        )
