"""Where live metrics come from: a scrape of each version's server, or PromQL.

Both sources answer the same question with the same quantities -- the CUMULATIVE counters of
``deploy.rollout.samples`` (requests, 5xx errors, latency buckets) per version -- so the analysis and
``decide`` stay one implementation whichever source a cluster has:

* ``ScrapeMetrics``: GET ``<url>/metrics`` of every version and parse it like the local
  backend does (clusters without Prometheus; tests).
* ``PromQLMetrics``: Prometheus's HTTP API (``/api/v1/query``), instant queries of the same
  counters summed over pods and protocols::

      sum by (version) (kloop_inference_requests_total{model="m"})
      sum by (version) (kloop_inference_errors_total{model="m",code=~"5.."})
      sum by (version, le) (kloop_inference_request_duration_seconds_bucket{model="m"})

  ``sum`` of raw counters (not ``rate``) is what ``deploy.rollout.delta`` expects: the window is
  ``now - baseline``. A pod that restarts (or scales in) lowers the sum, which ``delta`` reports
  as a counter reset: "could not measure", never "bad" -- the same rule as a local restart.

Both implement ``deploy.ports.MetricsSource`` and raise ``deploy.rollout.MetricsError`` when they
cannot measure (unreachable, bad answer).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from deploy.rollout import MetricsError, VersionSample, parse
from kloop.model_version import Version
from kloop.telemetry import CODE_LABEL, DURATION, ERRORS, MODEL_LABEL, REQUESTS, VERSION_LABEL


class ScrapeMetrics:
    """Scrape ``<url>/metrics`` of each version's own server."""

    def __init__(self, timeout: float = 5.0):
        self.timeout = timeout  # seconds per scrape

    def samples(self, model: str, versions: Mapping[Version, str | None],
                at: float) -> dict[Version, VersionSample]:
        out: dict[Version, VersionSample] = {}
        for version, url in sorted(versions.items()):
            if not url:
                raise MetricsError(f"{model} v{version}: no address to scrape yet")
            parsed = parse(_get(url.rstrip("/") + "/metrics", self.timeout), at)
            out[version] = parsed.get((model, version), VersionSample.zero(at))
        return out


class PromQLMetrics:
    """Instant PromQL queries against Prometheus's HTTP API."""

    def __init__(self, base_url: str, *, namespace: str | None = None, timeout: float = 5.0):
        """``namespace``: add ``namespace="..."`` to every selector, for a Prometheus that
        scrapes several namespaces serving the same model name (the label a ServiceMonitor or
        kubernetes_sd relabelling attaches)."""
        self.base_url = base_url.rstrip("/")
        self.namespace = namespace
        self.timeout = timeout

    def queries(self, model: str) -> dict[str, str]:
        sel = f'{MODEL_LABEL}="{escape(model)}"'
        if self.namespace is not None:
            sel += f',namespace="{escape(self.namespace)}"'
        v = VERSION_LABEL
        return {
            "requests": f"sum by ({v}) ({REQUESTS}{{{sel}}})",
            "errors": f'sum by ({v}) ({ERRORS}{{{sel},{CODE_LABEL}=~"5.."}})',
            "buckets": f"sum by ({v}, le) ({DURATION}_bucket{{{sel}}})",
        }

    def samples(self, model: str, versions: Mapping[Version, str | None],
                at: float) -> dict[Version, VersionSample]:
        q = self.queries(model)
        requests = _by_version(self.query(q["requests"]))
        errors = _by_version(self.query(q["errors"]))
        buckets: dict[Version, dict[float, float]] = {}
        for s in self.query(q["buckets"]):
            le = s.get("metric", {}).get("le")
            if le is None:
                raise MetricsError(f"PromQL answer without an 'le' label: {s}")
            version = _version(s)
            if version is not None:
                buckets.setdefault(version, {})[float(le)] = _value(s)
        return {
            v: VersionSample(requests=requests.get(v, 0.0), server_errors=errors.get(v, 0.0),
                             buckets=tuple(sorted(buckets.get(v, {}).items())), at=at)
            for v in versions
        }

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The ``result`` vector of one instant query; ``MetricsError`` on any failure."""
        url = f"{self.base_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            doc = json.loads(_get(url, self.timeout))
        except json.JSONDecodeError as e:
            raise MetricsError(f"Prometheus at {self.base_url} answered non-JSON: {e}") from e
        if doc.get("status") != "success":
            raise MetricsError(f"Prometheus query {promql!r} failed: "
                               f"{doc.get('errorType')}: {doc.get('error')}")
        data = doc.get("data", {})
        if data.get("resultType") != "vector":
            raise MetricsError(f"Prometheus query {promql!r}: expected a vector, "
                               f"got {data.get('resultType')}")
        return list(data.get("result", []))


def escape(value: str) -> str:
    """A PromQL double-quoted string's content: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _version(s: Mapping[str, Any]) -> Version | None:
    """The sample's version label as a number; None for a series that is not a version's."""
    label = str(s.get("metric", {}).get(VERSION_LABEL, ""))
    return int(label) if label.isascii() and label.isdecimal() else None


def _by_version(result: list[dict[str, Any]]) -> dict[Version, float]:
    out: dict[Version, float] = {}
    for s in result:
        version = _version(s)
        if version is not None:
            out[version] = _value(s)
    return out


def _value(s: Mapping[str, Any]) -> float:
    try:
        v = float(s["value"][1])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise MetricsError(f"PromQL sample without a value: {s}") from e
    if math.isnan(v):
        raise MetricsError(f"PromQL sample is NaN: {s}")
    return v


def _get(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            raw: bytes = resp.read()
            return raw.decode()
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")[:300]
        raise MetricsError(f"GET {url}: HTTP {e.code}: {body}") from e
    except (OSError, ValueError) as e:  # URLError, timeouts, refused, a malformed URL
        raise MetricsError(f"GET {url}: {type(e).__name__}: {e}") from e


__all__ = ["PromQLMetrics", "ScrapeMetrics", "escape"]
