"""Prometheus metrics of the server, labelled by model and version so a canary's live analysis
can compare the candidate with the champion.

The first four series are a contract (``kloop.telemetry``): the rollout analysis reads them.
They live in their OWN ``CollectorRegistry`` (not prometheus_client's global one) so two servers
in one process (tests) do not collide and nothing else in the process leaks into ``/metrics``.

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
  native front end's fast lane parsed and answered (serving.grpc.native.server); the rest took the
  general path

Requests that never reach a version (unknown model, version not loaded) are not counted: their
labels would come from the client, and unbounded label values would swell the registry.

Observations reach prometheus_client in bulk: the hot path appends each request's seconds (and
each batch's) to a list per series, and ``flush`` applies the lists, one update per series and
per histogram bucket touched, whenever the registry is collected (every scrape) and whenever
PENDING_MAX wait. Errors, which are rare, are counted at once. Applied one by one, a request
took about ten locked updates (counter, sums, buckets); switching the metrics off raised a fast
model's throughput on the gRPC fast lane at 8 clients by 9-15 %. With several worker processes
every observation is applied at once, since any worker may answer the scrape. The observe
methods are called from one thread, the event loop's (the dataplane's): what waits is not
locked.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kloop.telemetry import (
    CODE_LABEL,
    DURATION,
    ERRORS,
    MODEL_LABEL,
    PROTOCOL_LABEL,
    REQUESTS,
    VERSION_LABEL,
    WEIGHT,
)
from serving.core.errors import ServingError
from serving.core.types import WireProtocol
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
PENDING_MAX = 4096  # observations waiting before they are applied without a scrape


class _Flush(Collector):
    """Registered first, so collecting the registry applies the waiting observations before
    the metrics are read."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def collect(self) -> Iterable[Metric]:
        self._flush()
        return ()


class ServerMetrics:
    """Implements the dataplane's ``InferenceRecorder`` and the repository's observer."""

    def __init__(self, multiprocess: bool = False) -> None:
        """``multiprocess``: one of several worker processes sharing the ports; values then live
        in prometheus_client's per-process files (PROMETHEUS_MULTIPROC_DIR, set before the
        process imported prometheus_client) and every scrape sums them over the workers."""
        self.multiprocess = multiprocess
        self._inflight_fn: Callable[[], float] | None = None
        # What waits, by series: floats in a few long-lived lists (tuples or lists per
        # observation would be objects the garbage collector walks at every collection:
        # measured, that cost more than the locks saved).
        self._durations: dict[tuple[str, str, WireProtocol], list[float]] = {}
        self._lane: dict[tuple[str, str], int] = {}
        self._batches: dict[tuple[str, str], tuple[list[float], list[float], list[float]]] = {}
        self._pending = 0
        self._pending_max = 1 if multiprocess else PENDING_MAX
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Flush(self.flush))
        # The series a canary is judged on: names and labels from the shared contract.
        per_request = [MODEL_LABEL, VERSION_LABEL, PROTOCOL_LABEL]
        self.requests = Counter(
            REQUESTS, "Inference requests routed to a model version.", per_request,
            registry=self.registry,
        )
        self.errors = Counter(
            ERRORS, "Inference requests routed to a model version that failed, by HTTP status code.",
            [*per_request, CODE_LABEL], registry=self.registry,
        )
        self.duration = Histogram(
            DURATION, "Time from routing to response of an inference request.", per_request,
            buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.weight = Gauge(
            WEIGHT, "Share of unpinned traffic a version receives (0-100).",
            [MODEL_LABEL, VERSION_LABEL], registry=self.registry, multiprocess_mode="livemax",
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
        self, model: str, version: str, protocol: WireProtocol, seconds: float,
        error: ServingError | None,
    ) -> None:
        durations = self._durations.get((model, version, protocol))
        if durations is None:
            durations = self._durations[(model, version, protocol)] = []
        durations.append(seconds)
        if error is not None:  # rare: applied at once
            self.errors.labels(model, version, protocol, str(http_status(error))).inc()
        self._pending += 1
        if self._pending >= self._pending_max:
            self.flush()

    def observe_group(
        self, model: str, version: str, protocol: WireProtocol, seconds: Sequence[float],
        error: ServingError | None,
    ) -> None:
        """A fast-lane group's requests, each counted as ``observe`` counts one."""
        durations = self._durations.get((model, version, protocol))
        if durations is None:
            durations = self._durations[(model, version, protocol)] = []
        durations.extend(seconds)
        if error is not None:
            self.errors.labels(model, version, protocol, str(http_status(error))).inc(len(seconds))
        else:
            self._lane[(model, version)] = self._lane.get((model, version), 0) + len(seconds)
        self._pending += len(seconds)
        if self._pending >= self._pending_max:
            self.flush()

    def observe_batch(
        self, model: str, version: str, rows: int, queue_seconds: Sequence[float],
        compute_seconds: float,
    ) -> None:
        pending = self._batches.get((model, version))
        if pending is None:
            pending = self._batches[(model, version)] = ([], [], [])
        queued, computed, sizes = pending
        queued.extend(queue_seconds)
        computed.append(compute_seconds)
        sizes.append(float(rows))
        self._pending += len(queue_seconds)
        if self._pending >= self._pending_max:
            self.flush()

    def flush(self) -> None:
        """Apply the waiting observations: one update per series, and per histogram bucket."""
        durations, self._durations = self._durations, {}
        lane, self._lane = self._lane, {}
        batches, self._batches = self._batches, {}
        self._pending = 0
        for key, values in durations.items():
            counter, histogram = self._request_series(key)
            counter.inc(len(values))
            _observe_all(histogram, values)
        for (model, version), count in lane.items():
            self.fast_lane.labels(model, version).inc(count)
        for labels, observed in batches.items():
            for histogram, values in zip(self._batch_series(labels), observed, strict=True):
                _observe_all(histogram, values)

    def _request_series(self, key: tuple[str, str, WireProtocol]) -> tuple[Any, Any]:
        """The request counter's and duration histogram's children for these labels, cached:
        labels() costs a lock and a dict walk, so once per label set."""
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(*key), self.duration.labels(*key))
        return children

    def _batch_series(self, key: tuple[str, str]) -> tuple[Any, Any, Any]:
        children = self._batch_children.get(key)
        if children is None:
            children = self._batch_children[key] = (
                self.queue.labels(*key), self.compute.labels(*key), self.batch_size.labels(*key))
        return children

    def model_loaded(self, model: str, version: int, loaded: bool) -> None:
        self.loaded.labels(model, str(version)).set(1 if loaded else 0)
        if not loaded:
            self.flush()  # its last observations, before its cached series are forgotten
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
        self.flush()
        if not self.multiprocess:
            return generate_latest(self.registry)
        self.refresh()
        from prometheus_client import multiprocess

        # prometheus_client leaves this constructor unannotated: typed here, where it is used.
        collect_workers: Callable[[CollectorRegistry], object] = (
            multiprocess.MultiProcessCollector)
        merged = CollectorRegistry()
        collect_workers(merged)  # registers itself: collecting merged sums the workers' files
        return generate_latest(merged)


def _observe_all(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each of ``values``, with one update per bucket touched and
    one of the sum. It works on the child's ``_upper_bounds``, ``_buckets`` and ``_sum`` as
    prometheus_client's own ``observe`` does (a value goes to the first bucket whose bound is
    at least the value); tests/component/serving/test_runtime.py checks the two agree."""
    if not values:
        return
    bounds = histogram._upper_bounds
    for index, count in collections.Counter(bisect.bisect_left(bounds, v) for v in values).items():
        histogram._buckets[index].inc(count)
    histogram._sum.inc(sum(values))
