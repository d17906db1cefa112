"""Prometheus metrics of the server, labelled by model and version so a canary's live analysis
can compare the candidate with the champion.

The names are a contract: the rollout controller parses them. They live in their OWN
``CollectorRegistry`` (not prometheus_client's global one) so two servers in one process (tests)
do not collide and nothing else in the process leaks into ``/metrics``.

* ``kloop_inference_requests_total{model,version,protocol}``: every infer request routed to a version
* ``kloop_inference_errors_total{model,version,protocol,code}``: of those, the failed ones;
  ``code`` is the HTTP status as a string, for both protocols
* ``kloop_inference_request_duration_seconds{model,version,protocol}``: latency histogram
* ``kloop_model_traffic_weight{model,version}``, ``kloop_model_loaded{model,version}``: gauges
* ``kloop_inference_queue_seconds{model,version}``: per request, from joining a version's queue
  to its forward pass starting (batching delay plus waiting for a worker thread)
* ``kloop_inference_compute_seconds{model,version}``: per forward pass (one per batch)
* ``kloop_inference_batch_size{model,version}``: rows per forward pass (1 for a model without a
  batch dimension)
* ``kloop_inference_inflight_requests``: admitted and not yet answered (queued ones included)
* ``kloop_inference_fast_lane_requests_total{model,version}``: of the gRPC requests, those the
  native front end's fast lane parsed and answered (serving.grpc_native); the rest took the
  general path

Requests that never reach a version (unknown model, version not loaded) are not counted: their
labels would come from the client, and unbounded label values would swell the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serving.core.errors import ServingError
from serving.errormap import http_status

# 20 log-spaced buckets from 0.5 ms to 10 s: resolves both a sub-millisecond model and a
# request stuck behind an injected delay.
DURATION_BUCKETS: tuple[float, ...] = tuple(
    float(f"{b:.3g}") for b in np.geomspace(0.0005, 10.0, num=20)
)
# Queue time is often far below a millisecond (a lone request runs at once): start at 20 us.
QUEUE_BUCKETS: tuple[float, ...] = tuple(
    float(f"{b:.3g}") for b in np.geomspace(0.00002, 10.0, num=24)
)
# Rows per forward pass: powers of two up to 4096 (the largest batch a -1 dim is exported for).
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(13))
CONTENT_TYPE = CONTENT_TYPE_LATEST
INFLIGHT_REFRESH_S = 1.0  # how often each worker of a group writes its in-flight count


class ServerMetrics:
    """Implements the dataplane's ``InferenceRecorder`` and the repository's observer."""

    def __init__(self, multiprocess: bool = False) -> None:
        """``multiprocess``: one of several worker processes sharing the ports; values then live
        in prometheus_client's per-process files (PROMETHEUS_MULTIPROC_DIR, set before the
        process imported prometheus_client) and every scrape sums them over the workers."""
        self.multiprocess = multiprocess
        self._inflight_fn: Callable[[], float] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kloop_inference_requests_total", "Inference requests routed to a model version.",
            ["model", "version", "protocol"], registry=self.registry,
        )
        self.errors = Counter(
            "kloop_inference_errors_total",
            "Inference requests routed to a model version that failed, by HTTP status code.",
            ["model", "version", "protocol", "code"], registry=self.registry,
        )
        self.duration = Histogram(
            "kloop_inference_request_duration_seconds",
            "Time from routing to response of an inference request.",
            ["model", "version", "protocol"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.weight = Gauge(
            "kloop_model_traffic_weight", "Share of unpinned traffic a version receives (0-100).",
            ["model", "version"], registry=self.registry, multiprocess_mode="livemax",
        )
        self.loaded = Gauge(
            "kloop_model_loaded", "1 while a version is loaded.",
            ["model", "version"], registry=self.registry, multiprocess_mode="livemax",
        )
        self.queue = Histogram(
            "kloop_inference_queue_seconds",
            "Time an inference request waited between joining the queue and its forward pass.",
            ["model", "version"], buckets=QUEUE_BUCKETS, registry=self.registry,
        )
        self.compute = Histogram(
            "kloop_inference_compute_seconds", "Duration of one forward pass (one batch).",
            ["model", "version"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "kloop_inference_batch_size", "Rows per forward pass (the executed batch's size).",
            ["model", "version"], buckets=BATCH_SIZE_BUCKETS, registry=self.registry,
        )
        self.fast_lane = Counter(
            "kloop_inference_fast_lane_requests_total",
            "gRPC inference requests parsed, batched and answered by the native front end's "
            "fast lane.", ["model", "version"], registry=self.registry,
        )
        # Label children by label values, cached: the hot path skips labels()' lock and lookup.
        self._request_children: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self._batch_children: dict[tuple[str, ...], tuple[Any, Any, Any]] = {}
        # The load signal an HPA scales a predictor on (KServe `autoscalerClass: external` with
        # kloop's own HPA): read at scrape time, so it is exact when sampled.
        self.inflight = Gauge(
            "kloop_inference_inflight_requests", "Inference requests admitted and not yet answered.",
            registry=self.registry, multiprocess_mode="livesum",
        )

    def observe(
        self, model: str, version: str, protocol: str, seconds: float, error: ServingError | None
    ) -> None:
        requests, duration = self._request_series(model, version, protocol)
        requests.inc()
        duration.observe(seconds)
        if error is not None:
            self.errors.labels(model, version, protocol, str(http_status(error))).inc()

    def observe_group(
        self, model: str, version: str, protocol: str, seconds: Sequence[float],
        error: ServingError | None,
    ) -> None:
        """A fast-lane group's requests, each counted as ``observe`` counts one."""
        requests, duration = self._request_series(model, version, protocol)
        requests.inc(len(seconds))
        for s in seconds:
            duration.observe(s)
        if error is not None:
            self.errors.labels(model, version, protocol, str(http_status(error))).inc(len(seconds))
        else:
            self.fast_lane.labels(model, version).inc(len(seconds))

    def _request_series(self, model: str, version: str, protocol: str) -> tuple[Any, Any]:
        """The request counter's and duration histogram's children for these labels, cached:
        labels() costs a lock and a dict walk, so once per label set."""
        key = (model, version, protocol)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(*key), self.duration.labels(*key))
        return children

    def observe_batch(
        self, model: str, version: str, rows: int, queue_seconds: Sequence[float],
        compute_seconds: float,
    ) -> None:
        key = (model, version)
        children = self._batch_children.get(key)
        if children is None:
            children = self._batch_children[key] = (
                self.queue.labels(*key), self.compute.labels(*key), self.batch_size.labels(*key))
        queue, compute, batch_size = children
        for seconds in queue_seconds:
            queue.observe(seconds)
        compute.observe(compute_seconds)
        batch_size.observe(rows)

    def model_loaded(self, model: str, version: int, loaded: bool) -> None:
        self.loaded.labels(model, str(version)).set(1 if loaded else 0)
        if not loaded:
            for cache in (self._request_children, self._batch_children):
                for key in [k for k in cache if k[:2] == (model, str(version))]:
                    del cache[key]
            try:
                self.weight.remove(model, str(version))
            except KeyError:
                pass

    def weights_changed(self, model: str, weights: Mapping[int, int]) -> None:
        for version, weight in weights.items():
            self.weight.labels(model, str(version)).set(weight)

    def track_inflight(self, fn: Callable[[], float]) -> None:
        """Report ``fn()`` as the in-flight gauge: read at scrape time in one process; with
        several workers, each one's value is written by ``refresh`` (the server calls it every
        INFLIGHT_REFRESH_S) and the scrape sums the live workers'."""
        self._inflight_fn = fn
        if not self.multiprocess:
            self.inflight.set_function(fn)

    def refresh(self) -> None:
        if self.multiprocess and self._inflight_fn is not None:
            self.inflight.set(self._inflight_fn())

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        self.refresh()
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
