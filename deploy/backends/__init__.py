"""The seam between the rollout controller and whatever serves the model.

A backend answers one question (``read``: what is true now) and performs a few idempotent
writes. Idempotent matters because the controller may crash between a write and saving the
rollout's status: the next tick repeats the write, and a write that is already true must be a
no-op, not a second step.

Implementations: ``deploy.backends.local.LocalBackend`` (the local kloop server's admin API)
and ``deploy.backends.kserve.KServeBackend`` (InferenceServices and Gateway API routes, through
``deploy.kube``; readiness is whatever KServe reports, so it may lag ``ensure_loaded``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from deploy.metrics import VersionSample
from kloop.artifact import ArtifactError, Registry


class BackendError(Exception):
    """A backend write or read failed; the cause (server error, connection error) is chained."""


@dataclasses.dataclass(frozen=True)
class World:
    """What a backend saw for one model at one moment.

    ``samples`` holds one cumulative metrics sample per loaded version; it is ``None`` and
    ``error`` says why when the metrics could not be read. ``weights`` are the serving side's
    actual traffic weights (percent, summing to 100), read before acting so the controller
    never trusts its own memory of what it wrote. ``loaded`` are the versions READY to serve
    (a backend that loads asynchronously reports a version only once it is); ``failed`` maps a
    version that will not become ready without a new deployment (KServe's ``FailedToLoad``) to
    why, so the rollout gives up at once instead of waiting for its deadline.
    """

    weights: Mapping[str, int]
    loaded: frozenset[str]
    samples: Mapping[str, VersionSample] | None
    error: str | None = None
    failed: Mapping[str, str] = dataclasses.field(default_factory=dict)


@runtime_checkable
class RolloutBackend(Protocol):
    def read(self, model: str) -> World:
        """The current world; never raises for an unreachable server (``World.error`` instead)."""
        ...

    def ensure_loaded(self, model: str, version: str) -> None:
        """Start loading ``version`` unless it already is; ``read().loaded`` says when it is
        ready (at once for a synchronous backend, later for KServe)."""
        ...

    def set_weights(self, model: str, weights: Mapping[str, int]) -> None:
        """Route ``weights`` (percent, sum 100); nothing happens if they are already in place."""
        ...

    def promote(self, model: str, candidate: str) -> None:
        """Send 100% to ``candidate`` and point the registry's ``champion`` alias at it.

        The previous champion stays loaded at weight 0, so a rollback in the next minutes needs
        no model load; ``retire`` unloads it later.
        """
        ...

    def retire(self, model: str, version: str) -> None:
        """Unload a version that no longer takes traffic (the old champion after promotion)."""
        ...

    def rollback(self, model: str, champion: str | None, candidate: str) -> None:
        """Send 100% to ``champion`` (if any) and unload ``candidate``."""
        ...


def move_champion(registry: Registry, model: str, candidate: str) -> None:
    """Point the registry's ``champion`` alias at ``candidate`` and drop its ``candidate``
    alias (idempotent): the registry half of a promotion, the same for every backend."""
    try:
        if registry.alias(model, "champion") != int(candidate):
            registry.set_alias(model, "champion", int(candidate))
        if registry.alias(model, "candidate") == int(candidate):
            registry.remove_alias(model, "candidate")
    except (ArtifactError, OSError) as e:
        raise BackendError(f"moving {model}'s champion alias to {candidate}: {e}") from e


def normalized(weights: Mapping[str, int]) -> dict[str, int]:
    """Weights without zero entries: ``{"2": 100, "1": 0}`` and ``{"2": 100}`` route the same."""
    return {v: int(w) for v, w in sorted(weights.items()) if int(w) != 0}


__all__ = ["BackendError", "RolloutBackend", "World", "normalized"]
