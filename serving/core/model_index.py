"""The model repository extension (Triton / KServe): index, load and unload by model name.

The extension speaks of models, kloop's repository of versions with traffic weights, so:

* index: every version of every model in the registry, ``READY`` when loaded, else
  ``UNAVAILABLE`` with the reason: ``unloaded``, or why its load was refused (its files failed
  verification, its model file did not load: ``Management.rejected``); a server serving one
  model directory lists its version.
* load: with no version asked for, a model that has a loaded version is left as it is, and one
  that has none gets its ``champion`` version (else its latest), which takes all its traffic
  as the first loaded version does. ``parameters.version`` (kloop's parameter) loads that
  version next to the others with weight 0, as the admin API does.
* unload: every loaded version of the model goes (traffic first moves to the last of them, so
  the repository's "never unload a version that carries traffic" rule still holds meanwhile).

Load and unload change what is served: the HTTP adapter guards them with the admin token.
"""

from __future__ import annotations

import dataclasses

from kloop.artifact import ArtifactError, check_name
from serving.core.errors import ArtifactRejected, Conflict, InvalidInput, ModelNotFound
from serving.core.management import Management
from serving.core.repository import FIXED

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str = ""


def index(management: Management, ready_only: bool = False) -> list[IndexEntry]:
    repo = management.repository
    loaded = {m: set(_loaded_versions(management, m)) for m in repo.models()}
    rejected = management.rejected()
    entries = []
    registry = repo.registry
    names = sorted(set(loaded) | set(rejected) | set(registry.models() if registry else ()))
    for name in names:
        on_disk = registry.versions(name) if registry else []
        refused = rejected.get(name, {})
        for v in sorted(set(on_disk) | loaded.get(name, set()) | set(refused)):
            if v in loaded.get(name, ()):
                entries.append(IndexEntry(name, str(v), READY))
            elif not ready_only:
                entries.append(IndexEntry(name, str(v), UNAVAILABLE, refused.get(v, "unloaded")))
    return entries


async def load(management: Management, model: str, version: str | int | None = None) -> list[int]:
    """Load as described in the module docstring; returns the model's loaded versions."""
    _check_name(model)
    if version is None:
        if _loaded_versions(management, model):
            return _loaded_versions(management, model)
        version = _default_version(management, model)
    await management.load(model, _version_number(version))
    return _loaded_versions(management, model)


def unload(management: Management, model: str) -> list[int]:
    """Unload every loaded version of ``model``; returns the versions unloaded."""
    _check_name(model)
    versions = _loaded_versions(management, model)
    if not versions:
        registry = management.repository.registry
        if registry is None or model not in registry.models():
            raise ModelNotFound(f"model {model!r} is not in the repository")
        return []
    last = versions[-1]
    if len(versions) > 1:
        management.set_weights(model, {last: 100})
    for v in versions[:-1]:
        management.unload(model, v)
    management.unload(model, last)
    return versions


def _loaded_versions(management: Management, model: str) -> list[int]:
    try:
        return management.repository.versions(model)
    except ModelNotFound:
        return []


def _default_version(management: Management, model: str) -> int:
    registry = management.repository.registry
    if registry is None:
        raise Conflict(f"{FIXED}: loading another model is not applicable")
    try:
        versions = registry.versions(model)
        if not versions:
            raise ModelNotFound(f"model {model!r} has no versions in the registry")
        return registry.alias(model, "champion") or versions[-1]
    except ValueError as e:  # an invalid model name
        raise InvalidInput(str(e)) from e
    except ArtifactError as e:
        raise ArtifactRejected(f"cannot read model {model!r}: {e}") from e


def _check_name(model: str) -> None:
    try:
        check_name(model)
    except ValueError as e:
        raise InvalidInput(str(e)) from e


def _version_number(version: str | int) -> int:
    text = str(version)
    if isinstance(version, bool) or not (text.isascii() and text.isdigit()):
        raise InvalidInput(f"version {version!r} is not a number")
    return int(text)
