"""The local backend (``deploy.ports.RolloutBackend``): drives the kloop model server through
its admin API.

The admin client is injected (``serving.client.AdminClient(base_url, token)`` in production),
so this module never imports the server's package at import time; its error type is looked up
lazily and translated into ``BackendError`` with the cause chained.

Every write reads first and does nothing when the world already matches: the controller may
repeat a write after a crash, and a repeated write must not be a second action.

A refusal a retry cannot change becomes ``deploy.ports.Refused``: 422 (the version's files fail
verification or do not load) and 404 (no such version) on a load blame that version's files;
401/403/409 (a wrong token, management disabled, a multi-worker server) blame the server's
configuration. A connection error, a 5xx or a 400 (the world changed under the write) is a
plain ``BackendError``, retried within the rollout's outage bound.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from deploy.ports import BackendError, Refused
from deploy.rollout import MetricsError, World, normalized, samples_for
from kloop.model_version import Version


class AdminAPI(Protocol):
    """The part of ``serving.client.AdminClient`` this backend uses."""

    def models(self) -> Any: ...
    def load(self, m: str, v: Version) -> Any: ...
    def unload(self, m: str, v: Version) -> Any: ...
    def traffic(self, m: str) -> Mapping[Version, int]: ...
    def set_traffic(self, m: str, weights: Mapping[Version, int]) -> Any: ...
    def metrics_text(self) -> str: ...


def _admin_errors() -> tuple[type[BaseException], ...]:
    """Errors the admin client raises for a refused or failed call (connection errors are
    ``OSError``, which includes ``urllib.error.URLError``)."""
    try:
        from serving.client import AdminError
    except ImportError:  # a controller image without the server package
        return (OSError,)
    return (AdminError, OSError)


class LocalBackend:
    def __init__(
        self,
        admin: AdminAPI,
        now: Callable[[], float] = time.time,
        admin_errors: tuple[type[BaseException], ...] | None = None,
    ):
        """``admin_errors``: what the admin client raises for a failed call; by default
        ``serving.client.AdminError`` and ``OSError``."""
        self.admin = admin
        self._now = now
        self._errors = admin_errors if admin_errors is not None else _admin_errors()

    # ---- reading ------------------------------------------------------------------------

    def read(self, model: str) -> World:
        try:
            weights = self._traffic(model)
            loaded = loaded_versions(self.admin.models(), model)
            text = self.admin.metrics_text()
        except self._errors as e:
            return World(weights={}, loaded=frozenset(), samples=None,
                         error=f"admin API: {type(e).__name__}: {e}")
        try:
            samples = samples_for(text, model, loaded | set(weights), self._now())
        except MetricsError as e:
            return World(weights=weights, loaded=loaded, samples=None, error=str(e))
        return World(weights=weights, loaded=loaded, samples=samples)

    # ---- writing ------------------------------------------------------------------------

    def ensure_loaded(self, model: str, version: Version) -> None:
        with self._translated(f"load {model} v{version}", version=version, load=True):
            if version not in loaded_versions(self.admin.models(), model):
                self.admin.load(model, version)

    def set_weights(self, model: str, weights: Mapping[Version, int]) -> None:
        if sum(weights.values()) != 100:
            raise ValueError(f"weights {dict(weights)} do not sum to 100")
        with self._translated(f"set traffic of {model} to {dict(weights)}"):
            current = self._traffic(model)
            if normalized(current) != normalized(weights):
                # Name every version the server routes to, so none keeps a stale weight.
                full = {v: 0 for v in current} | {v: int(w) for v, w in weights.items()}
                self.admin.set_traffic(model, full)

    def promote(self, model: str, candidate: Version) -> None:
        self.set_weights(model, {candidate: 100})

    def retire(self, model: str, version: Version) -> None:
        with self._translated(f"unload {model} v{version}"):
            if self._traffic(model).get(version, 0) > 0:
                raise BackendError(f"{model} v{version} still takes traffic; not unloading it")
            if version in loaded_versions(self.admin.models(), model):
                self.admin.unload(model, version)

    def rollback(self, model: str, champion: Version | None, candidate: Version) -> None:
        if champion is not None:
            self.ensure_loaded(model, champion)
            self.set_weights(model, {champion: 100})
        else:
            with self._translated(f"read the traffic of {model}"):
                if self._traffic(model).get(candidate, 0) > 0:
                    return  # all the model has: it stays serving rather than go offline
        self._unload(model, candidate)

    def _traffic(self, model: str) -> dict[Version, int]:
        """Actual weights; a model the server does not know (404: nothing loaded yet, e.g.
        before a first version's rollout) routes nothing, which is an answer, not an error."""
        try:
            return {int(v): int(w) for v, w in self.admin.traffic(model).items()}
        except self._errors as e:
            if getattr(e, "status", None) == 404:
                return {}
            raise

    def _unload(self, model: str, version: Version) -> None:
        with self._translated(f"unload {model} v{version}"):
            if version in loaded_versions(self.admin.models(), model):
                self.admin.unload(model, version)

    def _translated(self, what: str, *, version: Version | None = None,
                    load: bool = False) -> _Translate:
        return _Translate(what, self._errors, version, load)


# HTTP statuses of the admin API that a retry cannot change, and whether they blame the
# version's own files (on a load) rather than the server's configuration.
_FILES = (404, 422)
_CONFIG = (401, 403, 409)


class _Translate:
    """Turn the admin client's errors into ``BackendError`` or ``Refused`` (cause chained)."""

    def __init__(self, what: str, errors: tuple[type[BaseException], ...],
                 version: Version | None, load: bool):
        self.what, self.errors, self.version, self.load = what, errors, version, load

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type[BaseException] | None, e: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        if e is None or not isinstance(e, self.errors) or isinstance(e, BackendError):
            return
        status = getattr(e, "status", None)
        message = f"{self.what}: {type(e).__name__}: {e}"
        if status in _CONFIG or (self.load and status in _FILES):
            raise Refused(message, version=self.version,
                          files=self.load and status in _FILES) from e
        raise BackendError(message) from e


def loaded_versions(models: Any, model: str) -> frozenset[Version]:
    """Versions of ``model`` in the admin API's ``models()`` answer.

    Tolerates the shapes a models listing plausibly takes -- ``{model: [versions]}``,
    ``{model: {"versions": [...]}}``, ``[{"name": m, "version": v}]`` or
    ``[{"name": m, "versions": [...]}]``, versions as ``"1"`` or ``{"version": "1"}`` -- so the
    backend does not break on a cosmetic change of the server's listing.
    """
    if isinstance(models, Mapping) and "models" in models and model not in models:
        models = models["models"]
    entries: Iterable[Any]
    if isinstance(models, Mapping):
        entry = models.get(model)
        entries = [] if entry is None else [{"name": model, "versions": entry}]
    else:
        entries = [e for e in models or [] if isinstance(e, Mapping) and e.get("name") == model]
    out: set[Version] = set()
    for e in entries:
        vs = e.get("versions", e.get("version"))
        if isinstance(vs, Mapping):
            vs = vs.get("versions", list(vs))
        for v in vs if isinstance(vs, list | tuple | set | frozenset) else [vs]:
            if isinstance(v, Mapping):
                v = v.get("version", v.get("name"))
            if v is not None and str(v).isascii() and str(v).isdecimal():
                out.add(int(str(v)))
    return frozenset(out)
