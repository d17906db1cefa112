"""The seams of the rollout controller, as Protocols, and the errors that cross them.

The controller (``deploy.controller``) is written against these and nothing concrete:

* ``RolloutStore`` keeps rollouts with optimistic concurrency. Implementations:
  ``deploy.local.rollout_store.SQLiteRolloutStore`` (``<home>/kloop.db``) and
  ``deploy.cluster.cr_store.CRRolloutStore`` (``kloop.dev`` Rollout custom resources).
* ``RolloutBackend`` reads what is true now and performs a few idempotent writes.
  Implementations: ``deploy.local.server_backend.LocalBackend`` (the local kloop server's admin
  API) and ``deploy.cluster.kserve_backend.KServeBackend`` (InferenceServices and Gateway API
  routes; readiness is whatever KServe reports, so it may lag ``ensure_loaded``).
* ``MetricsSource`` gives cumulative per-version samples in a cluster (PromQL or a scrape:
  ``deploy.cluster.prometheus``); locally the backend reads the server's ``/metrics`` itself.
* ``Clock``: time, injected so tests tick through a 30-minute rollout in milliseconds.

Idempotent writes matter because the controller may crash between a write and saving the
rollout's status: the next tick repeats the write, and a write that is already true must be a
no-op, not a second step.

Errors::

    StoreError
    ├── NotFound              no rollout with that id
    └── Conflict              the rollout moved since it was read (generation mismatch)
        └── ActiveRolloutExists   the model already has an active rollout
    BackendError              a backend read or write failed (the cause chained); retried
    └── Refused               the server refused it, and a retry cannot change that: a
                              version whose files fail verification, management disabled
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from deploy.rollout import Rollout, VersionSample, World
from kloop.model_version import Version


class StoreError(Exception):
    """Root of the rollout stores' errors."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class ActiveRolloutExists(Conflict):
    pass


class BackendError(Exception):
    """A backend write or read failed; the cause (server error, connection error) is chained.
    The controller retries it, within the policy's outage bound."""


class Refused(BackendError):
    """The serving side refused a write for a reason a retry cannot change. ``version`` is the
    version it concerned (if one) and ``files`` says whether that version's own files are the
    cause (a hash mismatch, a model file that does not load, a version not in the registry), as
    opposed to the server's configuration (management disabled, several worker processes)."""

    def __init__(self, message: str, *, version: Version | None = None, files: bool = False):
        super().__init__(message)
        self.version = version
        self.files = files


class Clock(Protocol):
    def now(self) -> float:
        """Unix seconds."""
        ...

    def sleep(self, seconds: float) -> None: ...


@runtime_checkable
class RolloutStore(Protocol):
    """Rollouts by id. ``generation`` is the store's concurrency token (opaque to callers)."""

    def create(self, rollout: Rollout) -> Rollout:
        """Store a new rollout; ``Conflict`` when the id exists, ``ActiveRolloutExists`` when
        the model has an active rollout (where the store can tell)."""
        ...

    def get(self, rollout_id: str) -> Rollout:
        """The rollout; ``NotFound`` when there is none."""
        ...

    def save(self, rollout: Rollout, expected_generation: int | str) -> Rollout:
        """Write ``rollout`` if the stored one is still at ``expected_generation``, else
        ``Conflict``; returns it with its new generation."""
        ...

    def list(self, model: str | None = None) -> list[Rollout]:
        """Rollouts, oldest first; only ``model``'s when given."""
        ...

    def active(self, model: str) -> Rollout | None:
        """The model's active (non-terminal) rollout, if any."""
        ...


@runtime_checkable
class RolloutBackend(Protocol):
    def read(self, model: str) -> World:
        """The current world; never raises for an unreachable server (``World.error`` instead)."""
        ...

    def ensure_loaded(self, model: str, version: Version) -> None:
        """Start loading ``version`` unless it already is; ``read().loaded`` says when it is
        ready (at once for a synchronous backend, later for KServe)."""
        ...

    def set_weights(self, model: str, weights: Mapping[Version, int]) -> None:
        """Route ``weights`` (percent, sum 100); nothing happens if they are already in place."""
        ...

    def promote(self, model: str, candidate: Version) -> None:
        """Send 100% to ``candidate`` (the controller then moves the registry's ``champion``
        alias). The previous champion stays loaded at weight 0, so a rollback in the next
        minutes needs no model load; ``retire`` unloads it later."""
        ...

    def retire(self, model: str, version: Version) -> None:
        """Unload a version that no longer takes traffic (the old champion after promotion)."""
        ...

    def rollback(self, model: str, champion: Version | None, candidate: Version) -> None:
        """Send 100% to ``champion`` (if any) and unload ``candidate``. Without a champion the
        candidate stays where it carries traffic: a rollback never leaves a serving model with
        nothing to serve."""
        ...


@runtime_checkable
class MetricsSource(Protocol):
    def samples(self, model: str, versions: Mapping[Version, str | None],
                at: float) -> dict[Version, VersionSample]:
        """A sample per version (a version without series is a measured zero).

        ``versions`` maps version -> that version's scrape base URL (``None`` when unknown; a
        source that needs it raises ``MetricsError``). ``at`` stamps the samples (the
        controller's clock, so windows are measured on one clock). Raises
        ``deploy.rollout.MetricsError`` when it cannot measure.
        """
        ...


__all__ = [
    "ActiveRolloutExists", "BackendError", "Clock", "Conflict", "MetricsSource", "NotFound",
    "Refused", "RolloutBackend", "RolloutStore", "StoreError",
]
