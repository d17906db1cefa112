"""Fakes owned by these tests: an in-memory stand-in for the model server's admin API that
exports real ``prometheus_client`` text with the server's exact metric names, and helpers to
publish manifests into a real registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kloop.artifact import Registry, TensorSpec

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class AdminError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


def metric_registry() -> tuple[CollectorRegistry, Counter, Counter, Histogram, Gauge]:
    reg = CollectorRegistry()
    labels = ["model", "version", "protocol"]
    req = Counter("kloop_inference_requests_total", "requests", labels, registry=reg)
    err = Counter("kloop_inference_errors_total", "errors", labels + ["code"], registry=reg)
    dur = Histogram("kloop_inference_request_duration_seconds", "latency", labels,
                    buckets=BUCKETS, registry=reg)
    weight = Gauge("kloop_model_traffic_weight", "weight", ["model", "version"], registry=reg)
    return reg, req, err, dur, weight


class FakeAdmin:
    """Loaded versions, weights and metrics of one server, in memory."""

    def __init__(self) -> None:
        self.loaded: dict[str, set[str]] = {}
        self.weights: dict[str, dict[str, int]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.down = False
        self._new_metrics()
        self.latency: dict[str, float] = {}  # version -> seconds per request
        self.error_rate: dict[str, float] = {}  # version -> fraction of 500s

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
        return {m: sorted(vs) for m, vs in self.loaded.items()}

    def load(self, m: str, v: str) -> None:
        self._check()
        self.calls.append(("load", m, v))
        self.loaded.setdefault(m, set()).add(v)
        self.weights.setdefault(m, {}).setdefault(v, 0)

    def unload(self, m: str, v: str) -> None:
        self._check()
        self.calls.append(("unload", m, v))
        if self.weights.get(m, {}).get(v, 0) > 0:
            raise AdminError(409, f"{m} v{v} takes traffic")
        self.loaded.get(m, set()).discard(v)
        self.weights.get(m, {}).pop(v, None)

    def traffic(self, m: str) -> dict[str, int]:
        self._check()
        if m not in self.loaded:
            raise AdminError(404, f"model {m} not found")
        return dict(self.weights.get(m, {}))

    def set_traffic(self, m: str, weights: dict[str, int]) -> None:
        self._check()
        self.calls.append(("set_traffic", m, dict(weights)))
        if sum(weights.values()) != 100 or set(weights) - self.loaded.get(m, set()):
            raise AdminError(400, f"bad weights {weights}")
        self.weights[m] = dict(weights)
        for v, w in weights.items():
            self.gauge.labels(m, v).set(w)

    def metrics_text(self) -> str:
        self._check()
        return generate_latest(self.reg).decode()

    # ---- traffic ------------------------------------------------------------------------
    def serve(self, m: str, v: str, n: int, *, errors: int = 0, latency: float = 0.004,
              protocol: str = "http", code: str = "500") -> None:
        self.req.labels(m, v, protocol).inc(n)
        if errors:
            self.err.labels(m, v, protocol, code).inc(errors)
        for _ in range(n):
            self.dur.labels(m, v, protocol).observe(latency)

    def drive(self, m: str, n: int) -> None:
        """``n`` requests split by the current weights, each version with its own behaviour."""
        for v, w in self.weights.get(m, {}).items():
            k = n * w // 100
            if k:
                self.serve(m, v, k, errors=round(k * self.error_rate.get(v, 0.0)),
                           latency=self.latency.get(v, 0.004))


def publish(registry: Registry, tmp: Path, model: str, accuracy: float | None,
            fingerprint: str = "fp-1") -> str:
    src = tmp / f"src-{model}-{len(registry.versions(model))}"
    src.mkdir(parents=True)
    (src / "model.pt2").write_bytes(b"weights")
    metrics = {} if accuracy is None else {"accuracy": accuracy}
    m = registry.publish(
        model, src, model_file="model.pt2", format="torch.export", torch_version="2.4",
        inputs=[TensorSpec("x", "FP32", (-1, 4))], outputs=[TensorSpec("y", "FP32", (-1, 3))],
        metrics=metrics, params={}, data_fingerprint=fingerprint, run_id="run",
    )
    return str(m.version)
