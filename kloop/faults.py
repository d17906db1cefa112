"""A fault injected into one model version's requests: the management API's contract.

The server applies it (``serving.core.faults``), the pipeline and chaos tests ask for it
(``serving.client.AdminClient.set_fault``); both use this one definition. It exists so a
canary's live analysis can be shown and tested rolling back a version whose offline metrics
looked fine, the way Istio's fault injection is used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

MAX_EXTRA_LATENCY_MS = 60_000.0


@dataclasses.dataclass(frozen=True)
class Fault:
    """``error_rate``: share of the version's requests that fail with a server error, 0..1;
    ``extra_latency_ms``: added before the model runs, 0..60000 ms. ``ValueError`` otherwise
    (a bool or a string is not a number here: nothing is coerced)."""

    error_rate: float = 0.0
    extra_latency_ms: float = 0.0

    def __post_init__(self) -> None:
        _number("error_rate", self.error_rate, 0.0, 1.0)
        _number("extra_latency_ms", self.extra_latency_ms, 0.0, MAX_EXTRA_LATENCY_MS)

    def to_dict(self) -> dict[str, float]:
        return {"error_rate": self.error_rate, "extra_latency_ms": self.extra_latency_ms}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fault:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown fault field(s) {sorted(unknown)}")
        return cls(**d)


def _number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
