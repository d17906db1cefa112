"""A fake world for the rollout's fault-injection suite: one model server with the real
server's rules, a real registry on disk, faults injected tick by tick on a fake clock.

``FakeServer`` stands in for what cannot run in a unit test (the model server process), and
keeps the rules the controller depends on, as ``serving.core.repository`` and ``serving.app``
have them:

* a load verifies the version's files (sha256, from the real registry): 422 when they do not
  match, 404 when the version is not in the registry; the first version of a model takes all
  its traffic;
* weights name loaded versions only and sum to 100; versions not named get 0;
* a version carrying traffic is not unloaded, unless it is the model's last;
* a start (and a restart) loads the ``champion`` alias, else the latest version; a version that
  fails verification falls back to the newest older one that loads; counters start at zero;
* ``down``: every call fails to connect; ``refusing``: every write answers that status (403
  management disabled, 409 several workers).

Metrics are real ``prometheus_client`` text with the server's metric names (``tests.support.
fakes.metric_registry``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prometheus_client import generate_latest

from kloop.artifact import ArtifactError, Registry, VersionNotFound
from kloop.model_version import Version
from tests.support.fakes import AdminError, metric_registry


class FakeServer:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.loaded: dict[str, set[Version]] = {}
        self.weights: dict[str, dict[Version, int]] = {}
        self.down = False
        self.refusing: int | None = None
        self.error_rate: dict[Version, float] = {}
        self.start()

    # ---- the process ------------------------------------------------------------------

    def start(self) -> None:
        """What ``kloop serve`` loads at start (``serving.app.Server._load_initial``)."""
        self.loaded, self.weights = {}, {}
        self.reg, self.req, self.err, self.dur, self.gauge = metric_registry()
        for model in self.registry.models():
            versions = self.registry.versions(model)
            wanted = self.registry.alias(model, "champion") or versions[-1]
            for v in [wanted, *(v for v in reversed(versions) if v < wanted)]:
                if self._verifies(model, v):
                    self.loaded[model] = {v}
                    self.weights[model] = {v: 100}
                    break

    def restart(self) -> None:
        self.start()

    def served(self, model: str) -> dict[Version, int]:
        """The weights that route requests now (zero entries dropped)."""
        return {v: w for v, w in sorted(self.weights.get(model, {}).items()) if w}

    # ---- the admin API (serving.client.AdminClient's surface) -------------------------

    def models(self) -> dict[str, list[str]]:
        self._reachable()
        return {m: [str(v) for v in sorted(vs)] for m, vs in self.loaded.items()}

    def load(self, m: str, v: Version) -> None:
        self._writable()
        try:
            self.registry.verify(m, v)
        except VersionNotFound as e:
            raise AdminError(404, str(e)) from e
        except ArtifactError as e:
            raise AdminError(422, f"refusing to load {m} v{v}: {e}") from e
        first = not self.loaded.get(m)
        self.loaded.setdefault(m, set()).add(v)
        self.weights.setdefault(m, {}).setdefault(v, 100 if first else 0)

    def unload(self, m: str, v: Version) -> None:
        self._writable()
        if v not in self.loaded.get(m, set()):
            raise AdminError(404, f"{m} v{v} is not loaded")
        if len(self.loaded[m]) > 1 and self.weights[m].get(v, 0) > 0:
            raise AdminError(409, f"{m} v{v} carries {self.weights[m][v]}% of the traffic")
        self.loaded[m].discard(v)
        self.weights[m].pop(v, None)
        if not self.loaded[m]:
            del self.loaded[m], self.weights[m]

    def traffic(self, m: str) -> dict[Version, int]:
        self._reachable()
        if m not in self.loaded:
            raise AdminError(404, f"model {m!r} is not loaded")
        return dict(self.weights[m])

    def set_traffic(self, m: str, weights: Mapping[Version, int]) -> None:
        self._writable()
        if m not in self.loaded:
            raise AdminError(404, f"model {m!r} is not loaded")
        if set(weights) - self.loaded[m] or sum(weights.values()) != 100:
            raise AdminError(400, f"bad weights {dict(weights)} (loaded {sorted(self.loaded[m])})")
        self.weights[m] = {v: int(weights.get(v, 0)) for v in sorted(self.loaded[m])}
        for v, w in self.weights[m].items():
            self.gauge.labels(m, str(v)).set(w)

    def metrics_text(self) -> str:
        self._reachable()
        return generate_latest(self.reg).decode()

    # ---- traffic ----------------------------------------------------------------------

    def drive(self, m: str, n: int) -> dict[Version, int]:
        """``n`` requests split by the weights; returns who answered how many."""
        answered: dict[Version, int] = {}
        for v, w in self.served(m).items():
            k = n * w // 100
            if k:
                errors = round(k * self.error_rate.get(v, 0.0))
                self.req.labels(m, str(v), "http").inc(k)
                if errors:
                    self.err.labels(m, str(v), "http", "500").inc(errors)
                for _ in range(k):
                    self.dur.labels(m, str(v), "http").observe(0.004)
                answered[v] = k
        return answered

    # ---- helpers ----------------------------------------------------------------------

    def _verifies(self, m: str, v: Version) -> bool:
        try:
            self.registry.verify(m, v)
        except ArtifactError:
            return False
        return True

    def _reachable(self) -> None:
        if self.down:
            raise ConnectionRefusedError("connection refused")

    def _writable(self) -> None:
        self._reachable()
        if self.refusing is not None:
            raise AdminError(self.refusing, "management refused (injected)")


def corrupt(registry: Registry, model: str, version: Version) -> None:
    """Flip one byte of the version's model file, as a disk or a hand might."""
    path = Path(registry.path(model, version)) / "model.pt2"
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
