"""Checkpoints (each epoch, and every N steps when asked): written atomically by rank 0, read
safely by every rank.

Why this shape:

* A pod can be killed at any instant (``restartPolicy: OnFailure`` then restarts it with
  ``--resume``), so a checkpoint is written to a temporary file, fsynced, and ``os.replace``d
  over the previous one: a reader sees the old checkpoint or the new one, never half of one.
* Only state dicts, tensors and plain numbers are stored, and loading uses
  ``torch.load(weights_only=True)``: a checkpoint file cannot run code.
* The checkpoint records what defines the optimisation (the task, its config, the seed and the
  global batch); resuming with a different one is refused instead of silently mixing runs.
  ``epochs`` is deliberately not among them: extending a run is what ``--resume`` is for.
* ``step`` is the optimizer steps done in epoch ``epoch + 1`` (0 at an epoch's end): a restart
  skips that many batches of the epoch's (seeded, world-size-independent) order and goes on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from kloop.fsutil import atomic_path
from trainer.spec import TrainSpec


class CheckpointMismatch(ValueError):
    """The checkpoint was written by a run with a different training identity."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """State after ``epoch`` (1-based) completed and ``step`` steps of the next one."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor
    identity: dict[str, Any]
    step: int = 0


def identity(spec: TrainSpec, target: str, config: dict[str, Any]) -> dict[str, Any]:
    """What must match to resume: the task (``module:Class``), its full config (defaults
    included), the seed and the global batch."""
    return {"task": target, "config": config, "global_batch_size": spec.global_batch_size,
            "seed": spec.seed}


def save(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (temp file in the same directory + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "epoch": ckpt.epoch,
        "model": ckpt.model,
        "optimizer": ckpt.optimizer,
        "rng": ckpt.rng,
        "identity": ckpt.identity,
        "step": ckpt.step,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: Path, want: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint at ``path``, or None when there is none yet (a first start)."""
    if not path.is_file():
        return None
    raw = torch.load(path, map_location="cpu", weights_only=True)
    ckpt = Checkpoint(
        epoch=int(raw["epoch"]), model=raw["model"], optimizer=raw["optimizer"],
        rng=raw["rng"], identity=dict(raw["identity"]), step=int(raw.get("step", 0)),
    )
    diff = {k: (ckpt.identity.get(k), v) for k, v in want.items() if ckpt.identity.get(k) != v}
    if diff:
        raise CheckpointMismatch(
            f"checkpoint {path} was written by a different run (field: (checkpoint, spec)): {diff}"
        )
    return ckpt
