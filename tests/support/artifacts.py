"""Registry versions for end-to-end tests that need a model but not a training run: the real
digits task's served graph (seeded, untrained) exported exactly as the trainer exports it
(``trainer.task_check.build_graph`` + ``trainer.served.export``), with the task's signature and
evaluation in the manifest."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kloop.artifact import Manifest, Registry
from trainer import served
from trainer.data import fingerprint
from trainer.publish import FORMAT
from trainer.task_check import ResolvedTask, Signature, build_graph, resolve

TASK = "digits"


@functools.cache
def digits() -> tuple[ResolvedTask, Signature]:
    """The digits task, resolved once per process (resolving exports a graph: seconds)."""
    return resolve(TASK, {})


@functools.cache
def digits_fingerprint() -> str:
    """The fingerprint of the digits task's held-out split, as training records it."""
    data = digits()[0].instance().datasets()
    return fingerprint(data.definition, data.held_out)


def export_digits(seed: int, out_dir: Path) -> Path:
    """An untrained digits graph of ``seed``, exported to ``out_dir/model.pt2``."""
    rt, _ = digits()
    task = rt.instance()
    data = task.datasets()
    example = dict(task.example_input())
    torch.manual_seed(seed)
    graph = build_graph(task, data.train, example, what=rt.cls.__name__)
    return served.save(served.export(graph, example), out_dir / "model.pt2")


def publish_exported(root: Path, name: str, seed: int, accuracy: float, tmp: Path, *,
                     data_fingerprint: str = "e2e-fixture") -> Manifest:
    rt, sig = digits()
    model_path = export_digits(seed, tmp / f"run-{seed}")
    return Registry(root).publish(
        name, model_path.parent, model_file=model_path.name, format=FORMAT, torch_version=torch.__version__,
        inputs=sig.inputs, outputs=sig.outputs, metrics={"accuracy": accuracy, "loss": 1.0},
        params={"seed": seed}, data_fingerprint=data_fingerprint, run_id=f"fixture-{seed}",
        labels={"task": TASK}, evaluation=rt.evaluation(),
    )


def publish_dummy(root: Path, name: str, count: int) -> list[Manifest]:
    """Versions whose model file is not a model: for commands that only read manifests."""
    rt, sig = digits()
    src = root.parent / "dummy-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "model.pt2").write_bytes(b"not a model")
    return [Registry(root).publish(name, src, model_file="model.pt2", format=FORMAT,
                                   torch_version=torch.__version__, inputs=sig.inputs,
                                   outputs=sig.outputs, metrics={"accuracy": 0.9}, params={},
                                   data_fingerprint="x", run_id=f"dummy-{i}",
                                   evaluation=rt.evaluation()) for i in range(count)]
