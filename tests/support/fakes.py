"""Fakes owned by these tests: a clock that moves only when told, an in-memory stand-in for the
model server's admin API that exports real ``prometheus_client`` text with the server's exact
metric names (``kloop.telemetry``), and a helper to publish manifests into a real registry."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kloop.artifact import Registry, TensorSpec
from kloop.model_version import Version
from kloop.telemetry import DURATION, ERRORS, REQUESTS, WEIGHT

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class FakeClock:
    """Time that moves only when told: ``sleep`` advances it instantly (``deploy.ports.Clock``)."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.t += seconds


class AdminError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


def metric_registry() -> tuple[CollectorRegistry, Counter, Counter, Histogram, Gauge]:
    reg = CollectorRegistry()
    labels = ["model", "version", "protocol"]
    req = Counter(REQUESTS, "requests", labels, registry=reg)
    err = Counter(ERRORS, "errors", labels + ["code"], registry=reg)
    dur = Histogram(DURATION, "latency", labels, buckets=BUCKETS, registry=reg)
    weight = Gauge(WEIGHT, "weight", ["model", "version"], registry=reg)
    return reg, req, err, dur, weight


class FakeAdmin:
    """Loaded versions, weights and metrics of one server, in memory (``serving.client.
    AdminClient``'s surface; the metrics as the server exports them, versions as label text)."""

    def __init__(self) -> None:
        self.loaded: dict[str, set[Version]] = {}
        self.weights: dict[str, dict[Version, int]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.down = False
        self._new_metrics()
        self.latency: dict[Version, float] = {}  # version -> seconds per request
        self.error_rate: dict[Version, float] = {}  # version -> fraction of 500s

    def _new_metrics(self) -> None:
        self.reg, self.req, self.err, self.dur, self.gauge = metric_registry()

    def restart(self) -> None:
        """Counters start again from zero, as after a server restart."""
        self._new_metrics()

    def _check(self) -> None:
        if self.down:
            raise ConnectionRefusedError("connection refused")

    # ---- the admin API ------------------------------------------------------------------
    def models(self) -> dict[str, list[str]]:
        self._check()
        return {m: [str(v) for v in sorted(vs)] for m, vs in self.loaded.items()}  # JSON's view

    def load(self, m: str, v: Version) -> None:
        self._check()
        self.calls.append(("load", m, v))
        self.loaded.setdefault(m, set()).add(v)
        self.weights.setdefault(m, {}).setdefault(v, 0)

    def unload(self, m: str, v: Version) -> None:
        self._check()
        self.calls.append(("unload", m, v))
        if self.weights.get(m, {}).get(v, 0) > 0:
            raise AdminError(409, f"{m} v{v} takes traffic")
        self.loaded.get(m, set()).discard(v)
        self.weights.get(m, {}).pop(v, None)

    def traffic(self, m: str) -> dict[Version, int]:
        self._check()
        if m not in self.loaded:
            raise AdminError(404, f"model {m} not found")
        return dict(self.weights.get(m, {}))

    def set_traffic(self, m: str, weights: Mapping[Version, int]) -> None:
        self._check()
        self.calls.append(("set_traffic", m, dict(weights)))
        if sum(weights.values()) != 100 or set(weights) - self.loaded.get(m, set()):
            raise AdminError(400, f"bad weights {weights}")
        self.weights[m] = dict(weights)
        for v, w in weights.items():
            self.gauge.labels(m, str(v)).set(w)

    def metrics_text(self) -> str:
        self._check()
        return generate_latest(self.reg).decode()

    # ---- traffic ------------------------------------------------------------------------
    def serve(self, m: str, v: Version, n: int, *, errors: int = 0, latency: float = 0.004,
              protocol: str = "http", code: str = "500") -> None:
        self.req.labels(m, str(v), protocol).inc(n)
        if errors:
            self.err.labels(m, str(v), protocol, code).inc(errors)
        for _ in range(n):
            self.dur.labels(m, str(v), protocol).observe(latency)

    def drive(self, m: str, n: int) -> None:
        """``n`` requests split by the current weights, each version with its own behaviour."""
        for v, w in self.weights.get(m, {}).items():
            k = n * w // 100
            if k:
                self.serve(m, v, k, errors=round(k * self.error_rate.get(v, 0.0)),
                           latency=self.latency.get(v, 0.004))


def publish(registry: Registry, tmp: Path, model: str, accuracy: float | None,
            fingerprint: str = "fp-1") -> Version:
    src = tmp / f"src-{model}-{len(registry.versions(model))}"
    src.mkdir(parents=True)
    (src / "model.pt2").write_bytes(b"weights")
    metrics = {} if accuracy is None else {"accuracy": accuracy}
    m = registry.publish(
        model, src, model_file="model.pt2", format="torch.export", torch_version="2.4",
        inputs=[TensorSpec("x", "FP32", (-1, 4))], outputs=[TensorSpec("y", "FP32", (-1, 3))],
        metrics=metrics, params={}, data_fingerprint=fingerprint, run_id="run",
    )
    return m.version
