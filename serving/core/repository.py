"""The model repository: which versions of which models are loaded, and how traffic splits.

Several versions of a model live at once so a canary can take a share of traffic next to the
champion. Routing is per request: a request naming a version is pinned to it; one that does
not is sent to a version drawn by the model's traffic weights (integers summing to 100, the
unit a rollout controller speaks). The random source is injected so tests can pin the draw.

Loading reads a ``kloop.artifact.Registry``: ``verify`` checks the sha256 of every file first,
then the archive is checked entry by entry (``kloop.modelfile``: nothing in it may need
unpickling) and only then rebuilt with ``torch.export.load``.

Loads are slow and blocking (hashing, deserialising): callers run ``load`` off the event loop.
A lock keeps routing consistent with concurrent management changes; a route only reads.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from kloop.artifact import (
    ArtifactCorrupt,
    ArtifactError,
    Manifest,
    Registry,
    VersionNotFound,
    verify_dir,
)
from serving.core.batching import BatchPolicy
from serving.core.errors import (
    ArtifactRejected,
    Conflict,
    InvalidInput,
    ModelNotFound,
)
from serving.core.runtime import RuntimeOptions, prepare

SUPPORTED_FORMAT = "torch.export"
TOTAL_WEIGHT = 100
FIXED = ("this server serves one fixed version from its model directory (--model-dir), as a "
         "KServe runtime does; roll out another InferenceService instead")

# A loaded model: called with one tensor per manifest input, in manifest order.
Runnable = Callable[..., Any]
Loader = Callable[[Path, Manifest], Runnable]


class RepositoryObserver(Protocol):
    """Told about every change in what is loaded and how traffic splits (metrics gauges)."""

    def model_loaded(self, model: str, version: int, loaded: bool) -> None: ...

    def weights_changed(self, model: str, weights: Mapping[int, int]) -> None: ...


def load_exported(version_dir: Path, manifest: Manifest) -> Runnable:
    """Rebuild a ``torch.export`` program after refusing anything in it that would unpickle,
    then prepare it to run (``serving.core.runtime``: traced and frozen on CPU by default)."""
    return make_loader(RuntimeOptions())(version_dir, manifest)


def make_loader(options: RuntimeOptions, batching: BatchPolicy | None = None) -> Loader:
    """A loader that runs models as ``options`` say (device, precision, optimisation), for the
    batches ``batching`` forms (``serving.core.runtime.prepare``)."""

    def load(version_dir: Path, manifest: Manifest) -> Runnable:
        from kloop.modelfile import load_exported as load_checked

        return prepare(load_checked(version_dir / manifest.model_file), manifest, options,
                       batching)

    return load


@dataclasses.dataclass(frozen=True)
class LoadedVersion:
    model: str
    version: int
    manifest: Manifest
    runnable: Runnable


@dataclasses.dataclass
class _Model:
    versions: dict[int, LoadedVersion] = dataclasses.field(default_factory=dict)
    weights: dict[int, int] = dataclasses.field(default_factory=dict)


class ModelRepository:
    def __init__(
        self,
        registry: Registry | None,
        *,
        rng: random.Random | None = None,
        loader: Loader = load_exported,
        observer: RepositoryObserver | None = None,
    ) -> None:
        self.registry = registry  # None: one fixed version from a model directory (``load_dir``)
        self._rng = rng or random.Random()
        self._loader = loader
        self._observer = observer
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()
        # Bumped by every change of what is loaded or how traffic splits: a cache of routing
        # decisions (the native gRPC front end's fast lane) is current while it is unchanged.
        self.generation = 0

    # ---- reading -------------------------------------------------------------------------

    def models(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def versions(self, model: str) -> list[int]:
        with self._lock:
            return sorted(self._get_model(model).versions)

    def weights(self, model: str) -> dict[int, int]:
        with self._lock:
            return dict(sorted(self._get_model(model).weights.items()))

    def get(self, model: str, version: str | int) -> LoadedVersion:
        """A loaded version; ``ModelNotFound`` when the model or that version is not loaded."""
        with self._lock:
            return self._get_version(model, version)

    def route(self, model: str, version: str | None) -> LoadedVersion:
        """The version that serves a request: pinned if named, else drawn by weight."""
        with self._lock:
            if version:
                return self._get_version(model, version)
            m = self._get_model(model)
            sole = sole_version(m.weights)
            if sole is not None:  # one version takes everything (the steady state): no draw
                return m.versions[sole]
            candidates = [(v, w) for v, w in sorted(m.weights.items()) if w > 0]
            if not candidates:
                raise ModelNotFound(f"model {model!r} has no version carrying traffic")
            (chosen,) = self._rng.choices([v for v, _ in candidates], [w for _, w in candidates])
            return m.versions[chosen]

    # ---- changing ------------------------------------------------------------------------

    def load(self, model: str, version: int) -> LoadedVersion:
        """Verify and load one version from the registry. Blocking; idempotent.

        The first version of a model takes all its traffic (weight 100), later ones start at 0
        until ``set_weights`` gives them a share.
        """
        with self._lock:
            existing = self._models.get(model)
            if existing and version in existing.versions:
                return existing.versions[version]
        loaded = self._read(model, version)
        return self._add(loaded)

    def load_dir(self, version_dir: Path) -> LoadedVersion:
        """Verify and load the one version in ``version_dir`` (KServe's ``/mnt/models``): name
        and version come from its manifest, checked like a registry version. Blocking."""
        try:
            manifest = verify_dir(version_dir)
        except ArtifactCorrupt as e:
            raise ArtifactRejected(f"refusing to load {version_dir}: {e}") from e
        except (ArtifactError, ValueError) as e:
            raise ArtifactRejected(f"cannot read {version_dir}: {e}") from e
        return self._add(self._build(version_dir, manifest))

    def _add(self, loaded: LoadedVersion) -> LoadedVersion:
        model, version = loaded.model, loaded.version
        with self._lock:
            m = self._models.setdefault(model, _Model())
            m.versions.setdefault(version, loaded)
            self.generation += 1
            if not m.weights:
                m.weights = {version: TOTAL_WEIGHT}
            else:
                m.weights.setdefault(version, 0)
            weights = dict(m.weights)
        self._notify_loaded(model, version, True)
        self._notify_weights(model, weights)
        return loaded

    def unload(self, model: str, version: int) -> None:
        """Drop a version. Refused while it carries traffic, unless it is the model's last."""
        if self.registry is None:
            raise Conflict(f"{FIXED}: unloading its version is not applicable")
        with self._lock:
            m = self._get_model(model)
            self._get_version(model, version)
            if len(m.versions) > 1 and m.weights.get(version, 0) > 0:
                raise Conflict(
                    f"model {model!r} version {version} carries {m.weights[version]}% of the "
                    "traffic: move its weight to another version before unloading it"
                )
            del m.versions[version]
            self.generation += 1
            m.weights.pop(version, None)
            if not m.versions:
                del self._models[model]
            weights = dict(m.weights)
        self._notify_loaded(model, version, False)
        self._notify_weights(model, weights)

    def set_weights(self, model: str, weights: Mapping[str | int, int]) -> dict[int, int]:
        """Replace the traffic split. Every loaded version not named gets weight 0."""
        with self._lock:
            m = self._get_model(model)
            parsed: dict[int, int] = {}
            for key, weight in weights.items():
                v = _parse_version(key)
                if v is None or v not in m.versions:
                    raise InvalidInput(
                        f"weights name version {key!r} of model {model!r}, which is not loaded "
                        f"(loaded: {sorted(m.versions)})"
                    )
                if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                    raise InvalidInput(
                        f"weight of version {key} must be a non-negative integer, got {weight!r}"
                    )
                parsed[v] = weight
            total = sum(parsed.values())
            if total != TOTAL_WEIGHT:
                raise InvalidInput(f"weights must sum to {TOTAL_WEIGHT}, got {total}")
            m.weights = {v: parsed.get(v, 0) for v in sorted(m.versions)}
            self.generation += 1
            result = dict(m.weights)
        self._notify_weights(model, result)
        return result

    # ---- helpers -------------------------------------------------------------------------

    def _read(self, model: str, version: int) -> LoadedVersion:
        if self.registry is None:
            raise Conflict(f"{FIXED}: loading another version is not applicable")
        try:
            manifest = self.registry.verify(model, version)
        except VersionNotFound as e:
            raise ModelNotFound(str(e)) from e
        except ArtifactCorrupt as e:
            raise ArtifactRejected(f"refusing to load {model} v{version}: {e}") from e
        except (ArtifactError, ValueError) as e:
            raise ArtifactRejected(f"cannot read {model} v{version}: {e}") from e
        return self._build(self.registry.path(model, version), manifest)

    def _build(self, version_dir: Path, manifest: Manifest) -> LoadedVersion:
        model, version = manifest.name, manifest.version
        if manifest.format != SUPPORTED_FORMAT:
            raise ArtifactRejected(
                f"{model} v{version} is stored as {manifest.format!r}; this server loads only "
                f"{SUPPORTED_FORMAT!r}"
            )
        try:
            runnable = self._loader(version_dir, manifest)
        except Exception as e:  # torch raises many kinds; the cause is chained
            raise ArtifactRejected(f"{model} v{version}: the model file did not load: {e}") from e
        return LoadedVersion(model=model, version=version, manifest=manifest, runnable=runnable)

    def _get_model(self, model: str) -> _Model:
        m = self._models.get(model)
        if m is None:
            raise ModelNotFound(f"model {model!r} is not loaded")
        return m

    def _get_version(self, model: str, version: str | int) -> LoadedVersion:
        m = self._get_model(model)
        v = _parse_version(version)
        if v is None or v not in m.versions:
            raise ModelNotFound(
                f"model {model!r} has no loaded version {str(version)!r} (loaded: {sorted(m.versions)})"
            )
        return m.versions[v]

    def _notify_loaded(self, model: str, version: int, loaded: bool) -> None:
        if self._observer:
            self._observer.model_loaded(model, version, loaded)

    def _notify_weights(self, model: str, weights: Mapping[int, int]) -> None:
        if self._observer:
            self._observer.weights_changed(model, weights)


def sole_version(weights: Mapping[int, int]) -> int | None:
    """The version that takes all the traffic, if one does (then nothing is drawn)."""
    return next((v for v, w in weights.items() if w == TOTAL_WEIGHT), None)


def _parse_version(v: str | int) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    return int(v) if v.isascii() and v.isdigit() else None
