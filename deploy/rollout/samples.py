"""Per-version request, error and latency samples read from the model server's Prometheus text.

Why a sample and a delta instead of rates: the controller scrapes ``/metrics`` itself (no
Prometheus needed locally), so it keeps the counters it saw when a rollout step began (the
*baseline*) and judges the window ``now - baseline``. Counters only go up; if one went down,
the server restarted and the window is lost, so ``delta`` raises ``CounterReset`` and analysis
calls that "could not measure" (an ``error`` verdict), never a failure.

Label handling follows the server's contract (``kloop.telemetry``):

* ``kloop_inference_requests_total{model,version,protocol}``: summed over protocols;
* ``kloop_inference_errors_total{model,version,protocol,code}``: only ``code >= 500`` counts
  (4xx are the client's fault); a non-numeric code is ignored rather than guessed at;
* ``kloop_inference_request_duration_seconds_bucket{...,le}``: buckets summed over protocols.

A version the server has loaded but never served has no series at all (``prometheus_client``
exports a labelled child only once it is touched), so ``samples_for`` reports it as a measured
zero, not as missing. Parsing text is pure: nothing here reads a socket or a clock.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kloop.model_version import Version
from kloop.telemetry import CODE_LABEL, DURATION, ERRORS, MODEL_LABEL, REQUESTS, VERSION_LABEL

Buckets = tuple[tuple[float, float], ...]
"""Cumulative histogram buckets: ``(upper bound in seconds, count <= bound)``, sorted, ending
with ``+Inf``."""


class MetricsError(Exception):
    """The metrics could not be read or do not make sense (unparseable text, counter reset)."""


class CounterReset(MetricsError):
    """A counter went down between two samples: the server restarted, the window is lost."""


@dataclasses.dataclass(frozen=True)
class VersionSample:
    """Cumulative counters of one (model, version) at one scrape."""

    requests: float
    server_errors: float
    buckets: Buckets
    at: float  # unix seconds of the scrape (the controller's clock)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "server_errors": self.server_errors,
            "buckets": [[_le_str(le), n] for le, n in self.buckets],
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VersionSample:
        return cls(
            requests=float(d["requests"]),
            server_errors=float(d["server_errors"]),
            buckets=tuple((float(le), float(n)) for le, n in d["buckets"]),
            at=float(d["at"]),
        )

    @classmethod
    def zero(cls, at: float) -> VersionSample:
        return cls(requests=0.0, server_errors=0.0, buckets=(), at=at)


@dataclasses.dataclass(frozen=True)
class VersionDelta:
    """What one version did in a window: counts, not rates, so small windows stay honest."""

    requests: float
    server_errors: float
    buckets: Buckets
    seconds: float

    @property
    def error_rate(self) -> float | None:
        return self.server_errors / self.requests if self.requests > 0 else None


def _le_str(le: float) -> str:
    return "+Inf" if math.isinf(le) else repr(le)


def parse(text: str, at: float) -> dict[tuple[str, Version], VersionSample]:
    """Every (model, version) with at least one kloop series in ``text``; a series whose
    version label is not a version number is not kloop's and is skipped.

    Raises ``MetricsError`` when the text is not Prometheus exposition format.
    """
    requests: dict[tuple[str, Version], float] = {}
    errors: dict[tuple[str, Version], float] = {}
    buckets: dict[tuple[str, Version], dict[float, float]] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError) as e:
        raise MetricsError(f"metrics text is not Prometheus exposition format: {e}") from e
    for family in families:
        for s in family.samples:
            model, version = s.labels.get(MODEL_LABEL, ""), s.labels.get(VERSION_LABEL, "")
            if not model or not (version.isascii() and version.isdecimal()):
                continue
            key = (model, int(version))
            if s.name == REQUESTS:
                requests[key] = requests.get(key, 0.0) + s.value
            elif s.name == ERRORS:
                errors.setdefault(key, 0.0)
                if _is_server_error(s.labels.get(CODE_LABEL, "")):
                    errors[key] += s.value
            elif s.name == DURATION + "_bucket":
                le = float(s.labels["le"])
                per = buckets.setdefault(key, {})
                per[le] = per.get(le, 0.0) + s.value
    keys = set(requests) | set(errors) | set(buckets)
    return {
        k: VersionSample(
            requests=requests.get(k, 0.0),
            server_errors=errors.get(k, 0.0),
            buckets=tuple(sorted(buckets.get(k, {}).items())),
            at=at,
        )
        for k in keys
    }


def samples_for(
    text: str, model: str, versions: Iterable[Version], at: float
) -> dict[Version, VersionSample]:
    """Samples of ``model``'s ``versions``; a version with no series is a measured zero."""
    parsed = parse(text, at)
    return {v: parsed.get((model, v), VersionSample.zero(at)) for v in versions}


def _is_server_error(code: str) -> bool:
    try:
        return int(code) >= 500
    except ValueError:
        return False


def delta(now: VersionSample, baseline: VersionSample) -> VersionDelta:
    """``now - baseline``; raises ``CounterReset`` if any counter went down."""
    if now.requests < baseline.requests or now.server_errors < baseline.server_errors:
        raise CounterReset(
            f"counters went down (requests {baseline.requests:g} -> {now.requests:g}, "
            f"errors {baseline.server_errors:g} -> {now.server_errors:g}): the server restarted"
        )
    base = dict(baseline.buckets)
    out: list[tuple[float, float]] = []
    for le, n in now.buckets:
        d = n - base.get(le, 0.0)
        if d < 0:
            raise CounterReset(f"histogram bucket le={_le_str(le)} went down: the server restarted")
        out.append((le, d))
    if set(base) - {le for le, _ in now.buckets} and any(base.values()):
        raise CounterReset("histogram buckets disappeared: the server restarted")
    return VersionDelta(
        requests=now.requests - baseline.requests,
        server_errors=now.server_errors - baseline.server_errors,
        buckets=tuple(out),
        seconds=now.at - baseline.at,
    )


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q``-quantile of cumulative ``buckets``, like PromQL's ``histogram_quantile``.

    Linear interpolation inside the bucket holding the rank; the first bucket starts at 0;
    a rank in the ``+Inf`` bucket returns the highest finite bound (the most the histogram
    can say). ``None`` when there are no observations (PromQL's NaN), so callers must decide
    what "no data" means instead of comparing against NaN.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is not in [0, 1]")
    bs = sorted(buckets)
    if len(bs) < 2 or not math.isinf(bs[-1][0]):
        return None
    total = bs[-1][1]
    if total <= 0:
        return None
    rank = q * total
    for i, (le, count) in enumerate(bs):
        if count >= rank:
            break
    if math.isinf(le):
        return bs[-2][0]
    lower, below = (0.0, 0.0) if i == 0 else bs[i - 1]
    if i == 0 and le <= 0:
        return le
    in_bucket = count - below
    if in_bucket <= 0:
        return le
    return lower + (le - lower) * (rank - below) / in_bucket
